//! A read-only view of an image's filesystem built from its layers' tar headers (whiteouts
//! applied), without unpacking anything: which paths exist, their metadata, symlink
//! resolution inside the image, and file contents read by streaming the one layer that holds
//! them. The builder uses it for parent directories, `--chown` names and `COPY --from`.

use std::collections::BTreeMap;
use std::io::{self, Read};

use super::BuildError;
use crate::store::{Digest, Store, StoreError};

/// What a path is in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsKind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symlink to a target.
    Symlink(String),
    /// Hardlink to another path of the image.
    Hardlink(String),
    /// Device, FIFO or other.
    Other,
}

/// A path's metadata and the layer holding its content.
#[derive(Debug, Clone)]
pub struct FsNode {
    /// Kind.
    pub kind: FsKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Size (files).
    pub size: u64,
    /// Index of the layer the entry comes from.
    pub layer: usize,
}

/// The merged filesystem of an image's layers.
#[derive(Debug, Clone, Default)]
pub struct ImageFs {
    /// Paths without a leading `/`, e.g. `etc/passwd`.
    pub nodes: BTreeMap<String, FsNode>,
    /// Layer blobs and their media types, bottom first.
    pub layers: Vec<(Digest, String)>,
}

/// Normalises a tar path: no leading `./` or `/`, no trailing `/`, no `.` components.
/// `None` for paths with `..` (an image that has them is refused elsewhere; here they are
/// skipped so they can never be looked up).
pub fn normalize(path: &str) -> Option<String> {
    // Most tar paths are normal already, or differ only by a `./` before and a `/` after.
    let trimmed = path.strip_prefix("./").unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    if !trimmed.starts_with('/')
        && trimmed
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
    {
        return Some(trimmed.to_string());
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Opens a layer blob as an uncompressed tar stream, by media type.
pub fn open_layer(
    store: &Store,
    digest: &Digest,
    media_type: &str,
) -> Result<Box<dyn Read>, BuildError> {
    Ok(store.open_layer(digest, media_type)?)
}

/// One tar entry of a layer, as the entry index keeps it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct IndexEntry {
    /// The path as the tar names it (UTF-8 paths only; others are skipped as before).
    #[serde(rename = "p")]
    pub path: String,
    /// `d`irectory, `f`ile, sym`l`ink, `h`ardlink, `o`ther.
    #[serde(rename = "k")]
    pub kind: char,
    /// Permission bits.
    #[serde(rename = "m")]
    pub mode: u32,
    /// Owner.
    #[serde(rename = "u")]
    pub uid: u64,
    /// Group.
    #[serde(rename = "g")]
    pub gid: u64,
    /// Size.
    #[serde(rename = "s")]
    pub size: u64,
    /// Link target (symlinks, hardlinks).
    #[serde(rename = "t", default, skip_serializing_if = "String::is_empty")]
    pub link: String,
}

/// Where a layer's entry index lives: `berth/layer-index/<hex>.json`, beside the blob it
/// describes (gc removes it with the blob).
pub fn index_path(store: &Store, digest: &Digest) -> std::path::PathBuf {
    store
        .state_dir()
        .join("layer-index")
        .join(format!("{}.json", digest.hex()))
}

/// A layer's tar entries in order: read from its index, or (the first time) from the
/// layer itself, then indexed. A layer's digest fixes its entries, so an index never goes
/// stale; one that cannot be read is rebuilt.
pub fn layer_entries(
    store: &Store,
    digest: &Digest,
    media_type: &str,
) -> Result<Vec<IndexEntry>, BuildError> {
    let path = index_path(store, digest);
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(entries) = serde_json::from_slice::<Vec<IndexEntry>>(&bytes)
    {
        return Ok(entries);
    }
    let mut out = Vec::new();
    let mut archive = tar::Archive::new(open_layer(store, digest, media_type)?);
    for entry in archive.entries().map_err(|e| layer_error(digest, e))? {
        let entry = entry.map_err(|e| layer_error(digest, e))?;
        let raw = entry.path_bytes();
        let Ok(p) = std::str::from_utf8(&raw) else {
            continue;
        };
        let h = entry.header();
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular | tar::EntryType::Continuous => 'f',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            _ => 'o',
        };
        out.push(IndexEntry {
            path: p.to_string(),
            kind,
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            size: h.size().unwrap_or(0),
            link: if matches!(kind, 'l' | 'h') {
                link
            } else {
                String::new()
            },
        });
    }
    // Best effort, written under a temporary name and renamed: a crash leaves no torn index.
    if let Some(dir) = path.parent()
        && std::fs::create_dir_all(dir).is_ok()
        && let Ok(json) = serde_json::to_vec(&out)
    {
        let _ = store.replace_cache_file(&path, &json);
    }
    Ok(out)
}

