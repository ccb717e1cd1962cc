//! What differs between two images: their configs (as flat `key = value` lines, diffed),
//! their layers (matched by diff_id, so a recompressed layer still counts as shared) and,
//! on request, their files.
//!
//! Files are found without unpacking anything to disk and without reading the layers the
//! two images share: the layers after the common prefix are streamed (from the store or
//! straight from the registry, verified as they go) into per-path states. Only when a path
//! is touched on one side alone does the other side's state have to come from the shared
//! prefix; then those layers are streamed once, looking only at the paths in question, and
//! an index of each (every path's state, by diff_id) is kept in the store, so the next
//! diff of images on the same base reads none of it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, Read};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::registry_client::{Client, RegistryError, documents, pull};
use crate::store::{Digest, Store, StoreError};

/// Text files up to this size get a line diff.
const TEXT_MAX: u64 = 64 << 10;
/// Text kept in memory for line diffs, in all.
const TEXT_BUDGET: usize = 32 << 20;

/// Why a diff failed.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// A registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An image document is not what it should be.
    #[error("{what}: {message}")]
    Bad {
        /// Which.
        what: String,
        /// Why.
        message: String,
    },
    /// Reading a layer failed.
    #[error("layer {digest}: {source}")]
    Layer {
        /// The layer.
        digest: Digest,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

fn bad(what: impl Into<String>) -> impl FnOnce(String) -> DiffError {
    let what = what.into();
    move |message| DiffError::Bad { what, message }
}

/// Where an image's blobs are read from.
pub enum Location<'a> {
    /// The local store.
    Store(&'a Store),
    /// A registry repository.
    Registry {
        /// The client (shared with the tasks that stream layers).
        client: std::sync::Arc<Client>,
        /// The repository.
        repository: String,
        /// The runtime its requests run on.
        rt: &'a tokio::runtime::Runtime,
    },
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layer {
    /// sha256 of its uncompressed tar.
    pub diff_id: String,
    /// sha256 of its blob.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The blob's media type.
    pub media_type: String,
}

/// An image, with its manifest and config read.
pub struct Image<'a> {
    /// Its manifest's digest.
    pub digest: Digest,
    /// The config document.
    pub config: Value,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    location: Location<'a>,
}

impl<'a> Image<'a> {
    /// Reads the manifest (the platform's, if `digest` is an index) and config.
    pub fn load(location: Location<'a>, digest: &Digest) -> Result<Image<'a>, DiffError> {
        let (manifest, digest) = match &location {
            Location::Store(store) => (store.read_blob(digest)?, digest.clone()),
            Location::Registry {
                client,
                repository,
                rt,
            } => rt.block_on(async {
                let (bytes, media, d) =
                    pull::fetch_manifest(client, repository, digest.as_str(), Some(digest)).await?;
                if media.contains("index") || media.contains("manifest.list") {
                    let want = pull::pick_platform(&bytes)?;
                    let (b, _, d) =
                        pull::fetch_manifest(client, repository, want.as_str(), Some(&want))
                            .await?;
                    return Ok::<_, RegistryError>((b, d));
                }
                Ok((bytes, d))
            })?,
        };
        let m: Value = serde_json::from_slice(&manifest)
            .map_err(|e| bad(format!("manifest {digest}"))(e.to_string()))?;
        let config_digest: Digest = m["config"]["digest"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| bad(format!("manifest {digest}"))("it names no config".into()))?;
        let config_bytes = match &location {
            Location::Store(store) => store.read_blob(&config_digest)?,
            Location::Registry {
                client,
                repository,
                rt,
            } => rt.block_on(documents::get_blob(
                client,
                repository,
                &config_digest,
                16 << 20,
            ))?,
        };
        let config: Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(format!("config {config_digest}"))(e.to_string()))?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let descs = m["layers"].as_array().cloned().unwrap_or_default();
        if descs.len() != diff_ids.len() {
            return Err(bad(format!("image {digest}"))(format!(
                "{} layers but {} diff_ids",
                descs.len(),
                diff_ids.len()
            )));
        }
        let layers = descs
            .iter()
            .zip(diff_ids)
            .map(|(d, diff_id)| {
                Ok(Layer {
                    diff_id,
                    digest: d["digest"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| {
                            bad(format!("manifest {digest}"))("a layer has no digest".into())
                        })?,
                    size: d["size"].as_u64().unwrap_or(0),
                    media_type: d["mediaType"].as_str().unwrap_or_default().to_string(),
                })
            })
            .collect::<Result<Vec<_>, DiffError>>()?;
        Ok(Image {
            digest,
            config,
            layers,
            location,
        })
    }

    /// A layer's uncompressed tar stream; its blob digest and diff_id are checked when the
    /// stream ends (see [`Verified`]).
    fn layer(&self, layer: &Layer) -> Result<Verified, DiffError> {
        let compressed: Box<dyn BufRead + Send> = match &self.location {
            Location::Store(store) => Box::new(io::BufReader::with_capacity(
                256 << 10,
                store.open_blob(&layer.digest)?,
            )),
            Location::Registry {
                client,
                repository,
                rt,
            } => Box::new(io::BufReader::with_capacity(
                256 << 10,
                registry_stream(client, repository, &layer.digest, rt),
            )),
        };
        let hashed = HashRead::new(compressed);
        let blob_hash = hashed.hasher.clone();
        let tar =
            crate::store::decompress(io::BufReader::new(hashed), &layer.digest, &layer.media_type)?;
        Ok(Verified {
            inner: HashRead::new(tar),
            blob_hash,
            layer: layer.clone(),
        })
    }
}

/// Streams a blob from a registry as a `Read`: a task on the runtime fetches chunks into
/// a small bounded channel, so at most a few chunks are ever in memory.
fn registry_stream(
    client: &std::sync::Arc<Client>,
    repository: &str,
    digest: &Digest,
    rt: &tokio::runtime::Runtime,
) -> ChannelRead {
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<bytes::Bytes>>(8);
    let (client, url, repo) = (
        client.clone(),
        client.url(&format!("{repository}/blobs/{digest}")),
        repository.to_string(),
    );
    let what = format!("blob {digest}");
    rt.spawn(async move {
        use futures_util::StreamExt;
        let resp = client
            .send(&crate::registry_client::pull_scope(&repo), &|| {
                Ok(client.http().get(&url))
            })
            .await;
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let e = client.fail(r, &repo, &what).await;
                let _ = tx.send(Err(io::Error::other(e.to_string())));
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(e.to_string())));
                return;
            }
        };
        let mut body = Box::pin(crate::registry_client::bounds::watched(
            resp.bytes_stream(),
            client.low_speed(),
        ));
        while let Some(chunk) = body.next().await {
            let item = chunk.map_err(io::Error::other);
            let stop = item.is_err();
            // The reader went away (it had enough, or failed): stop fetching.
            if tokio::task::block_in_place(|| tx.send(item)).is_err() || stop {
                return;
            }
        }
    });
    ChannelRead {
        rx,
        chunk: bytes::Bytes::new(),
    }
}

