//! RUN steps: the command runs in a container over the image built so far (an overlay of its
//! layers' snapshots, network off unless asked for); the overlay's upper directory is then
//! written as the step's layer. Deletions there are overlay whiteouts (0:0 character
//! devices) and opaque directories (`trusted.overlay.opaque`); they become OCI whiteouts
//! (`.wh.NAME`, `.wh..wh..opq`). Times are normalised like every other layer.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::BuildError;
use super::layer::{EntryMeta, Layer, LayerCompression, LayerWriter, entry_error};
use crate::runtime::cgroup::Cgroup;
use crate::runtime::process::{self, Launch, LaunchError, Network, Process};
use crate::runtime::snapshot::LayerRef;
use crate::runtime::{caps, rootfs};
use crate::store::{Digest, Store};

/// What a RUN step runs.
pub struct RunCommand<'a> {
    /// argv (shell form already wrapped in the image's shell).
    pub argv: Vec<String>,
    /// Environment, `K=V`.
    pub env: Vec<String>,
    /// User.
    pub user: &'a str,
    /// Working directory.
    pub cwd: &'a str,
    /// Use the host's network.
    pub host_network: bool,
    /// `RUN --mount`s (caches, secrets, tmpfs).
    pub mounts: Vec<crate::runtime::process::ExtraMount>,
    /// Their absolute targets: what the runtime creates for them is not layer content.
    pub mount_targets: Vec<String>,
}

/// Directories the runtime mounts over; empty ones in the upper directory are not layer content.
const MOUNT_POINTS: [&str; 3] = ["dev", "proc", "sys"];

/// Paths berth writes into a RUN container for networking; never part of the layer.
const NETWORK_FILES: [&str; 3] = ["etc/hostname", "etc/hosts", "etc/resolv.conf"];

