//! Writes one layer in one streaming pass: tar entries (given in sorted order) → sha256 of
//! the tar (the diff_id) → compression → the store's blob writer (which hashes the
//! compressed bytes into the digest, fsyncs, verifies and renames). Nothing is held in
//! memory beyond the compressor's blocks.
//!
//! Headers are normalised so the same entries give the same bytes anywhere: GNU format, the
//! given mtime (from `SOURCE_DATE_EPOCH` or zero), no user or group names, no device
//! numbers, ownership and mode as given.

use std::io::{self, Read, Write};

use oci_spec::image::{Descriptor, MediaType};

use super::BuildError;
use super::chunked::{
    ChunkIndex, ChunkedWriter, Codec, OutputError, ResumePoint, ReusableChunks, Start,
    prefix_pieces,
};
use super::imagefs::IndexEntry;
use crate::manifest::schema::Compression;
use crate::store::{BlobWriter, DiffId, Digest, PrefixCopy, Sha256Resumable, Store, StoreError};

/// Ownership, mode and time of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct EntryMeta {
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

/// A finished layer: blob in the store, both digests, size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: DiffId,
    /// Compressed size in bytes.
    pub size: u64,
    /// Uncompressed size in bytes.
    pub tar_size: u64,
    /// The layer media type.
    pub media_type: String,
    /// Uncompressed bytes taken over unread from an earlier layer of the same step (its
    /// unchanged first entries; see [`LayerWriter::resuming`]). Only for the build that
    /// wrote the layer: a cached layer has 0.
    #[serde(skip)]
    pub unchanged_prefix: u64,
}

impl Layer {
    /// The manifest descriptor.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            MediaType::from(self.media_type.as_str()),
            self.size,
            self.digest.to_oci(),
        )
    }
}

/// Compression settings for new layers.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerCompression {
    /// Algorithm.
    pub algorithm: Compression,
    /// Level; `None` for berth's default.
    pub level: Option<i32>,
}

impl LayerCompression {
    /// berth's default zstd level (zstd's own default).
    pub const DEFAULT_ZSTD_LEVEL: u32 = 3;

    /// berth's default gzip level: the fastest (go-containerregistry's default too). On
    /// binaries it compresses about twice as fast as level 4 for layers about 14% larger;
    /// `compression_level` trades the other way.
    pub const DEFAULT_GZIP_LEVEL: u32 = 1;

