//! Layer extraction that is safe against hostile input.
//!
//! Nothing is ever written outside the destination directory:
//!
//! - entry names with `..` components or absolute paths are refused;
//! - every parent directory is opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//!   relative to the destination, so a symlink planted by an earlier entry (or pointing at
//!   `/`) resolves inside the destination, never on the host;
//! - entries are created with `*at` calls relative to that parent descriptor, with
//!   `O_NOFOLLOW`/`O_EXCL`; ownership and modes are set through the new file's own
//!   descriptor (or `AT_SYMLINK_NOFOLLOW` for symlinks), never through a path that a
//!   symlink could redirect;
//! - hardlinks must name a non-directory inside the destination (resolved the same way);
//! - device nodes are refused; FIFOs lose setuid/setgid/sticky bits;
//! - whiteouts become overlayfs whiteouts: `.wh.NAME` a 0:0 character device, `.wh..wh..opq`
//!   the `trusted.overlay.opaque` attribute; a whiteout of `.`, `..` or with a `/` is refused;
//! - limits on entries and bytes stop tar and decompression bombs.
//!
//! Each refusal names the layer and the entry.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, fchmod, fstatat, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};

/// Limits that stop tar and decompression bombs (entries, bytes, and the free space to
/// leave on the destination's filesystem).
pub use crate::store::limits::LayerLimits as Limits;

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry is hostile or unsupported.
    #[error("layer {layer}: refused entry `{entry}`: {why}")]
    Refused {
        /// The layer (digest or name).
        layer: String,
        /// The entry's name.
        entry: String,
        /// Why.
        why: &'static str,
    },
    /// The layer has more entries than allowed.
    #[error("layer {layer}: more than {limit} entries (a tar bomb?)")]
    TooManyEntries {
        /// The layer.
        layer: String,
        /// The limit.
        limit: u64,
    },
    /// The layer's uncompressed stream is larger than allowed.
    #[error("layer {layer}: more than {limit} bytes uncompressed (a decompression bomb?)")]
    TooLarge {
        /// The layer.
        layer: String,
        /// The limit.
        limit: u64,
    },
    /// Unpacking further would leave less free space than the reserve.
    #[error(
        "layer {layer}: stopped unpacking with {free} bytes free on the store's filesystem, below its reserve of {reserve} bytes or 5% of its inodes (a decompression bomb, or a full disk?)"
    )]
    DiskReserve {
        /// The layer.
        layer: String,
        /// Bytes free when it stopped.
        free: u64,
        /// The reserve (`BERTH_DISK_RESERVE`).
        reserve: u64,
    },
    /// A system call failed.
    #[error("layer {layer}: cannot {what} `{entry}`")]
    Sys {
        /// The layer.
        layer: String,
        /// The entry.
        entry: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Counts and caps the bytes read through it, and every [`CHECK_EVERY`] bytes checks that
/// the destination's filesystem keeps its free-space reserve.
struct Capped<R> {
    inner: R,
    read: u64,
    limit: u64,
    /// The destination and the reserve to keep on its filesystem.
    reserve: Option<(OwnedFd, u64)>,
    next_check: u64,
}

/// How many bytes are unpacked between two free-space checks (and entries: every 256).
const CHECK_EVERY: u64 = 16 << 20;

/// The free bytes on `fd`'s filesystem when they (or its free inodes, against 5% of
/// them) are below the reserve.
fn below_reserve(fd: &OwnedFd, reserve: u64) -> Option<u64> {
    let (free, _) = crate::store::limits::free_space(fd).ok()?;
    let inodes_low = crate::store::limits::free_inodes(fd)
        .is_ok_and(|(avail, total)| total > 0 && avail < total / 20);
    (free < reserve || inodes_low).then_some(free)
}

impl<R> Capped<R> {
    fn check_reserve(&self) -> io::Result<()> {
        match &self.reserve {
            Some((fd, reserve)) if below_reserve(fd, *reserve).is_some() => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the filesystem's free-space reserve is reached",
            )),
            _ => Ok(()),
        }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "layer exceeds its size limit",
            ));
        }
        if self.read >= self.next_check {
            self.next_check = self.read + CHECK_EVERY;
            self.check_reserve()?;
        }
        Ok(n)
    }
}

