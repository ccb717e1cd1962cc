//! `RUN --mount`: cache directories kept in the store between builds, secrets, tmpfs.
//!
//! A cache lives in `berth/cache-mounts/<sha256 of its id>` beside a lock file. Every build
//! using it holds the lock: shared for `sharing=shared`, exclusive for `locked` (so a
//! second build waits), and `private` takes the first free instance (`…-1`, `…-2`) without
//! waiting. `berth gc --cache` removes only caches whose lock it can take, never one in use.
//! Cache contents never reach a layer: the mount is not part of the overlay.
//!
//! A secret's value goes into a sealed memory file (memfd), bind-mounted read-only at its
//! target: it never touches a disk, a layer, the history or the cache key.

use crate::runtime::mount::{
    MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, fs_context, fs_mount, fsconfig,
    fsconfig_flag,
};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::BuildError;
use crate::manifest::steps::{MountKind, RunMount, Sharing};
use crate::runtime::process::{ExtraMount, SecretBytes};
use crate::store::{Digest, Store};

/// Where a bind mount's files come from, as the engine resolved them.
pub enum BindSource {
    /// The context's files (ignore rules applied), copied to this path for the step: a
    /// `rw` mount's writes land in the copy and are discarded.
    Context(PathBuf),
    /// A stage's or image's layers (snapshot directories, bottom first) and the path in
    /// it to mount (`""` for its root), stacked in a detached overlay whose writes go to a
    /// scratch upper directory.
    Image {
        /// The unpacked layers.
        lowers: Vec<PathBuf>,
        /// The path inside, checked to pass through no symlink.
        path: String,
        /// Scratch directory for the overlay's upper and work directories.
        scratch: PathBuf,
    },
}

/// What a RUN step's mounts need while it runs.
#[derive(Default)]
pub struct Prepared {
    /// Mounts for the container.
    pub mounts: Vec<ExtraMount>,
    /// `NAME=value` of secrets given as variables.
    pub env: Vec<String>,
    /// Absolute targets, to clean the stubs the runtime creates for them.
    pub targets: Vec<String>,
    /// Cache locks held until the step ends.
    _locks: Vec<Flock<File>>,
    /// Secret files and detached overlays, alive until the step ends.
    _secrets: Vec<OwnedFd>,
}

/// The directory holding cache mounts.
pub fn cache_root(store: &Store) -> PathBuf {
    store.state_dir().join("cache-mounts")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Context {
        path: path.to_path_buf(),
        source,
    }
}

/// Absolute form of a mount target (relative ones are under the working directory).
pub fn absolute(target: &str, cwd: &str) -> String {
    if target.starts_with('/') {
        target.to_string()
    } else {
        format!("{}/{target}", cwd.trim_end_matches('/'))
    }
}

