//! Where command results go: stdout, as text or JSON, honouring `--quiet`. With `--json`
//! a command writes exactly one JSON document: its own (through [`Output::json_value`]),
//! or — for a command that has only lines to say, or that failed — the one [`Output::finish`]
//! writes from them.

use std::io::Write;

use serde::Serialize;

/// A reader that went away (`berth status | head`) is no reason to stop the work (a
/// release halfway through): what it no longer reads is dropped.
fn closed(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// A command's view of stdout.
pub struct Output {
    /// `--json` was given.
    pub json: bool,
    /// `-q` was given: only results, no commentary.
    pub quiet: bool,
    /// Results go to stderr instead (a command run as one step of another, whose own
    /// result is what stdout carries).
    to_stderr: bool,
    /// With `--json`: whether the command's document was written.
    printed: bool,
    /// With `--json`: the lines the command said instead of a document.
    lines: Vec<String>,
}

impl Output {
    /// An output for the given global flags.
    pub fn new(json: bool, quiet: bool) -> Self {
        Output {
            json,
            quiet,
            to_stderr: false,
            printed: false,
            lines: Vec::new(),
        }
    }

    /// An output whose results go to stderr (`deploy` running `build`: with `--json`,
    /// stdout holds the deploy's one document and nothing else).
    pub fn stderr(quiet: bool) -> Self {
        Output {
            to_stderr: true,
            ..Output::new(false, quiet)
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.to_stderr {
            closed(std::io::stderr().lock().write_all(bytes))
        } else if self.json {
            // Kept for the one document `finish` writes.
            let text = String::from_utf8_lossy(bytes);
            self.lines
                .extend(text.lines().map(str::to_string).filter(|l| !l.is_empty()));
            Ok(())
        } else {
            closed(std::io::stdout().lock().write_all(bytes))
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

    /// Prints a value as pretty JSON: the command's one document.
    pub fn json_value<T: Serialize>(&mut self, value: &T) -> std::io::Result<()> {
        let mut text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
        text.push(b'\n');
        if self.to_stderr {
            return closed(std::io::stderr().lock().write_all(&text));
        }
        debug_assert!(!self.printed, "a command writes one JSON document");
        self.printed = true;
        closed(std::io::stdout().lock().write_all(&text))
    }

    /// The command streamed JSON Lines itself (`logs -f --json`): no other document.
    pub fn streamed(&mut self) {
        self.printed = true;
    }

    /// Whether the command wrote its document (with `--json`).
    pub fn printed(&self) -> bool {
        self.printed
    }

    /// With `--json`, when the command wrote no document of its own: one from what it
    /// said (`lines`) and how it ended (`error`, the exit code).
    pub fn finish(&mut self, error: Option<(&str, u8)>) -> std::io::Result<()> {
        if !self.json || self.printed || self.to_stderr {
            return Ok(());
        }
        let doc = serde_json::json!({
            "ok": error.is_none(),
            "lines": self.lines,
            "error": error.map(|(m, _)| m),
            "exit_code": error.map_or(0, |(_, c)| c),
        });
        self.json_value(&doc)
    }
}