struct ChannelRead {
    rx: std::sync::mpsc::Receiver<io::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
}

impl Read for ChannelRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.recv() {
                Ok(Ok(c)) => self.chunk = c,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// A reader that hashes what passes through it.
struct HashRead<R> {
    inner: R,
    hasher: std::sync::Arc<std::sync::Mutex<Sha256>>,
}

impl<R> HashRead<R> {
    fn new(inner: R) -> Self {
        HashRead {
            inner,
            hasher: Default::default(),
        }
    }
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.lock().expect("hasher").update(&buf[..n]);
        Ok(n)
    }
}

/// A layer's tar stream whose blob digest and diff_id are checked by [`Verified::finish`].
struct Verified {
    inner: HashRead<Box<dyn Read + Send>>,
    blob_hash: std::sync::Arc<std::sync::Mutex<Sha256>>,
    layer: Layer,
}

impl Read for Verified {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Verified {
    /// Reads what is left and checks both digests.
    fn finish(mut self) -> Result<(), DiffError> {
        let err = |source| DiffError::Layer {
            digest: self.layer.digest.clone(),
            source,
        };
        io::copy(&mut self.inner, &mut io::sink()).map_err(err)?;
        let hex = |h: &std::sync::Arc<std::sync::Mutex<Sha256>>| {
            format!(
                "sha256:{}",
                hex::encode(h.lock().expect("hasher").clone().finalize())
            )
        };
        // Drain the compressed side too (gzip may stop before trailing bytes).
        let diff_id = hex(&self.inner.hasher);
        if diff_id != self.layer.diff_id {
            return Err(DiffError::Bad {
                what: format!("layer {}", self.layer.digest),
                message: format!(
                    "its content is {diff_id}, not the {} the config names",
                    self.layer.diff_id
                ),
            });
        }
        let blob = hex(&self.blob_hash);
        if blob != self.layer.digest.as_str() {
            return Err(DiffError::Bad {
                what: format!("layer {}", self.layer.digest),
                message: format!("its bytes hash to {blob}"),
            });
        }
        Ok(())
    }
}

/// A path's state in an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FileState {
    /// `file`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`.
    pub kind: String,
    /// Bytes (regular files).
    pub size: u64,
    /// Permission bits, as octal text.
    pub mode: String,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Symlink or hardlink target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// sha256 of the content (regular files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip)]
    text: Option<String>,
}