/// Prepares `mounts` for a RUN step in `cwd`, with the build's `secrets`.
pub fn prepare(
    store: &Store,
    mounts: &[RunMount],
    cwd: &str,
    secrets: &BTreeMap<String, SecretBytes>,
    binds: Vec<BindSource>,
) -> Result<Prepared, BuildError> {
    let mut p = Prepared::default();
    let mut binds = binds.into_iter();
    // A cache mounted twice in one step (two targets, one id) is one directory, locked once.
    let mut caches: BTreeMap<String, PathBuf> = BTreeMap::new();
    for m in mounts {
        let target = m.target.as_deref().map(|t| absolute(t, cwd));
        match m.kind {
            MountKind::Tmpfs => p.mounts.push(ExtraMount {
                source: None,
                target: target.clone().unwrap_or_default(),
                read_only: false,
                seed: false,
                tmpfs_size: m.size,
            }),
            MountKind::Cache => {
                let id = m.id.as_deref().unwrap_or_default();
                let dir = match caches.get(id) {
                    Some(dir) => dir.clone(),
                    None => {
                        let (dir, lock) = cache_dir(store, id, m)?;
                        p._locks.push(lock);
                        caches.insert(id.to_string(), dir.clone());
                        dir
                    }
                };
                p.mounts.push(ExtraMount {
                    source: Some(dir),
                    target: target.clone().unwrap_or_default(),
                    read_only: !m.read_write,
                    seed: false,
                    tmpfs_size: None,
                });
            }
            MountKind::Secret => {
                let id = m.id.as_deref().unwrap_or_default();
                let Some(value) = secrets.get(id) else {
                    if m.required {
                        return Err(BuildError::Mount(format!(
                            "the secret `{id}` is required and was not given (--secret id={id},src=FILE or env=VAR)"
                        )));
                    }
                    continue;
                };
                if let Some(var) = &m.env {
                    let text = String::from_utf8(value.0.clone()).map_err(|_| {
                        BuildError::Mount(format!(
                            "the secret `{id}` is not UTF-8 text, so it cannot be the variable {var}"
                        ))
                    })?;
                    p.env.push(format!("{var}={text}"));
                }
                if let Some(t) = &target {
                    let fd = memory_file(id, value, m)?;
                    p.mounts.push(ExtraMount {
                        source: Some(PathBuf::from(format!(
                            "/proc/self/fd/{}/secret",
                            fd.as_raw_fd()
                        ))),
                        target: t.clone(),
                        read_only: true,
                        seed: false,
                        tmpfs_size: None,
                    });
                    p._secrets.push(fd);
                }
            }
            MountKind::Bind => {
                let source = match binds.next() {
                    Some(BindSource::Context(path)) => path,
                    Some(BindSource::Image {
                        lowers,
                        path,
                        scratch,
                    }) => {
                        // `source=` as the stage sees it: its symlinks followed inside it.
                        let path = super::run::resolve_in_lowers(&lowers, &path).ok_or_else(|| {
                            BuildError::Mount(format!(
                                "the bind mount source `{path}` has too many levels of symbolic links"
                            ))
                        })?;
                        let fd = detached_overlay(&lowers, &scratch)?;
                        check_no_links(&fd, &path)?;
                        let source =
                            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(&path);
                        p._secrets.push(fd);
                        source
                    }
                    None => {
                        return Err(BuildError::Mount(
                            "a bind mount's source was not resolved".into(),
                        ));
                    }
                };
                p.mounts.push(ExtraMount {
                    source: Some(source),
                    target: target.clone().unwrap_or_default(),
                    read_only: !m.read_write,
                    seed: false,
                    tmpfs_size: None,
                });
            }
        }
        if let Some(t) = target {
            p.targets.push(t);
        }
    }
    Ok(p)
}

/// A secret's value as the file `secret` on a fresh tmpfs that is mounted nowhere (fsopen,
/// fsmount): it never touches a disk, and only the RUN container attaches it (through
/// `/proc/self/fd/N/secret`). The file has the mount's mode (default 0400) and owner.
fn memory_file(id: &str, value: &SecretBytes, m: &RunMount) -> Result<OwnedFd, BuildError> {
    let fail = |what: &str, e: std::io::Error| {
        BuildError::Mount(format!("the secret `{id}`: cannot {what}: {e}"))
    };
    let fs = fs_context(c"tmpfs").map_err(|e| fail("open a tmpfs", e))?;
    for (k, v) in [(c"size", c"4m"), (c"mode", c"0755")] {
        fsconfig(&fs, k, Some(v)).map_err(|e| fail("configure a tmpfs", e))?;
    }
    let mnt = fs_mount(
        &fs,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
    )
    .map_err(|e| fail("mount a tmpfs", e))?;
    let fd = nix::fcntl::openat(
        &mnt,
        "secret",
        nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| fail("write the secret file", e.into()))?;
    let mut file = File::from(fd);
    file.write_all(&value.0)
        .map_err(|e| fail("write the secret file", e))?;
    file.set_permissions(std::fs::Permissions::from_mode(m.mode.unwrap_or(0o400)))
        .map_err(|e| fail("set the secret file's mode", e))?;
    nix::unistd::fchown(
        &file,
        Some(nix::unistd::Uid::from_raw(m.uid.unwrap_or(0))),
        Some(nix::unistd::Gid::from_raw(m.gid.unwrap_or(0))),
    )
    .map_err(|e| fail("set the secret file's owner", e.into()))?;
    Ok(mnt)
}

