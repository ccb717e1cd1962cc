//! Where command results go: stdout, as text or JSON, honouring `--quiet`.

use std::io::Write;

use serde::Serialize;

/// A command's view of stdout.
pub struct Output {
    /// `--json` was given.
    pub json: bool,
    /// `-q` was given: only results, no commentary.
    pub quiet: bool,
    /// Results go to stderr instead (a command run as one step of another, whose own
    /// result is what stdout carries).
    to_stderr: bool,
}

impl Output {
    /// An output for the given global flags.
    pub fn new(json: bool, quiet: bool) -> Self {
        Output {
            json,
            quiet,
            to_stderr: false,
        }
    }

    /// An output whose results go to stderr (`deploy` running `build`: with `--json`,
    /// stdout holds the deploy's one document and nothing else).
    pub fn stderr(quiet: bool) -> Self {
        Output {
            json: false,
            quiet,
            to_stderr: true,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.to_stderr {
            std::io::stderr().lock().write_all(bytes)
        } else {
            std::io::stdout().lock().write_all(bytes)
        }
    }

    /// Prints a result line (always printed, also with `-q`).
    pub fn line(&mut self, text: impl std::fmt::Display) -> std::io::Result<()> {
        self.write(format!("{text}\n").as_bytes())
    }

    /// Prints text as is.
    pub fn text(&mut self, text: &str) -> std::io::Result<()> {
        self.write(text.as_bytes())
    }

    /// Prints commentary (suppressed by `-q`).
    pub fn note(&mut self, text: impl std::fmt::Display) -> std::io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        self.line(text)
    }

    /// Prints a value as pretty JSON.
    pub fn json_value<T: Serialize>(&mut self, value: &T) -> std::io::Result<()> {
        let mut text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
        text.push(b'\n');
        self.write(&text)
    }
}