/// One changed path.
#[derive(Debug, Clone, Serialize)]
pub struct FileChange {
    /// The path, without a leading `/`.
    pub path: String,
    /// `added`, `removed` or `modified`.
    pub change: &'static str,
    /// Its state in A.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub a: Option<FileState>,
    /// Its state in B.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b: Option<FileState>,
    /// For a modification: which of `kind`, `content`, `mode`, `owner`, `link` changed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<&'static str>,
    /// A unified diff, for small text files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

/// How one layer leaves a path.
#[derive(Debug, Clone)]
enum Entry {
    Present(FileState),
    Removed,
}

/// The effect of a run of layers: each path they touch, and the directories they made
/// opaque (hiding everything below from the layers underneath).
#[derive(Default)]
struct Effect {
    paths: BTreeMap<String, Entry>,
    opaque: BTreeSet<String>,
}

fn normalize(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

fn under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// What to keep while streaming.
enum Want<'a> {
    /// Every path (under a prefix).
    All(&'a str),
    /// Only these paths and what is under these directories.
    Some(&'a BTreeSet<String>, &'a BTreeSet<String>),
}

impl Want<'_> {
    fn wants(&self, path: &str) -> bool {
        match self {
            Want::All(prefix) => prefix.is_empty() || path == *prefix || under(path, prefix),
            Want::Some(paths, dirs) => paths.contains(path) || has_ancestor_in(path, dirs),
        }
    }
}

/// The proper ancestors of a path, nearest first (`a/b/c` → `a/b`, `a`, ``).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(path);
    std::iter::from_fn(move || {
        let cur = rest?;
        match cur.rsplit_once('/') {
            Some((parent, _)) => {
                rest = Some(parent);
                Some(parent)
            }
            None => {
                rest = None;
                (!cur.is_empty()).then_some("")
            }
        }
    })
}

/// True when a proper ancestor of `path` is in `dirs` (`under(path, d)` for some `d`),
/// in time proportional to the path's depth, not to the size of `dirs`.
fn has_ancestor_in(path: &str, dirs: &BTreeSet<String>) -> bool {
    !dirs.is_empty() && ancestors(path).any(|a| dirs.contains(a))
}

/// Removes every path strictly under `dir` from `paths`. They sort together (`dir/…`
/// lies between `dir/` and `dir0`), so this costs the entries removed, not the map.
fn remove_under<V>(paths: &mut BTreeMap<String, V>, dir: &str) {
    if dir.is_empty() {
        paths.clear();
        return;
    }
    let (lo, hi) = (format!("{dir}/"), format!("{dir}0"));
    let doomed: Vec<String> = paths.range(lo..hi).map(|(k, _)| k.clone()).collect();
    for k in doomed {
        paths.remove(&k);
    }
}

/// One step of a layer, in tar order.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
enum Op {
    /// A path made (or replaced) with this state.
    Put(String, FileState),
    /// `.wh.<name>`: the path and everything under it removed.
    Whiteout(String),
    /// `.wh..wh..opq`: everything under the directory from lower layers hidden.
    Opaque(String),
}

