//! The integration-test harness: a temp project directory and a `berth` command builder,
//! so each test reads as a short scenario.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary project directory, removed when dropped.
pub struct TempProject {
    dir: tempfile::TempDir,
}

impl TempProject {
    /// An empty project directory.
    pub fn new() -> Self {
        TempProject {
            dir: tempfile::tempdir().expect("create temp dir"),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file (creating parent directories), returning `self` for chaining.
    pub fn file(&self, rel: &str, text: &str) -> &Self {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        self
    }

    /// Reads a file.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).unwrap()
    }

    /// A `berth` command run in this project (`-C DIR`) with its own store.
    pub fn berth(&self) -> Berth {
        let mut b = Berth::new();
        b.cmd.arg("-C").arg(self.path());
        b.cmd.env("BERTH_STORE", self.path().join(".store"));
        b
    }
}

/// A `berth` command under construction.
pub struct Berth {
    cmd: Command,
}

/// What a finished `berth` run produced.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Berth {
    /// The `berth` binary built for these tests, with a clean environment for colour.
    pub fn new() -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.env("NO_COLOR", "1");
        Berth { cmd }
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.cmd.env(k, v);
        self
    }

    /// Runs to completion.
    pub fn run(mut self) -> Run {
        let Output {
            status,
            stdout,
            stderr,
        } = self.cmd.output().expect("run berth");
        Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

impl Run {
    /// Asserts the exit code, showing both streams on failure.
    #[track_caller]
    pub fn code(self, expected: i32) -> Self {
        assert_eq!(
            self.code, expected,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts success.
    #[track_caller]
    pub fn ok(self) -> Self {
        self.code(0)
    }
}

/// The repository root (holds the demo app).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
