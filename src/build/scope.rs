//! Paths resolved inside a root directory, as if it were `/`: every symlink on the way is
//! followed *within* the root, an absolute target starts again at the root, and `..`
//! never climbs above it (Docker's FollowSymlinkInScope, the kernel's
//! `RESOLVE_IN_ROOT`). A build context is read only this way, so `ctx/etcdir -> /etc`
//! means `ctx/etc`, never the host's `/etc`: a pull request built by CI cannot copy the
//! runner's files into an image.
//!
//! Resolution ([`resolve`]) gives a symlink-free relative path for listings and messages;
//! file contents are opened with `openat2(RESOLVE_IN_ROOT)` ([`Root::open`]), so a path
//! changed between the two still cannot lead out.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// Most symlinks followed in one resolution (Linux's limit).
const MAX_LINKS: u32 = 40;

fn components(path: &str) -> impl DoubleEndedIterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".")
}

/// Resolves `rel` (relative to `root`; a leading `/` means the root) inside `root`. With
/// `follow_last`, a symlink in the last component is followed too; otherwise it is kept
/// (the path names the link). Components that do not exist are kept as written (`..`
/// after them is applied lexically). The result is relative, `/`-separated, and holds no
/// symlink before its last component.
pub fn resolve(root: &Path, rel: &str, follow_last: bool) -> io::Result<String> {
    let mut pending: VecDeque<String> = components(rel).map(str::to_string).collect();
    let mut out: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            out.pop();
            continue;
        }
        let is_last = pending.is_empty();
        let candidate = root.join(out.join("/")).join(&c);
        match std::fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() && (follow_last || !is_last) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&candidate)?;
                let target = target.to_str().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the symlink {} is not UTF-8", candidate.display()),
                    )
                })?;
                if target.starts_with('/') {
                    out.clear();
                }
                for t in components(target).rev() {
                    pending.push_front(t.to_string());
                }
            }
            Ok(_) => out.push(c),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                out.push(c)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out.join("/"))
}

/// A root directory held open, to open files beneath it.
pub struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Holds `dir` open as a root.
    pub fn new(dir: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { fd })
    }

    /// Opens the file `rel` for reading, resolving every component inside the root (the
    /// kernel's `RESOLVE_IN_ROOT`; magic links such as `/proc/self/root` refused). A
    /// symlink in the last component is followed within the root, too.
    pub fn open(&self, rel: &str) -> io::Result<File> {
        let rel = if rel.is_empty() { "." } else { rel };
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = nix::fcntl::openat2(&self.fd, rel, how)?;
        Ok(File::from(fd))
    }

    /// Reads the file `rel` (resolved as [`Root::open`] does) as text.
    pub fn read_to_string(&self, rel: &str) -> io::Result<String> {
        io::read_to_string(self.open(rel)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("real/sub")).unwrap();
        std::fs::write(r.join("real/sub/f"), "inside").unwrap();
        symlink("/etc", r.join("etcdir")).unwrap();
        symlink("/", r.join("root")).unwrap();
        symlink("../../../../..", r.join("up")).unwrap();
        symlink("real/sub", r.join("rel")).unwrap();
        symlink("/real", r.join("abs")).unwrap();
        symlink("loop2", r.join("loop1")).unwrap();
        symlink("loop1", r.join("loop2")).unwrap();

        assert_eq!(resolve(r, "etcdir/shadow", true).unwrap(), "etc/shadow");
        assert_eq!(resolve(r, "root/etc/passwd", true).unwrap(), "etc/passwd");
        assert_eq!(resolve(r, "up/etc/passwd", true).unwrap(), "etc/passwd");
        assert_eq!(resolve(r, "../../etc", true).unwrap(), "etc");
        assert_eq!(resolve(r, "rel/f", true).unwrap(), "real/sub/f");
        assert_eq!(resolve(r, "abs/sub/f", true).unwrap(), "real/sub/f");
        assert_eq!(
            resolve(r, "/rel", false).unwrap(),
            "rel",
            "the last link is kept"
        );
        assert_eq!(resolve(r, "rel", true).unwrap(), "real/sub");
        assert!(resolve(r, "loop1/x", true).is_err());

        let root = Root::new(r).unwrap();
        assert_eq!(root.read_to_string("rel/f").unwrap(), "inside");
        assert_eq!(root.read_to_string("abs/sub/f").unwrap(), "inside");
        for escape in [
            "etcdir/passwd",
            "root/etc/passwd",
            "up/etc/passwd",
            "/etc/passwd",
        ] {
            let e = root.open(escape).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{escape}");
        }
    }
}
