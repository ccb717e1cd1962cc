//! Mount plans. A plan is data — filesystem type, source, target, flags, options — that can
//! be printed, tested and diffed; [`apply`] performs it through the [`Syscall`] seam, the
//! one place that mounts anything. A recording fake of the seam lets the logic deciding
//! *which* mounts to make be tested without root.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
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

/// One step of setting up a container's filesystem: a mount, or what goes with mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A mount.
    Mount(Mount),
    /// A mount point from the image: created when missing (a directory when `dir`, else
    /// an empty file), refused when the image has a symlink there (it would be followed).
    Target {
        /// The path.
        path: PathBuf,
        /// A directory, not a file.
        dir: bool,
    },
    /// A new directory (in a filesystem the runtime just mounted).
    Dir(PathBuf),
    /// A character device node, with its mode set exactly (not through the umask).
    CharDev {
        /// The path.
        path: PathBuf,
        /// Major number.
        major: u64,
        /// Minor number.
        minor: u64,
        /// Permission bits.
        mode: u32,
    },
    /// A detached mount (open_tree) attached at `path` (move_mount): in a user
    /// namespace, which cannot make device nodes, the host's own nodes are bound.
    Attach {
        /// The detached mount's descriptor.
        fd: std::os::fd::RawFd,
        /// Where it goes.
        path: PathBuf,
    },
    /// A symlink `link` → `to`.
    Symlink {
        /// The link.
        link: PathBuf,
        /// What it points to.
        to: PathBuf,
    },
    /// Hides a path from the container (Docker's masked paths): a directory under an
    /// empty read-only tmpfs, a file under `/dev/null`; nothing if it is missing.
    Mask(PathBuf),
    /// Makes a path read-only (a bind mount onto itself, remounted read-only); nothing if
    /// it is missing.
    ReadOnly(PathBuf),
    /// A file the runtime writes (`/etc/hosts` and the like): a symlink in its place is
    /// replaced, never followed.
    File {
        /// The path.
        path: PathBuf,
        /// Its content.
        content: Vec<u8>,
    },
    /// Copies what the image has at `path` into the empty volume behind the detached
    /// mount `fd` (a named volume's first use, as Docker does).
    Seed {
        /// The path in the image.
        path: PathBuf,
        /// The volume's detached mount.
        fd: std::os::fd::RawFd,
    },
    /// A secret's file, created (never replaced) with mode 0400 and the given owner.
    Secret {
        /// The path.
        path: PathBuf,
        /// The value (never printed).
        value: super::process::SecretBytes,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Remounts a mount read-only, keeping the flags it has (in a user namespace those it
    /// inherited from the host are locked, and a remount without them fails).
    RemountReadOnly(PathBuf),
    /// Makes `root` the root (`pivot_root`) and lets go of the old one.
    PivotRoot(PathBuf),
    /// The UTS namespace's host name.
    Hostname(String),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Mount(m) => write!(f, "mount {m}"),
            Op::Target { path, dir } => write!(
                f,
                "target {} ({})",
                path.display(),
                if *dir { "dir" } else { "file" }
            ),
            Op::Dir(p) => write!(f, "mkdir {}", p.display()),
            Op::CharDev {
                path,
                major,
                minor,
                mode,
            } => write!(f, "mknod {} c {major} {minor} {mode:o}", path.display()),
            Op::Attach { fd, path } => write!(f, "attach fd {fd} at {}", path.display()),
            Op::Symlink { link, to } => write!(f, "symlink {} -> {}", link.display(), to.display()),
            Op::File { path, content } => {
                write!(f, "write {} ({} bytes)", path.display(), content.len())
            }
            Op::Seed { path, fd } => write!(f, "seed fd {fd} from {}", path.display()),
            Op::Secret { path, uid, gid, .. } => {
                write!(f, "secret {} (0400 {uid}:{gid})", path.display())
            }
            Op::RemountReadOnly(p) => write!(f, "remount read-only {}", p.display()),
            Op::Mask(p) => write!(f, "mask {}", p.display()),
            Op::ReadOnly(p) => write!(f, "read-only {}", p.display()),
            Op::PivotRoot(root) => write!(f, "pivot_root {}", root.display()),
            Op::Hostname(h) => write!(f, "sethostname {h}"),
        }
    }
}