fn io(path: &Path) -> impl Fn(std::io::Error) -> BuildError + '_ {
    move |e| {
        entry_error(e, |source| BuildError::Context {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Runs `cmd` over `layers` and returns the layer of what it changed.
pub fn run(
    store: &Store,
    layers: &[LayerRef],
    cmd: &RunCommand<'_>,
    compression: LayerCompression,
    reuse_from: &[Digest],
    epoch: u64,
) -> Result<Layer, BuildError> {
    if !crate::runtime::mount::overlay_supported() {
        return Err(BuildError::Runtime(
            if crate::runtime::rootless::active() {
                "RUN steps need overlayfs, which this kernel does not let a user namespace mount (Linux 5.11 does): build as root"
            } else {
                "RUN steps need overlayfs, which this kernel does not offer"
            }
            .into(),
        ));
    }
    let tmp_base = store.state_dir().join("tmp");
    std::fs::create_dir_all(&tmp_base).map_err(io(&tmp_base))?;
    let tmp = tempfile::Builder::new()
        .prefix(&crate::store::Store::temp_prefix("run-"))
        .tempdir_in(&tmp_base)
        .map_err(io(&tmp_base))?;
    let lowers = crate::runtime::snapshot::snapshots_of(store, layers)
        .map_err(|e| BuildError::Runtime(e.to_string()))?;
    let (fs, overlay) = rootfs::overlay_over(lowers.clone(), tmp.path())
        .map_err(|e| BuildError::Runtime(e.to_string()))?;
    // Every RUN gets /etc/hostname and /etc/hosts (and, with the host's network, its
    // resolv.conf), and a /run directory, as Docker gives them, whether the image has
    // them or not. What the runtime creates for them and for mount targets is removed
    // from the upper directory afterwards unless the command put something there.
    let mut stubs: Vec<String> = Vec::new();
    let mut candidates: Vec<String> = vec![
        "/etc/hostname".into(),
        "/etc/hosts".into(),
        "/etc/resolv.conf".into(),
        "/run".into(),
        cmd.cwd.to_string(),
    ];
    // Mount targets as the container resolves them: through the image's symlinks.
    candidates.extend(
        cmd.mount_targets
            .iter()
            .filter_map(|t| resolve_in_lowers(&lowers, t)),
    );
    for c in &candidates {
        let mut prefix = String::new();
        for comp in c.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if comp == ".." {
                break;
            }
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            if !stubs.contains(&prefix) && !exists_in(&lowers, &prefix) {
                stubs.push(prefix.clone());
            }
        }
    }
    let upper = tmp.path().join("upper");
    if stubs.iter().any(|s| s == "run") {
        let run = upper.join("run");
        std::fs::create_dir(&run).map_err(io(&run))?;
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io(&run))?;
    }
    let mut etc_files = Vec::new();
    let hosts = if cmd.host_network {
        std::fs::read("/etc/hosts").unwrap_or_default()
    } else {
        b"127.0.0.1\tlocalhost berth-build\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_vec()
    };
    let mut files: Vec<(&str, Vec<u8>, &'static str)> = vec![
        ("hostname", b"berth-build\n".to_vec(), "/etc/hostname"),
        ("hosts", hosts, "/etc/hosts"),
    ];
    if cmd.host_network {
        files.push((
            "resolv.conf",
            std::fs::read("/etc/resolv.conf").unwrap_or_default(),
            "/etc/resolv.conf",
        ));
    }
    for (name, content, dest) in files {
        let p = tmp.path().join(name);
        std::fs::write(&p, content).map_err(io(&p))?;
        etc_files.push((p, dest));
    }
    let launch = Launch {
        overlay: Some(overlay),
        rootfs: fs.path.clone(),
        etc_files,
        hostname: "berth-build".into(),
        network: if cmd.host_network {
            Network::Host
        } else {
            Network::None
        },
        read_only: false,
        mounts: cmd.mounts.clone(),
        interface: None,
        cgroup_join: Vec::new(),
        cgroupfs: None,
        secret_files: Vec::new(),
        handover: None,
        // `wait` below, in this thread: a killed build takes its RUN step with it.
        die_with_parent: true,
        process: Process {
            args: cmd.argv.clone(),
            env: cmd.env.clone(),
            cwd: cmd.cwd.to_string(),
            user: cmd.user.to_string(),
            capabilities: caps::DOCKER_DEFAULT.to_vec(),
            stdout_to_stderr: true,
            ..Process::default()
        },
    };
    // A cgroup of its own: the device policy (and nothing else) applies to RUN steps as
    // to containers, so a build cannot open the host's disks or kernel log.
    let cgroup_id = format!(
        "build-{}",
        tmp.path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    crate::runtime::cgroup::sweep_abandoned("build-run-");
    let cgroup = Cgroup::create(&cgroup_id, &Default::default())
        .map_err(|e| BuildError::Runtime(format!("cannot create the RUN step's cgroup: {e}")))?;
    let launch = Launch {
        cgroup_join: cgroup.self_join_files(),
        cgroupfs: cgroup.fs(),
        ..launch
    };
    let started = process::start(&launch, &mut |_| Ok(())).map_err(|e| {
        let _ = cgroup.remove();
        match e {
            LaunchError::Container { message, code } => BuildError::RunFailed { code, message },
            other => BuildError::Runtime(other.to_string()),
        }
    })?;
    let waited = started.wait();
    let _ = cgroup.remove();
    let code =
        waited.map_err(|e| BuildError::Runtime(format!("waiting for the RUN container: {e}")))?;
    if code != 0 {
        return Err(BuildError::RunFailed {
            code,
            message: format!("the command exited with {code}"),
        });
    }
    // Stubs deepest first: a mount point, then the parents made for it, each only if
    // it is still empty (the command may have written beside a mount point).
    for stub in stubs.iter().rev() {
        let p = upper.join(stub);
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => {
                let _ = std::fs::remove_dir(&p);
            }
            Ok(md) if md.is_file() && md.len() == 0 => {
                let _ = std::fs::remove_file(&p);
            }
            _ => {}
        }
    }
    for name in NETWORK_FILES {
        // berth's own /etc files are never layer content (in Docker they are bind
        // mounts): without them the image's own show through again.
        let p = upper.join(name);
        if std::fs::symlink_metadata(&p).is_ok_and(|md| md.is_file()) {
            let _ = std::fs::remove_file(&p);
        }
    }
    prune_copied_up(&lowers, &upper, "");
    upper_to_layer(
        store,
        &upper,
        &NETWORK_FILES,
        compression,
        reuse_from,
        epoch,
    )
}

/// True when `rel` exists in the overlay of `lowers` (bottom first).
fn exists_in(lowers: &[PathBuf], rel: &str) -> bool {
    lower_entry(lowers, rel).is_some()
}

/// What the overlay of `lowers` (bottom first) has at `rel`: the topmost layer that has
/// it, or a whiteout of it or of a parent, decides. Components are looked at one by one,
/// never following a link (a link on the way counts as the entry).
fn lower_entry(lowers: &[PathBuf], rel: &str) -> Option<std::fs::Metadata> {
    lower_path(lowers, rel).map(|(_, md)| md)
}

/// [`lower_entry`] with the host path of the entry found.
fn lower_path(lowers: &[PathBuf], rel: &str) -> Option<(PathBuf, std::fs::Metadata)> {
    let comps: Vec<&str> = rel.split('/').collect();
    for lower in lowers.iter().rev() {
        let mut p = lower.clone();
        for (i, c) in comps.iter().enumerate() {
            p.push(c);
            match std::fs::symlink_metadata(&p) {
                Ok(md) if is_whiteout(&md) => return None,
                Ok(md) if md.file_type().is_symlink() || i + 1 == comps.len() => {
                    return Some((p, md));
                }
                Ok(md) if md.is_dir() => {
                    if is_opaque(&p) {
                        // Nothing below an opaque directory comes from lower layers.
                        let mut rest = p.clone();
                        for c in &comps[i + 1..] {
                            rest.push(c);
                        }
                        return std::fs::symlink_metadata(&rest).ok().map(|md| (rest, md));
                    }
                }
                Ok(_) => return None,
                Err(_) => break,
            }
        }
    }
    None
}

/// Resolves `path` inside the image whose layers are `lowers` (bottom first): every
/// symlink on the way, the last component's too, is followed within the image, never above
/// its root, as a lookup inside the container would. `None` after 40 links.
pub(crate) fn resolve_in_lowers(lowers: &[PathBuf], path: &str) -> Option<String> {
    let mut todo: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .rev()
        .collect();
    let mut done: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            done.pop();
            continue;
        }
        done.push(c);
        let here = done.join("/");
        let Some((host, md)) = lower_path(lowers, &here) else {
            continue;
        };
        if !md.file_type().is_symlink() {
            continue;
        }
        hops += 1;
        if hops > 40 {
            return None;
        }
        let target = std::fs::read_link(&host).ok()?;
        let target = target.to_string_lossy();
        done.pop();
        if target.starts_with('/') {
            done.clear();
        }
        todo.extend(
            target
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(str::to_string)
                .rev(),
        );
    }
    Some(done.join("/"))
}