    fn media_type(&self) -> &'static str {
        match self.algorithm {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Where a layer's chunk index lives (gc removes it with the blob).
fn chunk_index_path(store: &Store, digest: &Digest) -> std::path::PathBuf {
    store
        .state_dir()
        .join("cache/chunks-b3c")
        .join(format!("{}.json", digest.hex()))
}

/// Loads the chunk indexes of earlier layers whose compressed chunks a new layer may copy.
fn reusable(
    store: &Store,
    from: &[Digest],
    codec: Codec,
    level: u32,
) -> (ReusableChunks, Vec<(Digest, ChunkIndex)>) {
    let mut reuse = ReusableChunks::default();
    let mut indexes = Vec::new();
    for d in from {
        if let (Some(index), Ok(blob)) = (read_chunk_index(store, d), store.blob_ranges(d)) {
            reuse.add(blob, &index, codec, level);
            indexes.push((d.clone(), index));
        }
    }
    (reuse, indexes)
}

/// The chunk index of a stored layer, if it has a readable one; resume points whose
/// checksum fails are dropped (the chunks stay usable, the points not).
fn read_chunk_index(store: &Store, digest: &Digest) -> Option<ChunkIndex> {
    let bytes = std::fs::read(chunk_index_path(store, digest)).ok()?;
    let mut index = serde_json::from_slice::<ChunkIndex>(&bytes).ok()?;
    if index.resume_sum != ChunkIndex::resume_checksum(&index.resume) {
        index.resume.clear();
    }
    Some(index)
}

/// The resume points of `index` a layer compressed with `codec` at `level` can start from:
/// its hash states whole, and its chunks up to it listed end to end with their hashes.
fn usable_points(
    index: &ChunkIndex,
    codec: Codec,
    level: u32,
) -> impl Iterator<Item = (&ResumePoint, Vec<(u64, [u8; 32])>)> {
    let same = index.resumable_as(codec, level);
    index
        .resume
        .iter()
        .filter(move |_| same)
        .filter(|p| {
            Sha256Resumable::resume(&p.boundary.tar).is_some()
                && Sha256Resumable::resume(&p.boundary.blob).is_some()
        })
        .filter_map(|p| Some((p, prefix_pieces(index, &p.boundary)?)))
}

/// The first bytes of a step's last layer, copied while the step's plan is still being
/// made: as far as its furthest resume point. [`LayerWriter::resuming`] then takes as many
/// of them as the plan allows; dropped unused, the copy stops and is removed.
pub struct EarlyCopy {
    digest: Digest,
    copy: PrefixCopy,
}

impl EarlyCopy {
    /// Starts copying the stored layer `from`, if a layer compressed as `compression` could
    /// resume from it.
    pub fn start(store: &Store, compression: LayerCompression, from: &Digest) -> Option<EarlyCopy> {
        let (codec, level) = codec_level(compression);
        let index = read_chunk_index(store, from)?;
        let (_, pieces) =
            usable_points(&index, codec, level).max_by_key(|(p, _)| p.boundary.tar.len)?;
        let copy = store.copy_prefix(from, pieces).ok()?;
        Some(EarlyCopy {
            digest: from.clone(),
            copy,
        })
    }
}

/// What a step's cache key holds of how its layer is compressed: the algorithm, the level,
/// and the rules its chunks are cut by (the layer's bytes depend on all three, and a cache
/// hit must give the bytes a build without the cache would).
pub fn compression_key(compression: LayerCompression) -> String {
    let (codec, _) = codec_level(compression);
    let named = format!("{:?}/{:?}", compression.algorithm, compression.level);
    match super::chunked::cut_rules(codec) {
        0 => named,
        rules => format!("{named}/cuts {rules}"),
    }
}

/// The chunk codec and level for `compression`.
fn codec_level(compression: LayerCompression) -> (Codec, u32) {
    match compression.algorithm {
        Compression::Gzip => (
            Codec::Gzip,
            compression
                .level
                .map_or(LayerCompression::DEFAULT_GZIP_LEVEL, |l| {
                    l.clamp(0, 9) as u32
                }),
        ),
        Compression::Zstd => (
            Codec::Zstd,
            compression
                .level
                .map_or(LayerCompression::DEFAULT_ZSTD_LEVEL, |l| {
                    l.clamp(1, 19) as u32
                }),
        ),
    }
}

/// Bumped whenever the bytes an entry is written as change (header format, padding, or
/// an upgrade of the `tar` crate that writes headers differently, so check its changelog
/// when Cargo.lock moves it): a resume point saved by another version then matches nothing.
const ENTRY_FORMAT: &[u8] = b"berth layer entries v1: GNU headers, long names as records";

/// The fingerprint of a layer's entries up to and including `e` (`prev` is the one up to
/// the entry before): equal fingerprints mean equal tar bytes up to the end of `e`.
/// `identity` names a file's content (its content hash); other entries have none.
pub fn fingerprint(
    prev: Option<&[u8; 32]>,
    e: &IndexEntry,
    mtime: u64,
    identity: &str,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(ENTRY_FORMAT);
    h.update(prev.unwrap_or(&[0; 32]));
    for part in [e.path.as_str(), e.link.as_str(), identity] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&[e.kind as u8]);
    for n in [u64::from(e.mode), e.uid, e.gid, e.size, mtime] {
        h.update(&n.to_le_bytes());
    }
    h.finalize().into()
}

/// The index entry for an entry of `kind` (`d`, `f`, `l`, `h`): a directory's path gets
/// its trailing slash, as in the tar.
pub fn describe(path: &str, kind: char, meta: &EntryMeta, size: u64, link: &str) -> IndexEntry {
    IndexEntry {
        path: if kind == 'd' {
            format!("{path}/")
        } else {
            path.to_string()
        },
        kind,
        mode: meta.mode & 0o7777,
        uid: meta.uid,
        gid: meta.gid,
        size,
        link: link.to_string(),
    }
}

/// Where a resumed layer carries on: the entry (by position in the layer) and how many of
/// its bytes (header included) are already written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeAt {
    /// The entry's position.
    pub entry: usize,
    /// Its bytes already in the layer.
    pub offset: u64,
}

