//! Container logs, in Docker's json-file format: one JSON object per line with the time
//! (RFC 3339, nanoseconds), the stream and the text. Files rotate by size
//! (`container.log`, `.1`, `.2`, oldest dropped); readers see the rotated files first.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Size at which the log rotates.
pub const MAX_SIZE: u64 = 10 * 1024 * 1024;
/// Rotated files kept besides the current one.
pub const KEEP: usize = 2;
/// Longest line kept whole; longer output is split.
const MAX_LINE: usize = 16 * 1024;

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The line (with its newline, when it had one).
    pub log: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// When it was read (RFC 3339).
    pub time: String,
}

/// The current log file of a container directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("container.log")
}

fn rotated(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("container.log.{n}"))
}

/// Appends lines to a container's log, rotating it by size.
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    partial: [Vec<u8>; 2],
}

/// Opens a log for appending, created 0640: what a container, a supervisor or a router
/// prints is for root and the host's admin group, not for every user on the host. A log
/// an older berth left world-readable is narrowed.
pub fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = File::options()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o027 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777 & !0o027))?;
    }
    Ok(file)
}

impl LogWriter {
    /// Opens (appends to) the log of `dir`.
    pub fn open(dir: &Path) -> io::Result<LogWriter> {
        Self::with_max_size(dir, MAX_SIZE)
    }

    /// As [`LogWriter::open`] with a rotation size.
    pub fn with_max_size(dir: &Path, max_size: u64) -> io::Result<LogWriter> {
        let file = open_append(&log_path(dir))?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            file,
            size,
            max_size,
            partial: [Vec::new(), Vec::new()],
        })
    }

    /// Adds output of stream 0 (stdout) or 1 (stderr); complete lines are written.
    pub fn write(&mut self, stream: usize, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.partial[stream].len();
            let (take, line_done) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) if i < room => (i + 1, true),
                _ if bytes.len() >= room => (room, true),
                _ => (bytes.len(), false),
            };
            self.partial[stream].extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if line_done {
                self.flush_stream(stream)?;
            }
        }
        Ok(())
    }

    fn flush_stream(&mut self, stream: usize) -> io::Result<()> {
        if self.partial[stream].is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.partial[stream]);
        self.record(
            if stream == 0 { "stdout" } else { "stderr" },
            &String::from_utf8_lossy(&line),
        )
    }

    /// Writes one record as it is.
    pub fn record(&mut self, stream: &str, log: &str) -> io::Result<()> {
        let rec = LogRecord {
            log: log.to_string(),
            stream: stream.to_string(),
            time: jiff::Timestamp::now().to_string(),
        };
        let mut line = serde_json::to_vec(&rec).expect("a record serialises");
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Writes out partial lines (at exit).
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_stream(0)?;
        self.flush_stream(1)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let _ = std::fs::remove_file(rotated(&self.dir, KEEP));
        for n in (1..KEEP).rev() {
            let _ = std::fs::rename(rotated(&self.dir, n), rotated(&self.dir, n + 1));
        }
        std::fs::rename(log_path(&self.dir), rotated(&self.dir, 1))?;
        self.file = open_append(&log_path(&self.dir))?;
        self.size = 0;
        Ok(())
    }
}

/// Which records to read.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only the last N.
    pub tail: Option<usize>,
    /// Only records at or after this time.
    pub since: Option<jiff::Timestamp>,
}

fn parse_line(line: &str, since: Option<jiff::Timestamp>) -> Option<LogRecord> {
    let rec: LogRecord = serde_json::from_str(line).ok()?;
    if let Some(since) = since {
        let t: jiff::Timestamp = rec.time.parse().ok()?;
        if t < since {
            return None;
        }
    }
    Some(rec)
}