/// Removes the directories overlayfs only copied up (to hold a mount point or a file the
/// command created and removed again): empty, not opaque, and with the lower directory's
/// mode and owner. They are no change, and BuildKit's diff leaves them out too. Returns
/// whether `dir` itself is gone.
fn prune_copied_up(lowers: &[PathBuf], upper: &Path, rel: &str) -> bool {
    let dir = if rel.is_empty() {
        upper.to_path_buf()
    } else {
        upper.join(rel)
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return false;
    };
    let mut left = 0;
    for e in entries.flatten() {
        let Ok(name) = e.file_name().into_string() else {
            left += 1;
            continue;
        };
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if !(is_dir && prune_copied_up(lowers, upper, &child)) {
            left += 1;
        }
    }
    if rel.is_empty() || left > 0 || is_opaque(&dir) {
        return false;
    }
    let (Ok(here), Some(below)) = (std::fs::symlink_metadata(&dir), lower_entry(lowers, rel))
    else {
        return false;
    };
    let same = below.is_dir()
        && (here.mode() & 0o7777) == (below.mode() & 0o7777)
        && here.uid() == below.uid()
        && here.gid() == below.gid();
    same && std::fs::remove_dir(&dir).is_ok()
}

/// True for an overlay whiteout: a character device 0:0.
fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// True for a directory overlayfs marked opaque.
fn is_opaque(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 2];
    // SAFETY: valid NUL-terminated strings and a buffer of the given size.
    let name = crate::runtime::rootless::overlay_opaque_xattr();
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n == 1 && buf[0] == b'y'
}

