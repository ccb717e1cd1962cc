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
use super::chunked::{ChunkIndex, ChunkedWriter, Codec, OutputError, ReusableChunks};
use crate::manifest::schema::Compression;
use crate::store::{BlobWriter, DiffId, Digest, Store, StoreError};

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

fn chunk_index_path(store: &Store, digest: &Digest) -> std::path::PathBuf {
    store
        .state_dir()
        .join("cache/chunks-b3")
        .join(format!("{}.json", digest.hex()))
}

/// Loads the chunk indexes of earlier layers whose compressed chunks a new layer may copy.
fn reusable(store: &Store, from: &[Digest], codec: Codec, level: u32) -> ReusableChunks {
    let mut reuse = ReusableChunks::default();
    for d in from {
        let index = std::fs::read(chunk_index_path(store, d))
            .ok()
            .and_then(|b| serde_json::from_slice::<ChunkIndex>(&b).ok());
        if let (Some(index), Ok(blob)) = (index, store.blob_ranges(d)) {
            reuse.add(blob, &index, codec, level);
        }
    }
    reuse
}

/// Streams tar entries into a new layer blob.
pub struct LayerWriter {
    tar: tar::Builder<ChunkedWriter<BlobWriter>>,
    media_type: &'static str,
    store: Store,
    /// Every entry written, for the layer's entry index (what a later step reads instead
    /// of decompressing the layer).
    entries: Vec<super::imagefs::IndexEntry>,
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
        let blob = store.blob_writer()?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (codec, level) = match compression.algorithm {
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
        };
        let reuse = reusable(store, reuse_from, codec, level);
        let compressor = ChunkedWriter::new(blob, codec, level, threads, reuse).map_err(io_err)?;
        let mut tar = tar::Builder::new(compressor);
        tar.follow_symlinks(false);
        Ok(LayerWriter {
            tar,
            media_type: compression.media_type(),
            store: store.clone(),
            entries: Vec::new(),
        })
    }

    fn record(&mut self, path: String, kind: char, meta: &EntryMeta, size: u64, link: &str) {
        self.entries.push(super::imagefs::IndexEntry {
            path,
            kind,
            mode: meta.mode & 0o7777,
            uid: meta.uid,
            gid: meta.gid,
            size,
            link: link.to_string(),
        });
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

    /// Appends a directory. `path` is relative (no leading `/`), without a trailing slash.
    pub fn dir(&mut self, path: &str, meta: &EntryMeta) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, meta, 0);
        self.tar
            .append_data(&mut h, format!("{path}/"), io::empty())?;
        self.record(format!("{path}/"), 'd', meta, 0, "");
        Ok(())
    }

    /// Appends a regular file of `size` bytes read from `content`, failing if the content
    /// is not exactly `size` bytes (the file changed while it was being read).
    pub fn file(
        &mut self,
        path: &str,
        meta: &EntryMeta,
        size: u64,
        content: impl Read,
    ) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, meta, size);
        // The header (and any long-name records) through the tar crate, which pads after
        // the bytes it copied: none. The content is read straight into the compressor's
        // chunk buffer, not through the tar crate's 8 KiB copy loop.
        self.tar.append_data(&mut h, path, io::empty())?;
        let out = self.tar.get_mut();
        let mut content = content;
        if out.write_from(&mut content, size)? != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path} shrank while it was being read"),
            ));
        }
        let pad = (512 - size % 512) % 512;
        out.write_all(&[0u8; 512][..pad as usize])?;
        self.record(path.to_string(), 'f', meta, size, "");
        Ok(())
    }

    /// Appends a symlink.
    pub fn symlink(&mut self, path: &str, target: &str, meta: &EntryMeta) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, meta, 0);
        self.tar.append_link(&mut h, path, target)?;
        self.record(path.to_string(), 'l', meta, 0, target);
        Ok(())
    }

    /// Appends a hardlink to an earlier entry of this layer.
    pub fn hardlink(&mut self, path: &str, target: &str, meta: &EntryMeta) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Link, meta, 0);
        self.tar.append_link(&mut h, path, target)?;
        self.record(path.to_string(), 'h', meta, 0, target);
        Ok(())
    }

    /// Finishes the tar, the compression and the blob.
    pub fn finish(self) -> Result<Layer, StoreError> {
        let finished = self
            .tar
            .into_inner()
            .map_err(io_err)?
            .finish()
            .map_err(io_err)?;
        let (blob, index, diff_id, tar_size) = (
            finished.inner,
            finished.index,
            finished.uncompressed_digest,
            finished.uncompressed_len,
        );
        let (digest, size) = blob.commit(None)?;
        // The index only speeds up later builds; failing to save it loses nothing.
        let path = chunk_index_path(&self.store, &digest);
        if let (Some(dir), Ok(bytes)) = (path.parent(), serde_json::to_vec(&index)) {
            let _ = std::fs::create_dir_all(dir);
            let _ = self.store.replace_file(&path, &bytes);
        }
        // Its entry index too: the next step that needs the image's files reads this, not
        // the layer it just compressed.
        let path = super::imagefs::index_path(&self.store, &digest);
        if let (Some(dir), Ok(bytes)) = (path.parent(), serde_json::to_vec(&self.entries)) {
            let _ = std::fs::create_dir_all(dir);
            let _ = self.store.replace_file(&path, &bytes);
        }
        Ok(Layer {
            digest,
            diff_id: DiffId(diff_id),
            size,
            tar_size,
            media_type: self.media_type.to_string(),
        })
    }
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

    #[test]
    fn layers_are_reproducible_and_digests_check_out() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (
            Store::open(a.path()).unwrap(),
            Store::open(b.path()).unwrap(),
        );
        let (la, lb) = (write_sample(&sa), write_sample(&sb));
        assert_eq!(la, lb);
        let blob = std::fs::read(sa.blob_path(&la.digest)).unwrap();
        assert_eq!(Digest::of(&blob), la.digest);
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(&blob[..])
            .read_to_end(&mut tar_bytes)
            .unwrap();
        assert_eq!(DiffId(Digest::of(&tar_bytes)), la.diff_id);
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
        let index = crate::build::imagefs::index_path(&store, &layer.digest);
        let written = std::fs::read(&index).unwrap();
        std::fs::remove_file(&index).unwrap();
        let read =
            crate::build::imagefs::layer_entries(&store, &layer.digest, &layer.media_type).unwrap();
        assert_eq!(serde_json::to_vec(&read).unwrap(), written);
        assert!(index.exists(), "reading indexes it again");
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
