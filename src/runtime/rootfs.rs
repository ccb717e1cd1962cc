//! A container's root filesystem: an overlay of the image's snapshots with a private upper
//! and work directory, or, where overlayfs is unavailable, a flattened copy.

use std::path::{Path, PathBuf};

use super::mount::{self, PlanError, Syscall};
use super::snapshot::{self, SnapshotError};
use crate::store::{Store, StoredImage};

/// Errors preparing a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The layers could not be unpacked.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The overlay cannot be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A directory or mount failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How the root filesystem was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsKind {
    /// An overlay mount of the snapshots.
    Overlay,
    /// A flattened copy of the layers.
    Copy,
}

/// A prepared root filesystem.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// The container's directory (holds `upper/`, `work/` and `rootfs/`).
    pub dir: PathBuf,
    /// The root filesystem.
    pub path: PathBuf,
    /// Overlay or copy.
    pub kind: RootfsKind,
}

fn mkdir(path: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(path).map_err(|source| RootfsError::Io {
        what: "create",
        path: path.to_path_buf(),
        source,
    })
}

/// Prepares the root filesystem of `image` in `dir` (which should be empty) and mounts it.
/// With `allow_overlay` false, or without kernel support, layers are copied instead.
pub fn prepare(
    store: &Store,
    image: &StoredImage,
    dir: &Path,
    sys: &dyn Syscall,
    allow_overlay: bool,
) -> Result<Rootfs, RootfsError> {
    let (rootfs, plan) = plan(store, image, dir, allow_overlay)?;
    if let Some(m) = plan {
        mount::apply(sys, &[m]).map_err(|source| RootfsError::Io {
            what: "mount the root filesystem on",
            path: rootfs.path.clone(),
            source,
        })?;
    }
    Ok(rootfs)
}

/// Like [`prepare`], but returns the overlay mount instead of making it: a container mounts
/// it in its own mount namespace, so it disappears with the container.
pub fn plan(
    store: &Store,
    image: &StoredImage,
    dir: &Path,
    allow_overlay: bool,
) -> Result<(Rootfs, Option<mount::Mount>), RootfsError> {
    if allow_overlay && mount::overlay_supported() {
        let (rootfs, m) = overlay_for_layers(store, &snapshot::layers_of(image)?, dir)?;
        return Ok((rootfs, Some(m)));
    }
    let path = dir.join("rootfs");
    mkdir(&path)?;
    snapshot::flatten(store, image, &path)?;
    Ok((
        Rootfs {
            dir: dir.to_path_buf(),
            path,
            kind: RootfsKind::Copy,
        },
        None,
    ))
}

/// The overlay mount over a stack of layers (bottom first) with a fresh upper and work
/// directory in `dir`; what a build's RUN step runs in, its upper directory becoming the
/// step's layer.
pub fn overlay_for_layers(
    store: &Store,
    layers: &[snapshot::LayerRef],
    dir: &Path,
) -> Result<(Rootfs, mount::Mount), RootfsError> {
    overlay_over(snapshot::snapshots_of(store, layers)?, dir)
}

/// [`overlay_for_layers`] over snapshot directories already at hand (bottom first).
pub fn overlay_over(
    mut lowers: Vec<std::path::PathBuf>,
    dir: &Path,
) -> Result<(Rootfs, mount::Mount), RootfsError> {
    let path = dir.join("rootfs");
    mkdir(&path)?;
    if lowers.is_empty() {
        let empty = dir.join("empty");
        mkdir(&empty)?;
        lowers.push(empty);
    }
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    mkdir(&upper)?;
    mkdir(&work)?;
    let plan = mount::overlay_rootfs(&lowers, &upper, &work, &path)?;
    Ok((
        Rootfs {
            dir: dir.to_path_buf(),
            path,
            kind: RootfsKind::Overlay,
        },
        plan,
    ))
}