/// Writes an overlay upper directory as a layer, whiteouts converted.
pub fn upper_to_layer(
    store: &Store,
    upper: &Path,
    exclude: &[&str],
    compression: LayerCompression,
    reuse_from: &[Digest],
    epoch: u64,
) -> Result<Layer, BuildError> {
    let mut w = LayerWriter::new(store, compression, reuse_from)?;
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    walk(&mut w, upper, String::new(), exclude, &mut links, epoch)?;
    Ok(w.finish()?)
}

fn walk(
    w: &mut LayerWriter,
    upper: &Path,
    rel: String,
    exclude: &[&str],
    links: &mut HashMap<(u64, u64), String>,
    epoch: u64,
) -> Result<(), BuildError> {
    let dir: PathBuf = if rel.is_empty() {
        upper.to_path_buf()
    } else {
        upper.join(&rel)
    };
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let e = e.map_err(io(&dir))?;
        names.push(
            e.file_name()
                .into_string()
                .map_err(|n| BuildError::NonUtf8Path(dir.join(n)))?,
        );
    }
    names.sort();
    for name in names {
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if exclude.contains(&child.as_str()) {
            continue;
        }
        // Mount points the runtime made for /proc, /dev and /sys: what is written under them
        // goes to the mounted filesystems, so an empty one is only an artefact of running.
        if rel.is_empty()
            && MOUNT_POINTS.contains(&name.as_str())
            && std::fs::read_dir(upper.join(&name)).is_ok_and(|mut d| d.next().is_none())
        {
            continue;
        }
        let abs = upper.join(&child);
        let md = std::fs::symlink_metadata(&abs).map_err(io(&abs))?;
        let meta = EntryMeta {
            mode: md.mode() & 0o7777,
            uid: u64::from(md.uid()),
            gid: u64::from(md.gid()),
            mtime: epoch,
        };
        let werr = io(&abs);
        let ft = md.file_type();
        if is_whiteout(&md) {
            let wh = if rel.is_empty() {
                format!(".wh.{name}")
            } else {
                format!("{rel}/.wh.{name}")
            };
            w.file(
                &wh,
                &EntryMeta {
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime: epoch,
                },
                0,
                std::io::empty(),
            )
            .map_err(&werr)?;
        } else if ft.is_dir() {
            w.dir(&child, &meta).map_err(&werr)?;
            if is_opaque(&abs) {
                w.file(
                    &format!("{child}/.wh..wh..opq"),
                    &EntryMeta {
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                        mtime: epoch,
                    },
                    0,
                    std::io::empty(),
                )
                .map_err(&werr)?;
            }
            walk(w, upper, child, exclude, links, epoch)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&abs).map_err(&werr)?;
            w.symlink(&child, &target.to_string_lossy(), &meta)
                .map_err(&werr)?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    w.hardlink(&child, first, &meta).map_err(&werr)?;
                    continue;
                }
                links.insert((md.dev(), md.ino()), child.clone());
            }
            let f = File::open(&abs).map_err(&werr)?;
            w.file(&child, &meta, md.len(), std::io::BufReader::new(f))
                .map_err(&werr)?;
        } else {
            return Err(BuildError::SpecialFile(format!(
                "/{child} (made by a RUN step)"
            )));
        }
    }
    Ok(())
}