/// Streams tar entries into a new layer blob.
pub struct LayerWriter {
    tar: tar::Builder<ChunkedWriter<BlobWriter>>,
    media_type: &'static str,
    store: Store,
    /// Every entry written, for the layer's entry index (what a later step reads instead
    /// of decompressing the layer).
    entries: Vec<IndexEntry>,
    /// Per entry: its mtime, and its content's identity when known (`Some("")` for
    /// entries without content).
    identities: Vec<(u64, Option<String>)>,
    /// Where each entry from `starts_from` on starts in the tar.
    starts: Vec<u64>,
    /// The first entry whose start is known (a resumed layer does not know those before
    /// the entry it resumed in).
    starts_from: usize,
    /// Resume points of the earlier layer that lie before where this one resumed: the same
    /// bytes, so valid for this one too.
    inherited: Vec<ResumePoint>,
    /// The fingerprints of the first entries, as the caller planned them (see
    /// [`LayerWriter::resuming`]): not computed again at the end.
    planned: Vec<[u8; 32]>,
    /// Where this layer resumed (uncompressed bytes taken over), or 0.
    resumed_from: u64,
    /// The header bytes of the entry being written.
    scratch: Vec<u8>,
}

/// The build error for an entry that could not be added: the store's when the layer could
/// not be written (a full disk, say), else what `otherwise` makes of it (a failure to read
/// the entry's source, usually).
pub fn entry_error(e: io::Error, otherwise: impl FnOnce(io::Error) -> BuildError) -> BuildError {
    if e.get_ref().is_some_and(|r| r.is::<OutputError>()) {
        let inner = e.into_inner().expect("checked").downcast::<OutputError>();
        return BuildError::Store(io_err(inner.expect("checked").0));
    }
    otherwise(e)
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::Io {
        what: "cannot write a layer into",
        path: "the store".into(),
        source: e,
    }
}

impl LayerWriter {
    /// Starts a layer in `store`. Compressed chunks of the layers in `reuse_from` that recur
    /// in the new layer are copied rather than compressed again.
    pub fn new(
        store: &Store,
        compression: LayerCompression,
        reuse_from: &[Digest],
    ) -> Result<Self, StoreError> {
        Ok(Self::resuming(store, compression, reuse_from, &[], None)?.0)
    }

    fn around(
        compressor: ChunkedWriter<BlobWriter>,
        compression: LayerCompression,
        store: &Store,
        starts_from: usize,
        inherited: Vec<ResumePoint>,
    ) -> LayerWriter {
        let mut tar = tar::Builder::new(compressor);
        tar.follow_symlinks(false);
        LayerWriter {
            tar,
            media_type: compression.media_type(),
            store: store.clone(),
            entries: Vec::new(),
            identities: Vec::new(),
            starts: Vec::new(),
            starts_from,
            inherited,
            planned: Vec::new(),
            resumed_from: 0,
            scratch: Vec::with_capacity(1024),
        }
    }

