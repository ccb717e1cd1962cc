//! Downloads that survive the process: a blob being pulled is written to
//! `ingest/partial-<hex>`, held by a lock while a process writes it. A pull killed halfway
//! leaves the file, and the next pull of the same blob continues where it stopped (a
//! Range request), re-hashing what it has first; the finished file is verified by digest
//! and size before it is renamed to its final name. `gc` removes partial files no process
//! holds.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use sha2::Digest as _;

use super::{Digest, Result, Store, StoreError};

/// A blob being downloaded into its partial file.
pub struct PartialBlob {
    store: Store,
    file: File,
    path: PathBuf,
    hasher: sha2::Sha256,
    len: u64,
}

impl Store {
    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.state_dir()
            .join("ingest")
            .join(format!("partial-{}", digest.hex()))
    }

    /// The partial download of `digest`, created or continued (what it holds already is
    /// hashed again). `None` when another process is downloading it right now.
    pub fn partial(&self, digest: &Digest) -> Result<Option<PartialBlob>> {
        let path = self.partial_path(digest);
        let err = |e| StoreError::io("cannot open", &path)(e);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        Ok(Some(PartialBlob {
            store: self.clone(),
            file,
            path,
            hasher,
            len,
        }))
    }

    /// Bytes a partial download of `digest` holds (0 without one).
    pub fn partial_len(&self, digest: &Digest) -> u64 {
        std::fs::metadata(self.partial_path(digest)).map_or(0, |m| m.len())
    }

    /// Removes the partial downloads no process holds; the bytes freed.
    pub fn remove_abandoned_partials(&self) -> u64 {
        let dir = self.state_dir().join("ingest");
        let mut freed = 0;
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with("partial-") {
                continue;
            }
            let Ok(f) = File::options().write(true).open(e.path()) else {
                continue;
            };
            if f.try_lock().is_ok() {
                freed += f.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = std::fs::remove_file(e.path());
            }
        }
        freed
    }
}

impl PartialBlob {
    /// Bytes it holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes it (a download refused before it began).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Starts over (the registry would not send a range).
    pub fn restart(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.hasher = sha2::Sha256::new();
        self.len = 0;
        Ok(())
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Checks digest and size, makes it durable and gives it its final name. A mismatch
    /// removes the partial file (its bytes are not the blob's).
    pub fn commit(self, digest: &Digest, size: u64) -> Result<()> {
        let actual = Digest::from_hasher(self.hasher);
        if actual != *digest || self.len != size {
            let _ = std::fs::remove_file(&self.path);
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                expected_size: size,
                actual,
                actual_size: self.len,
            });
        }
        self.file
            .sync_all()
            .map_err(StoreError::io("cannot sync", &self.path))?;
        let final_path = self.store.blob_path(digest);
        std::fs::rename(&self.path, &final_path)
            .map_err(StoreError::io("cannot rename into", &final_path))?;
        super::sync_dir(final_path.parent().expect("blob dir"))
    }
}
