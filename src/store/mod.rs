//! The local content store. Its root is an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/…`), so skopeo and umoci read it directly; tags are
//! `org.opencontainers.image.ref.name` annotations in `index.json`. berth's own state (build
//! cache, ingest files) lives under `berth/` beside the layout.
//!
//! Writes are atomic: a blob is written to an ingest file, fsynced, checked for size and
//! digest, then renamed to its final name; `index.json` is rewritten whole under a file lock
//! and renamed into place. A crash leaves no half blob under a final name.

pub mod digest;
mod direct;
pub mod export;
pub mod gc;
pub mod image;
pub mod index;
pub mod limits;
pub mod owner;
pub mod partial;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use digest::{DiffId, Digest, HashingReader, HashingWriter, Midstate, Sha256Resumable};
pub use direct::BlobRanges;
pub use gc::{GcReport, Pin, Root, UseGuard};
pub use image::{ImageConfig, StoredImage};
pub use index::{Tag, canonical_json, normalize_tag};

/// The `imageLayoutVersion` berth writes.
const LAYOUT_VERSION: &str = "1.0.0";

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done ("cannot read", "cannot create", …).
        what: &'static str,
        /// The file involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Written content does not match what was expected.
    #[error(
        "blob content does not match: expected {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes)"
    )]
    DigestMismatch {
        /// Expected digest.
        expected: Digest,
        /// Expected size.
        expected_size: u64,
        /// Digest of what arrived.
        actual: Digest,
        /// Size of what arrived.
        actual_size: u64,
    },
    /// A blob the store should have is missing.
    #[error("blob {0} is not in the store")]
    MissingBlob(Digest),
    /// A JSON document in the store does not parse.
    #[error("{what} {digest} is not valid: {message}")]
    BadDocument {
        /// Which kind of document.
        what: &'static str,
        /// Its digest (or file name).
        digest: String,
        /// The parser's complaint.
        message: String,
    },
    /// No image matches a reference.
    #[error("no image `{0}` in the store")]
    UnknownImage(String),
    /// A digest prefix matches several images.
    #[error("`{reference}` matches several images: {}", candidates.join(", "))]
    AmbiguousImage {
        /// The prefix.
        reference: String,
        /// What it matches.
        candidates: Vec<String>,
    },
    /// A tag is not a valid `name:tag`.
    #[error(
        "`{0}` is not a valid image name (expected [HOST/]NAME[:TAG] or NAME@sha256:DIGEST: lower-case path components of letters, digits and . _ -, at most 255 characters; a tag of at most 128)"
    )]
    BadTag(String),
}

impl StoreError {
    /// Wraps an I/O error with what was being done to which path.
    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { what, path, source }
    }
}