/// What an unpack did.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnpackStats {
    /// Entries extracted.
    pub entries: u64,
    /// Uncompressed bytes read.
    pub bytes: u64,
}

/// A chown's result, where an owner the rootless user namespace does not map (EINVAL:
/// no subordinate ids, or an id beyond the mapped range) leaves the file the user's own,
/// with a warning once per process.
fn unmapped(result: nix::Result<()>, uid: u64, gid: u64) -> nix::Result<()> {
    match result {
        Err(Errno::EINVAL) if super::rootless::active() => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                crate::say!(
                    "berth: warning: the image has files owned by {uid}:{gid}, which this user namespace does not map (see /etc/subuid and /etc/subgid): they are unpacked as root's"
                )
            });
            Ok(())
        }
        other => other,
    }
}

/// What to do with whiteout entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Keep them as overlayfs whiteouts: the directory is one layer of an overlay mount.
    Overlay,
    /// Apply them: layers are extracted one over another into a single directory, and a
    /// whiteout deletes what lower layers put there.
    Apply,
}

struct Unpacker<'a> {
    root: OwnedFd,
    layer: &'a str,
    chown: bool,
    max_bytes: u64,
    whiteouts: Whiteouts,
    /// Paths this layer created (for opaque directories when applying whiteouts).
    created: std::cell::RefCell<std::collections::HashSet<Vec<u8>>>,
}

/// `/proc/self/fd/N/name`: a path to `name` in the directory open as `dir` (resolved by the
/// kernel from the descriptor, so no symlink on the way can redirect it).
fn fd_path(dir: &OwnedFd, name: &[u8]) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    let mut p = std::path::PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    if !name.is_empty() {
        p.push(OsStr::from_bytes(name));
    }
    p
}

/// Removes `name` in `dir` whatever it is (a directory with everything under it; a symlink
/// itself, never its target).
fn remove_any(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let path = fd_path(dir, name);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(&path),
        Ok(_) => std::fs::remove_file(&path),
    }
}

/// Splits an entry name into components, refusing `..` and absolute paths. Empty and `.`
/// components are dropped.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("`..` component"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

