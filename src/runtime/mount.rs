//! Mount plans. A plan is data — filesystem type, source, target, flags, options — that can
//! be printed, tested and diffed; [`apply`] performs it through the [`Syscall`] seam, the
//! one place that mounts anything. A recording fake of the seam lets the logic deciding
//! *which* mounts to make be tested without root.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type (`overlay`, `proc`, `tmpfs`, …); `None` for bind mounts.
    pub fstype: Option<String>,
    /// Source (a device, a directory for binds, or a name such as `overlay`).
    pub source: Option<PathBuf>,
    /// Where to mount.
    pub target: PathBuf,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem options (`lowerdir=…`).
    pub data: Option<String>,
}

impl fmt::Display for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} on {} flags={:?}",
            self.fstype.as_deref().unwrap_or("bind"),
            self.source
                .as_deref()
                .map_or_else(|| "none".into(), |p| p.display().to_string()),
            self.target.display(),
            self.flags
        )?;
        if let Some(d) = &self.data {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// The system calls the runtime makes, behind one trait.
pub trait Syscall {
    /// Performs a mount.
    fn mount(&self, m: &Mount) -> io::Result<()>;
    /// Unmounts `target` (lazily when `detach`).
    fn umount(&self, target: &Path, detach: bool) -> io::Result<()>;
}

/// The real system calls.
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(&self, m: &Mount) -> io::Result<()> {
        nix::mount::mount(
            m.source.as_deref(),
            &m.target,
            m.fstype.as_deref(),
            m.flags,
            m.data.as_deref(),
        )
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("mount {m}: {e}")))
    }

    fn umount(&self, target: &Path, detach: bool) -> io::Result<()> {
        let flags = if detach {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        nix::mount::umount2(target, flags).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("umount {}: {e}", target.display()),
            )
        })
    }
}

/// A fake that records what would be done, for tests.
#[derive(Default)]
pub struct RecordingSyscall {
    /// Every call, rendered.
    pub calls: RefCell<Vec<String>>,
}

impl Syscall for RecordingSyscall {
    fn mount(&self, m: &Mount) -> io::Result<()> {
        self.calls.borrow_mut().push(format!("mount {m}"));
        Ok(())
    }

    fn umount(&self, target: &Path, detach: bool) -> io::Result<()> {
        self.calls.borrow_mut().push(format!(
            "umount {}{}",
            target.display(),
            if detach { " (detach)" } else { "" }
        ));
        Ok(())
    }
}

/// Performs `mounts` in order through `sys`.
pub fn apply(sys: &dyn Syscall, mounts: &[Mount]) -> io::Result<()> {
    for m in mounts {
        sys.mount(m)?;
    }
    Ok(())
}

/// The kernel's limit on mount option data (one page).
const MAX_MOUNT_DATA: usize = 4096 - 1;

/// Why an overlay cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The lowerdir list does not fit in the kernel's option page.
    #[error(
        "{layers} layers do not fit in one overlay mount ({len} bytes of options, the kernel takes {MAX_MOUNT_DATA})"
    )]
    TooManyLayers {
        /// Number of layers.
        layers: usize,
        /// Length of the option string.
        len: usize,
    },
    /// A path cannot be written in overlay options (`,` `:` and `\` would need escaping).
    #[error("path {0} cannot be used in overlay options")]
    BadPath(PathBuf),
}

fn option_path(p: &Path) -> Result<&str, PlanError> {
    let s = p
        .to_str()
        .ok_or_else(|| PlanError::BadPath(p.to_path_buf()))?;
    if s.contains([',', ':', '\\']) {
        return Err(PlanError::BadPath(p.to_path_buf()));
    }
    Ok(s)
}

/// The overlay mount of a container's root filesystem: `lowers` are the image's snapshots,
/// bottom first (overlayfs wants the top first), `upper` and `work` the container's own.
/// An image with no layers still gets an (empty) lower directory of its own.
///
/// A layer that appears more than once (two RUN steps that changed the same way, an image
/// built so) is mounted once, at its topmost place: overlayfs refuses a directory twice in
/// `lowerdir` (ELOOP), and the topmost copy already covers what the lower one gave.
pub fn overlay_rootfs(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<Mount, PlanError> {
    let mut seen = std::collections::HashSet::new();
    let lowerdir = lowers
        .iter()
        .rev()
        .filter(|p| seen.insert(p.as_path()))
        .map(|p| option_path(p))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let data = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        option_path(upper)?,
        option_path(work)?
    );
    if data.len() > MAX_MOUNT_DATA {
        return Err(PlanError::TooManyLayers {
            layers: lowers.len(),
            len: data.len(),
        });
    }
    Ok(Mount {
        fstype: Some("overlay".into()),
        source: Some("overlay".into()),
        target: target.to_path_buf(),
        flags: MsFlags::MS_NODEV,
        data: Some(data),
    })
}

/// True when the kernel supports overlayfs (listed in `/proc/filesystems`).
pub fn overlay_supported() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_lists_the_top_layer_first() {
        let lowers = vec![PathBuf::from("/s/base/fs"), PathBuf::from("/s/app/fs")];
        let m = overlay_rootfs(
            &lowers,
            Path::new("/c/1/upper"),
            Path::new("/c/1/work"),
            Path::new("/c/1/rootfs"),
        )
        .unwrap();
        assert_eq!(
            m.data.as_deref(),
            Some("lowerdir=/s/app/fs:/s/base/fs,upperdir=/c/1/upper,workdir=/c/1/work")
        );
        let sys = RecordingSyscall::default();
        apply(&sys, &[m]).unwrap();
        assert_eq!(sys.calls.borrow().len(), 1);
        assert!(
            sys.calls.borrow()[0].starts_with("mount overlay overlay on /c/1/rootfs"),
            "{:?}",
            sys.calls.borrow()
        );
    }

    #[test]
    fn a_layer_twice_is_mounted_once_at_its_top_place() {
        let (a, b) = (PathBuf::from("/s/a/fs"), PathBuf::from("/s/b/fs"));
        let m = overlay_rootfs(
            &[a.clone(), b, a.clone(), a],
            Path::new("/u"),
            Path::new("/w"),
            Path::new("/t"),
        )
        .unwrap();
        assert_eq!(
            m.data.as_deref(),
            Some("lowerdir=/s/a/fs:/s/b/fs,upperdir=/u,workdir=/w")
        );
    }

    #[test]
    fn overlay_options_are_checked() {
        let many: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("/var/lib/berth/berth/snapshots/{i:064}/fs")))
            .collect();
        assert!(matches!(
            overlay_rootfs(&many, Path::new("/u"), Path::new("/w"), Path::new("/t")),
            Err(PlanError::TooManyLayers { .. })
        ));
        let bad = vec![PathBuf::from("/a,b")];
        assert!(matches!(
            overlay_rootfs(&bad, Path::new("/u"), Path::new("/w"), Path::new("/t")),
            Err(PlanError::BadPath(_))
        ));
    }
}
