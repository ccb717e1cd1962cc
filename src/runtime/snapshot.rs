//! Root filesystems from the store. Each layer is unpacked once into a snapshot keyed by its
//! diff_id (for overlay mounts), verifying the diff_id while it unpacks; or all layers are
//! flattened into one directory (the fallback where overlayfs is unavailable, and bundles).

use std::io;
use std::path::{Path, PathBuf};

use super::unpack::{self, Limits, UnpackError, Whiteouts};
use crate::store::{DiffId, Digest, HashingReader, Store, StoreError, StoredImage};

/// Errors making a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The layer's content does not match the diff_id the config promises.
    #[error(
        "layer {digest}: its content has diff_id {actual}, but the image config says {expected}"
    )]
    DiffIdMismatch {
        /// The layer blob.
        digest: Digest,
        /// What the config says.
        expected: DiffId,
        /// What the content hashes to.
        actual: Digest,
    },
    /// Extraction failed or was refused.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A directory could not be made or moved.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> SnapshotError + 'p {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Unpacks one layer into `dest`, checking that its uncompressed stream hashes to `diff_id`.
fn unpack_verified(
    store: &Store,
    digest: &Digest,
    media_type: &str,
    diff_id: &DiffId,
    dest: &Path,
    whiteouts: Whiteouts,
) -> Result<(), SnapshotError> {
    let limits = Limits::configured().map_err(|e| SnapshotError::Io {
        what: "read the layer limits for",
        path: dest.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let mut hashing = HashingReader::new(store.open_layer(digest, media_type)?);
    unpack::unpack(&mut hashing, dest, digest.as_str(), limits, whiteouts)?;
    // The tar reader stops at the end-of-archive marker; hash the padding after it too.
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err("read", Path::new(digest.as_str())))?;
    let (actual, _) = hashing.finish();
    if actual != diff_id.0 {
        return Err(SnapshotError::DiffIdMismatch {
            digest: digest.clone(),
            expected: diff_id.clone(),
            actual,
        });
    }
    Ok(())
}

/// The snapshot directory of a layer, unpacking it on first use. Concurrent callers may
/// both unpack; the first rename wins and the other copy is discarded.
pub fn snapshot(
    store: &Store,
    digest: &Digest,
    media_type: &str,
    diff_id: &DiffId,
) -> Result<PathBuf, SnapshotError> {
    let base = store.state_dir().join("snapshots");
    let dir = base.join(diff_id.0.hex());
    let fs = dir.join("fs");
    if fs.is_dir() {
        return Ok(fs);
    }
    std::fs::create_dir_all(&base).map_err(io_err("create", &base))?;
    let tmp = tempfile::Builder::new()
        .prefix(&Store::temp_prefix(".unpack-"))
        .tempdir_in(&base)
        .map_err(io_err("create a directory in", &base))?;
    let tmp_fs = tmp.path().join("fs");
    std::fs::create_dir(&tmp_fs).map_err(io_err("create", &tmp_fs))?;
    unpack_verified(
        store,
        digest,
        media_type,
        diff_id,
        &tmp_fs,
        Whiteouts::Overlay,
    )?;
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, &dir) {
        let _ = std::fs::remove_dir_all(&tmp_path);
        if !fs.is_dir() {
            return Err(io_err("move a snapshot to", &dir)(e));
        }
    }
    Ok(fs)
}

/// A layer to stack: blob digest, media type, diff_id.
pub type LayerRef = (Digest, String, DiffId);

/// The layers of an image, bottom first.
pub fn layers_of(image: &StoredImage) -> Result<Vec<LayerRef>, SnapshotError> {
    let diff_ids = image.config.diff_ids()?;
    Ok(image
        .layers()
        .into_iter()
        .zip(diff_ids)
        .map(|((d, desc), id)| (d, desc.media_type().to_string(), id))
        .collect())
}

/// The snapshots of every layer of an image, bottom first.
pub fn snapshots(store: &Store, image: &StoredImage) -> Result<Vec<PathBuf>, SnapshotError> {
    snapshots_of(store, &layers_of(image)?)
}

/// The snapshots of the given layers, bottom first.
pub fn snapshots_of(store: &Store, layers: &[LayerRef]) -> Result<Vec<PathBuf>, SnapshotError> {
    layers
        .iter()
        .map(|(digest, media_type, diff_id)| snapshot(store, digest, media_type, diff_id))
        .collect()
}

/// Extracts every layer of `image`, bottom first, into the empty directory `dest`, applying
/// whiteouts: one plain directory tree, verified layer by layer.
pub fn flatten(store: &Store, image: &StoredImage, dest: &Path) -> Result<(), SnapshotError> {
    let diff_ids = image.config.diff_ids()?;
    for ((digest, desc), diff_id) in image.layers().into_iter().zip(&diff_ids) {
        unpack_verified(
            store,
            &digest,
            desc.media_type().as_ref(),
            diff_id,
            dest,
            Whiteouts::Apply,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::layer::{EntryMeta, LayerCompression, LayerWriter};
    use crate::manifest::schema::Compression;

    #[test]
    fn snapshots_verify_the_diff_id_and_are_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = EntryMeta {
            mode: 0o755,
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
        w.dir("etc", &meta).unwrap();
        w.file("etc/motd", &meta, 2, &b"hi"[..]).unwrap();
        let layer = w.finish().unwrap();

        let fs = snapshot(&store, &layer.digest, &layer.media_type, &layer.diff_id).unwrap();
        assert_eq!(std::fs::read(fs.join("etc/motd")).unwrap(), b"hi");
        assert_eq!(
            snapshot(&store, &layer.digest, &layer.media_type, &layer.diff_id).unwrap(),
            fs,
            "made once"
        );

        let wrong = DiffId(Digest::of(b"not this layer"));
        let err = snapshot(&store, &layer.digest, &layer.media_type, &wrong).unwrap_err();
        assert!(matches!(err, SnapshotError::DiffIdMismatch { .. }), "{err}");
        assert!(
            !store
                .state_dir()
                .join("snapshots")
                .join(wrong.0.hex())
                .exists(),
            "no snapshot under the wrong name"
        );
        let leftovers: Vec<_> = std::fs::read_dir(store.state_dir().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "the failed unpack left nothing behind: {leftovers:?}"
        );
    }
}