/// Result type of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Makes sure `dir` (the store, or its `berth/` directory) is the caller's alone: owned by
/// its user, and closed to everyone else (mode 0700). Unpacked images hold setuid files
/// and world-writable directories; a store others can traverse would let them plant files
/// in images, or run those setuid files as the store's owner (as Docker's CVE-2021-41091).
/// A store another user owns is refused: they could plant what berth then runs.
pub fn own_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "it belongs to uid {}, not to uid {me}: berth keeps images only in a store of its own user",
                md.uid()
            ),
        ));
    }
    if md.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A content store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store at `root`, creating an empty OCI layout if there is none.
    pub fn open(root: &Path) -> Result<Store> {
        let store = Store {
            root: root.to_path_buf(),
        };
        // The store's own directories are checked before anything in them is used.
        for dir in [&store.root, &store.state_dir()] {
            fs::create_dir_all(dir).map_err(StoreError::io("cannot create", dir))?;
            own_dir(dir).map_err(StoreError::io("cannot use the store", dir))?;
        }
        for dir in [
            store.root.join("blobs/sha256"),
            store.state_dir().join("ingest"),
        ] {
            fs::create_dir_all(&dir).map_err(StoreError::io("cannot create", &dir))?;
        }
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            let text = format!("{{\"imageLayoutVersion\":\"{LAYOUT_VERSION}\"}}");
            store.write_atomic(&layout, text.as_bytes())?;
        }
        let index = store.root.join("index.json");
        if !index.exists() {
            let _lock = store.lock()?;
            if !index.exists() {
                store.write_atomic(&index, index::EMPTY_INDEX.as_bytes())?;
            }
        }
        store.recover();
        Ok(store)
    }

    /// Removes what killed berth processes left behind (their ingest files, temp files and
    /// build directories, half-unpacked snapshots): each carries its owner's id and start
    /// time ([`owner`]), so only the abandoned ones go. Returns the bytes freed.
    ///
    /// Ownership, not the store lock, makes this safe beside other berth processes: an
    /// entry is removed only once the process that made it is gone.
    pub fn recover(&self) -> u64 {
        let state = self.state_dir();
        let mut freed = owner::sweep(&state.join("ingest"), "blob-")
            + owner::sweep(&state.join("tmp"), "build-")
            + owner::sweep(&state.join("tmp"), "run-")
            + owner::sweep(&state.join("snapshots"), ".unpack-")
            + owner::sweep(&state.join("containers"), ".new-")
            + owner::sweep(&state.join("pins"), "pin-");
        // Half-written replacements of records (`replace`), wherever records live.
        let mut dirs = vec![
            self.root.clone(),
            state.clone(),
            state.join("ingest/uploads"),
        ];
        for parent in ["containers", "deploy"] {
            if let Ok(entries) = fs::read_dir(state.join(parent)) {
                dirs.extend(entries.flatten().map(|e| e.path()));
            }
        }
        for dir in dirs {
            freed += owner::sweep(&dir, ".tmp-");
        }
        freed
    }

    /// The prefix of a temporary name this process makes: `{what}{owner}-`.
    pub fn temp_prefix(what: &str) -> String {
        format!("{what}{}-", owner::tag())
    }

    /// The store's root directory (the OCI layout).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// berth's own state beside the layout.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("berth")
    }

    /// Where a blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// True when the blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Size of a stored blob.
    pub fn blob_size(&self, digest: &Digest) -> Result<u64> {
        let p = self.blob_path(digest);
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::MissingBlob(digest.clone()))
            }
            Err(e) => Err(StoreError::io("cannot stat", p)(e)),
        }
    }

    /// Opens a blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let p = self.blob_path(digest);
        File::open(&p).map_err(|e| Self::open_error(digest, p, e))
    }

    /// A blob that could not be opened: missing, or unreadable.
    fn open_error(digest: &Digest, path: PathBuf, e: io::Error) -> StoreError {
        match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(digest.clone()),
            _ => StoreError::io("cannot open", path)(e),
        }
    }

    /// Opens a blob for reads of byte ranges that bypass the page cache.
    pub fn blob_ranges(&self, digest: &Digest) -> Result<BlobRanges> {
        let p = self.blob_path(digest);
        BlobRanges::open(&p).map_err(|e| Self::open_error(digest, p, e))
    }

    /// Opens a layer blob as its uncompressed tar stream, by media type: OCI and Docker
    /// gzip (`…tar+gzip`, `…tar.gzip`), zstd (`…tar+zstd`), and plain tar.
    pub fn open_layer(
        &self,
        digest: &Digest,
        media_type: &str,
    ) -> Result<Box<dyn io::Read + Send>> {
        let file = io::BufReader::with_capacity(256 << 10, self.open_blob(digest)?);
        decompress(file, digest, media_type).map_err(|e| match e {
            StoreError::Io { source, .. } => {
                StoreError::io("cannot decompress", self.blob_path(digest))(source)
            }
            e => e,
        })
    }

    /// Reads a small blob (a manifest or config) whole.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(digest);
        fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(digest.clone()),
            _ => StoreError::io("cannot read", p)(e),
        })
    }

    /// Starts writing a blob of unknown digest.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        Ok(BlobWriter {
            store: self.clone(),
            state: Ingest::Ready(HashingWriter::new(self.ingest_file()?)),
        })
    }

    fn ingest_file(&self) -> Result<direct::IngestFile> {
        let dir = self.state_dir().join("ingest");
        let file = tempfile::Builder::new()
            .prefix(&Store::temp_prefix("blob-"))
            .tempfile_in(&dir)
            .map_err(StoreError::io("cannot create an ingest file in", &dir))?;
        Ok(direct::IngestFile::new(file))
    }

    /// Starts writing a blob whose first `state.len` bytes are those of the stored blob
    /// `from`, with the hash state after them. The bytes are copied on a thread of their
    /// own while the caller goes on; the first write waits for the copy, which fails if
    /// they are not the `pieces` (consecutive lengths with the BLAKE3 each had when it was
    /// written: a damaged or shortened blob). BLAKE3 costs a fraction of hashing them
    /// with SHA-256 again; `state` itself comes from an index that is checksummed.
    pub fn blob_writer_from(
        &self,
        from: &Digest,
        state: &Midstate,
        pieces: Vec<(u64, [u8; 32])>,
    ) -> Result<BlobWriter> {
        let hasher = Sha256Resumable::resume(state).ok_or_else(|| StoreError::BadDocument {
            what: "hash state",
            digest: from.to_string(),
            message: "its tail does not match its length".into(),
        })?;
        let len = state.len;
        if pieces.iter().map(|p| p.0).sum::<u64>() != len {
            return Err(StoreError::BadDocument {
                what: "chunk index",
                digest: from.to_string(),
                message: "its chunks do not add up to the resume point".into(),
            });
        }
        let path = self.blob_path(from);
        let src = File::open(&path).map_err(|e| Self::open_error(from, path.clone(), e))?;
        advise_willneed(&src, len);
        let mut file = self.ingest_file()?;
        // The copy starts now, on its own thread, while the caller reads and compresses
        // what follows; the first write waits for it. Its reads go through the page cache,
        // which [`Store::prefetch`] may have filled already, straight into the ingest
        // file's write buffer. The bytes are checked as they pass: a damaged earlier blob
        // never reaches a new one (the caller then writes the layer in full).
        let copy = std::thread::spawn(move || -> io::Result<direct::IngestFile> {
            let mut check = PieceCheck::new(pieces);
            file.copy_in(&src, len, |bytes| check.update(bytes))?;
            if !check.matches() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the earlier blob's first bytes are not those its saved state describes",
                ));
            }
            Ok(file)
        });
        Ok(BlobWriter {
            store: self.clone(),
            state: Ingest::Copying(copy, hasher),
        })
    }

    /// Starts reading a blob into the page cache in the background (the kernel's
    /// readahead), for a copy of it that is about to come: see
    /// [`Store::blob_writer_from`]. Failing to is harmless.
    pub fn prefetch(&self, digest: &Digest) {
        if let Ok(f) = File::open(self.blob_path(digest)) {
            advise_willneed(&f, 0);
        }
    }

    /// Stores a small blob held in memory; returns its digest and size.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<(Digest, u64)> {
        let digest = Digest::of(bytes);
        if self.has_blob(&digest) {
            return Ok((digest, bytes.len() as u64));
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes).map_err(StoreError::io(
            "cannot write",
            self.state_dir().join("ingest"),
        ))?;
        w.commit(Some((&digest, bytes.len() as u64)))
    }

    /// Writes `bytes` to `path` atomically and durably: temp file in the same directory,
    /// fsync, rename, fsync of the directory. For what must survive a crash (the layout,
    /// `index.json`).
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.replace(path, bytes, true)
    }

    /// Replaces `path` with `bytes` atomically (temp file, rename) without waiting for the
    /// disk: for state rewritten often whose loss costs only re-work or the last transition
    /// (caches, container records). A crash never leaves a torn file.
    pub fn replace_file(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.replace(path, bytes, false)
    }

    fn replace(&self, path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
        let dir = path.parent().expect("store paths have a parent");
        let mut tmp = tempfile::Builder::new()
            .prefix(&Store::temp_prefix(".tmp-"))
            .tempfile_in(dir)
            .map_err(StoreError::io("cannot create a temp file in", dir))?;
        tmp.write_all(bytes)
            .map_err(StoreError::io("cannot write", tmp.path()))?;
        if durable {
            tmp.as_file()
                .sync_all()
                .map_err(StoreError::io("cannot sync", tmp.path()))?;
        }
        tmp.persist(path)
            .map_err(|e| StoreError::io("cannot replace", path)(e.error))?;
        if durable { sync_dir(dir) } else { Ok(()) }
    }

    /// Takes the store's exclusive lock (held until the guard drops). Index updates and GC
    /// run under it, so concurrent berth processes never lose each other's tags.
    pub fn lock(&self) -> Result<StoreLock> {
        let path = self.state_dir().join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(StoreError::io("cannot open", &path))?;
        file.lock().map_err(StoreError::io("cannot lock", &path))?;
        Ok(StoreLock { _file: file })
    }
}

