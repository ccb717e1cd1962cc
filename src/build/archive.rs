//! Local tar archives, as `ADD` extracts them and `berth import` reads them: the format is
//! sniffed once, and every entry's path and hardlink target are checked in one place
//! (normalised, never climbing out with `..`).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use super::BuildError;
use super::imagefs::normalize;

/// Archive formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A plain tar.
    Tar,
    /// A gzipped tar.
    Gzip,
}

/// An entry with its path checked.
pub struct Checked {
    /// Path inside the archive, normalised and non-empty.
    pub rel: String,
    /// The entry's header.
    pub header: tar::Header,
    /// Symlink target (as written) or hardlink target (normalised, inside the archive).
    pub link: Option<String>,
}

fn bad(path: &Path, why: String) -> BuildError {
    BuildError::Archive {
        path: path.to_path_buf(),
        why,
    }
}

/// The format of `file` (at `path`, for messages): gzip by its magic, tar by its `ustar`
/// magic, `None` otherwise.
pub fn sniff(file: File, path: &Path) -> Result<Option<Kind>, BuildError> {
    let mut head = Vec::with_capacity(262);
    file.take(262)
        .read_to_end(&mut head)
        .map_err(|e| BuildError::Context {
            path: path.to_path_buf(),
            source: e,
        })?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Some(Kind::Gzip)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Some(Kind::Tar)
    } else {
        None
    })
}

/// Calls `f` for every entry of the archive in `file` (at `path`, for messages; the root
/// entry skipped), with its path and link target checked, and a reader of its content.
pub fn for_each(
    file: File,
    path: &Path,
    kind: Kind,
    mut f: impl FnMut(Checked, &mut dyn Read) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    let reader: Box<dyn Read> = match kind {
        Kind::Tar => Box::new(io::BufReader::new(file)),
        Kind::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(file))),
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(|e| bad(path, e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(path, e.to_string()))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = normalize(&raw)
            .ok_or_else(|| bad(path, format!("entry `{raw}` climbs out with `..`")))?;
        if rel.is_empty() {
            continue;
        }
        let header = entry.header().clone();
        let target = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let link = match header.entry_type() {
            tar::EntryType::Symlink => Some(target.unwrap_or_default()),
            tar::EntryType::Link => Some(
                target
                    .as_deref()
                    .and_then(normalize)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        bad(path, format!("hardlink `{raw}` points outside the archive"))
                    })?,
            ),
            _ => None,
        };
        f(Checked { rel, header, link }, &mut entry)?;
    }
    Ok(())
}