fn layer_error(digest: &Digest, e: io::Error) -> BuildError {
    BuildError::Store(StoreError::BadDocument {
        what: "layer",
        digest: digest.to_string(),
        message: e.to_string(),
    })
}

impl ImageFs {
    /// Indexes the given layers (bottom first), from each layer's entry index when the store
    /// has one (see [`layer_entries`]): a rebuild reads no cached layer to place a COPY.
    /// When `stop` is given and set, it stops between two layers and returns what it has.
    pub fn load(
        store: &Store,
        layers: &[(Digest, String)],
        stop: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<ImageFs, BuildError> {
        let mut fs = ImageFs::default();
        for (i, (digest, media_type)) in layers.iter().enumerate() {
            if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
                break;
            }
            fs.layers.push((digest.clone(), media_type.clone()));
            for e in layer_entries(store, digest, media_type)? {
                let Some(path) = normalize(&e.path) else {
                    continue;
                };
                let (dir, name) = match path.rsplit_once('/') {
                    Some((d, n)) => (d.to_string(), n),
                    None => (String::new(), path.as_str()),
                };
                if name == ".wh..wh..opq" {
                    let prefix = if dir.is_empty() {
                        String::new()
                    } else {
                        format!("{dir}/")
                    };
                    // What earlier layers had under the directory (a range of the
                    // sorted map, not a scan of all of it).
                    let hidden: Vec<String> = fs
                        .nodes
                        .range(prefix.clone()..)
                        .take_while(|(p, _)| p.starts_with(&prefix))
                        .filter(|(p, n)| p.len() > prefix.len() && n.layer < i)
                        .map(|(p, _)| p.clone())
                        .collect();
                    for p in hidden {
                        fs.nodes.remove(&p);
                    }
                    continue;
                }
                if let Some(hidden) = name.strip_prefix(".wh.") {
                    let target = if dir.is_empty() {
                        hidden.to_string()
                    } else {
                        format!("{dir}/{hidden}")
                    };
                    fs.remove_tree(&target);
                    continue;
                }
                let kind = match e.kind {
                    'd' => FsKind::Dir,
                    'f' => FsKind::File,
                    'l' => FsKind::Symlink(e.link.clone()),
                    'h' => FsKind::Hardlink(normalize(&e.link).unwrap_or_default()),
                    _ => FsKind::Other,
                };
                if kind != FsKind::Dir {
                    fs.remove_tree(&path);
                }
                let node = FsNode {
                    kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    size: e.size,
                    layer: i,
                };
                if !path.is_empty() {
                    fs.nodes.insert(path, node);
                }
            }
        }
        Ok(fs)
    }

    fn remove_tree(&mut self, path: &str) {
        use std::ops::Bound;
        self.nodes.remove(path);
        // The paths under it follow it in the map, after any `path-x` or `path.x` (bytes
        // below `/`) and before `path0`: found without building the prefix.
        let mut doomed = Vec::new();
        let after = (Bound::Excluded(path), Bound::Unbounded);
        for (p, _) in self.nodes.range::<str, _>(after) {
            match p.strip_prefix(path).and_then(|rest| rest.bytes().next()) {
                Some(b'/') => doomed.push(p.clone()),
                Some(c) if c < b'/' => {}
                _ => break,
            }
        }
        for p in doomed {
            self.nodes.remove(&p);
        }
    }