    /// [`LayerWriter::new`] for a layer whose entries will be those `planned` fingerprints
    /// (see [`fingerprint`]; one per entry, in order): when an earlier layer in
    /// `reuse_from` had the same first entries, the new layer starts as a copy of its
    /// compressed bytes up to a chunk boundary inside them, with the hash states saved
    /// there, and the caller writes from the returned point on, announcing the entries
    /// before it with [`LayerWriter::skip`]. Otherwise it is a fresh layer (`None`).
    pub fn resuming(
        store: &Store,
        compression: LayerCompression,
        reuse_from: &[Digest],
        planned: &[[u8; 32]],
        early: Option<EarlyCopy>,
    ) -> Result<(Self, Option<ResumeAt>), StoreError> {
        let (codec, level) = codec_level(compression);
        let (reuse, indexes) = reusable(store, reuse_from, codec, level);
        // The furthest point whose entries up to it are the planned ones.
        let best = indexes
            .iter()
            .flat_map(|(d, index)| {
                usable_points(index, codec, level).map(move |(p, pieces)| (d, index, p, pieces))
            })
            .filter(|(_, _, p, _)| {
                planned
                    .get(p.entry)
                    .is_some_and(|fp| hex::encode(fp) == p.entries)
            })
            .max_by_key(|(_, _, p, _)| p.boundary.tar.len);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some((digest, index, point, pieces)) = best {
            // The copy started early, when it is of this blob; else one starts now.
            let copy = match early {
                Some(e) if e.digest == *digest => Some(e.copy),
                other => {
                    drop(other);
                    store.copy_prefix(digest, pieces).ok()
                }
            };
            if let Some(copy) = copy
                && let Ok(blob) = store.blob_writer_from(copy, &point.boundary.blob)
            {
                let start = Start {
                    boundary: point.boundary.clone(),
                    chunks: index.chunks[..point.boundary.chunks].to_vec(),
                };
                let inherited = index
                    .resume
                    .iter()
                    .filter(|p| p.boundary.tar.len <= point.boundary.tar.len)
                    .cloned()
                    .collect();
                let compressor =
                    ChunkedWriter::resume(blob, codec, level, threads, reuse, Some(start))
                        .map_err(io_err)?;
                let mut w = Self::around(compressor, compression, store, point.entry, inherited);
                w.planned = planned.to_vec();
                w.resumed_from = point.boundary.tar.len;
                // The entry it resumes in starts this far before the boundary.
                w.starts.push(point.boundary.tar.len - point.entry_offset);
                let at = ResumeAt {
                    entry: point.entry,
                    offset: point.entry_offset,
                };
                return Ok((w, Some(at)));
            }
        }
        let blob = store.blob_writer()?;
        let compressor = ChunkedWriter::new(blob, codec, level, threads, reuse).map_err(io_err)?;
        let mut w = Self::around(compressor, compression, store, 0, Vec::new());
        w.planned = planned.to_vec();
        Ok((w, None))
    }

    /// Notes the start of the next entry.
    fn begin(&mut self) {
        if self.entries.len() >= self.starts_from + self.starts.len() {
            let at = self.tar.get_ref().position();
            self.starts.push(at);
        }
    }

    fn record(&mut self, entry: IndexEntry, meta: &EntryMeta, identity: Option<String>) {
        self.entries.push(entry);
        self.identities.push((meta.mtime, identity));
    }

    /// Gives the last entry written (a file) its content's identity, known only once its
    /// bytes were read.
    pub fn identify_last(&mut self, identity: &str) {
        if let Some(last) = self.identities.last_mut() {
            last.1 = Some(identity.to_string());
        }
    }

    /// Announces an entry of a resumed layer that lies before where it resumed: its bytes
    /// are already in the layer; only the layer's entry index learns of it.
    pub fn skip(&mut self, entry: IndexEntry, meta: &EntryMeta, identity: String) {
        self.record(entry, meta, Some(identity));
    }

    /// Writes the rest of an entry a resumed layer resumed in: its bytes from `offset` on
    /// (its header, then `size` content bytes from `content`, then padding).
    pub fn finish_entry<R: Read + io::Seek>(
        &mut self,
        entry: IndexEntry,
        meta: &EntryMeta,
        identity: &str,
        content: Option<R>,
        offset: u64,
    ) -> io::Result<()> {
        match content {
            Some(mut content) => {
                // The content from the first byte still to write (none when the offset lies
                // in the header).
                let hlen = self.header_bytes(&entry, meta)?.len() as u64;
                content.seek(io::SeekFrom::Start(offset.saturating_sub(hlen)))?;
                self.entry(entry, meta, Some(identity), &mut content, offset)
            }
            None => self.entry(entry, meta, Some(identity), &mut io::empty(), offset),
        }
    }