/// The system calls the runtime makes, behind one trait.
pub trait Syscall {
    /// Performs a mount.
    fn mount(&self, m: &Mount) -> io::Result<()>;
    /// Unmounts `target` (lazily when `detach`).
    fn umount(&self, target: &Path, detach: bool) -> io::Result<()>;
    /// Prepares a mount point from the image (see [`Op::Target`]).
    fn target(&self, path: &Path, dir: bool) -> io::Result<()>;
    /// Creates a directory.
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    /// Creates a character device node with exactly `mode`.
    fn mknod_char(&self, path: &Path, major: u64, minor: u64, mode: u32) -> io::Result<()>;
    /// Attaches the detached mount `fd` at `path` (move_mount).
    fn attach(&self, fd: std::os::fd::RawFd, path: &Path) -> io::Result<()>;
    /// Creates a symlink.
    fn symlink(&self, to: &Path, link: &Path) -> io::Result<()>;
    /// Writes a file (see [`Op::File`]).
    fn write_file(&self, path: &Path, content: &[u8]) -> io::Result<()>;
    /// Seeds a volume (see [`Op::Seed`]).
    fn seed(&self, path: &Path, fd: std::os::fd::RawFd) -> io::Result<()>;
    /// Remounts read-only (see [`Op::RemountReadOnly`]).
    fn remount_read_only(&self, path: &Path) -> io::Result<()>;
    /// Writes a secret's file (see [`Op::Secret`]).
    fn secret(&self, path: &Path, value: &[u8], uid: u32, gid: u32) -> io::Result<()>;
    /// Masks a path (see [`Op::Mask`]).
    fn mask(&self, path: &Path) -> io::Result<()>;
    /// Makes a path read-only (see [`Op::ReadOnly`]).
    fn read_only(&self, path: &Path) -> io::Result<()>;
    /// `pivot_root` into `root`, the old root detached.
    fn pivot_root(&self, root: &Path) -> io::Result<()>;
    /// Sets the host name.
    fn sethostname(&self, name: &str) -> io::Result<()>;
}

