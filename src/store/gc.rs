//! Garbage collection: remove every blob, and every unpacked layer (snapshot), that no
//! root reaches. Roots are the tags, and what the caller adds: the images of containers
//! and of the releases kept for rollback ([`Root`]), so nothing a host runs or may roll
//! back to is ever deleted.
//!
//! Builds and pulls hold the store's *use* lock shared while they write blobs that no tag
//! reaches yet; GC takes it exclusively, so it never deletes a layer a build is about to
//! tag.

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::PathBuf;

use oci_spec::image::{ImageIndex, MediaType};

use super::{Digest, Result, Store, StoreError};

/// What a collection removed (or, dry, would remove).
#[derive(Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Blobs removed.
    pub blobs: usize,
    /// Bytes freed.
    pub bytes: u64,
    /// Unpacked layers removed.
    #[serde(default)]
    pub snapshots: usize,
    /// Their bytes.
    #[serde(default)]
    pub snapshot_bytes: u64,
    /// What was kept, and why (every root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<Root>,
}

/// An image that must stay, and why (`tag hello:latest`, `container web-1 (running)`,
/// `release 4 of shop-uat (kept for rollback)`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Root {
    /// The image's manifest digest.
    pub digest: Digest,
    /// Why it stays.
    pub why: String,
}

/// Keeps an image from gc while held, whatever names it: a file
/// `berth/pins/pin-{owner}-{hex}` that gc counts as a root while its owner lives. What a
/// command holds from the moment an image is whole until something else references it
/// (a tag, a container, a recorded release) — a build before it tags, a deploy while it
/// rolls out, an agent between its pull and its replicas.
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
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

    /// Pins `digest` until the pin drops (see [`Pin`]).
    pub fn pin(&self, digest: &Digest) -> Result<Pin> {
        let dir = self.state_dir().join("pins");
        fs::create_dir_all(&dir).map_err(StoreError::io("cannot create", &dir))?;
        let path = dir.join(format!("{}{}", Store::temp_prefix("pin-"), digest.hex()));
        File::create(&path).map_err(StoreError::io("cannot create", &path))?;
        Ok(Pin { path })
    }

    /// The images pinned by live processes.
    fn pin_roots(&self) -> Vec<Root> {
        let dir = self.state_dir().join("pins");
        let mut roots = Vec::new();
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(owner) = super::owner::owner_of(name, "pin-") else {
                continue;
            };
            let hex = &name["pin-".len() + owner.len() + 1..];
            if super::owner::alive(owner)
                && let Ok(digest) = format!("sha256:{hex}").parse::<Digest>()
            {
                roots.push(Root {
                    digest,
                    why: format!(
                        "in use by berth process {}",
                        owner.split('.').next().unwrap_or(owner)
                    ),
                });
            }
        }
        roots
    }

    /// The tags as roots.
    pub fn tag_roots(&self) -> Result<Vec<Root>> {
        Ok(self
            .tags()?
            .into_iter()
            .map(|t| Root {
                digest: t.digest(),
                why: format!("tag {}", t.name),
            })
            .collect())
    }

    /// Every blob the tags and `roots` reach: manifests (and the manifests of indexes),
    /// configs, layers; and the diff_ids of the images they reach.
    pub fn reachable_from(&self, roots: &[Root]) -> Result<(HashSet<Digest>, HashSet<String>)> {
        let mut seen = HashSet::new();
        let mut diff_ids = HashSet::new();
        let mut todo: Vec<(Digest, MediaType)> = self
            .tags()?
            .into_iter()
            .map(|t| (t.digest(), t.descriptor.media_type().clone()))
            .collect();
        todo.extend(
            roots
                .iter()
                .chain(&self.pin_roots())
                .map(|r| (r.digest.clone(), MediaType::ImageManifest)),
        );
        while let Some((digest, media_type)) = todo.pop() {
            if !seen.insert(digest.clone()) || !self.has_blob(&digest) {
                continue;
            }
            let bytes = self.read_blob(&digest)?;
            let is_index = media_type == MediaType::ImageIndex
                || serde_json::from_slice::<serde_json::Value>(&bytes)
                    .is_ok_and(|v| v["manifests"].is_array());
            if is_index {
                if let Ok(index) = serde_json::from_slice::<ImageIndex>(&bytes) {
                    for m in index.manifests() {
                        if let Ok(d) = Digest::try_from(m.digest()) {
                            todo.push((d, m.media_type().clone()));
                        }
                    }
                }
                continue;
            }
            let image = self.image(&digest)?;
            seen.insert(image.config_digest.clone());
            seen.extend(image.layers().into_iter().map(|(d, _)| d));
            diff_ids.extend(image.config.oci.rootfs().diff_ids().iter().cloned());
        }
        Ok((seen, diff_ids))
    }

    /// Every blob a tag reaches.
    pub fn reachable(&self) -> Result<HashSet<Digest>> {
        Ok(self.reachable_from(&[])?.0)
    }

    /// Removes the blobs of `images` that neither a remaining tag nor `roots` reach (what
    /// `rmi` frees).
    pub fn remove_unreferenced(
        &self,
        images: &[super::StoredImage],
        roots: &[Root],
    ) -> Result<GcReport> {
        let _locks = self.exclusive()?;
        let (keep, _) = self.reachable_from(roots)?;
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

    /// The blobs neither the tags nor `roots` reach, with their sizes: what [`Store::gc`]
    /// removes. Without the store's lock, a build that is committing its blobs may show in
    /// it for a moment.
    pub fn unreachable(&self, roots: &[Root]) -> Result<Vec<(PathBuf, u64)>> {
        let (keep, _) = self.reachable_from(roots)?;
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

    /// The unpacked layers (`berth/snapshots/<diff_id>`) no reachable image uses.
    fn unused_snapshots(&self, diff_ids: &HashSet<String>) -> Vec<PathBuf> {
        let dir = self.state_dir().join("snapshots");
        fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.') && !diff_ids.contains(&format!("sha256:{name}"))
            })
            .map(|e| e.path())
            .collect()
    }

    /// Removes every blob and unpacked layer that neither the tags nor `roots` reach, and
    /// what killed processes left behind; with `dry_run`, only says what it would remove
    /// and lists what it keeps.
    pub fn gc(&self, roots: &[Root], dry_run: bool) -> Result<GcReport> {
        let _locks = self.exclusive()?;
        self.collect(roots, dry_run)
    }

    /// [`Store::gc`] if no build or pull is writing right now, else `None` (nothing is
    /// waited for: what a release prunes after itself).
    pub fn try_gc(&self, roots: &[Root]) -> Result<Option<GcReport>> {
        let lock = self.use_lock_file()?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::io(
                    "cannot lock",
                    self.state_dir().join("use.lock"),
                )(e));
            }
        }
        let _index = self.lock()?;
        self.collect(roots, false).map(Some)
    }

    fn collect(&self, roots: &[Root], dry_run: bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        let (_, diff_ids) = self.reachable_from(roots)?;
        for (path, size) in self.unreachable(roots)? {
            if !dry_run {
                fs::remove_file(&path).map_err(StoreError::io("cannot remove", &path))?;
            }
            report.blobs += 1;
            report.bytes += size;
        }
        if !dry_run {
            // Entry indexes (build::imagefs::index_path) and chunk indexes
            // (build::layer::chunk_index_path) of layers whose blob is gone.
            for dir in ["layer-index", "cache/chunks-b3c"] {
                let dir = self.state_dir().join(dir);
                for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let Some(hex) = name.strip_suffix(".json") else {
                        continue;
                    };
                    let gone = format!("sha256:{hex}")
                        .parse::<super::Digest>()
                        .is_ok_and(|d| !self.has_blob(&d));
                    if gone {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
            // Chunk indexes where berth kept them before gzip chunks were made smaller: no
            // version reads them any more.
            let _ = fs::remove_dir_all(self.state_dir().join("cache/chunks-b3"));
        }
        for path in self.unused_snapshots(&diff_ids) {
            report.snapshots += 1;
            report.snapshot_bytes += super::owner::size_of(&path);
            if !dry_run {
                fs::remove_dir_all(&path).map_err(StoreError::io("cannot remove", &path))?;
            }
        }
        if dry_run {
            report.kept = self.tag_roots()?;
            report.kept.extend(roots.iter().cloned());
            report.kept.extend(self.pin_roots());
        } else {
            self.recover();
            self.remove_abandoned_partials();
        }
        Ok(report)
    }
}