    fn header(kind: tar::EntryType, meta: &EntryMeta, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(meta.mode & 0o7777);
        h.set_uid(meta.uid);
        h.set_gid(meta.gid);
        h.set_mtime(meta.mtime);
        h.set_size(size);
        h
    }

    /// The bytes of an entry's header, long-name records included, as the tar crate
    /// writes them (in a buffer kept between entries).
    fn header_bytes(&mut self, entry: &IndexEntry, meta: &EntryMeta) -> io::Result<&[u8]> {
        let kind = match entry.kind {
            'd' => tar::EntryType::Directory,
            'f' => tar::EntryType::Regular,
            'l' => tar::EntryType::Symlink,
            _ => tar::EntryType::Link,
        };
        let mut h = Self::header(kind, meta, entry.size);
        self.scratch.clear();
        let mut b = tar::Builder::new(&mut self.scratch);
        match entry.kind {
            'd' | 'f' => b.append_data(&mut h, &entry.path, io::empty())?,
            _ => b.append_link(&mut h, &entry.path, &entry.link)?,
        }
        b.into_inner()?;
        // `into_inner` ended the archive (two zero blocks): not part of the entry.
        self.scratch.truncate(self.scratch.len() - 1024);
        Ok(&self.scratch)
    }

    /// Writes an entry from its byte `skip` on (0 for all of it): its header, then
    /// `entry.size` bytes from `content` (the first of them still to write), then padding
    /// to the block. Fresh entries and the one a resumed layer carries on in are written
    /// by this one function, so they are the same bytes.
    fn entry(
        &mut self,
        entry: IndexEntry,
        meta: &EntryMeta,
        identity: Option<&str>,
        content: &mut dyn Read,
        skip: u64,
    ) -> io::Result<()> {
        self.begin();
        let hlen = self.header_bytes(&entry, meta)?.len() as u64;
        let out = self.tar.get_mut();
        if skip < hlen {
            out.write_all(&self.scratch[skip as usize..])?;
        }
        // The content is read straight into the compressor's chunk buffer.
        let size = entry.size;
        let from = skip.saturating_sub(hlen);
        if from < size && out.write_from(&mut &mut *content, size - from)? != size - from {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was being read", entry.path),
            ));
        }
        let pad = (512 - size % 512) % 512;
        let padded = from.saturating_sub(size).min(pad);
        out.write_all(&[0u8; 512][..(pad - padded) as usize])?;
        self.record(entry, meta, identity.map(str::to_string));
        Ok(())
    }

    /// Appends a directory. `path` is relative (no leading `/`), without a trailing slash.
    pub fn dir(&mut self, path: &str, meta: &EntryMeta) -> io::Result<()> {
        let e = describe(path, 'd', meta, 0, "");
        self.entry(e, meta, Some(""), &mut io::empty(), 0)
    }

    /// Appends a regular file of `size` bytes read from `content`, failing if the content
    /// is not exactly `size` bytes (the file changed while it was being read).
    pub fn file(
        &mut self,
        path: &str,
        meta: &EntryMeta,
        size: u64,
        mut content: impl Read,
    ) -> io::Result<()> {
        let e = describe(path, 'f', meta, size, "");
        self.entry(e, meta, None, &mut content, 0)
    }

    /// Appends a symlink.
    pub fn symlink(&mut self, path: &str, target: &str, meta: &EntryMeta) -> io::Result<()> {
        let e = describe(path, 'l', meta, 0, target);
        self.entry(e, meta, Some(""), &mut io::empty(), 0)
    }

    /// Appends a hardlink to an earlier entry of this layer.
    pub fn hardlink(&mut self, path: &str, target: &str, meta: &EntryMeta) -> io::Result<()> {
        let e = describe(path, 'h', meta, 0, target);
        self.entry(e, meta, Some(""), &mut io::empty(), 0)
    }

    /// Finishes the tar, the compression and the blob.
    pub fn finish(self) -> Result<Layer, StoreError> {
        let end = self.tar.get_ref().position();
        let finished = self
            .tar
            .into_inner()
            .map_err(io_err)?
            .finish()
            .map_err(io_err)?;
        let (blob, mut index, diff_id, tar_size) = (
            finished.inner,
            finished.index,
            finished.uncompressed_digest,
            finished.uncompressed_len,
        );
        index.resume = resume_points(
            &self.entries,
            &self.identities,
            &self.planned,
            &self.starts,
            self.starts_from,
            end,
            self.inherited,
            finished.boundaries,
        );
        index.resume_sum = ChunkIndex::resume_checksum(&index.resume);
        let (digest, size) = blob.commit(None)?;
        // The chunk index, and the entry index (the next step that needs the image's files
        // reads it, not the layer just compressed), are written on a thread of their own
        // while the build goes on (a step that cannot find one yet reads the layer). They
        // only speed up later builds: failing to save them loses nothing.
        let (store, entries, at) = (self.store.clone(), self.entries, digest.clone());
        crate::background::spawn_kept(move || {
            let path = chunk_index_path(&store, &at);
            if let (Some(dir), Ok(bytes)) = (path.parent(), serde_json::to_vec(&index)) {
                let _ = std::fs::create_dir_all(dir);
                let _ = store.replace_cache_file(&path, &bytes);
            }
            let path = super::imagefs::index_path(&store, &at);
            if let (Some(dir), Ok(bytes)) = (path.parent(), serde_json::to_vec(&entries)) {
                let _ = std::fs::create_dir_all(dir);
                let _ = store.replace_cache_file(&path, &bytes);
            }
        });
        Ok(Layer {
            digest,
            diff_id: DiffId(diff_id),
            size,
            tar_size,
            media_type: self.media_type.to_string(),
            unchanged_prefix: self.resumed_from,
        })
    }
}