impl Unpacker<'_> {
    fn sys(&self, entry: &[u8], what: &'static str) -> impl FnOnce(Errno) -> UnpackError + '_ {
        let entry = String::from_utf8_lossy(entry).into_owned();
        move |e| UnpackError::Sys {
            layer: self.layer.to_string(),
            entry,
            what,
            source: io::Error::from(e),
        }
    }

    fn refuse(&self, entry: &[u8], why: &'static str) -> UnpackError {
        UnpackError::Refused {
            layer: self.layer.to_string(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            why,
        }
    }

    /// Opens (creating missing directories) the directory at `parts`, resolving every
    /// component inside the root.
    fn dir(&self, parts: &[&[u8]], entry: &[u8]) -> Result<OwnedFd, UnpackError> {
        let how = || {
            OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
        };
        let path = join(parts);
        if path.is_empty() {
            return openat2(&self.root, ".", how()).map_err(self.sys(entry, "open the root for"));
        }
        match openat2(&self.root, OsStr::from_bytes(&path), how()) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.sys(entry, "open the parent directory of")(e)),
        }
        // Create missing parents one component at a time. Each is created relative to its
        // parent as resolved inside the root, and opened again from the root, so a symlink
        // among them can never lead outside.
        for i in 0..parts.len() {
            let prefix = join(&parts[..=i]);
            match openat2(&self.root, OsStr::from_bytes(&prefix), how()) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(self.sys(entry, "open a parent directory of")(e)),
            }
            let above = self.dir(&parts[..i], entry)?;
            match mkdirat(
                &above,
                OsStr::from_bytes(parts[i]),
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.sys(entry, "create a parent directory of")(e)),
            }
        }
        match openat2(&self.root, OsStr::from_bytes(&path), how()) {
            Ok(fd) => Ok(fd),
            // Still missing after creating every component: one of them is a symlink whose
            // target (resolved inside the root) does not exist.
            Err(Errno::ENOENT) => {
                Err(self.refuse(entry, "a parent directory is a symlink to a missing path"))
            }
            Err(e) => Err(self.sys(entry, "open the parent directory of")(e)),
        }
    }

    /// Removes whatever is at `name` in `parent` (a file, symlink or empty directory); a
    /// non-empty directory is kept when `keep_dir`.
    fn clear(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        keep_dir: bool,
        entry: &[u8],
    ) -> Result<bool, UnpackError> {
        match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(self.sys(entry, "inspect")(e)),
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
                if keep_dir {
                    return Ok(true);
                }
                unlinkat(parent, name, UnlinkatFlags::RemoveDir)
                    .map_err(|_| self.refuse(entry, "replaces a non-empty directory"))?;
                Ok(false)
            }
            Ok(_) => {
                unlinkat(parent, name, UnlinkatFlags::NoRemoveDir)
                    .map_err(self.sys(entry, "replace"))?;
                Ok(false)
            }
        }
    }

    /// Applies an opaque marker to a flattened tree: removes every child of the directory
    /// that this layer did not create.
    fn clear_lower(&self, dir: &OwnedFd, parts: &[&[u8]], entry: &[u8]) -> Result<(), UnpackError> {
        let err = |source| UnpackError::Sys {
            layer: self.layer.to_string(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            what: "apply the opaque marker",
            source,
        };
        let prefix = join(parts);
        for child in std::fs::read_dir(fd_path(dir, b"")).map_err(err)? {
            let name = child.map_err(err)?.file_name();
            let full = if prefix.is_empty() {
                name.as_bytes().to_vec()
            } else {
                [&prefix[..], b"/", name.as_bytes()].concat()
            };
            if !self.created.borrow().contains(&full) {
                remove_any(dir, name.as_bytes()).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Marks a directory opaque for overlayfs (`trusted.overlay.opaque=y`): lower layers'
    /// entries under it are hidden.
    fn mark_opaque(&self, parts: &[&[u8]], entry: &[u8]) -> Result<(), UnpackError> {
        use std::os::fd::AsRawFd;
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        self.dir(parts, entry)?;
        let path = join(parts);
        let dir = openat2(
            &self.root,
            OsStr::from_bytes(if path.is_empty() { b"." } else { &path }),
            how,
        )
        .map_err(self.sys(entry, "open the opaque directory"))?;
        // SAFETY: the name and value are valid NUL-terminated / sized buffers that outlive
        // the call, and `dir` is an open descriptor.
        let name = super::rootless::overlay_opaque_xattr();
        let rc =
            unsafe { libc::fsetxattr(dir.as_raw_fd(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
        Errno::result(rc)
            .map(drop)
            .map_err(self.sys(entry, "mark opaque"))
    }

    fn times(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        mtime: u64,
        entry: &[u8],
    ) -> Result<(), UnpackError> {
        let t = TimeSpec::new(mtime as i64, 0);
        utimensat(parent, name, &t, &t, UtimensatFlags::NoFollowSymlink)
            .map_err(self.sys(entry, "set the times of"))
    }

    /// Owner and mode through the entry's own descriptor.
    fn own(
        &self,
        fd: &OwnedFd,
        uid: u64,
        gid: u64,
        mode: u32,
        entry: &[u8],
    ) -> Result<(), UnpackError> {
        if self.chown {
            unmapped(
                fchown(
                    fd,
                    Some(Uid::from_raw(uid as u32)),
                    Some(Gid::from_raw(gid as u32)),
                ),
                uid,
                gid,
            )
            .map_err(self.sys(entry, "chown"))?;
        }
        // After chown, which clears setuid/setgid.
        fchmod(fd, Mode::from_bits_truncate(mode)).map_err(self.sys(entry, "chmod"))
    }

    fn entry<R: Read>(&self, mut e: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = e.path_bytes().into_owned();
        let parts = components(&raw).map_err(|why| self.refuse(&raw, why))?;
        let Some((name, parent_parts)) = parts.split_last() else {
            // The root itself ("./"): a directory entry is fine (its metadata stays the
            // snapshot's); anything else would replace the root.
            return match e.header().entry_type() {
                tar::EntryType::Directory => Ok(()),
                _ => Err(self.refuse(&raw, "the root entry is not a directory")),
            };
        };
        let h = e.header().clone();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (h.uid().unwrap_or(0), h.gid().unwrap_or(0));
        let mtime = h.mtime().unwrap_or(0);
        let parent = self.dir(parent_parts, &raw)?;

        // Whiteouts.
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden == b".wh..opq" {
                return match self.whiteouts {
                    Whiteouts::Overlay => self.mark_opaque(parent_parts, &raw),
                    Whiteouts::Apply => self.clear_lower(&parent, parent_parts, &raw),
                };
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.starts_with(b".wh.")
            {
                return Err(self.refuse(&raw, "invalid whiteout"));
            }
            if self.whiteouts == Whiteouts::Apply {
                return remove_any(&parent, hidden).map_err(|source| UnpackError::Sys {
                    layer: self.layer.to_string(),
                    entry: String::from_utf8_lossy(&raw).into_owned(),
                    what: "apply the whiteout",
                    source,
                });
            }
            let target = OsStr::from_bytes(hidden);
            self.clear(&parent, target, false, &raw)?;
            mknodat(&parent, target, SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(self.sys(&raw, "create the whiteout"))?;
            return Ok(());
        }

        self.created.borrow_mut().insert(join(&parts));
        let name = OsStr::from_bytes(name);
        match h.entry_type() {
            tar::EntryType::Directory => {
                self.clear(&parent, name, true, &raw)?;
                match mkdirat(&parent, name, Mode::from_bits_truncate(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(self.sys(&raw, "create the directory")(e)),
                }
                let fd = openat(
                    &parent,
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(self.sys(&raw, "open the directory"))?;
                self.own(&fd, uid, gid, mode, &raw)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.clear(&parent, name, false, &raw)?;
                let fd = openat(
                    &parent,
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(self.sys(&raw, "create"))?;
                let mut file = std::fs::File::from(fd);
                io::copy(&mut e, &mut file).map_err(|source| match source.kind() {
                    io::ErrorKind::FileTooLarge => UnpackError::TooLarge {
                        layer: self.layer.to_string(),
                        limit: self.max_bytes,
                    },
                    _ => UnpackError::Sys {
                        layer: self.layer.to_string(),
                        entry: String::from_utf8_lossy(&raw).into_owned(),
                        what: "write",
                        source,
                    },
                })?;
                file.flush().ok();
                self.own(&OwnedFd::from(file), uid, gid, mode, &raw)?;
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| self.refuse(&raw, "symlink without a target"))?
                    .into_owned();
                self.clear(&parent, name, false, &raw)?;
                symlinkat(OsStr::from_bytes(&target), &parent, name)
                    .map_err(self.sys(&raw, "create the symlink"))?;
                if self.chown {
                    unmapped(
                        fchownat(
                            &parent,
                            name,
                            Some(Uid::from_raw(uid as u32)),
                            Some(Gid::from_raw(gid as u32)),
                            AtFlags::AT_SYMLINK_NOFOLLOW,
                        ),
                        uid,
                        gid,
                    )
                    .map_err(self.sys(&raw, "chown"))?;
                }
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| self.refuse(&raw, "hardlink without a target"))?
                    .into_owned();
                // Hardlink targets are archive paths; a leading `/` means the archive root.
                let trimmed: &[u8] = target.strip_prefix(b"/").unwrap_or(&target);
                let tparts = components(trimmed).map_err(|why| self.refuse(&raw, why))?;
                let Some((tname, tparent)) = tparts.split_last() else {
                    return Err(self.refuse(&raw, "hardlink to the root"));
                };
                let tdir = self.dir(tparent, &raw)?;
                let st = fstatat(
                    &tdir,
                    OsStr::from_bytes(tname),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|_| self.refuse(&raw, "hardlink to a missing entry"))?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                    return Err(self.refuse(&raw, "hardlink to a directory"));
                }
                self.clear(&parent, name, false, &raw)?;
                linkat(
                    &tdir,
                    OsStr::from_bytes(tname),
                    &parent,
                    name,
                    AtFlags::empty(),
                )
                .map_err(self.sys(&raw, "create the hardlink"))?;
                return Ok(());
            }
            tar::EntryType::Fifo => {
                self.clear(&parent, name, false, &raw)?;
                mknodat(
                    &parent,
                    name,
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(mode & 0o777),
                    0,
                )
                .map_err(self.sys(&raw, "create the FIFO"))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(self.refuse(&raw, "device node"));
            }
            _ => return Err(self.refuse(&raw, "unsupported entry type")),
        }
        self.times(&parent, name, mtime, &raw)
    }
}

/// Unpacks the uncompressed tar stream `tar` into `dest` (an existing directory: empty for an
/// overlay layer, or holding the layers below when whiteouts are applied). `layer` names
/// the layer in errors.
pub fn unpack(
    tar: impl Read,
    dest: &Path,
    layer: &str,
    limits: Limits,
    whiteouts: Whiteouts,
) -> Result<UnpackStats, UnpackError> {
    let root = nix::fcntl::open(
        dest,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Sys {
        layer: layer.to_string(),
        entry: dest.display().to_string(),
        what: "open",
        source: e.into(),
    })?;
    let u = Unpacker {
        root,
        layer,
        chown: nix::unistd::geteuid().is_root(),
        max_bytes: limits.max_bytes,
        whiteouts,
        created: Default::default(),
    };
    // The reserve: free space this unpack must leave on the destination's filesystem.
    let reserve = match crate::store::limits::free_space(&u.root) {
        Ok((_, total)) => Some(limits.reserve_bytes(total)).filter(|r| *r > 0),
        Err(_) => None,
    };
    let reserve_fd = match reserve {
        Some(r) => u.root.try_clone().ok().map(|fd| (fd, r)),
        None => None,
    };
    let out_of_space = |fd: &OwnedFd, reserve: u64| UnpackError::DiskReserve {
        layer: layer.to_string(),
        free: crate::store::limits::free_space(fd).map_or(0, |(f, _)| f),
        reserve,
    };
    if let Some((fd, r)) = &reserve_fd
        && below_reserve(fd, *r).is_some()
    {
        return Err(out_of_space(fd, *r));
    }
    let watch = reserve_fd
        .as_ref()
        .and_then(|(fd, r)| fd.try_clone().ok().map(|fd| (fd, *r)));
    let mut archive = tar::Archive::new(Capped {
        inner: tar,
        read: 0,
        limit: limits.max_bytes,
        reserve: reserve_fd,
        next_check: CHECK_EVERY,
    });
    let mut stats = UnpackStats::default();
    let reserve_err = || match &watch {
        Some((fd, r)) => out_of_space(fd, *r),
        None => UnpackError::DiskReserve {
            layer: layer.to_string(),
            free: 0,
            reserve: 0,
        },
    };
    let read_err = |source: io::Error| match source.kind() {
        io::ErrorKind::FileTooLarge => UnpackError::TooLarge {
            layer: layer.to_string(),
            limit: limits.max_bytes,
        },
        io::ErrorKind::StorageFull if source.get_ref().is_some() => reserve_err(),
        _ => UnpackError::Sys {
            layer: layer.to_string(),
            entry: String::new(),
            what: "read the tar stream for",
            source,
        },
    };
    for e in archive.entries().map_err(read_err)? {
        let e = e.map_err(read_err)?;
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                layer: layer.to_string(),
                limit: limits.max_entries,
            });
        }
        // Many small entries fill a disk too (inodes, and blocks for metadata).
        if stats.entries % 256 == 0
            && let Some((fd, r)) = &watch
            && below_reserve(fd, *r).is_some()
        {
            return Err(reserve_err());
        }
        match u.entry(e) {
            Err(UnpackError::Sys { source, .. })
                if source.kind() == io::ErrorKind::StorageFull && source.get_ref().is_some() =>
            {
                return Err(reserve_err());
            }
            other => other?,
        }
    }
    stats.bytes = archive.into_inner().read;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;

    /// Appends a raw GNU tar entry: names are written as bytes, so hostile ones survive.
    fn raw(out: &mut Vec<u8>, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn finish(mut t: Vec<u8>) -> Vec<u8> {
        t.extend_from_slice(&[0u8; 1024]);
        t
    }

    /// A destination inside a sandbox directory; returns (sandbox, dest).
    fn dest() -> (tempfile::TempDir, std::path::PathBuf) {
        let sandbox = tempfile::tempdir().unwrap();
        let dest = sandbox.path().join("rootfs");
        std::fs::create_dir(&dest).unwrap();
        (sandbox, dest)
    }

    fn unpack_bytes(t: Vec<u8>, dest: &Path) -> Result<UnpackStats, UnpackError> {
        unpack(
            &finish(t)[..],
            dest,
            "test-layer",
            Limits::default(),
            Whiteouts::Overlay,
        )
    }

    fn refused(r: Result<UnpackStats, UnpackError>, needle: &str) {
        match r {
            Err(UnpackError::Refused { layer, entry, why }) => {
                assert_eq!(layer, "test-layer");
                assert!(
                    why.contains(needle) || entry.contains(needle),
                    "{entry}: {why}"
                );
            }
            other => panic!("expected a refusal mentioning {needle:?}, got {other:?}"),
        }
    }

    /// Everything in the sandbox, outside the destination: must stay empty.
    fn outside(sandbox: &Path) -> Vec<String> {
        std::fs::read_dir(sandbox)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "rootfs")
            .collect()
    }

    #[test]
    fn dotdot_and_absolute_paths_are_refused() {
        let (sb, d) = dest();
        let mut t = Vec::new();
        raw(&mut t, b"../escaped", tar::EntryType::Regular, b"", b"x");
        refused(unpack_bytes(t, &d), "..");
        let mut t = Vec::new();
        raw(
            &mut t,
            b"a/../../escaped",
            tar::EntryType::Regular,
            b"",
            b"x",
        );
        refused(unpack_bytes(t, &d), "..");
        let mut t = Vec::new();
        raw(&mut t, b"/abs", tar::EntryType::Regular, b"", b"x");
        refused(unpack_bytes(t, &d), "absolute");
        assert!(outside(sb.path()).is_empty());
    }

    #[test]
    fn a_symlink_to_root_cannot_redirect_later_writes() {
        let (sb, d) = dest();
        // The symlink points at the sandbox itself and at `/`; writes through either stay
        // inside the destination.
        let sandbox = sb.path().to_str().unwrap().as_bytes().to_vec();
        let mut t = Vec::new();
        raw(&mut t, b"evil", tar::EntryType::Symlink, &sandbox, b"");
        raw(
            &mut t,
            b"evil/pwned",
            tar::EntryType::Regular,
            b"",
            b"owned",
        );
        // The sandbox path does not exist inside the root: refused, not followed.
        refused(unpack_bytes(t, &d), "symlink to a missing path");
        assert!(
            outside(sb.path()).is_empty(),
            "nothing lands outside: {:?}",
            outside(sb.path())
        );
        let mut t = Vec::new();
        raw(&mut t, b"root", tar::EntryType::Symlink, b"/", b"");
        raw(
            &mut t,
            b"root/etc/pwned",
            tar::EntryType::Regular,
            b"",
            b"owned",
        );
        unpack_bytes(t, &d).unwrap();
        assert!(
            outside(sb.path()).is_empty(),
            "nothing lands outside: {:?}",
            outside(sb.path())
        );
        assert!(!Path::new("/etc/pwned").exists());
        assert_eq!(
            std::fs::read(d.join("etc/pwned")).unwrap(),
            b"owned",
            "resolved inside the root"
        );
    }

    #[test]
    fn a_symlink_planted_by_an_earlier_layer_cannot_redirect_a_later_one() {
        let (sb, d) = dest();
        let mut first = Vec::new();
        raw(
            &mut first,
            b"data",
            tar::EntryType::Symlink,
            b"../../../../../../../../tmp",
            b"",
        );
        unpack_bytes(first, &d).unwrap();
        let name = format!("data/berth-pwned-{}", std::process::id());
        let mut second = Vec::new();
        raw(
            &mut second,
            name.as_bytes(),
            tar::EntryType::Regular,
            b"",
            b"x",
        );
        // `data` resolves to the root's own tmp/, which does not exist: refused.
        refused(unpack_bytes(second, &d), "symlink to a missing path");
        assert!(
            !Path::new("/tmp").join(&name[5..]).exists(),
            "host /tmp untouched"
        );
        // Once tmp/ exists inside the root, the write lands there and nowhere else.
        std::fs::create_dir(d.join("tmp")).unwrap();
        let mut third = Vec::new();
        raw(
            &mut third,
            name.as_bytes(),
            tar::EntryType::Regular,
            b"",
            b"x",
        );
        unpack_bytes(third, &d).unwrap();
        assert!(
            !Path::new("/tmp").join(&name[5..]).exists(),
            "host /tmp untouched"
        );
        assert!(d.join("tmp").join(&name[5..]).exists());
        assert!(outside(sb.path()).is_empty());
    }

    #[test]
    fn hardlinks_must_stay_inside() {
        let (sb, d) = dest();
        let mut t = Vec::new();
        raw(&mut t, b"passwd", tar::EntryType::Link, b"/etc/passwd", b"");
        refused(unpack_bytes(t, &d), "missing");
        let mut t = Vec::new();
        raw(
            &mut t,
            b"passwd",
            tar::EntryType::Link,
            b"../../etc/passwd",
            b"",
        );
        refused(unpack_bytes(t, &d), "..");
        let mut t = Vec::new();
        raw(&mut t, b"root", tar::EntryType::Symlink, b"/", b"");
        raw(
            &mut t,
            b"passwd",
            tar::EntryType::Link,
            b"root/etc/passwd",
            b"",
        );
        refused(unpack_bytes(t, &d), "missing");
        let mut t = Vec::new();
        raw(&mut t, b"a", tar::EntryType::Regular, b"", b"same");
        raw(&mut t, b"b", tar::EntryType::Link, b"a", b"");
        unpack_bytes(t, &d).unwrap();
        assert_eq!(
            std::fs::metadata(d.join("a")).unwrap().ino(),
            std::fs::metadata(d.join("b")).unwrap().ino()
        );
        assert!(outside(sb.path()).is_empty());
    }

    #[test]
    fn devices_and_bad_whiteouts_are_refused() {
        let (_sb, d) = dest();
        let mut t = Vec::new();
        raw(&mut t, b"dev/sda", tar::EntryType::Block, b"", b"");
        refused(unpack_bytes(t, &d), "device");
        let mut t = Vec::new();
        raw(&mut t, b"dev/mem", tar::EntryType::Char, b"", b"");
        refused(unpack_bytes(t, &d), "device");
        for w in [&b".wh..."[..], b"a/.wh..", b".wh."] {
            let mut t = Vec::new();
            raw(&mut t, w, tar::EntryType::Regular, b"", b"");
            refused(unpack_bytes(t, &d), "whiteout");
        }
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let (_sb, d) = dest();
        let mut t = Vec::new();
        raw(&mut t, b"etc/", tar::EntryType::Directory, b"", b"");
        raw(&mut t, b"etc/.wh.shadow", tar::EntryType::Regular, b"", b"");
        raw(
            &mut t,
            b"var/.wh..wh..opq",
            tar::EntryType::Regular,
            b"",
            b"",
        );
        unpack_bytes(t, &d).unwrap();
        let md = std::fs::symlink_metadata(d.join("etc/shadow")).unwrap();
        assert!(
            md.file_type().is_char_device() && md.rdev() == 0,
            "a 0:0 character device"
        );
        let mut buf = [0u8; 8];
        let path = std::ffi::CString::new(d.join("var").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings and a buffer of the given size.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 1, "opaque xattr set");
        assert_eq!(buf[0], b'y');
    }

    #[test]
    fn applied_whiteouts_delete_lower_entries() {
        let (sb, d) = dest();
        let mut lower = Vec::new();
        raw(&mut lower, b"etc/", tar::EntryType::Directory, b"", b"");
        raw(
            &mut lower,
            b"etc/shadow",
            tar::EntryType::Regular,
            b"",
            b"secret",
        );
        raw(&mut lower, b"etc/keep", tar::EntryType::Regular, b"", b"k");
        raw(
            &mut lower,
            b"var/cache/a/b",
            tar::EntryType::Regular,
            b"",
            b"x",
        );
        raw(&mut lower, b"link", tar::EntryType::Symlink, b"/etc", b"");
        unpack(
            &finish(lower)[..],
            &d,
            "lower",
            Limits::default(),
            Whiteouts::Apply,
        )
        .unwrap();
        let mut upper = Vec::new();
        raw(
            &mut upper,
            b"etc/.wh.shadow",
            tar::EntryType::Regular,
            b"",
            b"",
        );
        raw(
            &mut upper,
            b"var/cache/",
            tar::EntryType::Directory,
            b"",
            b"",
        );
        raw(
            &mut upper,
            b"var/cache/new",
            tar::EntryType::Regular,
            b"",
            b"n",
        );
        raw(
            &mut upper,
            b"var/cache/.wh..wh..opq",
            tar::EntryType::Regular,
            b"",
            b"",
        );
        raw(&mut upper, b".wh.link", tar::EntryType::Regular, b"", b"");
        unpack(
            &finish(upper)[..],
            &d,
            "upper",
            Limits::default(),
            Whiteouts::Apply,
        )
        .unwrap();
        assert!(!d.join("etc/shadow").exists() && d.join("etc/keep").exists());
        assert!(
            !d.join("var/cache/a").exists(),
            "the opaque directory drops lower entries"
        );
        assert!(d.join("var/cache/new").exists(), "but keeps this layer's");
        assert!(
            std::fs::symlink_metadata(d.join("link")).is_err(),
            "the symlink itself is removed"
        );
        assert!(outside(sb.path()).is_empty());
    }

    #[test]
    fn the_root_entry_must_not_be_replaced() {
        let (sb, d) = dest();
        let mut t = Vec::new();
        raw(&mut t, b".", tar::EntryType::Symlink, b"/", b"");
        raw(&mut t, b"./etc/x", tar::EntryType::Regular, b"", b"x");
        refused(unpack_bytes(t, &d), "root entry");
        let mut t = Vec::new();
        raw(&mut t, b"./", tar::EntryType::Directory, b"", b"");
        raw(&mut t, b"./etc/x", tar::EntryType::Regular, b"", b"x");
        unpack_bytes(t, &d).unwrap();
        assert!(d.is_dir() && !d.is_symlink() && d.join("etc/x").exists());
        assert!(outside(sb.path()).is_empty());
    }

    #[test]
    fn bombs_hit_the_limits() {
        let (_sb, d) = dest();
        let mut t = Vec::new();
        for i in 0..50 {
            raw(
                &mut t,
                format!("f{i}").as_bytes(),
                tar::EntryType::Regular,
                b"",
                b"",
            );
        }
        let r = unpack(
            &finish(t)[..],
            &d,
            "bomb",
            Limits {
                max_entries: 10,
                max_bytes: 1 << 30,
                ..Limits::default()
            },
            Whiteouts::Overlay,
        );
        assert!(
            matches!(r, Err(UnpackError::TooManyEntries { .. })),
            "{r:?}"
        );
        let mut t = Vec::new();
        raw(
            &mut t,
            b"big",
            tar::EntryType::Regular,
            b"",
            &vec![0u8; 1 << 20],
        );
        let r = unpack(
            &finish(t)[..],
            &d,
            "bomb",
            Limits {
                max_entries: 10,
                max_bytes: 64 << 10,
                ..Limits::default()
            },
            Whiteouts::Overlay,
        );
        assert!(matches!(r, Err(UnpackError::TooLarge { .. })), "{r:?}");
    }

    #[test]
    fn ownership_modes_and_times_are_applied_without_following_symlinks() {
        let (_sb, d) = dest();
        let mut t = Vec::new();
        let mut h = tar::Header::new_gnu();
        h.set_path("bin/tool").unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o4755);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_000_000);
        h.set_size(2);
        h.set_cksum();
        t.extend_from_slice(h.as_bytes());
        t.extend_from_slice(b"ok");
        t.resize(1024, 0);
        raw(
            &mut t,
            b"link",
            tar::EntryType::Symlink,
            b"/etc/passwd",
            b"",
        );
        let before = std::fs::metadata("/etc/passwd").unwrap();
        unpack_bytes(t, &d).unwrap();
        let md = std::fs::metadata(d.join("bin/tool")).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
            (0o4755, 1000, 1001, 1_000_000)
        );
        let after = std::fs::metadata("/etc/passwd").unwrap();
        assert_eq!(
            (before.mode(), before.uid(), before.mtime()),
            (after.mode(), after.uid(), after.mtime()),
            "the host file is untouched"
        );
    }
}