/// An error of `what` on `path`, with the errno's text.
fn at(what: &str, path: &Path) -> impl FnOnce(nix::errno::Errno) -> io::Error {
    let what = format!("{what} {}", path.display());
    move |e| io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
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

    fn target(&self, path: &Path, dir: bool) -> io::Result<()> {
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_symlink() => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mount target {} is a symlink in the image", path.display()),
            )),
            Ok(_) => Ok(()),
            Err(_) if dir => std::fs::create_dir_all(path).map_err(with_path),
            Err(_) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(with_path)?;
                }
                std::fs::File::create(path).map(drop).map_err(with_path)
            }
        }
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
            .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))
    }

    fn mknod_char(&self, path: &Path, major: u64, minor: u64, mode: u32) -> io::Result<()> {
        use nix::sys::stat::{Mode, SFlag};
        let mode = Mode::from_bits_truncate(mode);
        nix::sys::stat::mknod(
            path,
            SFlag::S_IFCHR,
            mode,
            nix::sys::stat::makedev(major, minor),
        )
        .map_err(at("mknod", path))?;
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            path,
            mode,
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(at("chmod", path))
    }

    fn attach(&self, fd: std::os::fd::RawFd, path: &Path) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let dest = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with NUL"))?;
        const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
        // SAFETY: move_mount(2) of a detached mount onto a NUL-terminated path.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                dest.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("attach a mount at {}: {e}", path.display()),
            ));
        }
        Ok(())
    }

    fn symlink(&self, to: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(to, link)
            .map_err(|e| io::Error::new(e.kind(), format!("symlink {}: {e}", link.display())))
    }

    fn write_file(&self, path: &Path, content: &[u8]) -> io::Result<()> {
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(path).map_err(with_path)?;
        }
        self.target(path, false)?;
        std::fs::write(path, content).map_err(with_path)
    }

    fn seed(&self, path: &Path, fd: std::os::fd::RawFd) -> io::Result<()> {
        // The detached mount's root, reachable through the descriptor.
        let via = format!("/proc/self/fd/{fd}");
        super::process::seed(path, Path::new(&via)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("copy {} into its volume: {e}", path.display()),
            )
        })
    }

    fn secret(&self, path: &Path, value: &[u8], uid: u32, gid: u32) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(path)
            .map_err(with_path)?;
        f.write_all(value).map_err(with_path)?;
        nix::unistd::fchown(
            &f,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("give {} to uid {uid}: {e}", path.display()),
            )
        })
    }

    fn remount_read_only(&self, path: &Path) -> io::Result<()> {
        let kept = nix::sys::statvfs::statvfs(path)
            .map(|st| locked_flags(st.flags()))
            .unwrap_or(MsFlags::empty());
        self.mount(&Mount {
            fstype: None,
            source: None,
            target: path.into(),
            flags: MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_REC
                | kept,
            data: None,
        })
    }

    fn mask(&self, path: &Path) -> io::Result<()> {
        let m = match std::fs::symlink_metadata(path) {
            Ok(md) if md.is_dir() => Mount {
                fstype: Some("tmpfs".into()),
                source: Some("tmpfs".into()),
                target: path.into(),
                flags: MsFlags::MS_RDONLY,
                data: Some("size=0".into()),
            },
            Ok(_) => Mount {
                fstype: None,
                source: Some("/dev/null".into()),
                target: path.into(),
                flags: MsFlags::MS_BIND,
                data: None,
            },
            Err(_) => return Ok(()),
        };
        self.mount(&m)
    }

    fn read_only(&self, path: &Path) -> io::Result<()> {
        if std::fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        let bind = |flags| Mount {
            fstype: None,
            source: Some(path.into()),
            target: path.into(),
            flags,
            data: None,
        };
        self.mount(&bind(MsFlags::MS_BIND | MsFlags::MS_REC))?;
        self.mount(&Mount {
            source: None,
            ..bind(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC)
        })
    }

    fn pivot_root(&self, root: &Path) -> io::Result<()> {
        nix::unistd::chdir(root).map_err(at("enter the root filesystem", root))?;
        nix::unistd::pivot_root(".", ".").map_err(at("pivot_root to", root))?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH)
            .map_err(at("detach the host's root from", root))?;
        nix::unistd::chdir("/").map_err(at("chdir", Path::new("/")))
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        nix::unistd::sethostname(name).map_err(at("set the host name to", Path::new(name)))
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

    fn target(&self, path: &Path, dir: bool) -> io::Result<()> {
        self.record(Op::Target {
            path: path.into(),
            dir,
        })
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        self.record(Op::Dir(path.into()))
    }

    fn mknod_char(&self, path: &Path, major: u64, minor: u64, mode: u32) -> io::Result<()> {
        self.record(Op::CharDev {
            path: path.into(),
            major,
            minor,
            mode,
        })
    }

    fn attach(&self, fd: std::os::fd::RawFd, path: &Path) -> io::Result<()> {
        self.record(Op::Attach {
            fd,
            path: path.into(),
        })
    }

    fn symlink(&self, to: &Path, link: &Path) -> io::Result<()> {
        self.record(Op::Symlink {
            link: link.into(),
            to: to.into(),
        })
    }

    fn write_file(&self, path: &Path, content: &[u8]) -> io::Result<()> {
        self.record(Op::File {
            path: path.into(),
            content: content.to_vec(),
        })
    }

    fn seed(&self, path: &Path, fd: std::os::fd::RawFd) -> io::Result<()> {
        self.record(Op::Seed {
            path: path.into(),
            fd,
        })
    }

    fn remount_read_only(&self, path: &Path) -> io::Result<()> {
        self.record(Op::RemountReadOnly(path.into()))
    }

    fn secret(&self, path: &Path, _value: &[u8], uid: u32, gid: u32) -> io::Result<()> {
        self.record(Op::Secret {
            path: path.into(),
            value: Default::default(),
            uid,
            gid,
        })
    }

    fn mask(&self, path: &Path) -> io::Result<()> {
        self.record(Op::Mask(path.into()))
    }

    fn read_only(&self, path: &Path) -> io::Result<()> {
        self.record(Op::ReadOnly(path.into()))
    }

    fn pivot_root(&self, root: &Path) -> io::Result<()> {
        self.record(Op::PivotRoot(root.into()))
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        self.record(Op::Hostname(name.into()))
    }
}

impl RecordingSyscall {
    fn record(&self, op: Op) -> io::Result<()> {
        self.calls.borrow_mut().push(op.to_string());
        Ok(())
    }
}