/// Unmounts (if mounted) and removes a root filesystem and its directory.
pub fn teardown(sys: &dyn Syscall, rootfs: &Rootfs) -> Result<(), RootfsError> {
    if rootfs.kind == RootfsKind::Overlay {
        match sys.umount(&rootfs.path, true) {
            Ok(()) => {}
            // Already unmounted (e.g. the mount lived in a namespace that is gone).
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    || e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RootfsError::Io {
                    what: "unmount",
                    path: rootfs.path.clone(),
                    source,
                });
            }
        }
    }
    match std::fs::remove_dir_all(&rootfs.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RootfsError::Io {
            what: "remove",
            path: rootfs.dir.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::layer::{EntryMeta, LayerCompression, LayerWriter};
    use crate::manifest::schema::Compression;
    use crate::runtime::mount::LinuxSyscall;
    use crate::store::ImageConfig;

    /// An image of two layers; the upper one deletes and hides parts of the lower one.
    fn image(store: &Store) -> StoredImage {
        let meta = EntryMeta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        let c = LayerCompression {
            algorithm: Compression::Gzip,
            level: None,
        };
        let mut lower = LayerWriter::new(store, c, &[]).unwrap();
        lower.dir("etc", &meta).unwrap();
        lower.file("etc/a", &meta, 1, &b"a"[..]).unwrap();
        lower.file("etc/b", &meta, 1, &b"b"[..]).unwrap();
        lower.dir("var", &meta).unwrap();
        lower.dir("var/x", &meta).unwrap();
        lower.file("var/x/old", &meta, 1, &b"o"[..]).unwrap();
        let lower = lower.finish().unwrap();
        let mut upper = LayerWriter::new(store, c, &[]).unwrap();
        upper.dir("etc", &meta).unwrap();
        upper.file("etc/.wh.a", &meta, 0, &b""[..]).unwrap();
        upper.dir("var", &meta).unwrap();
        upper.dir("var/x", &meta).unwrap();
        upper
            .file("var/x/.wh..wh..opq", &meta, 0, &b""[..])
            .unwrap();
        upper.file("var/x/new", &meta, 1, &b"n"[..]).unwrap();
        let upper = upper.finish().unwrap();
        let mut oci = oci_spec::image::ImageConfiguration::default();
        oci.rootfs_mut()
            .diff_ids_mut()
            .extend([lower.diff_id.to_string(), upper.diff_id.to_string()]);
        store
            .write_image(
                &ImageConfig {
                    oci,
                    extra: Default::default(),
                },
                vec![lower.descriptor(), upper.descriptor()],
            )
            .unwrap()
    }

    /// Unmounts and removes on drop, so a failing test leaves no mount behind.
    struct Guard(Option<Rootfs>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(r) = self.0.take() {
                let _ = teardown(&LinuxSyscall, &r);
            }
        }
    }

    fn check_view(root: &Path) {
        assert!(!root.join("etc/a").exists(), "whited out");
        assert_eq!(std::fs::read(root.join("etc/b")).unwrap(), b"b");
        assert!(
            !root.join("var/x/old").exists(),
            "hidden by the opaque directory"
        );
        assert_eq!(std::fs::read(root.join("var/x/new")).unwrap(), b"n");
    }

    #[test]
    fn overlay_and_copy_give_the_same_view() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let img = image(&store);
        for allow_overlay in [true, false] {
            let cdir = dir.path().join(format!("c-{allow_overlay}"));
            let mut g = Guard(Some(
                prepare(&store, &img, &cdir, &LinuxSyscall, allow_overlay).unwrap(),
            ));
            let r = g.0.clone().unwrap();
            assert_eq!(
                r.kind,
                if allow_overlay && mount::overlay_supported() {
                    RootfsKind::Overlay
                } else {
                    RootfsKind::Copy
                }
            );
            check_view(&r.path);
            std::fs::write(r.path.join("etc/written"), "w").unwrap();
            if r.kind == RootfsKind::Overlay {
                assert!(
                    cdir.join("upper/etc/written").exists(),
                    "writes go to the container's upper dir"
                );
                let snapshots = store.state_dir().join("snapshots");
                let leaked = std::fs::read_dir(&snapshots)
                    .unwrap()
                    .any(|s| s.unwrap().path().join("fs/etc/written").exists());
                assert!(!leaked, "snapshots are never written");
            }
            teardown(&LinuxSyscall, &g.0.take().unwrap()).unwrap();
            assert!(!cdir.exists());
        }
    }
}
