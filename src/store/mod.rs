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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

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
        Ok(direct::IngestFile::new(self.ingest_temp()?))
    }

    /// [`Store::ingest_file`] for a blob of `len` bytes.
    fn ingest_file_for(&self, len: u64) -> Result<direct::IngestFile> {
        Ok(direct::IngestFile::sized(self.ingest_temp()?, len))
    }

    fn ingest_temp(&self) -> Result<tempfile::NamedTempFile> {
        let dir = self.state_dir().join("ingest");
        tempfile::Builder::new()
            .prefix(&Store::temp_prefix("blob-"))
            .tempfile_in(&dir)
            .map_err(StoreError::io("cannot create an ingest file in", &dir))
    }

    /// Starts copying the first bytes of the stored blob `from` into a new ingest file, on
    /// a thread of its own, while the caller goes on: they are the `pieces` (consecutive
    /// lengths, each with the BLAKE3 it had when written) and are checked as they pass. A
    /// damaged or shortened blob stops the copy. [`Store::blob_writer_from`] later says how
    /// many of them the new blob takes (so the copy can start before that is known).
    /// BLAKE3 costs a fraction of hashing the bytes with SHA-256 again.
    pub fn copy_prefix(&self, from: &Digest, pieces: Vec<(u64, [u8; 32])>) -> Result<PrefixCopy> {
        let path = self.blob_path(from);
        let src = File::open(&path).map_err(|e| Self::open_error(from, path.clone(), e))?;
        let src_direct = direct::open_direct(&path);
        let ends: Vec<u64> = pieces
            .iter()
            .scan(0, |at, p| {
                *at += p.0;
                Some(*at)
            })
            .collect();
        let total = ends.last().copied().unwrap_or(0);
        let mut file = self.ingest_file()?;
        let limit = Arc::new(AtomicU64::new(total));
        let stop = Arc::clone(&limit);
        // Reads go straight into the ingest file's write buffers, past the page cache
        // (the blob was written past it, so its pages would be read once and evicted).
        let thread = std::thread::spawn(move || -> io::Result<Copied> {
            if src_direct.is_none() {
                // Asked for all at once, from this thread: queueing the reads of a large
                // blob costs the caller milliseconds.
                advise_willneed(&src, stop.load(Ordering::Acquire));
            }
            let mut check = PieceCheck::new(pieces);
            let copied = file.copy_in(
                &src,
                src_direct,
                || stop.load(Ordering::Acquire),
                |bytes| check.update(bytes),
            )?;
            Ok(Copied {
                file,
                src,
                copied,
                verified: check.verified,
            })
        });
        Ok(PrefixCopy {
            ends,
            limit,
            thread: Some(thread),
        })
    }

    /// Starts writing a blob whose first `state.len` bytes are those `copy` is copying
    /// (`state.len` must be where one of its pieces ends), with the hash state after them.
    /// The copy stops there; the first write waits for it, and fails if those bytes were
    /// not all as the pieces say (the caller then writes the blob in full).
    pub fn blob_writer_from(&self, mut copy: PrefixCopy, state: &Midstate) -> Result<BlobWriter> {
        let bad = |message: &str| StoreError::BadDocument {
            what: "hash state",
            digest: format!("{}-byte prefix", state.len),
            message: message.into(),
        };
        let hasher = Sha256Resumable::resume(state)
            .ok_or_else(|| bad("its tail does not match its length"))?;
        if state.len > 0 && !copy.ends.contains(&state.len) {
            return Err(bad("it does not lie between two of the copied pieces"));
        }
        copy.limit.fetch_min(state.len, Ordering::AcqRel);
        let thread = copy.thread.take().expect("a copy is adopted once");
        Ok(BlobWriter {
            store: self.clone(),
            state: Ingest::Copying(thread, hasher, state.len),
        })
    }

    /// Stores a small blob held in memory; returns its digest and size.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<(Digest, u64)> {
        let digest = Digest::of(bytes);
        if self.has_blob(&digest) {
            return Ok((digest, bytes.len() as u64));
        }
        let mut w = BlobWriter {
            store: self.clone(),
            state: Ingest::Ready(HashingWriter::new(
                self.ingest_file_for(bytes.len() as u64)?,
            )),
        };
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

    /// [`Store::replace_file`] for a cache's file, which readers may find missing (they
    /// do without): the old one is removed before the new one takes its name. On ext4 a
    /// rename over an existing file makes the new one's data be written out first
    /// (`auto_da_alloc`), and the build would wait for the disk for a file that need not
    /// survive a crash.
    pub fn replace_cache_file(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = Self::temp_beside(path, bytes)?;
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(StoreError::io("cannot replace", path)(e));
            }
            _ => {}
        }
        tmp.persist(path)
            .map_err(|e| StoreError::io("cannot replace", path)(e.error))?;
        Ok(())
    }

    fn replace(&self, path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
        let tmp = Self::temp_beside(path, bytes)?;
        if durable {
            tmp.as_file()
                .sync_all()
                .map_err(StoreError::io("cannot sync", tmp.path()))?;
        }
        tmp.persist(path)
            .map_err(|e| StoreError::io("cannot replace", path)(e.error))?;
        let dir = path.parent().expect("store paths have a parent");
        if durable { sync_dir(dir) } else { Ok(()) }
    }

    /// A temp file holding `bytes` in the directory of `path`, to be renamed to it.
    fn temp_beside(path: &Path, bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
        let dir = path.parent().expect("store paths have a parent");
        let mut tmp = tempfile::Builder::new()
            .prefix(&Store::temp_prefix(".tmp-"))
            .tempfile_in(dir)
            .map_err(StoreError::io("cannot create a temp file in", dir))?;
        tmp.write_all(bytes)
            .map_err(StoreError::io("cannot write", tmp.path()))?;
        Ok(tmp)
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

/// An earlier blob's first bytes being copied into a new blob (see [`Store::copy_prefix`]).
/// Dropped unused, it stops the copy and removes what was copied.
pub struct PrefixCopy {
    /// Where each piece ends.
    ends: Vec<u64>,
    /// Where the copy stops: lowered once the caller knows how much it takes.
    limit: Arc<AtomicU64>,
    thread: Option<JoinHandle<io::Result<Copied>>>,
}

impl Drop for PrefixCopy {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.limit.store(0, Ordering::Release);
            let _ = thread.join();
        }
    }
}