    /// Resolves symlinks in `path` inside the image (never above its root), following the
    /// last component too when `follow_last`. Returns the resolved path (which may not exist).
    pub fn resolve(&self, path: &str, follow_last: bool) -> Option<String> {
        let mut todo: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(String::from)
            .rev()
            .collect();
        let mut done: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            if c == ".." {
                done.pop();
                continue;
            }
            done.push(c);
            let here = done.join("/");
            let is_last = todo.is_empty();
            if let Some(FsNode {
                kind: FsKind::Symlink(target),
                ..
            }) = self.nodes.get(&here)
                && (!is_last || follow_last)
            {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                done.pop();
                if target.starts_with('/') {
                    done.clear();
                }
                todo.extend(
                    target
                        .split('/')
                        .filter(|c| !c.is_empty() && *c != ".")
                        .map(String::from)
                        .rev(),
                );
            }
        }
        Some(done.join("/"))
    }

    /// The node at a resolved path.
    pub fn get(&self, path: &str) -> Option<&FsNode> {
        self.nodes.get(path)
    }

    /// Reads a small file (at most `limit` bytes) by path, following symlinks.
    pub fn read_file(
        &self,
        store: &Store,
        path: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, BuildError> {
        let Some(resolved) = self.resolve(path, true) else {
            return Ok(None);
        };
        let Some(mut node) = self.nodes.get(&resolved) else {
            return Ok(None);
        };
        let mut target = resolved;
        if let FsKind::Hardlink(t) = &node.kind {
            target = t.clone();
            node = match self.nodes.get(&target) {
                Some(n) => n,
                None => return Ok(None),
            };
        }
        if node.kind != FsKind::File || node.size > limit {
            return Ok(None);
        }
        let (digest, media_type) = &self.layers[node.layer];
        let mut archive = tar::Archive::new(open_layer(store, digest, media_type)?);
        for entry in archive.entries().map_err(|e| layer_error(digest, e))? {
            let mut entry = entry.map_err(|e| layer_error(digest, e))?;
            let raw = entry.path_bytes();
            if std::str::from_utf8(&raw)
                .ok()
                .and_then(normalize)
                .as_deref()
                == Some(target.as_str())
            {
                let mut buf = Vec::new();
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| layer_error(digest, e))?;
                return Ok(Some(buf));
            }
        }
        Ok(None)
    }

    /// Records entries added by a layer this build wrote (so later steps see them without
    /// re-reading the layer).
    pub fn add_layer(
        &mut self,
        digest: Digest,
        media_type: String,
        entries: impl IntoIterator<Item = (String, FsNode)>,
    ) {
        let index = self.layers.len();
        self.layers.push((digest, media_type));
        for (path, mut node) in entries {
            node.layer = index;
            if node.kind != FsKind::Dir {
                self.remove_tree(&path);
            }
            self.nodes.insert(path, node);
        }
    }
}

pub use crate::runtime::users::{lookup_group, lookup_user};

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kind: FsKind) -> FsNode {
        FsNode {
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            layer: 0,
        }
    }

    #[test]
    fn symlinks_resolve_inside_the_image() {
        let mut fs = ImageFs::default();
        fs.nodes.insert("usr".into(), node(FsKind::Dir));
        fs.nodes.insert("usr/bin".into(), node(FsKind::Dir));
        fs.nodes
            .insert("bin".into(), node(FsKind::Symlink("usr/bin".into())));
        fs.nodes.insert(
            "escape".into(),
            node(FsKind::Symlink("../../../etc".into())),
        );
        fs.nodes
            .insert("loop".into(), node(FsKind::Symlink("/loop".into())));
        assert_eq!(fs.resolve("bin/sh", true).unwrap(), "usr/bin/sh");
        assert_eq!(fs.resolve("/bin", false).unwrap(), "bin");
        assert_eq!(
            fs.resolve("escape/passwd", true).unwrap(),
            "etc/passwd",
            "`..` stops at the image root"
        );
        assert_eq!(fs.resolve("loop", true), None);
    }

    #[test]
    fn paths_normalize() {
        assert_eq!(normalize("./a//b/").unwrap(), "a/b");
        assert_eq!(normalize("/").unwrap(), "");
        assert_eq!(normalize("./").unwrap(), "");
        assert_eq!(normalize("./a/b/").unwrap(), "a/b");
        assert_eq!(normalize("a/./b").unwrap(), "a/b");
        assert_eq!(normalize("/a/b").unwrap(), "a/b");
        assert_eq!(normalize("usr/bin/ls").unwrap(), "usr/bin/ls");
        assert!(normalize("a/../b").is_none());
        assert!(normalize("./..").is_none());
    }

    #[test]
    fn removing_a_tree_takes_what_is_under_it_and_nothing_beside_it() {
        let mut fs = ImageFs::default();
        for p in [
            "a", "a-b", "a.d", "a.d/x", "a/b", "a/b/c", "a/z", "a0", "ab", "b",
        ] {
            fs.nodes.insert(p.into(), node(FsKind::Dir));
        }
        fs.remove_tree("a");
        let left: Vec<&str> = fs.nodes.keys().map(String::as_str).collect();
        assert_eq!(left, ["a-b", "a.d", "a.d/x", "a0", "ab", "b"]);
        fs.remove_tree("a.d");
        fs.remove_tree("nothing");
        let left: Vec<&str> = fs.nodes.keys().map(String::as_str).collect();
        assert_eq!(left, ["a-b", "a0", "ab", "b"]);
    }
}