/// Performs `ops` in order through `sys`.
pub fn perform(sys: &dyn Syscall, ops: &[Op]) -> io::Result<()> {
    for op in ops {
        match op {
            Op::Mount(m) => sys.mount(m)?,
            Op::Target { path, dir } => sys.target(path, *dir)?,
            Op::Dir(p) => sys.mkdir(p)?,
            Op::CharDev {
                path,
                major,
                minor,
                mode,
            } => sys.mknod_char(path, *major, *minor, *mode)?,
            Op::Attach { fd, path } => sys.attach(*fd, path)?,
            Op::Symlink { link, to } => sys.symlink(to, link)?,
            Op::File { path, content } => sys.write_file(path, content)?,
            Op::Seed { path, fd } => sys.seed(path, *fd)?,
            Op::RemountReadOnly(p) => sys.remount_read_only(p)?,
            Op::Secret {
                path,
                value,
                uid,
                gid,
            } => sys.secret(path, &value.0, *uid, *gid)?,
            Op::Mask(p) => sys.mask(p)?,
            Op::ReadOnly(p) => sys.read_only(p)?,
            Op::PivotRoot(root) => sys.pivot_root(root)?,
            Op::Hostname(h) => sys.sethostname(h)?,
        }
    }
    Ok(())
}

/// A mount step.
pub fn mount_op(
    fstype: Option<&str>,
    source: Option<&str>,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Op {
    Op::Mount(Mount {
        fstype: fstype.map(String::from),
        source: source.map(PathBuf::from),
        target: target.into(),
        flags,
        data: data.map(String::from),
    })
}

/// The device nodes every container gets (Docker's defaults): name, major, minor.
pub const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Docker's masked paths: made unreadable inside the container.
pub const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// Docker's read-only paths.
pub const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The mount flags a bind remount must repeat (`statvfs` flags as `mount` flags).
fn locked_flags(st: nix::sys::statvfs::FsFlags) -> MsFlags {
    use nix::sys::statvfs::FsFlags as F;
    [
        (F::ST_NOSUID, MsFlags::MS_NOSUID),
        (F::ST_NODEV, MsFlags::MS_NODEV),
        (F::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (F::ST_NOATIME, MsFlags::MS_NOATIME),
        (F::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (F::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(s, _)| st.contains(*s))
    .fold(MsFlags::empty(), |acc, (_, m)| acc | m)
}

/// The container's own `/etc` files (`hostname`, `hosts`, `resolv.conf`): contents and
/// paths.
pub fn etc_files(files: &[(Vec<u8>, &str)]) -> Vec<Op> {
    files
        .iter()
        .map(|(content, path)| Op::File {
            path: (*path).into(),
            content: content.clone(),
        })
        .collect()
}

/// A user's mount (`-v`, `--tmpfs`, a service's volumes) as the plan sees it.
#[derive(Debug, Clone)]
pub struct UserMount<'a> {
    /// Absolute path inside the container.
    pub target: &'a str,
    /// The detached bind source (opened before `pivot_root`) and whether it is a
    /// directory; `None` for a tmpfs.
    pub source: Option<(std::os::fd::RawFd, bool)>,
    /// Read-only.
    pub read_only: bool,
    /// Copy the image's content at `target` into the (empty) source first.
    pub seed: bool,
    /// A tmpfs's size in bytes.
    pub tmpfs_size: Option<u64>,
}

/// The user's mounts, in order: a tmpfs (world-writable, sticky, like Docker's) or the
/// detached bind source attached at its target (created when missing, never a symlink),
/// seeded first when asked, remounted read-only when asked.
pub fn user_mounts(mounts: &[UserMount]) -> Vec<Op> {
    let mut ops = Vec::new();
    for m in mounts {
        let path = PathBuf::from(m.target);
        let Some((fd, dir)) = m.source else {
            ops.push(Op::Target {
                path: path.clone(),
                dir: true,
            });
            let data = match m.tmpfs_size {
                Some(size) => format!("mode=1777,size={size}"),
                None => "mode=1777".to_string(),
            };
            ops.push(mount_op(
                Some("tmpfs"),
                Some("tmpfs"),
                m.target,
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(&data),
            ));
            continue;
        };
        if m.seed && dir {
            ops.push(Op::Seed {
                path: path.clone(),
                fd,
            });
        }
        ops.push(Op::Target {
            path: path.clone(),
            dir,
        });
        ops.push(Op::Attach {
            fd,
            path: path.clone(),
        });
        if m.read_only {
            ops.push(Op::RemountReadOnly(path));
        }
    }
    ops
}

/// Secrets delivered as files: a fresh tmpfs at `/run/secrets` (they never touch a disk),
/// each file mode 0400 and owned by the command's user, then the mount read-only.
pub fn secret_files(
    files: &[(String, super::process::SecretBytes)],
    uid: u32,
    gid: u32,
) -> Vec<Op> {
    const DIR: &str = "/run/secrets";
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut ops = vec![
        Op::Target {
            path: DIR.into(),
            dir: true,
        },
        mount_op(
            Some("tmpfs"),
            Some("secrets"),
            DIR,
            flags,
            Some("mode=0755,size=4m"),
        ),
    ];
    ops.extend(files.iter().map(|(name, value)| Op::Secret {
        path: format!("{DIR}/{name}").into(),
        value: value.clone(),
        uid,
        gid,
    }));
    ops.push(mount_op(
        None,
        None,
        DIR,
        flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    ));
    ops
}

/// Docker's masked paths, then its read-only ones (after `/proc` and `/sys` are mounted).
pub fn hidden_paths() -> Vec<Op> {
    MASKED
        .iter()
        .map(|p| Op::Mask(p.into()))
        .chain(READ_ONLY.iter().map(|p| Op::ReadOnly(p.into())))
        .collect()
}

/// What a container in a user namespace gets made before `pivot_root`, as detached
/// mounts attached afterwards: procfs and sysfs may be mounted there only while a fully
/// visible instance is in sight (the host's, until `pivot_root`), and device nodes cannot
/// be made at all (the host's are bound, as rootless podman does).
#[derive(Debug)]
pub struct Detached {
    /// A procfs of the container's PID namespace.
    pub proc: std::os::fd::RawFd,
    /// A read-only sysfs of its network namespace (none with the host's network).
    pub sys: Option<std::os::fd::RawFd>,
    /// The host's nodes, one per [`DEVICES`] entry.
    pub devices: Vec<std::os::fd::RawFd>,
    /// Whether group 5 (`tty`, owner of the pseudo-terminals) is mapped: not with a
    /// single-id map.
    pub tty_group: bool,
}

/// The kernel filesystems of a container, inside its new root: `/proc`; `/dev` as a tmpfs
/// with Docker's device nodes, `pts`, `shm`, `mqueue` and the usual links; `/sys`
/// read-only (sysfs in its own network namespace, else an empty tmpfs: sysfs would show
/// the host's network); and the container's own cgroup at `/sys/fs/cgroup`.
///
/// `detached` (in a user namespace) gives what is made before `pivot_root` instead.
pub fn kernel_filesystems(
    host_network: bool,
    cgroupfs: Option<&super::cgroup::CgroupFs>,
    detached: Option<&Detached>,
) -> Vec<Op> {
    use super::cgroup::CgroupFs;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let ro = nosuid | MsFlags::MS_RDONLY;
    let mut ops = vec![
        Op::Target {
            path: "/proc".into(),
            dir: true,
        },
        match detached {
            Some(d) => Op::Attach {
                fd: d.proc,
                path: "/proc".into(),
            },
            None => mount_op(Some("proc"), Some("proc"), "/proc", nosuid, None),
        },
        Op::Target {
            path: "/dev".into(),
            dir: true,
        },
        mount_op(
            Some("tmpfs"),
            Some("tmpfs"),
            "/dev",
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        ),
    ];
    for (i, (name, major, minor)) in DEVICES.into_iter().enumerate() {
        let path: PathBuf = format!("/dev/{name}").into();
        match detached.and_then(|d| d.devices.get(i)) {
            Some(&fd) => ops.extend([
                Op::Target {
                    path: path.clone(),
                    dir: false,
                },
                Op::Attach { fd, path },
            ]),
            None => ops.push(Op::CharDev {
                path,
                major,
                minor,
                mode: 0o666,
            }),
        }
    }
    for d in ["/dev/pts", "/dev/shm", "/dev/mqueue"] {
        ops.push(Op::Dir(d.into()));
    }
    ops.extend([
        mount_op(
            Some("devpts"),
            Some("devpts"),
            "/dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some(if detached.is_some_and(|d| !d.tty_group) {
                "newinstance,ptmxmode=0666,mode=0620"
            } else {
                "newinstance,ptmxmode=0666,mode=0620,gid=5"
            }),
        ),
        mount_op(
            Some("tmpfs"),
            Some("shm"),
            "/dev/shm",
            nosuid,
            Some("mode=1777,size=65536k"),
        ),
        mount_op(Some("mqueue"), Some("mqueue"), "/dev/mqueue", nosuid, None),
    ]);
    for (link, to) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        ops.push(Op::Symlink {
            link: link.into(),
            to: to.into(),
        });
    }
    ops.push(Op::Target {
        path: "/sys".into(),
        dir: true,
    });
    const CG: &str = "/sys/fs/cgroup";
    if host_network {
        ops.push(mount_op(
            Some("tmpfs"),
            Some("sysfs"),
            "/sys",
            MsFlags::MS_NOSUID,
            Some("size=16k,mode=755"),
        ));
        if cgroupfs.is_some() {
            ops.extend([Op::Dir("/sys/fs".into()), Op::Dir(CG.into())]);
        }
    } else {
        ops.push(match detached.and_then(|d| d.sys) {
            Some(fd) => Op::Attach {
                fd,
                path: "/sys".into(),
            },
            None => mount_op(Some("sysfs"), Some("sysfs"), "/sys", ro, None),
        });
    }
    match cgroupfs {
        None => {}
        Some(CgroupFs::V2) => ops.push(mount_op(Some("cgroup2"), Some("cgroup2"), CG, ro, None)),
        Some(CgroupFs::V1(hierarchies)) => {
            ops.push(mount_op(
                Some("tmpfs"),
                Some("tmpfs"),
                CG,
                nosuid,
                Some("mode=755,size=64k"),
            ));
            for h in hierarchies {
                let dir = format!("{CG}/{}", h.dir);
                ops.push(Op::Dir(dir.clone().into()));
                ops.push(mount_op(
                    Some("cgroup"),
                    Some("cgroup"),
                    &dir,
                    ro,
                    Some(&h.options),
                ));
                for link in &h.links {
                    ops.push(Op::Symlink {
                        link: format!("{CG}/{link}").into(),
                        to: h.dir.clone().into(),
                    });
                }
            }
            ops.push(mount_op(None, None, CG, MsFlags::MS_REMOUNT | ro, None));
        }
    }
    if host_network {
        ops.push(mount_op(None, None, "/sys", MsFlags::MS_REMOUNT | ro, None));
    }
    ops
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
        "lowerdir={lowerdir},upperdir={},workdir={}{}",
        option_path(upper)?,
        option_path(work)?,
        // In a user namespace overlayfs keeps its whiteout and opaque marks in `user.`
        // attributes (kernel 5.11).
        if super::rootless::active() {
            ",userxattr"
        } else {
            ""
        }
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

/// True when the kernel supports overlayfs (listed in `/proc/filesystems`), and lets this
/// process mount it: in a user namespace only from Linux 5.11 (containers then get a
/// copy of the image instead).
pub fn overlay_supported() -> bool {
    let listed = std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    });
    listed && (!super::rootless::active() || kernel_at_least(&kernel_release(), (5, 11)))
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()
}