/// What a prefix copy's thread hands back.
struct Copied {
    file: direct::IngestFile,
    /// The blob copied from.
    src: File,
    /// Bytes copied.
    copied: u64,
    /// Bytes from the start that were checked and found as their pieces say.
    verified: u64,
}

/// Checks that an earlier blob's first bytes are consecutive pieces with the BLAKE3s
/// they had when written (see [`Store::copy_prefix`]).
struct PieceCheck {
    /// The pieces still to come, last first; the first of them partly seen.
    left: Vec<(u64, [u8; 32])>,
    hasher: blake3::Hasher,
    /// Bytes from the start whose pieces were seen whole and matched.
    verified: u64,
    ok: bool,
}

impl PieceCheck {
    fn new(mut pieces: Vec<(u64, [u8; 32])>) -> PieceCheck {
        pieces.retain(|p| p.0 > 0);
        pieces.reverse();
        PieceCheck {
            left: pieces,
            hasher: blake3::Hasher::new(),
            verified: 0,
            ok: true,
        }
    }

    /// Checks the next bytes; false once something did not match (nothing from there on
    /// can be used).
    fn update(&mut self, mut bytes: &[u8]) -> bool {
        while self.ok && !bytes.is_empty() {
            let Some((left, want)) = self.left.last_mut() else {
                self.ok = false; // More bytes than pieces.
                break;
            };
            let n = (*left).min(bytes.len() as u64) as usize;
            self.hasher.update(&bytes[..n]);
            *left -= n as u64;
            bytes = &bytes[n..];
            if *left == 0 {
                self.ok = self.hasher.finalize().as_bytes() == want;
                if self.ok {
                    self.verified += self.hasher.count();
                }
                self.hasher.reset();
                self.left.pop();
            }
        }
        self.ok
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
    /// An earlier blob's first bytes still being copied in, the hash state after them and
    /// how many there are.
    Copying(JoinHandle<io::Result<Copied>>, Sha256Resumable, u64),
    /// The copy failed (its error was returned) or the writer was committed.
    Gone,
}

impl Ingest {
    /// The writer, once the copy of an earlier blob's first bytes (if any) is done.
    fn into_writer(self) -> io::Result<HashingWriter<direct::IngestFile>> {
        match self {
            Ingest::Ready(w) => Ok(w),
            Ingest::Copying(copy, hasher, len) => {
                let mut done = copy
                    .join()
                    .map_err(|_| io::Error::other("the blob copy thread panicked"))??;
                if done.verified < len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the earlier blob's first bytes are not those its chunk index describes",
                    ));
                }
                // It may have gone further before it was told where to stop.
                if done.copied > len {
                    done.file.truncate_to(len, &done.src)?;
                }
                Ok(HashingWriter::resumed(done.file, hasher))
            }
            Ingest::Gone => Err(io::Error::other(
                "the blob's ingest file is gone after an error",
            )),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // A copy still under way ends before the writer does (it has a limit): no thread
        // outlives it to run while the runtime forks.
        if let Ingest::Copying(copy, _, _) = std::mem::replace(&mut self.state, Ingest::Gone) {
            let _ = copy.join();
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
            Ingest::Copying(_, hasher, _) => Some(hasher.midstate()),
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
        // The new blob takes the first `cut` bytes (not a multiple of the block size); the
        // pieces copied go further.
        let cut = 3_000_001;
        let mut h = Sha256Resumable::new();
        h.update(&old[..cut]);
        let state = h.midstate();
        let pieces = || {
            [0, 10, 1_000_000, cut, 4_000_000, 5_000_000]
                .windows(2)
                .map(|w| {
                    let piece = &old[w[0]..w[1]];
                    (piece.len() as u64, *blake3::hash(piece).as_bytes())
                })
                .collect::<Vec<_>>()
        };
        let expect = Digest::of(&[&old[..cut], b"a new tail"].concat());
        let ingest = || {
            fs::read_dir(store.state_dir().join("ingest"))
                .unwrap()
                .count()
        };
        // Told where to stop at once, or only after copying everything.
        for wait in [false, true] {
            let copy = store.copy_prefix(&old_digest, pieces()).unwrap();
            if wait {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            let mut w = store.blob_writer_from(copy, &state).unwrap();
            w.write_all(b"a new tail").unwrap();
            let (digest, size) = w.commit(None).unwrap();
            assert_eq!(digest, expect, "waited: {wait}");
            let bytes = fs::read(store.blob_path(&digest)).unwrap();
            assert_eq!(
                (bytes.len() as u64, Digest::of(&bytes)),
                (size, expect.clone())
            );
            fs::remove_file(store.blob_path(&digest)).unwrap();
        }
        // Only where a piece ends.
        let copy = store.copy_prefix(&old_digest, pieces()).unwrap();
        let mut off = state.clone();
        off.len += 1;
        assert!(store.blob_writer_from(copy, &off).is_err());
        // A copy nobody takes is removed.
        drop(store.copy_prefix(&old_digest, pieces()).unwrap());
        assert_eq!(ingest(), 0);
        // Damage after the cut does not matter; before it, a flipped byte or a blob cut
        // short fails the write, and nothing is left behind.
        let mut after = old.clone();
        after[4_500_000] ^= 1;
        let mut before = old.clone();
        before[500_000] ^= 1;
        for (bytes, fine) in [
            (&after[..], true),
            (&before[..], false),
            (&old[..cut - 1], false),
        ] {
            fs::write(store.blob_path(&old_digest), bytes).unwrap();
            let copy = store.copy_prefix(&old_digest, pieces()).unwrap();
            let mut w = store.blob_writer_from(copy, &state).unwrap();
            assert_eq!(w.write_all(b"a new tail").is_ok(), fine);
            let committed = w.commit(None);
            assert_eq!(committed.is_ok(), fine, "{committed:?}");
            if let Ok((digest, _)) = committed {
                assert_eq!(digest, expect);
                fs::remove_file(store.blob_path(&digest)).unwrap();
            }
        }
        assert_eq!(ingest(), 0, "the failed writers left nothing behind");
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
