//! Where command results go: stdout, as text or JSON, honouring `--quiet`.

use std::io::Write;

use serde::Serialize;

/// A command's view of stdout.
pub struct Output {
    /// `--json` was given.
    pub json: bool,
    /// `-q` was given: only results, no commentary.
    pub quiet: bool,
    stdout: std::io::Stdout,
}

impl Output {
    /// An output for the given global flags.
    pub fn new(json: bool, quiet: bool) -> Self {
        Output {
            json,
            quiet,
            stdout: std::io::stdout(),
        }
    }

    /// Prints a result line (always printed, also with `-q`).
    pub fn line(&mut self, text: impl std::fmt::Display) -> std::io::Result<()> {
        writeln!(self.stdout.lock(), "{text}")
    }

    /// Prints text as is.
    pub fn text(&mut self, text: &str) -> std::io::Result<()> {
        self.stdout.lock().write_all(text.as_bytes())
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
        let mut lock = self.stdout.lock();
        serde_json::to_writer_pretty(&mut lock, value)?;
        writeln!(lock)
    }
}