/// An overlay of `lowers` (bottom first) with an upper and work directory in `scratch`,
/// mounted nowhere (fsopen/fsmount): the RUN container attaches it through
/// `/proc/self/fd/N`.
fn detached_overlay(lowers: &[PathBuf], scratch: &Path) -> Result<OwnedFd, BuildError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let fail = |what: &str, e: std::io::Error| {
        BuildError::Mount(format!("a bind mount from an image: cannot {what}: {e}"))
    };
    let (upper, work) = (scratch.join("upper"), scratch.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| fail("make its scratch directories", e))?;
    }
    let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL");
    let fs = fs_context(c"overlay").map_err(|e| fail("open an overlay", e))?;
    let empty = scratch.join("empty");
    let mut stack: Vec<&Path> = lowers.iter().rev().map(PathBuf::as_path).collect();
    if stack.is_empty() {
        std::fs::create_dir_all(&empty).map_err(|e| fail("make its scratch directories", e))?;
        stack.push(&empty);
    }
    // One lower directory at a time (`lowerdir+`, Linux 6.8) keeps long stacks within
    // fsconfig's limits; older kernels get the joined list.
    let appended = stack
        .iter()
        .try_for_each(|l| fsconfig(&fs, c"lowerdir+", Some(&cstr(l))));
    if appended.is_err() {
        let joined: Vec<String> = stack.iter().map(|l| l.display().to_string()).collect();
        fsconfig(
            &fs,
            c"lowerdir",
            Some(&CString::new(joined.join(":")).expect("paths have no NUL")),
        )
        .map_err(|e| fail("stack its layers", e))?;
    }
    fsconfig(&fs, c"upperdir", Some(&cstr(&upper)))
        .map_err(|e| fail("set its upper directory", e))?;
    fsconfig(&fs, c"workdir", Some(&cstr(&work))).map_err(|e| fail("set its work directory", e))?;
    if crate::runtime::rootless::active() {
        fsconfig_flag(&fs, c"userxattr").map_err(|e| fail("use user attributes", e))?;
    }
    fs_mount(&fs, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV).map_err(|e| fail("mount it", e))
}

/// Refuses a path inside a mounted image that passes through a symlink: resolved through
/// `/proc/self/fd/N/…`, an absolute link would lead to the host's files.
fn check_no_links(root: &OwnedFd, path: &str) -> Result<(), BuildError> {
    let mut prefix = String::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if c == ".." {
            return Err(BuildError::Mount(format!(
                "the bind mount source `{path}` climbs out of its image"
            )));
        }
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(c);
        let st = nix::sys::stat::fstatat(
            root,
            prefix.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| BuildError::Mount(format!("the bind mount source `/{prefix}`: {e}")))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(BuildError::Mount(format!(
                "the bind mount source `{path}` passes through the symlink /{prefix}; name the path it points to"
            )));
        }
    }
    Ok(())
}

/// Copies a context selection to `dir` (files, directories, links as they are): what a
/// bind mount from the context shows. Returns the path to mount: `dir` itself for a
/// directory source, the copied file for a file source.
pub fn materialize(
    ctx: &super::context::Context,
    selected: &[(
        super::context::ContextEntry,
        Vec<super::context::ContextEntry>,
    )],
    dir: &Path,
) -> Result<PathBuf, BuildError> {
    use super::context::EntryKind;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut mount = dir.to_path_buf();
    for (root, children) in selected {
        let base = root.rel.clone();
        for e in std::iter::once(root).chain(children) {
            let rel = if e.rel == base {
                String::new()
            } else {
                e.rel
                    .strip_prefix(&format!("{base}/"))
                    .or_else(|| base.is_empty().then_some(e.rel.as_str()))
                    .unwrap_or(&e.rel)
                    .to_string()
            };
            let out = if rel.is_empty() {
                if e.kind == EntryKind::Dir {
                    dir.to_path_buf()
                } else {
                    dir.join(&e.name)
                }
            } else {
                dir.join(&rel)
            };
            if rel.is_empty() && e.kind != EntryKind::Dir {
                mount = out.clone();
            }
            match &e.kind {
                EntryKind::Dir => std::fs::create_dir_all(&out).map_err(io(&out))?,
                EntryKind::Symlink(t) => std::os::unix::fs::symlink(t, &out).map_err(io(&out))?,
                EntryKind::File => {
                    let mut from = ctx.open_file(&e.rel)?;
                    let mut to = File::create(&out).map_err(io(&out))?;
                    std::io::copy(&mut from, &mut to).map_err(io(&out))?;
                }
            }
            // Never through a link: it would change what the link points to.
            if !matches!(e.kind, EntryKind::Symlink(_)) {
                std::fs::set_permissions(&out, std::fs::Permissions::from_mode(e.mode))
                    .map_err(io(&out))?;
            }
        }
    }
    Ok(mount)
}