/// Asks the kernel to read the first `len` bytes of `f` (all of it for 0) ahead, in the
/// background.
fn advise_willneed(f: &File, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor this function borrows.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            0,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("cannot sync", dir))
}

/// The store's exclusive lock; released on drop.
pub struct StoreLock {
    _file: File,
}

/// Checks that an earlier blob's first bytes are consecutive pieces with the BLAKE3s
/// they had when written (see [`Store::blob_writer_from`]).
struct PieceCheck {
    /// The pieces still to come, last first.
    left: Vec<(u64, [u8; 32])>,
    hasher: blake3::Hasher,
    ok: bool,
}

impl PieceCheck {
    fn new(mut pieces: Vec<(u64, [u8; 32])>) -> PieceCheck {
        pieces.retain(|p| p.0 > 0);
        pieces.reverse();
        PieceCheck {
            left: pieces,
            hasher: blake3::Hasher::new(),
            ok: true,
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let Some((piece_left, want)) = self.left.last_mut() else {
                self.ok = false; // More bytes than pieces.
                return;
            };
            let n = (*piece_left).min(bytes.len() as u64) as usize;
            self.hasher.update(&bytes[..n]);
            *piece_left -= n as u64;
            bytes = &bytes[n..];
            if *piece_left == 0 {
                self.ok &= self.hasher.finalize().as_bytes() == want;
                self.hasher.reset();
                self.left.pop();
            }
        }
    }

