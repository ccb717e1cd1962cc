//! The build cache, under the store's `berth/cache/`:
//!
//! - the **stat cache** maps a context file's identity (path, size, device, inode, mtime,
//!   ctime) to its content hash (BLAKE3: an internal identity, fast, never an OCI digest),
//!   so a no-op rebuild of a large context re-hashes nothing;
//! - **step records** map a step's cache key to the layer it produced;
//! - **explain records** keep, per project and step position, what the last build's step
//!   saw, so `--explain` can say why a step missed (which file, which build arg, which base).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layer::Layer;
use crate::store::{Digest, Store};

/// Identity of a file as of its last hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StatEntry {
    size: u64,
    dev: u64,
    ino: u64,
    mtime: i128,
    ctime: i128,
    hash: String,
}

/// Content hashes of context files, keyed by absolute path.
pub struct StatCache {
    path: PathBuf,
    /// Read on a thread of its own from [`StatCache::load`] on (a large context's cache is
    /// most of a megabyte of JSON), and waited for when first asked.
    entries: crate::background::Later<BTreeMap<String, StatEntry>>,
    dirty: bool,
}

impl StatCache {
    /// Starts loading the stat cache (an unreadable or corrupt one is treated as empty).
    pub fn load(store: &Store) -> StatCache {
        let path = store.state_dir().join("cache/stat.json");
        let from = path.clone();
        let entries = crate::background::Later::spawn(move || {
            std::fs::read(&from)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default()
        });
        StatCache {
            path,
            entries,
            dirty: false,
        }
    }

    fn entries(&self) -> &BTreeMap<String, StatEntry> {
        self.entries.get()
    }

    fn entries_mut(&mut self) -> &mut BTreeMap<String, StatEntry> {
        self.entries.get_mut()
    }

    /// The cached content hash of a file, if its identity is unchanged.
    pub fn get(&self, abs: &Path, size: u64, stamp: (u64, u64, i128, i128)) -> Option<&str> {
        let e = self.entries().get(abs.to_str()?)?;
        let same = e.size == size
            && (e.dev, e.ino, e.mtime, e.ctime) == stamp
            && e.hash.starts_with(CONTENT_HASH_PREFIX);
        same.then_some(e.hash.as_str())
    }

    /// Records a file's hash. Files changed in the last two seconds are not recorded: a
    /// write within the same timestamp tick could otherwise go unnoticed (git's "racy"
    /// files).
    pub fn put(&mut self, abs: &Path, size: u64, stamp: (u64, u64, i128, i128), hash: &str) {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        if now_ns - stamp.2.max(stamp.3) < 2_000_000_000 {
            return;
        }
        let Some(key) = abs.to_str() else { return };
        let entry = StatEntry {
            size,
            dev: stamp.0,
            ino: stamp.1,
            mtime: stamp.2,
            ctime: stamp.3,
            hash: hash.to_string(),
        };
        if self.entries().get(key) != Some(&entry) {
            self.entries_mut().insert(key.to_string(), entry);
            self.dirty = true;
        }
    }

    /// Writes the cache back if it changed.
    pub fn save(&self, store: &Store) {
        if !self.dirty {
            return;
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(bytes) = serde_json::to_vec(self.entries()) {
            // Losing the stat cache only costs re-hashing; a failure here is not an error.
            let _ = store.replace_cache_file(&self.path, &bytes);
        }
    }
}

/// Prefix of content hashes in the stat cache and explain records.
pub const CONTENT_HASH_PREFIX: &str = "b3:";

/// A reader that computes the content hash (BLAKE3) of what passes through it.
pub struct ContentHashReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: std::io::Read> ContentHashReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        ContentHashReader {
            inner,
            hasher: blake3::Hasher::new(),
        }
    }

    /// `b3:<hex>` of everything read.
    pub fn finish(self) -> String {
        format!("{CONTENT_HASH_PREFIX}{}", self.hasher.finalize().to_hex())
    }
}

impl<R: std::io::Read> std::io::Read for ContentHashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn record_path(store: &Store, kind: &str, key: &Digest) -> PathBuf {
    store
        .state_dir()
        .join("cache")
        .join(kind)
        .join(format!("{}.json", key.hex()))
}

fn write_record<T: Serialize>(store: &Store, kind: &str, key: &Digest, value: &T) {
    let path = record_path(store, kind, key);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(bytes) = serde_json::to_vec(value) {
        let _ = store.replace_cache_file(&path, &bytes);
    }
}