/// Streams one layer into its steps, for the paths `want` asks for (whiteouts and opaque
/// markers always). Small text files keep their text while `text_budget` lasts.
fn layer_ops(
    image: &Image<'_>,
    layer: &Layer,
    want: &Want<'_>,
    text_budget: &mut usize,
) -> Result<Vec<Op>, DiffError> {
    let mut ops = Vec::new();
    let limits = crate::store::limits::LayerLimits::configured().map_err(|e| DiffError::Bad {
        what: "layer limits".into(),
        message: e.to_string(),
    })?;
    let mut entries = 0u64;
    let mut bytes = 0u64;
    let mut stream = image.layer(layer)?;
    {
        let err = |source| DiffError::Layer {
            digest: layer.digest.clone(),
            source,
        };
        let mut archive = tar::Archive::new(&mut stream);
        for entry in archive.entries().map_err(err)? {
            let mut entry = entry.map_err(err)?;
            // The same bounds as unpacking: a tar bomb stops here too.
            entries += 1;
            bytes = bytes.saturating_add(entry.header().size().unwrap_or(0));
            if entries > limits.max_entries || bytes > limits.max_bytes {
                return Err(DiffError::Bad {
                    what: format!("layer {}", layer.digest),
                    message: format!(
                        "more than {} entries or {} bytes (BERTH_LAYER_MAX_ENTRIES, BERTH_LAYER_MAX_BYTES)",
                        limits.max_entries, limits.max_bytes
                    ),
                });
            }
            let raw = entry.path().map_err(err)?.to_string_lossy().into_owned();
            let path = normalize(&raw);
            let (dir, name) = match path.rsplit_once('/') {
                Some((d, n)) => (d.to_string(), n.to_string()),
                None => (String::new(), path.clone()),
            };
            if name == ".wh..wh..opq" {
                ops.push(Op::Opaque(dir));
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                ops.push(Op::Whiteout(if dir.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{dir}/{hidden}")
                }));
                continue;
            }
            if path.is_empty() || !want.wants(&path) {
                continue;
            }
            let h = entry.header();
            let kind = match h.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => "file",
                tar::EntryType::Directory => "dir",
                tar::EntryType::Symlink => "symlink",
                tar::EntryType::Link => "hardlink",
                tar::EntryType::Char => "char",
                tar::EntryType::Block => "block",
                tar::EntryType::Fifo => "fifo",
                _ => continue,
            };
            let link = entry
                .link_name()
                .map_err(err)?
                .map(|l| l.to_string_lossy().into_owned());
            let (size, mode, uid, gid) = (
                h.size().unwrap_or(0),
                h.mode().unwrap_or(0),
                h.uid().unwrap_or(0),
                h.gid().unwrap_or(0),
            );
            let (mut sha256, mut text) = (None, None);
            if kind == "file" {
                let keep = size <= TEXT_MAX && (size as usize) <= *text_budget;
                let mut hasher = Sha256::new();
                let mut small = Vec::new();
                let mut buf = [0u8; 64 << 10];
                loop {
                    let n = entry.read(&mut buf).map_err(err)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    if keep {
                        small.extend_from_slice(&buf[..n]);
                    }
                }
                sha256 = Some(format!("sha256:{}", hex::encode(hasher.finalize())));
                if keep
                    && !small.contains(&0)
                    && let Ok(s) = String::from_utf8(small)
                {
                    *text_budget -= s.len();
                    text = Some(s);
                }
            }
            ops.push(Op::Put(
                path,
                FileState {
                    kind: kind.to_string(),
                    size: if kind == "file" { size } else { 0 },
                    mode: format!("{:o}", mode & 0o7777),
                    uid,
                    gid,
                    link,
                    sha256,
                    text,
                },
            ));
        }
    }
    stream.finish()?;
    Ok(ops)
}

/// Applies one layer's steps to `effect`, keeping the paths `want` asks for. Each step
/// costs the paths it removes plus a logarithmic lookup, so a layer of N entries applies
/// in O(N log N), whatever its shape.
fn apply_ops(effect: &mut Effect, ops: Vec<Op>, want: &Want<'_>) {
    for op in ops {
        match op {
            Op::Opaque(dir) => {
                remove_under(&mut effect.paths, &dir);
                effect.opaque.insert(dir);
            }
            Op::Whiteout(target) => {
                remove_under(&mut effect.paths, &target);
                if want.wants(&target) {
                    effect.paths.insert(target, Entry::Removed);
                }
            }
            Op::Put(path, state) => {
                if state.kind != "dir" {
                    // A non-directory replaces whatever was below this path.
                    remove_under(&mut effect.paths, &path);
                }
                if want.wants(&path) {
                    effect.paths.insert(path, Entry::Present(state));
                }
            }
        }
    }
}

/// Per-layer file indexes (every path's state, no text), by diff_id: what a layer holds,
/// read once. Later diffs look paths up in the shared layers without reading them.
pub struct Indexes(pub std::path::PathBuf);