    /// True when every piece came whole and as it was.
    fn matches(self) -> bool {
        self.ok && self.left.is_empty()
    }
}

/// A blob being written: bytes go to an ingest file and are hashed as they pass. Only
/// [`BlobWriter::commit`] gives the blob its final name; dropping the writer removes the
/// ingest file.
pub struct BlobWriter {
    store: Store,
    state: Ingest,
}

/// Where a blob writer's bytes go.
enum Ingest {
    /// The ingest file, hashing what is written.
    Ready(HashingWriter<direct::IngestFile>),
    /// An earlier blob's first bytes still being copied in, and the hash state after them.
    Copying(
        std::thread::JoinHandle<io::Result<direct::IngestFile>>,
        Sha256Resumable,
    ),
    /// The copy failed (its error was returned) or the writer was committed.
    Gone,
}

impl Ingest {
    /// The writer, once the copy of an earlier blob's first bytes (if any) is done.
    fn into_writer(self) -> io::Result<HashingWriter<direct::IngestFile>> {
        match self {
            Ingest::Ready(w) => Ok(w),
            Ingest::Copying(copy, hasher) => {
                let file = copy
                    .join()
                    .map_err(|_| io::Error::other("the blob copy thread panicked"))??;
                Ok(HashingWriter::resumed(file, hasher))
            }
            Ingest::Gone => Err(io::Error::other(
                "the blob's ingest file is gone after an error",
            )),
        }
    }
}

impl BlobWriter {
    /// The writer, once the copy of an earlier blob's first bytes (if any) is done.
    fn ready(&mut self) -> io::Result<&mut HashingWriter<direct::IngestFile>> {
        if !matches!(self.state, Ingest::Ready(_)) {
            let state = std::mem::replace(&mut self.state, Ingest::Gone);
            self.state = Ingest::Ready(state.into_writer()?);
        }
        match &mut self.state {
            Ingest::Ready(w) => Ok(w),
            _ => unreachable!("made ready above"),
        }
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ready()?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ready()?.flush()
    }
}

impl BlobWriter {
    /// The hash state of the bytes written so far.
    pub fn midstate(&self) -> Option<Midstate> {
        match &self.state {
            Ingest::Ready(w) => Some(w.midstate()),
            Ingest::Copying(_, hasher) => Some(hasher.midstate()),
            Ingest::Gone => None,
        }
    }

    /// Flushes, fsyncs, checks digest and size against `expected` (when given) and renames
    /// the ingest file to the blob's final name. Returns the digest and size.
    pub fn commit(mut self, expected: Option<(&Digest, u64)>) -> Result<(Digest, u64)> {
        let ingest = self.store.state_dir().join("ingest");
        let (file, digest, size) = std::mem::replace(&mut self.state, Ingest::Gone)
            .into_writer()
            .map_err(StoreError::io("cannot write", &ingest))?
            .finish();
        let tmp = file
            .finish()
            .map_err(StoreError::io("cannot write", &ingest))?;
        if let Some((want, want_size)) = expected
            && (want != &digest || want_size != size)
        {
            return Err(StoreError::DigestMismatch {
                expected: want.clone(),
                expected_size: want_size,
                actual: digest,
                actual_size: size,
            });
        }
        let final_path = self.store.blob_path(&digest);
        if final_path.exists() {
            return Ok((digest, size)); // Same content already stored; the temp file goes.
        }
        tmp.as_file()
            .sync_all()
            .map_err(StoreError::io("cannot sync", tmp.path()))?;
        tmp.persist(&final_path)
            .map_err(|e| StoreError::io("cannot rename into", &final_path)(e.error))?;
        sync_dir(final_path.parent().expect("blob dir"))?;
        Ok((digest, size))
    }
}