/// The layer cached under `key`, if its blob is still in the store.
pub fn lookup_step(store: &Store, key: &Digest) -> Option<Layer> {
    let bytes = std::fs::read(record_path(store, "steps", key)).ok()?;
    let layer: Layer = serde_json::from_slice(&bytes).ok()?;
    store.has_blob(&layer.digest).then_some(layer)
}

/// Records the layer a step produced.
pub fn record_step(store: &Store, key: &Digest, layer: &Layer) {
    write_record(store, "steps", key, layer);
}

/// What one step saw in the last build at its position.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExplainRecord {
    /// The parent's chain key.
    pub parent: String,
    /// The base image digest (first step of a stage).
    pub base: Option<String>,
    /// The instruction, expanded.
    pub instruction: String,
    /// Input files: path → (content hash or link target, mode).
    pub inputs: BTreeMap<String, (String, u32)>,
    /// Build arguments in scope.
    pub args: BTreeMap<String, String>,
    /// The key this step had.
    pub key: String,
    /// The layer it produced (whose compressed chunks the next build may reuse).
    #[serde(default)]
    pub layer: Option<Digest>,
    /// The file times of its layer (`SOURCE_DATE_EPOCH`, else 0).
    #[serde(default)]
    pub epoch: u64,
    /// It missed the cache: a developer changing files between builds makes the next
    /// one likely to miss too (a COPY then starts taking over its last layer early).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub missed: bool,
}

/// The record a step position had in the last build. What a rebuild needs at once (the
/// layer, whether the step missed) is read first; the whole record (whose inputs are
/// hundreds of kilobytes of JSON for a large context) is parsed on a thread of its own.
pub struct LastExplain {
    /// The layer the step produced.
    pub layer: Option<Digest>,
    /// The step missed the cache.
    pub missed: bool,
    record: crate::background::Later<Option<ExplainRecord>>,
}

impl LastExplain {
    /// The whole record (`None` if it did not parse).
    pub fn record(&self) -> Option<&ExplainRecord> {
        self.record.get().as_ref()
    }
}

/// The last record at a step position.
pub fn last_explain(store: &Store, slot: &Digest) -> Option<LastExplain> {
    // The fields every record has are required here too (as for the whole record), so
    // a record that would not parse is not half used.
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "parent")]
        _parent: serde::de::IgnoredAny,
        #[serde(rename = "instruction")]
        _instruction: serde::de::IgnoredAny,
        #[serde(rename = "inputs")]
        _inputs: serde::de::IgnoredAny,
        #[serde(rename = "args")]
        _args: serde::de::IgnoredAny,
        #[serde(rename = "key")]
        _key: serde::de::IgnoredAny,
        #[serde(default)]
        layer: Option<Digest>,
        #[serde(default)]
        missed: bool,
    }
    let bytes = std::fs::read(record_path(store, "explain", slot)).ok()?;
    let head: Head = serde_json::from_slice(&bytes).ok()?;
    Some(LastExplain {
        layer: head.layer,
        missed: head.missed,
        record: crate::background::Later::spawn(move || serde_json::from_slice(&bytes).ok()),
    })
}

/// Saves the record at a step position, unless it is the `last` one there (a step that
/// hit: rewriting it would only cost a write, and on ext4 a flush). Compared and written
/// on a thread of its own; the process waits for it before it ends.
pub fn save_explain(
    store: &Store,
    slot: &Digest,
    record: ExplainRecord,
    last: Option<LastExplain>,
) {
    let (store, slot) = (store.clone(), slot.clone());
    crate::background::spawn_kept(move || {
        if last.as_ref().and_then(LastExplain::record) != Some(&record) {
            write_record(&store, "explain", &slot, &record);
        }
    });
}