/// Whether a kernel release (`6.1.0-18-amd64`) is at least `major.minor`.
fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// mount_setattr/fsmount flag: read-only.
pub const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
/// mount_setattr/fsmount flag: nosuid.
pub const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
/// nodev.
pub const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
/// noexec.
pub const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

/// A new filesystem context (fsopen(2)) of `fstype`.
pub fn fs_context(fstype: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    // SAFETY: fsopen(2) with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Creates the configured filesystem and mounts it nowhere (fsmount(2)): a detached mount
/// only a descriptor reaches.
pub fn fs_mount(ctx: &OwnedFd, attrs: libc::c_uint) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    fsconfig(ctx, c"create", None)?;
    // SAFETY: fsmount(2) of the configured context; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_fsmount, ctx.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Calls fsconfig(2) with a string value (or, without one, the create command).
pub fn fsconfig(
    fd: &OwnedFd,
    key: &std::ffi::CStr,
    value: Option<&std::ffi::CStr>,
) -> std::io::Result<()> {
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    // SAFETY: fsconfig(2) on our descriptor with NUL-terminated strings (or none, for the
    // create command); the result is checked.
    let rc = unsafe {
        match value {
            Some(v) => libc::syscall(
                libc::SYS_fsconfig,
                fd.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                v.as_ptr(),
                0,
            ),
            None => libc::syscall(
                libc::SYS_fsconfig,
                fd.as_raw_fd(),
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_void>(),
                0,
            ),
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets a flag option (fsconfig(2) `FSCONFIG_SET_FLAG`), such as overlayfs's `userxattr`.
pub fn fsconfig_flag(fd: &OwnedFd, key: &std::ffi::CStr) -> std::io::Result<()> {
    const FSCONFIG_SET_FLAG: libc::c_uint = 0;
    // SAFETY: fsconfig(2) on our descriptor with a NUL-terminated key and no value.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd.as_raw_fd(),
            FSCONFIG_SET_FLAG,
            key.as_ptr(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use crate::runtime::cgroup::CgroupFs;

    fn rendered(ops: &[Op]) -> Vec<String> {
        let sys = RecordingSyscall::default();
        perform(&sys, ops).unwrap();
        sys.calls.into_inner()
    }

    #[test]
    fn kernel_filesystems_are_planned_as_docker_makes_them() {
        let v1 = CgroupFs::V1(crate::runtime::cgroup::sample_v1());
        let ops = kernel_filesystems(false, Some(&v1), None);
        let calls = rendered(&ops);
        // Every step goes through the seam, in order.
        assert_eq!(calls.len(), ops.len());
        // Docker's six device nodes, mode 0666, nothing else.
        let nodes: Vec<&String> = calls.iter().filter(|c| c.starts_with("mknod")).collect();
        assert_eq!(
            nodes,
            [
                "mknod /dev/null c 1 3 666",
                "mknod /dev/zero c 1 5 666",
                "mknod /dev/full c 1 7 666",
                "mknod /dev/random c 1 8 666",
                "mknod /dev/urandom c 1 9 666",
                "mknod /dev/tty c 5 0 666",
            ]
        );
        // /proc and /dev are made before anything is mounted under them.
        let pos = |needle: &str| calls.iter().position(|c| c.contains(needle)).unwrap();
        assert!(pos("target /proc") < pos("proc proc on /proc"));
        assert!(pos("tmpfs on /dev ") < pos("mknod /dev/null"));
        assert!(pos("mkdir /dev/pts") < pos("devpts devpts on /dev/pts"));
        // sysfs read-only; each v1 hierarchy read-only, with its own options, on a tmpfs
        // that is made read-only last; the co-mount links.
        let sysfs = ops
            .iter()
            .find_map(|o| match o {
                Op::Mount(m) if m.fstype.as_deref() == Some("sysfs") => Some(m),
                _ => None,
            })
            .unwrap();
        assert!(
            sysfs
                .flags
                .contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID)
        );
        let cgroups: Vec<&Mount> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Mount(m) if m.fstype.as_deref() == Some("cgroup") => Some(m),
                _ => None,
            })
            .collect();
        assert_eq!(cgroups.len(), 2);
        for m in &cgroups {
            assert!(
                m.flags.contains(
                    MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC
                ),
                "{m}"
            );
        }
        assert_eq!(cgroups[0].data.as_deref(), Some("cpu,cpuacct"));
        assert_eq!(cgroups[0].target, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert!(calls.contains(&"symlink /sys/fs/cgroup/cpu -> cpu,cpuacct".to_string()));
        let last = calls.last().unwrap();
        assert!(
            last.contains("on /sys/fs/cgroup")
                && last.contains("MS_REMOUNT")
                && last.contains("MS_RDONLY"),
            "{last}"
        );
    }

    #[test]
    fn host_networking_hides_sysfs_and_v2_mounts_one_hierarchy() {
        let calls = rendered(&kernel_filesystems(true, Some(&CgroupFs::V2), None));
        assert!(
            !calls.iter().any(|c| c.contains("sysfs sysfs")),
            "{calls:#?}"
        );
        let sys = calls
            .iter()
            .position(|c| c.contains("tmpfs sysfs on /sys "))
            .unwrap();
        let cg = calls
            .iter()
            .position(|c| c.starts_with("mount cgroup2 cgroup2 on /sys/fs/cgroup"))
            .unwrap();
        assert!(sys < cg);
        assert!(calls[cg].contains("MS_RDONLY"), "{}", calls[cg]);
        // /sys itself ends read-only.
        let last = calls.last().unwrap();
        assert!(
            last.contains("on /sys ") && last.contains("MS_REMOUNT") && last.contains("MS_RDONLY"),
            "{last}"
        );
        // Without a cgroup: nothing under /sys/fs.
        let calls = rendered(&kernel_filesystems(false, None, None));
        assert!(!calls.iter().any(|c| c.contains("/sys/fs")), "{calls:#?}");
    }

    #[test]
    fn user_mounts_and_etc_files_are_planned_in_order() {
        let mounts = [
            UserMount {
                target: "/data",
                source: Some((7, true)),
                read_only: false,
                seed: true,
                tmpfs_size: None,
            },
            UserMount {
                target: "/etc/app.conf",
                source: Some((8, false)),
                read_only: true,
                seed: true,
                tmpfs_size: None,
            },
            UserMount {
                target: "/scratch",
                source: None,
                read_only: false,
                seed: false,
                tmpfs_size: Some(1 << 20),
            },
        ];
        let calls = rendered(&user_mounts(&mounts));
        assert_eq!(
            calls[..6],
            [
                "seed fd 7 from /data",
                "target /data (dir)",
                "attach fd 7 at /data",
                // A file is never seeded.
                "target /etc/app.conf (file)",
                "attach fd 8 at /etc/app.conf",
                "remount read-only /etc/app.conf",
            ]
        );
        assert_eq!(calls[6], "target /scratch (dir)");
        assert!(
            calls[7].starts_with("mount tmpfs tmpfs on /scratch")
                && calls[7].contains("mode=1777,size=1048576"),
            "{}",
            calls[7]
        );
        let etc = rendered(&etc_files(&[(b"web-1\n".to_vec(), "/etc/hostname")]));
        assert_eq!(etc, ["write /etc/hostname (6 bytes)"]);
    }

    #[test]
    fn secrets_go_on_their_own_tmpfs_read_only_once_written() {
        use super::super::process::SecretBytes;
        let ops = secret_files(
            &[("db".into(), SecretBytes(b"hunter2".to_vec()))],
            1000,
            1000,
        );
        let shown = format!("{ops:?}");
        assert!(
            !shown.contains("hunter2"),
            "a plan never shows a value: {shown}"
        );
        let calls = rendered(&ops);
        assert_eq!(calls[0], "target /run/secrets (dir)");
        assert!(
            calls[1].starts_with("mount tmpfs secrets on /run/secrets"),
            "{}",
            calls[1]
        );
        assert_eq!(calls[2], "secret /run/secrets/db (0400 1000:1000)");
        assert!(
            calls[3].contains("MS_REMOUNT") && calls[3].contains("MS_RDONLY"),
            "{}",
            calls[3]
        );
    }

    #[test]
    fn kernel_releases_are_compared() {
        assert!(kernel_at_least("6.1.0-18-amd64", (5, 11)));
        assert!(kernel_at_least("5.11.0", (5, 11)));
        assert!(!kernel_at_least("5.10.209-1", (5, 11)));
        assert!(!kernel_at_least("4.19.0-26-amd64", (5, 11)));
        assert!(!kernel_at_least("", (5, 11)));
    }

    #[test]
    fn docker_s_masked_paths_then_its_read_only_ones() {
        let calls = rendered(&hidden_paths());
        let kcore = calls.iter().position(|c| c == "mask /proc/kcore").unwrap();
        let sys = calls
            .iter()
            .position(|c| c == "read-only /proc/sys")
            .unwrap();
        assert!(kcore < sys, "{calls:#?}");
        assert!(
            calls.contains(&"mask /sys/firmware".to_string()),
            "{calls:#?}"
        );
        assert!(calls.contains(&"read-only /proc/sysrq-trigger".to_string()));
    }

    #[test]
    fn in_a_user_namespace_proc_sys_and_devices_are_attached_not_made() {
        let d = Detached {
            proc: 10,
            sys: Some(11),
            devices: (20..26).collect(),
            tty_group: false,
        };
        let calls = rendered(&kernel_filesystems(false, None, Some(&d)));
        assert!(
            calls.contains(&"attach fd 10 at /proc".to_string()),
            "{calls:#?}"
        );
        assert!(
            calls.contains(&"attach fd 11 at /sys".to_string()),
            "{calls:#?}"
        );
        for (i, (name, _, _)) in DEVICES.iter().enumerate() {
            let at = format!("/dev/{name}");
            let target = calls
                .iter()
                .position(|c| *c == format!("target {at} (file)"))
                .unwrap_or_else(|| panic!("{at}: {calls:#?}"));
            assert_eq!(calls[target + 1], format!("attach fd {} at {at}", 20 + i));
        }
        assert!(
            !calls.iter().any(|c| c.starts_with("mknod")
                || c.contains("proc on /proc")
                || c.contains("sysfs on /sys")),
            "nothing is made that a user namespace cannot make: {calls:#?}"
        );
        let devpts = calls.iter().find(|c| c.contains("devpts")).unwrap();
        assert!(!devpts.contains("gid=5"), "group 5 is not mapped: {devpts}");
        // With the host's network, /sys stays the empty tmpfs.
        let d = Detached { sys: None, ..d };
        let calls = rendered(&kernel_filesystems(true, None, Some(&d)));
        assert!(
            calls
                .iter()
                .any(|c| c.contains("tmpfs sysfs on /sys") || c.contains("sysfs on /sys")),
            "{calls:#?}"
        );
        assert!(
            !calls.iter().any(|c| c.contains("attach fd 11")),
            "{calls:#?}"
        );
    }

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