impl Indexes {
    fn path(&self, layer: &Layer) -> std::path::PathBuf {
        let hex = layer
            .diff_id
            .strip_prefix("sha256:")
            .unwrap_or(&layer.diff_id);
        self.0.join(format!("{hex}.json.zst"))
    }

    fn load(&self, layer: &Layer) -> Option<Vec<Op>> {
        let f = std::fs::File::open(self.path(layer)).ok()?;
        let d = zstd::stream::read::Decoder::new(f).ok()?;
        serde_json::from_reader(io::BufReader::new(d)).ok()
    }

    fn save(&self, layer: &Layer, ops: &[Op]) {
        let write = || -> io::Result<()> {
            std::fs::create_dir_all(&self.0)?;
            let path = self.path(layer);
            let mut tmp = tempfile::NamedTempFile::new_in(&self.0)?;
            {
                let mut z = zstd::stream::write::Encoder::new(&mut tmp, 3)?;
                serde_json::to_writer(&mut z, ops)?;
                z.finish()?;
            }
            tmp.persist(path).map_err(|e| e.error)?;
            Ok(())
        };
        // An index is a cache: failing to write one costs only speed.
        let _ = write();
    }
}

/// A diff keeps at most as many paths per side as one layer may hold (memory grows with
/// them): beyond, it stops and asks for a narrower `--path`.
fn bounded(effect: &Effect, layer: &Layer) -> Result<(), DiffError> {
    let max = crate::store::limits::LayerLimits::configured()
        .map(|l| l.max_entries)
        .unwrap_or(2_000_000) as usize;
    if effect.paths.len() > max {
        return Err(DiffError::Bad {
            what: format!("layer {}", layer.digest),
            message: format!(
                "the layers that differ hold more than {max} paths; compare part of the tree with --path"
            ),
        });
    }
    Ok(())
}

/// Applies `layers` in order, bottom first, keeping the paths `want` asks for. Each layer
/// streamed whole (no prefix, every path) leaves its index behind.
fn apply_layers(
    image: &Image<'_>,
    layers: &[Layer],
    want: &Want<'_>,
    text_budget: &mut usize,
    indexes: Option<&Indexes>,
) -> Result<Effect, DiffError> {
    let mut effect = Effect::default();
    for layer in layers {
        let ops = layer_ops(image, layer, want, text_budget)?;
        if let (Some(ix), Want::All("")) = (indexes, want) {
            ix.save(layer, &ops);
        }
        apply_ops(&mut effect, ops, want);
        bounded(&effect, layer)?;
    }
    Ok(effect)
}

/// The shared layers' state of the paths `want` asks for: from the layers' indexes where
/// they exist, else by streaming the layer (and indexing it for next time).
fn lower_state(
    image: &Image<'_>,
    layers: &[Layer],
    want: &Want<'_>,
    indexes: Option<&Indexes>,
) -> Result<Effect, DiffError> {
    let mut effect = Effect::default();
    for layer in layers {
        let ops = match indexes.and_then(|ix| ix.load(layer)) {
            Some(ops) => ops,
            None => {
                let ops = layer_ops(image, layer, &Want::All(""), &mut 0)?;
                if let Some(ix) = indexes {
                    ix.save(layer, &ops);
                }
                ops
            }
        };
        apply_ops(&mut effect, ops, want);
        bounded(&effect, layer)?;
    }
    Ok(effect)
}

/// The state of `path` on one side: its own layers' effect over the shared prefix.
fn resolve<'e>(side: &'e Effect, lower: &'e Effect, path: &str) -> Option<&'e FileState> {
    let from = |e: &'e Effect| match e.paths.get(path) {
        Some(Entry::Present(s)) => Some(Some(s)),
        Some(Entry::Removed) => Some(None),
        None => None,
    };
    if let Some(s) = from(side) {
        return s;
    }
    if has_ancestor_in(path, &side.opaque) {
        return None;
    }
    from(lower).flatten()
}