/// The chunk boundaries of a finished layer a later one can resume from: those inside an
/// entry whose fingerprint (and every one before it) is known, before the archive's end.
#[allow(clippy::too_many_arguments)]
fn resume_points(
    entries: &[IndexEntry],
    identities: &[(u64, Option<String>)],
    planned: &[[u8; 32]],
    starts: &[u64],
    starts_from: usize,
    end: u64,
    inherited: Vec<ResumePoint>,
    boundaries: Vec<super::chunked::Boundary>,
) -> Vec<ResumePoint> {
    // The planned ones are those of the first entries written (resuming relies on it).
    let mut fps: Vec<[u8; 32]> = planned[..planned.len().min(entries.len())].to_vec();
    for (e, (mtime, identity)) in entries.iter().zip(identities).skip(fps.len()) {
        let Some(identity) = identity else { break };
        fps.push(fingerprint(fps.last(), e, *mtime, identity));
    }
    if cfg!(debug_assertions) {
        let mut again: Vec<[u8; 32]> = Vec::new();
        for (e, (mtime, identity)) in entries.iter().zip(identities) {
            let Some(identity) = identity else { break };
            again.push(fingerprint(again.last(), e, *mtime, identity));
        }
        assert_eq!(
            fps, again,
            "the planned fingerprints are those of the entries written"
        );
    }
    let mut points = inherited;
    for b in boundaries {
        let at = b.tar.len;
        if at >= end || starts.first().is_none_or(|&s| at < s) {
            continue;
        }
        // The last entry starting at or before the boundary.
        let k = starts.partition_point(|&s| s <= at) - 1;
        let entry = starts_from + k;
        if let Some(fp) = fps.get(entry) {
            points.push(ResumePoint {
                entry,
                entry_offset: at - starts[k],
                entries: hex::encode(fp),
                boundary: b,
            });
        }
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_sample(store: &Store) -> Layer {
        let meta = EntryMeta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        let mut w = LayerWriter::new(
            store,
            LayerCompression {
                algorithm: Compression::Gzip,
                level: None,
            },
            &[],
        )
        .unwrap();
        w.dir("www", &meta).unwrap();
        w.file(
            "www/index.html",
            &EntryMeta {
                mode: 0o644,
                ..meta
            },
            5,
            &b"hello"[..],
        )
        .unwrap();
        w.symlink("www/link", "index.html", &meta).unwrap();
        let long = format!("www/{}", "x".repeat(150));
        w.file(&long, &meta, 0, io::empty()).unwrap();
        w.finish().unwrap()
    }

    /// A gzip layer's tar, after checking its blob against its digest and the tar against
    /// its diff_id.
    fn checked_tar(store: &Store, layer: &Layer) -> Vec<u8> {
        let blob = std::fs::read(store.blob_path(&layer.digest)).unwrap();
        assert_eq!(Digest::of(&blob), layer.digest);
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(&blob[..])
            .read_to_end(&mut tar_bytes)
            .unwrap();
        assert_eq!(DiffId(Digest::of(&tar_bytes)), layer.diff_id);
        tar_bytes
    }

    #[test]
    fn layers_are_reproducible_and_digests_check_out() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (
            Store::open(a.path()).unwrap(),
            Store::open(b.path()).unwrap(),
        );
        let (la, lb) = (write_sample(&sa), write_sample(&sb));
        assert_eq!(la, lb);
        let tar_bytes = checked_tar(&sa, &la);
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names[..3], ["www/", "www/index.html", "www/link"]);
        assert_eq!(
            names[3].len(),
            154,
            "long names survive via GNU long-name entries"
        );
    }

    #[test]
    fn the_entry_index_written_with_a_layer_is_what_reading_the_layer_gives() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let layer = write_sample(&store);
        crate::background::finish(); // The indexes are written on a thread of their own.
        let index = crate::build::imagefs::index_path(&store, &layer.digest);
        let written = std::fs::read(&index).unwrap();
        std::fs::remove_file(&index).unwrap();
        let read =
            crate::build::imagefs::layer_entries(&store, &layer.digest, &layer.media_type).unwrap();
        assert_eq!(serde_json::to_vec(&read).unwrap(), written);
        assert!(index.exists(), "reading indexes it again");
    }

    /// A tree of `n` files of pseudo-random text (so deflate has work), in directories.
    fn tree(n: usize, seed: u64) -> Vec<(String, Option<Vec<u8>>)> {
        let mut x = seed | 1;
        let mut out = vec![("d".to_string(), None)];
        for i in 0..n {
            if i % 16 == 0 {
                out.push((format!("d/s{:03}", i / 16), None));
            }
            let len = 20_000 + (i * 7919) % 90_000;
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b"abcdefghij klmnop\n"[(x % 18) as usize]
                })
                .collect();
            out.push((format!("d/s{:03}/f{i:04}", i / 16), Some(body)));
        }
        out
    }

    fn meta_of(content: &Option<Vec<u8>>) -> EntryMeta {
        EntryMeta {
            mode: if content.is_some() { 0o644 } else { 0o755 },
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }

    /// Writes `entries` as write_plan does: resuming after an earlier layer when `reuse`
    /// offers one with the same first entries. Returns the layer, where it resumed and
    /// its entry index.
    fn write_tree(
        store: &Store,
        entries: &[(String, Option<Vec<u8>>)],
        reuse: &[Digest],
    ) -> (Layer, Option<ResumeAt>, Vec<u8>) {
        let c = LayerCompression {
            algorithm: Compression::Gzip,
            level: None,
        };
        let describe_of = |(path, content): &(String, Option<Vec<u8>>)| match content {
            None => describe(path, 'd', &meta_of(content), 0, ""),
            Some(b) => describe(path, 'f', &meta_of(content), b.len() as u64, ""),
        };
        let identity = |content: &Option<Vec<u8>>| {
            content
                .as_ref()
                .map_or(String::new(), |b| blake3::hash(b).to_hex().to_string())
        };
        let mut planned: Vec<[u8; 32]> = Vec::new();
        for e in entries {
            let fp = fingerprint(planned.last(), &describe_of(e), 0, &identity(&e.1));
            planned.push(fp);
        }
        let (mut w, at) = LayerWriter::resuming(store, c, reuse, &planned, None).unwrap();
        for (i, e) in entries.iter().enumerate() {
            let (path, content) = e;
            let meta = meta_of(content);
            match at {
                Some(at) if i < at.entry => {
                    w.skip(describe_of(e), &meta, identity(content).to_string())
                }
                Some(at) if i == at.entry => w
                    .finish_entry(
                        describe_of(e),
                        &meta,
                        &identity(content),
                        content.as_ref().map(|b| io::Cursor::new(b.clone())),
                        at.offset,
                    )
                    .unwrap(),
                _ => match content {
                    None => w.dir(path, &meta).unwrap(),
                    Some(b) => {
                        w.file(path, &meta, b.len() as u64, &b[..]).unwrap();
                        w.identify_last(&identity(content));
                    }
                },
            }
        }
        let layer = w.finish().unwrap();
        crate::background::finish(); // The indexes are written on a thread of their own.
        let index = std::fs::read(crate::build::imagefs::index_path(store, &layer.digest)).unwrap();
        (layer, at, index)
    }

    #[test]
    fn a_layer_resumed_after_its_unchanged_first_entries_is_the_layer_written_whole() {
        let (dir, fresh_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = Store::open(dir.path()).unwrap();
        let mut entries = tree(200, 7);
        let (first, at, _) = write_tree(&store, &entries, &[]);
        assert_eq!(at, None, "nothing to resume from");
        let points = std::fs::read(chunk_index_path(&store, &first.digest)).unwrap();
        let points: ChunkIndex = serde_json::from_slice(&points).unwrap();
        assert!(
            points.resume.len() >= 4,
            "{} resume points",
            points.resume.len()
        );

        // The last file changes (and grows): the layer resumes near the end.
        let mut previous = first.clone();
        for round in 0..3u8 {
            let last = entries.last_mut().unwrap().1.as_mut().unwrap();
            last.extend_from_slice(format!("an edit, round {round}\n").as_bytes());
            let (mut resumed, at, index) = write_tree(&store, &entries, &[previous.digest.clone()]);
            let at = at.expect("resumed");
            assert!(
                resumed.unchanged_prefix > resumed.tar_size / 2,
                "{resumed:?}"
            );
            resumed.unchanged_prefix = 0;
            assert!(
                at.entry > entries.len() / 2,
                "resumed at entry {}",
                at.entry
            );
            // The same bytes as a layer written whole in a store that never saw the others.
            let fresh_store = Store::open(&fresh_dir.path().join(round.to_string())).unwrap();
            let (whole, _, whole_index) = write_tree(&fresh_store, &entries, &[]);
            assert_eq!(resumed, whole, "round {round}");
            assert_eq!(index, whole_index, "the entry index too");
            checked_tar(&store, &resumed);
            previous = resumed;
        }

        // A change in the first file: nothing before it to resume after.
        let first_file = entries.iter_mut().find_map(|e| e.1.as_mut()).unwrap();
        first_file[0] ^= 1;
        let (changed, at, _) = write_tree(&store, &entries, &[previous.digest.clone()]);
        assert!(at.is_none_or(|at| at.entry <= 2), "{at:?}");
        let fresh_store = Store::open(&fresh_dir.path().join("first")).unwrap();
        assert_eq!(changed, write_tree(&fresh_store, &entries, &[]).0);
    }

    #[test]
    fn a_file_that_shrinks_while_read_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = EntryMeta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        let mut w = LayerWriter::new(
            &store,
            LayerCompression {
                algorithm: Compression::Gzip,
                level: None,
            },
            &[],
        )
        .unwrap();
        assert!(w.file("f", &meta, 10, &b"short"[..]).is_err());
    }
}