/// Reads a container's log (rotated files first); returns the records and the current
/// file's length, where following continues.
pub fn read(dir: &Path, filter: &Filter) -> io::Result<(Vec<LogRecord>, u64)> {
    let mut out = Vec::new();
    let mut end = 0;
    let files: Vec<PathBuf> = (1..=KEEP)
        .rev()
        .map(|n| rotated(dir, n))
        .chain([log_path(dir)])
        .collect();
    for (i, path) in files.iter().enumerate() {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        let mut pos = 0u64;
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            pos += n as u64;
            if let Some(rec) = parse_line(&line, filter.since) {
                out.push(rec);
            }
        }
        if i == files.len() - 1 {
            end = pos;
        }
    }
    if let Some(t) = filter.tail {
        let skip = out.len().saturating_sub(t);
        out.drain(..skip);
    }
    Ok((out, end))
}

/// Follows the current log file from `offset`, handing each new record to `each`, until
/// `done()` says the container has stopped (and everything written was read). Survives
/// rotation.
pub fn follow(
    dir: &Path,
    mut offset: u64,
    each: &mut dyn FnMut(&LogRecord) -> io::Result<()>,
    done: &dyn Fn() -> bool,
) -> io::Result<()> {
    let path = log_path(dir);
    let mut pending = String::new();
    loop {
        let finished = done();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len < offset {
            // Rotated: the rest of the old file is in `.1`; read its tail first.
            if let Ok(mut old) = File::open(rotated(dir, 1)) {
                old.seek(SeekFrom::Start(offset))?;
                for line in BufReader::new(old).lines() {
                    if let Some(rec) = parse_line(&line?, None) {
                        each(&rec)?;
                    }
                }
            }
            offset = 0;
        }
        file.seek(SeekFrom::Start(offset))?;
        let mut reader = BufReader::new(file);
        loop {
            let n = reader.read_line(&mut pending)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            if pending.ends_with('\n') {
                if let Some(rec) = parse_line(&pending, None) {
                    each(&rec)?;
                }
                pending.clear();
            }
        }
        if finished {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_recorded_split_and_rotated() {
        let d = tempfile::tempdir().unwrap();
        let mut w = LogWriter::with_max_size(d.path(), 400).unwrap();
        w.write(0, b"one\ntw").unwrap();
        w.write(1, b"err\n").unwrap();
        w.write(0, b"o\n").unwrap();
        w.write(0, b"tail").unwrap();
        w.flush().unwrap();
        let (recs, _) = read(d.path(), &Filter::default()).unwrap();
        let lines: Vec<(&str, &str)> = recs
            .iter()
            .map(|r| (r.stream.as_str(), r.log.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                ("stdout", "one\n"),
                ("stderr", "err\n"),
                ("stdout", "two\n"),
                ("stdout", "tail")
            ]
        );
        for i in 0..20 {
            w.write(0, format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(rotated(d.path(), 1).exists(), "rotated by size");
        let (recs, _) = read(
            d.path(),
            &Filter {
                tail: Some(3),
                since: None,
            },
        )
        .unwrap();
        let last: Vec<&str> = recs.iter().map(|r| r.log.as_str()).collect();
        assert_eq!(last, ["line 17\n", "line 18\n", "line 19\n"]);
        let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
        let (recs, _) = read(
            d.path(),
            &Filter {
                tail: None,
                since: Some(future),
            },
        )
        .unwrap();
        assert!(recs.is_empty());
    }

    #[test]
    fn follow_reads_what_is_appended_until_done() {
        let d = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(d.path()).unwrap();
        w.write(0, b"first\n").unwrap();
        let (_, end) = read(d.path(), &Filter::default()).unwrap();
        let dir = d.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            w.write(0, b"second\n").unwrap();
            std::fs::write(dir.join("done"), "").unwrap();
        });
        let mut got = Vec::new();
        let marker = d.path().join("done");
        follow(
            d.path(),
            end,
            &mut |r| {
                got.push(r.log.clone());
                Ok(())
            },
            &|| marker.exists(),
        )
        .unwrap();
        writer.join().unwrap();
        assert_eq!(got, ["second\n"]);
    }
}