fn compare(path: &str, a: Option<&FileState>, b: Option<&FileState>) -> Option<FileChange> {
    let change = |change, what, diff| FileChange {
        path: path.to_string(),
        change,
        a: a.cloned(),
        b: b.cloned(),
        what,
        diff,
    };
    match (a, b) {
        (None, None) => None,
        (None, Some(_)) => Some(change("added", Vec::new(), None)),
        (Some(_), None) => Some(change("removed", Vec::new(), None)),
        (Some(x), Some(y)) => {
            let mut what = Vec::new();
            if x.kind != y.kind {
                what.push("kind");
            }
            if x.sha256 != y.sha256 || x.size != y.size {
                what.push("content");
            }
            if x.mode != y.mode {
                what.push("mode");
            }
            if (x.uid, x.gid) != (y.uid, y.gid) {
                what.push("owner");
            }
            if x.link != y.link {
                what.push("link");
            }
            if what.is_empty() {
                return None;
            }
            let diff = match (&x.text, &y.text) {
                (Some(t1), Some(t2)) if what.contains(&"content") => Some(
                    similar::TextDiff::from_lines(t1, t2)
                        .unified_diff()
                        .context_radius(3)
                        .header(&format!("a/{path}"), &format!("b/{path}"))
                        .to_string(),
                ),
                _ => None,
            };
            Some(change("modified", what, diff))
        }
    }
}

/// The paths that differ between `a` and `b` (under `prefix`, if not empty).
pub fn files(
    a: &Image<'_>,
    b: &Image<'_>,
    prefix: &str,
    indexes: Option<&Indexes>,
) -> Result<Vec<FileChange>, DiffError> {
    let prefix = normalize(prefix);
    let common = a
        .layers
        .iter()
        .zip(&b.layers)
        .take_while(|(x, y)| x.diff_id == y.diff_id)
        .count();
    let mut budget = TEXT_BUDGET;
    let want = Want::All(&prefix);
    let ea = apply_layers(a, &a.layers[common..], &want, &mut budget, indexes)?;
    let eb = apply_layers(b, &b.layers[common..], &want, &mut budget, indexes)?;
    let touched: BTreeSet<String> = ea.paths.keys().chain(eb.paths.keys()).cloned().collect();
    // What the shared layers hold is needed only for paths one side did not touch, and
    // below directories one side made opaque.
    let one_sided: BTreeSet<String> = touched
        .iter()
        .filter(|p| ea.paths.contains_key(*p) != eb.paths.contains_key(*p))
        .cloned()
        .collect();
    let opaque: BTreeSet<String> = ea
        .opaque
        .symmetric_difference(&eb.opaque)
        .filter(|d| prefix.is_empty() || under(d, &prefix) || **d == prefix || under(&prefix, d))
        .cloned()
        .collect();
    let lower = if common > 0 && (!one_sided.is_empty() || !opaque.is_empty()) {
        lower_state(
            a,
            &a.layers[..common],
            &Want::Some(&one_sided, &opaque),
            indexes,
        )?
    } else {
        Effect::default()
    };
    let mut paths = touched;
    for (p, e) in &lower.paths {
        if matches!(e, Entry::Present(_)) && has_ancestor_in(p, &opaque) {
            paths.insert(p.clone());
        }
    }
    Ok(paths
        .iter()
        .filter(|p| prefix.is_empty() || **p == prefix || under(p, &prefix))
        .filter_map(|p| compare(p, resolve(&ea, &lower, p), resolve(&eb, &lower, p)))
        .collect())
}

/// Layers matched by diff_id: shared, only in A, only in B.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LayerDiff {
    /// In both.
    pub shared: Vec<Layer>,
    /// Only in A.
    pub only_a: Vec<Layer>,
    /// Only in B.
    pub only_b: Vec<Layer>,
}

/// Matches layers by diff_id (a multiset: a layer twice in A and once in B is shared once).
pub fn layers(a: &[Layer], b: &[Layer]) -> LayerDiff {
    let mut left: Vec<Option<&Layer>> = b.iter().map(Some).collect();
    let mut out = LayerDiff::default();
    for l in a {
        match left
            .iter_mut()
            .find(|x| x.is_some_and(|y| y.diff_id == l.diff_id))
        {
            Some(slot) => {
                out.shared.push(l.clone());
                *slot = None;
            }
            None => out.only_a.push(l.clone()),
        }
    }
    out.only_b = left.into_iter().flatten().cloned().collect();
    out
}