/// Why a step missed, comparing what it sees now with the last build at its position.
pub fn miss_reason(
    now: &ExplainRecord,
    last: Option<&ExplainRecord>,
    parent_missed: bool,
) -> String {
    let Some(last) = last else {
        return "no earlier build of this step".into();
    };
    if now.base != last.base {
        return format!(
            "the base image changed ({} → {})",
            last.base.as_deref().map_or("none", short),
            now.base.as_deref().map_or("none", short)
        );
    }
    if now.instruction != last.instruction {
        let args: Vec<String> = now
            .args
            .iter()
            .filter(|(k, v)| last.args.get(*k) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}={v} (was {})",
                    last.args.get(k).map_or("unset", String::as_str)
                )
            })
            .collect();
        let mut reason = format!("the instruction changed (was `{}`)", last.instruction);
        if !args.is_empty() {
            reason += &format!("; build args changed: {}", args.join(", "));
        }
        return reason;
    }
    if now.epoch != last.epoch {
        return format!(
            "SOURCE_DATE_EPOCH changed ({} → {}): the layer's file times differ",
            last.epoch, now.epoch
        );
    }
    if now.parent != last.parent {
        return if parent_missed {
            "an earlier step changed".into()
        } else {
            "the layers below changed".into()
        };
    }
    // Both maps in order, side by side (a large context has thousands of inputs).
    let (mut changes, mut removed) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (now.inputs.iter().peekable(), last.inputs.iter().peekable());
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((p, _)), Some((q, _))) => p.cmp(q),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (path, _) = a.next().expect("peeked");
                changes.push(format!("{path} added"));
            }
            std::cmp::Ordering::Greater => {
                let (path, _) = b.next().expect("peeked");
                removed.push(format!("{path} removed"));
            }
            std::cmp::Ordering::Equal => {
                let ((path, (hash, mode)), (_, (h, m))) =
                    (a.next().expect("peeked"), b.next().expect("peeked"));
                if h != hash {
                    changes.push(format!("{path} changed"));
                } else if m != mode {
                    changes.push(format!("{path} mode {m:o} → {mode:o}"));
                }
            }
        }
    }
    changes.extend(removed);
    if changes.is_empty() {
        return "the cached layer is gone (removed by gc?) or the cache was cleared".into();
    }
    let more = changes.len().saturating_sub(5);
    changes.truncate(5);
    let mut s = changes.join(", ");
    if more > 0 {
        s += &format!(" and {more} more");
    }
    s
}

fn short(d: &str) -> &str {
    d.strip_prefix("sha256:")
        .map_or(d, |h| &h[..12.min(h.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(instruction: &str, inputs: &[(&str, &str, u32)]) -> ExplainRecord {
        ExplainRecord {
            parent: "p".into(),
            instruction: instruction.into(),
            inputs: inputs
                .iter()
                .map(|(p, h, m)| (p.to_string(), (h.to_string(), *m)))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_record_is_written_when_it_changed_and_left_alone_when_not() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let slot = Digest::of(b"slot");
        let path = record_path(&store, "explain", &slot);
        let one = rec("COPY . /app", &[("a.js", "h1", 0o644)]);
        save_explain(&store, &slot, one.clone(), None);
        crate::background::finish();
        let inode = std::fs::metadata(&path).unwrap().ino();
        let last = || last_explain(&store, &slot).unwrap();
        assert_eq!(last().record(), Some(&one));
        // The same record again: not rewritten.
        save_explain(&store, &slot, one.clone(), Some(last()));
        crate::background::finish();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        // A changed one replaces it whole, and no temp file stays beside it.
        let two = ExplainRecord {
            layer: Some(Digest::of(b"layer")),
            missed: true,
            ..rec("COPY . /app", &[("a.js", "h2", 0o644)])
        };
        save_explain(&store, &slot, two.clone(), Some(last()));
        crate::background::finish();
        let read = last();
        assert_eq!(read.record(), Some(&two));
        assert_eq!((read.layer, read.missed), (two.layer.clone(), true));
        let names = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(names, 1);
        // A record that is not one is not used, not even in part.
        for bad in [
            &b"{}"[..],
            br#"{"layer": null, "missed": true}"#,
            b"{\"parent\": ",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(last_explain(&store, &slot).is_none());
        }
    }

    #[test]
    fn reasons_name_the_change() {
        let last = rec(
            "COPY . /app",
            &[
                ("a.js", "h1", 0o644),
                ("b.js", "h2", 0o644),
                ("c.js", "h3", 0o644),
            ],
        );
        let now = rec(
            "COPY . /app",
            &[
                ("a.js", "h1", 0o755),
                ("b.js", "h9", 0o644),
                ("d.js", "h4", 0o644),
            ],
        );
        assert_eq!(
            miss_reason(&now, Some(&last), false),
            "a.js mode 644 → 755, b.js changed, d.js added, c.js removed"
        );
        assert_eq!(
            miss_reason(&rec("COPY x /y", &[]), Some(&last), false),
            "the instruction changed (was `COPY . /app`)"
        );
        assert_eq!(
            miss_reason(&now, None, false),
            "no earlier build of this step"
        );
        let mut moved = now.clone();
        moved.parent = "q".into();
        assert_eq!(
            miss_reason(&moved, Some(&now), true),
            "an earlier step changed"
        );
    }
}