/// The cache directory for `id`, created with the mount's mode and owner on first use, and
/// its lock taken as the mount's sharing asks.
fn cache_dir(store: &Store, id: &str, m: &RunMount) -> Result<(PathBuf, Flock<File>), BuildError> {
    let root = cache_root(store);
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let base = Digest::of(id.as_bytes()).hex().to_string();
    for instance in 0.. {
        let name = if instance == 0 {
            base.clone()
        } else {
            format!("{base}-{instance}")
        };
        let lock_path = root.join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let arg = match m.sharing {
            Sharing::Shared => FlockArg::LockShared,
            Sharing::Locked => FlockArg::LockExclusive,
            Sharing::Private => FlockArg::LockExclusiveNonblock,
        };
        let lock = match Flock::lock(file, arg) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if m.sharing == Sharing::Private => continue,
            Err((_, e)) => return Err(io(&lock_path)(e.into())),
        };
        let dir = root.join(&name);
        if !dir.exists() {
            // Made under a temporary name, then renamed: a crash leaves no half-made cache.
            let tmp = root.join(format!(".new-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir(&tmp).map_err(io(&tmp))?;
            std::fs::set_permissions(
                &tmp,
                std::fs::Permissions::from_mode(m.mode.unwrap_or(0o755)),
            )
            .map_err(io(&tmp))?;
            nix::unistd::chown(
                &tmp,
                Some(nix::unistd::Uid::from_raw(m.uid.unwrap_or(0))),
                Some(nix::unistd::Gid::from_raw(m.gid.unwrap_or(0))),
            )
            .map_err(|e| io(&tmp)(e.into()))?;
            std::fs::write(root.join(format!("{name}.id")), id).map_err(io(&root))?;
            // Never over a directory another build made meanwhile (a plain rename would
            // replace it while that build has it mounted).
            match nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &tmp,
                nix::fcntl::AT_FDCWD,
                &dir,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => {}
                Err(nix::errno::Errno::EEXIST) | Err(nix::errno::Errno::ENOTEMPTY) => {
                    let _ = std::fs::remove_dir(&tmp);
                }
                Err(e) => return Err(io(&dir)(e.into())),
            }
        }
        return Ok((dir, lock));
    }
    unreachable!("an unbounded loop returns")
}

/// One cache `gc --cache` looked at.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheReport {
    /// The cache's id.
    pub id: String,
    /// Bytes it held.
    pub size: u64,
    /// Removed (else in use by a build).
    pub removed: bool,
}

/// Removes every cache mount no build is using (`berth gc --cache`).
pub fn clear(store: &Store, dry_run: bool) -> std::io::Result<Vec<CacheReport>> {
    let root = cache_root(store);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".lock"))
        .map(|n| n.trim_end_matches(".lock").to_string())
        .collect();
    names.sort();
    for name in names {
        let dir = root.join(&name);
        if !dir.exists() {
            // Only its lock file is left (kept: a build may hold it); nothing to report.
            continue;
        }
        let id = std::fs::read_to_string(root.join(format!("{name}.id"))).unwrap_or(name.clone());
        let size = dir_size(&dir);
        let lock = OpenOptions::new()
            .write(true)
            .open(root.join(format!("{name}.lock")))?;
        let removed = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(_held) => {
                if !dry_run {
                    // Renamed away first: a build never finds a half-deleted cache.
                    let doomed = root.join(format!(".gc-{name}"));
                    if dir.exists() {
                        std::fs::rename(&dir, &doomed)?;
                        std::fs::remove_dir_all(&doomed)?;
                    }
                    let _ = std::fs::remove_file(root.join(format!("{name}.id")));
                }
                true
            }
            Err(_) => false,
        };
        out.push(CacheReport { id, size, removed });
    }
    Ok(out)
}

/// Bytes under `dir` (not following links).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(md) if md.is_dir() => dir_size(&e.path()),
            Ok(md) => md.len(),
            Err(_) => 0,
        })
        .sum()
}