/// An image config as flat `key → value` pairs: entrypoint, cmd, each env variable, ports,
/// user, workdir, each label, healthcheck, stop signal, volumes, shell.
pub fn config_keys(config: &Value) -> BTreeMap<String, String> {
    let c = &config["config"];
    let mut out = BTreeMap::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (key, field) in [
        ("entrypoint", "Entrypoint"),
        ("cmd", "Cmd"),
        ("user", "User"),
        ("workdir", "WorkingDir"),
        ("healthcheck", "Healthcheck"),
        ("stopsignal", "StopSignal"),
        ("shell", "Shell"),
    ] {
        if let Some(v) = c.get(field).filter(|v| !v.is_null()) {
            out.insert(key.to_string(), text(v));
        }
    }
    for (key, field) in [("ports", "ExposedPorts"), ("volumes", "Volumes")] {
        if let Some(m) = c.get(field).and_then(Value::as_object) {
            out.insert(
                key.to_string(),
                m.keys().cloned().collect::<Vec<_>>().join(" "),
            );
        }
    }
    for e in c["Env"].as_array().into_iter().flatten() {
        if let Some((k, v)) = e.as_str().and_then(|s| s.split_once('=')) {
            out.insert(format!("env.{k}"), v.to_string());
        }
    }
    for (k, v) in c["Labels"].as_object().into_iter().flatten() {
        out.insert(format!("labels.{k}"), text(v));
    }
    out
}

/// One key whose value differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyChange {
    /// The key.
    pub key: String,
    /// Its value in A (absent: not set).
    pub a: Option<String>,
    /// Its value in B.
    pub b: Option<String>,
}

/// The keys whose values differ, and a unified diff of `key = value` lines.
pub fn keyed(
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
    names: (&str, &str),
) -> (Vec<KeyChange>, String) {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let changes = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| KeyChange {
            key: k.clone(),
            a: a.get(k).cloned(),
            b: b.get(k).cloned(),
        })
        .collect();
    let render = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect::<String>()
    };
    let (ta, tb) = (render(a), render(b));
    let text = similar::TextDiff::from_lines(&ta, &tb)
        .unified_diff()
        .context_radius(2)
        .header(names.0, names.1)
        .to_string();
    (changes, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(d: &str) -> Layer {
        Layer {
            diff_id: format!("sha256:{d}"),
            digest: Digest::of(d.as_bytes()),
            size: 1,
            media_type: String::new(),
        }
    }

    #[test]
    fn layers_match_by_diff_id_as_a_multiset() {
        let d = layers(
            &[layer("x"), layer("y"), layer("y")],
            &[layer("y"), layer("z")],
        );
        let ids = |v: &[Layer]| v.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&d.shared), ["sha256:y"]);
        assert_eq!(ids(&d.only_a), ["sha256:x", "sha256:y"]);
        assert_eq!(ids(&d.only_b), ["sha256:z"]);
    }

    #[test]
    fn config_keys_flatten_env_and_labels() {
        let c: Value = serde_json::json!({"config": {
            "Env": ["A=1", "PATH=/bin"], "Cmd": ["sh"], "Labels": {"l": "v"},
            "ExposedPorts": {"80/tcp": {}}, "User": ""
        }});
        let k = config_keys(&c);
        assert_eq!(k["env.A"], "1");
        assert_eq!(k["labels.l"], "v");
        assert_eq!(k["cmd"], "[\"sh\"]");
        assert_eq!(k["ports"], "80/tcp");
        let mut other = k.clone();
        other.insert("env.A".into(), "2".into());
        let (changes, text) = keyed(&k, &other, ("a", "b"));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].key, "env.A");
        assert!(text.contains("-env.A = 1\n+env.A = 2\n"), "{text}");
    }

    #[test]
    fn a_path_resolves_through_whiteouts_and_opaque_dirs() {
        let st = |n: &str| FileState {
            kind: "file".into(),
            size: 1,
            mode: "644".into(),
            uid: 0,
            gid: 0,
            link: None,
            sha256: Some(n.into()),
            text: None,
        };
        let mut lower = Effect::default();
        lower.paths.insert("etc/a".into(), Entry::Present(st("1")));
        lower.paths.insert("d/x".into(), Entry::Present(st("2")));
        let mut side = Effect::default();
        side.paths.insert("etc/a".into(), Entry::Removed);
        side.opaque.insert("d".into());
        assert!(resolve(&side, &lower, "etc/a").is_none());
        assert!(resolve(&side, &lower, "d/x").is_none());
        assert!(resolve(&Effect::default(), &lower, "d/x").is_some());
    }
}