/// A layer's compressed bytes (from anywhere) as its uncompressed tar stream, by media
/// type: OCI and Docker gzip (`…tar+gzip`, `…tar.gzip`), zstd (`…tar+zstd`), plain tar.
pub fn decompress(
    compressed: impl io::BufRead + Send + 'static,
    digest: &Digest,
    media_type: &str,
) -> Result<Box<dyn io::Read + Send>> {
    if media_type.ends_with("gzip") {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(compressed)))
    } else if media_type.ends_with("zstd") {
        let d = zstd::stream::read::Decoder::with_buffer(compressed).map_err(|e| {
            StoreError::io("cannot decompress", PathBuf::from(digest.to_string()))(e)
        })?;
        Ok(Box::new(d))
    } else if media_type.ends_with("tar") {
        Ok(Box::new(compressed))
    } else {
        Err(StoreError::BadDocument {
            what: "layer",
            digest: digest.to_string(),
            message: format!("unsupported layer media type {media_type}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_built_on_an_earlier_ones_first_bytes_checks_them_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let (old_digest, _) = store.put_blob(&old).unwrap();
        let cut = 3_000_001;
        let mut h = Sha256Resumable::new();
        h.update(&old[..cut]);
        let state = h.midstate();
        let pieces = |bytes: &[u8]| {
            let split = [0, 10, 1_000_000, cut];
            let p: Vec<(u64, [u8; 32])> = split
                .windows(2)
                .map(|w| {
                    let piece = &bytes[w[0]..w[1]];
                    (piece.len() as u64, *blake3::hash(piece).as_bytes())
                })
                .collect();
            p
        };
        let expect = |tail: &[u8]| Digest::of(&[&old[..cut], tail].concat());
        {
            let mut w = store
                .blob_writer_from(&old_digest, &state, pieces(&old))
                .unwrap();
            w.write_all(b"a new tail").unwrap();
            let (digest, size) = w.commit(None).unwrap();
            assert_eq!(digest, expect(b"a new tail"));
            assert_eq!(
                fs::read(store.blob_path(&digest)).unwrap().len() as u64,
                size
            );
            assert_eq!(
                Digest::of(&fs::read(store.blob_path(&digest)).unwrap()),
                digest
            );
        }
        // Pieces that do not add up to the state's length are refused at once.
        let short = vec![(10, [0; 32])];
        assert!(store.blob_writer_from(&old_digest, &state, short).is_err());
        // A damaged earlier blob: a flipped byte in the second piece, or a blob cut short.
        let mut damaged = old.clone();
        damaged[500_000] ^= 1;
        for bytes in [&damaged[..], &old[..cut - 1]] {
            fs::write(store.blob_path(&old_digest), bytes).unwrap();
            let mut w = store
                .blob_writer_from(&old_digest, &state, pieces(&old))
                .unwrap();
            assert!(w.write_all(b"a new tail").is_err());
            assert!(w.commit(None).is_err());
        }
        let ingest = fs::read_dir(store.state_dir().join("ingest"))
            .unwrap()
            .count();
        assert_eq!(ingest, 0, "the failed writers left nothing behind");
    }

    #[test]
    fn a_new_store_is_an_oci_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("oci-layout")).unwrap(),
            r#"{"imageLayoutVersion":"1.0.0"}"#
        );
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert!(store.root().join("blobs/sha256").is_dir());
    }

    #[test]
    fn blobs_are_verified_before_they_get_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (d, n) = store.put_blob(b"hello").unwrap();
        assert_eq!((d.clone(), n), (Digest::of(b"hello"), 5));
        assert_eq!(store.read_blob(&d).unwrap(), b"hello");

        let mut w = store.blob_writer().unwrap();
        w.write_all(b"not what was promised").unwrap();
        let err = w.commit(Some((&Digest::of(b"other"), 5))).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.has_blob(&Digest::of(b"not what was promised")));
        let ingest: Vec<_> = fs::read_dir(store.state_dir().join("ingest"))
            .unwrap()
            .collect();
        assert!(ingest.is_empty(), "the failed ingest file is removed");
    }

    #[test]
    fn a_dropped_writer_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.blob_writer().unwrap();
        w.write_all(&[7u8; 100_000]).unwrap();
        drop(w);
        assert_eq!(
            fs::read_dir(store.root().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            fs::read_dir(store.state_dir().join("ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
