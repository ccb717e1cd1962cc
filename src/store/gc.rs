//! Garbage collection: remove every blob that no tag reaches.
//!
//! Builds and pulls hold the store's *use* lock shared while they write blobs that no tag
//! reaches yet; GC takes it exclusively, so it never deletes a layer a build is about to
//! tag.

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use oci_spec::image::{ImageIndex, MediaType};

use super::{Digest, Result, Store, StoreError};

/// What a collection removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Blobs removed.
    pub blobs: usize,
    /// Bytes freed.
    pub bytes: u64,
}

/// A shared hold on the store that keeps GC away; released on drop.
pub struct UseGuard {
    _file: File,
}

impl Store {
    fn use_lock_file(&self) -> Result<File> {
        let path = self.state_dir().join("use.lock");
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(StoreError::io("cannot open", &path))
    }

    /// Keeps GC from running until the guard drops (taken by builds and pulls).
    pub fn use_guard(&self) -> Result<UseGuard> {
        let file = self.use_lock_file()?;
        file.lock_shared().map_err(StoreError::io(
            "cannot lock",
            self.state_dir().join("use.lock"),
        ))?;
        Ok(UseGuard { _file: file })
    }

    /// Takes the use lock exclusively (no build or pull is writing untagged blobs) and the
    /// index lock (no tag changes): what deleting blobs needs.
    fn exclusive(&self) -> Result<(File, super::StoreLock)> {
        let lock = self.use_lock_file()?;
        lock.lock().map_err(StoreError::io(
            "cannot lock",
            self.state_dir().join("use.lock"),
        ))?;
        Ok((lock, self.lock()?))
    }

    /// Every blob a tag reaches: manifests (and the manifests of indexes), configs, layers.
    pub fn reachable(&self) -> Result<HashSet<Digest>> {
        let mut seen = HashSet::new();
        let mut todo: Vec<(Digest, MediaType)> = self
            .tags()?
            .into_iter()
            .map(|t| (t.digest(), t.descriptor.media_type().clone()))
            .collect();
        while let Some((digest, media_type)) = todo.pop() {
            if !seen.insert(digest.clone()) || !self.has_blob(&digest) {
                continue;
            }
            match media_type {
                MediaType::ImageIndex => {
                    let bytes = self.read_blob(&digest)?;
                    if let Ok(index) = serde_json::from_slice::<ImageIndex>(&bytes) {
                        for m in index.manifests() {
                            if let Ok(d) = Digest::try_from(m.digest()) {
                                todo.push((d, m.media_type().clone()));
                            }
                        }
                    }
                }
                _ => {
                    let image = self.image(&digest)?;
                    seen.insert(image.config_digest.clone());
                    seen.extend(image.layers().into_iter().map(|(d, _)| d));
                }
            }
        }
        Ok(seen)
    }

    /// Removes the blobs of `images` that no remaining tag reaches (what `rmi` frees).
    pub fn remove_unreferenced(&self, images: &[super::StoredImage]) -> Result<GcReport> {
        let _locks = self.exclusive()?;
        let keep = self.reachable()?;
        let mut report = GcReport::default();
        let mut candidates: Vec<Digest> = Vec::new();
        for image in images {
            candidates.push(image.digest.clone());
            candidates.push(image.config_digest.clone());
            candidates.extend(image.layers().into_iter().map(|(d, _)| d));
        }
        candidates.sort();
        candidates.dedup();
        for d in candidates.into_iter().filter(|d| !keep.contains(d)) {
            let path = self.blob_path(&d);
            if let Ok(md) = fs::metadata(&path) {
                fs::remove_file(&path).map_err(StoreError::io("cannot remove", &path))?;
                report.blobs += 1;
                report.bytes += md.len();
            }
        }
        Ok(report)
    }

    /// The blobs no tag reaches, with their sizes: what [`Store::gc`] removes. Without the
    /// store's lock, a build that is committing its blobs may show in it for a moment.
    pub fn unreachable(&self) -> Result<Vec<(PathBuf, u64)>> {
        let keep = self.reachable()?;
        let dir = self.root().join("blobs/sha256");
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io("cannot list", &dir))? {
            let entry = entry.map_err(StoreError::io("cannot list", &dir))?;
            let name = entry.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|h| format!("sha256:{h}").parse::<Digest>().ok())
            else {
                continue;
            };
            if !keep.contains(&digest) {
                found.push((entry.path(), entry.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
        Ok(found)
    }

    /// Removes unreachable blobs, and ingest files abandoned for over a day.
    pub fn gc(&self) -> Result<GcReport> {
        let _locks = self.exclusive()?;
        let mut report = GcReport::default();
        for (path, size) in self.unreachable()? {
            fs::remove_file(&path).map_err(StoreError::io("cannot remove", &path))?;
            report.blobs += 1;
            report.bytes += size;
        }
        let ingest = self.state_dir().join("ingest");
        let day_ago = SystemTime::now() - Duration::from_secs(24 * 3600);
        for entry in fs::read_dir(&ingest)
            .map_err(StoreError::io("cannot list", &ingest))?
            .flatten()
        {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < day_ago);
            if old {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(report)
    }
}
