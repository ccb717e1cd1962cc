//! cgroups v1 and v2: memory limit (with OOM detection), CPU quota, pids limit, and the
//! device policy ([`super::devices`]: v1's devices controller, v2's device program). The layout is
//! detected: a unified hierarchy with controllers (v2, what servers mostly run) or the
//! per-controller v1 hierarchies (including the hybrid layout, whose unified part has no
//! controllers). Each container gets `berth/<id>`; it is removed with the container.

use std::io;
use std::path::{Path, PathBuf};

/// Resource limits of one container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes (swap is not allowed beyond it).
    pub memory: Option<u64>,
    /// CPU quota in thousandths of a CPU.
    pub cpu_millis: Option<u32>,
    /// Most processes and threads.
    pub pids: Option<u32>,
}

/// A container's cgroup.
#[derive(Debug, Clone)]
pub enum Cgroup {
    /// One directory in the unified hierarchy.
    V2(PathBuf),
    /// One directory per v1 controller.
    V1(Vec<PathBuf>),
    /// None: rootless without a delegated cgroup. No limits apply. Device access needs no
    /// cgroup there: a user namespace cannot make device nodes, and the container gets
    /// only the host's harmless ones bind-mounted.
    Absent,
}

/// Where berth's cgroups go: `berth` at the top of the hierarchy as root; without root,
/// `berth` in the cgroup v2 subtree systemd delegates to the user (`user@UID.service`),
/// when berth itself runs inside it (a process can be moved only within a subtree its
/// user may write). `Err` says what is missing.
fn parent() -> Result<PathBuf, String> {
    if !super::rootless::active() {
        return Ok(Path::new(ROOT).join("berth"));
    }
    if !is_v2() {
        return Err(
            "cgroup v1 cannot be delegated to a user: limits need root or a cgroup v2 host".into(),
        );
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_string();
    delegated(&own, |p| {
        nix::unistd::access(
            &Path::new(ROOT).join(p).join("cgroup.procs"),
            nix::unistd::AccessFlags::W_OK,
        )
        .is_ok()
    })
    .map(|d| Path::new(ROOT).join(d).join("berth"))
}

/// The delegated subtree berth's own cgroup `own` is in: its `user@UID.service`
/// ancestor, when `writable` says the user may write it.
fn delegated(own: &str, writable: impl Fn(&str) -> bool) -> Result<String, String> {
    let parts: Vec<&str> = own.trim_start_matches('/').split('/').collect();
    let Some(at) = parts
        .iter()
        .position(|p| p.starts_with("user@") && p.ends_with(".service"))
    else {
        return Err(format!(
            "berth runs in cgroup {own}, outside a delegated subtree: start it with `systemd-run --user --scope berth …` (systemd's user manager delegates memory, cpu and pids to user@UID.service)"
        ));
    };
    let subtree = parts[..=at].join("/");
    if !writable(&subtree) {
        return Err(format!(
            "the user may not write the cgroup {subtree} (no Delegate=yes)"
        ));
    }
    Ok(subtree)
}

const ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers a container's cgroup spans.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "devices"];
const CPU_PERIOD: u64 = 100_000;

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

/// `create_dir_all` with the path in its error, and what to change where the cause is the
/// host's setup.
fn mkdir(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path).map_err(|e| {
        let help = match e.raw_os_error() {
            Some(libc::EROFS) => {
                "; help: the cgroup filesystem is mounted read-only here (a container or a sandbox?): berth needs it writable to limit and confine its containers"
            }
            Some(libc::EACCES | libc::EPERM) => {
                "; help: berth needs root, or a cgroup delegated to its user (systemd's Delegate=yes on v2)"
            }
            _ => "",
        };
        io::Error::new(e.kind(), format!("create {}: {e}{help}", path.display()))
    })
}

/// True when the unified hierarchy has controllers (cgroup v2).
pub fn is_v2() -> bool {
    std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"))
        .is_ok_and(|c| !c.trim().is_empty())
}

/// Removes the empty cgroups `berth/{prefix}{owner}-…` whose owner process is gone (see
/// `store::owner`): what the RUN steps of a killed build leave.
pub fn sweep_abandoned(prefix: &str) {
    let Ok(parent) = parent() else { return };
    let parents: Vec<PathBuf> = if is_v2() {
        vec![parent]
    } else {
        V1_CONTROLLERS
            .iter()
            .map(|c| Path::new(ROOT).join(c).join("berth"))
            .collect()
    };
    for parent in parents {
        for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if crate::store::owner::owner_of(name, prefix)
                .is_some_and(|o| !crate::store::owner::alive(o))
            {
                // Fails harmlessly while a process is still inside.
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// What a container sees at `/sys/fs/cgroup`: its own cgroup, read-only, through its cgroup
/// namespace, as Docker and podman mount it. Runtimes read their limits there (the JVM,
/// Go's GOMAXPROCS and memory limit, .NET, Node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupFs {
    /// The unified hierarchy, mounted as cgroup2.
    V2,
    /// The v1 hierarchies the container has a cgroup in, on a tmpfs.
    V1(Vec<V1Hierarchy>),
}

/// One v1 hierarchy as the host mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// Its directory under `/sys/fs/cgroup` (`memory`, `cpu,cpuacct`).
    pub dir: String,
    /// The mount options naming its controllers (`cpu,cpuacct`).
    pub options: String,
    /// Links to `dir` named after each of several co-mounted controllers (`cpu`,
    /// `cpuacct`), as the host has them.
    pub links: Vec<String>,
}

/// Co-mounted cpu,cpuacct and memory, as a v1 host has them: for tests.
#[cfg(test)]
pub(crate) fn sample_v1() -> Vec<V1Hierarchy> {
    vec![
        V1Hierarchy {
            dir: "cpu,cpuacct".into(),
            options: "cpu,cpuacct".into(),
            links: vec!["cpu".into(), "cpuacct".into()],
        },
        V1Hierarchy {
            dir: "memory".into(),
            options: "memory".into(),
            links: vec![],
        },
    ]
}

/// The v1 hierarchies mounted under `/sys/fs/cgroup` in `mountinfo` (as
/// `/proc/self/mountinfo` lists them) that hold one of `controllers`.
pub fn v1_hierarchies(mountinfo: &str, controllers: &[&str]) -> Vec<V1Hierarchy> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split(' ');
        let (Some("cgroup"), Some(_source), Some(opts)) =
            (right.next(), right.next(), right.next())
        else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let Some(dir) = point.strip_prefix("/sys/fs/cgroup/") else {
            continue;
        };
        if dir.contains('/') {
            continue;
        }
        let named: Vec<&str> = opts
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro" | "xattr" | "noprefix" | "clone_children"))
            .filter(|o| !o.starts_with("release_agent=") && !o.starts_with("name="))
            .collect();
        if named.is_empty() || !named.iter().any(|c| controllers.contains(c)) {
            continue;
        }
        let links = if named.len() > 1 {
            named
                .iter()
                .filter(|c| **c != dir)
                .map(|c| c.to_string())
                .collect()
        } else {
            Vec::new()
        };
        out.push(V1Hierarchy {
            dir: dir.to_string(),
            options: named.join(","),
            links,
        });
    }
    out
}

impl Cgroup {
    /// Creates the cgroup `berth/<id>` with `limits`.
    pub fn create(id: &str, limits: &Limits) -> io::Result<Cgroup> {
        // The first thing a container (or a RUN step) needs that only root has: say so
        // plainly rather than fail on a cgroup directory's permissions.
        if !nix::unistd::geteuid().is_root() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "berth runs containers, and the RUN steps of builds, as root or in a user namespace of its own, and it could not make one (see the warning above); without either, `build` (without RUN steps), `import`, `export`, `push`, `pull`, `copy` and `diff` work",
            ));
        }
        let parent = match parent() {
            Ok(p) => p,
            Err(why) => {
                if *limits != Limits::default() {
                    crate::say!(
                        "berth: warning: running without root, the container's limits (--memory, --cpus, --pids-limit) are not applied: {why}"
                    );
                }
                return Ok(Cgroup::Absent);
            }
        };
        if is_v2() {
            let top = parent.parent().unwrap_or(Path::new(ROOT)).to_path_buf();
            mkdir(&parent)?;
            // Let the controllers reach our level and the container's, one by one: a
            // controller that cannot be enabled (not delegated, or the level holds
            // processes) is remembered, and named if a limit then needs it.
            let mut refused: Vec<(&str, io::Error)> = Vec::new();
            for controller in ["memory", "pids", "cpu"] {
                for dir in [top.as_path(), parent.as_path()] {
                    if let Err(e) = write(
                        &dir.join("cgroup.subtree_control"),
                        &format!("+{controller}"),
                    ) {
                        refused.push((controller, e));
                        break;
                    }
                }
            }
            let dir = parent.join(id);
            mkdir(&dir)?;
            let why = |controller: &str, e: io::Error| -> io::Error {
                match refused.iter().find(|(c, _)| *c == controller) {
                    Some((_, cause)) => io::Error::new(
                        e.kind(),
                        format!(
                            "{e}: the {controller} controller could not be enabled ({cause}); on cgroup v2 the parent must delegate it, and a cgroup that holds processes cannot enable controllers for its children (move them to a leaf cgroup)"
                        ),
                    ),
                    None => e,
                }
            };
            if let Some(m) = limits.memory {
                write(&dir.join("memory.max"), &m.to_string()).map_err(|e| why("memory", e))?;
                let _ = write(&dir.join("memory.swap.max"), "0");
            }
            if let Some(c) = limits.cpu_millis {
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD}", u64::from(c) * CPU_PERIOD / 1000),
                )
                .map_err(|e| why("cpu", e))?;
            }
            if let Some(p) = limits.pids {
                write(&dir.join("pids.max"), &p.to_string()).map_err(|e| why("pids", e))?;
            }
            let cg = Cgroup::V2(dir.clone());
            // Rootless, a device program cannot be loaded (that needs CAP_BPF on the host)
            // nor is one needed: the user namespace makes no device nodes and the
            // container gets only the host's harmless ones, bound.
            if super::rootless::active() {
                return Ok(cg);
            }
            if let Err(e) = super::devices::attach_v2(&dir, super::devices::DEFAULT_ALLOW) {
                let _ = cg.remove();
                return Err(e);
            }
            return Ok(cg);
        }
        let mut dirs = Vec::new();
        for controller in V1_CONTROLLERS {
            let base = Path::new(ROOT).join(controller);
            if !base.is_dir() {
                continue;
            }
            let dir = base.join("berth").join(id);
            mkdir(&dir)?;
            dirs.push(dir);
        }
        if dirs.is_empty() {
            // Neither a v2 hierarchy with controllers nor any v1 controller: nothing, or
            // something else, is mounted there.
            let seen: Vec<String> = std::fs::read_dir(ROOT)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no cgroup hierarchy is mounted at {ROOT} (it holds {}); help: `ip netns exec` remounts /sys without the cgroup filesystems: start berth with `nsenter --net=/run/netns/NAME` instead, or mount cgroup2 at {ROOT}",
                    if seen.is_empty() {
                        "nothing".to_string()
                    } else {
                        seen.join(", ")
                    }
                ),
            ));
        }
        let cg = Cgroup::V1(dirs);
        let file = |controller: &str, name: &str| {
            Path::new(ROOT)
                .join(controller)
                .join("berth")
                .join(id)
                .join(name)
        };
        if let Some(m) = limits.memory {
            write(&file("memory", "memory.limit_in_bytes"), &m.to_string())?;
            let memsw = file("memory", "memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &m.to_string())?;
            }
        }
        if let Some(c) = limits.cpu_millis {
            write(&file("cpu", "cpu.cfs_period_us"), &CPU_PERIOD.to_string())?;
            write(
                &file("cpu", "cpu.cfs_quota_us"),
                &(u64::from(c) * CPU_PERIOD / 1000).to_string(),
            )?;
        }
        if let Some(p) = limits.pids {
            write(&file("pids", "pids.max"), &p.to_string())?;
        }
        let devices = Path::new(ROOT).join("devices").join("berth").join(id);
        if !devices.is_dir() {
            // Without the devices controller a container could open any device node it
            // makes: refuse to run rather than run unconfined.
            let _ = cg.remove();
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cgroup v1 without the devices controller: berth cannot confine device access",
            ));
        }
        if let Err(e) = super::devices::apply_v1(&devices, super::devices::DEFAULT_ALLOW) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// The cgroup `berth/<id>` as [`Cgroup::create`] made it, without touching anything: to
    /// join it (`exec`) or remove it after its supervisor is gone.
    pub fn of(id: &str) -> Cgroup {
        let Ok(parent) = parent() else {
            return Cgroup::Absent;
        };
        if is_v2() {
            return Cgroup::V2(parent.join(id));
        }
        Cgroup::V1(
            V1_CONTROLLERS
                .iter()
                .map(|c| Path::new(ROOT).join(c).join("berth").join(id))
                .filter(|d| d.is_dir())
                .collect(),
        )
    }

    /// What the container mounts at `/sys/fs/cgroup` (see [`CgroupFs`]).
    pub fn fs(&self) -> Option<CgroupFs> {
        match self {
            Cgroup::V2(_) => Some(CgroupFs::V2),
            Cgroup::V1(_) => Some(CgroupFs::V1(v1_hierarchies(
                &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
                &V1_CONTROLLERS,
            ))),
            Cgroup::Absent => None,
        }
    }

    /// The files a process writes `0` into to move itself into the cgroup: v1's `tasks`
    /// (one thread: the caller must be single-threaded) and v2's `cgroup.procs`.
    ///
    /// A process moving itself as a single thread skips the kernel's threadgroup lock,
    /// whose write side waits for an RCU grace period: writing another process's pid to
    /// `cgroup.procs` cost 12-18 ms here, writing `0` to `tasks` 0.3 ms. (v2 has no
    /// single-thread move for domain cgroups; `CLONE_INTO_CGROUP` is its fast path.)
    pub fn self_join_files(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V2(dir) => vec![dir.join("cgroup.procs")],
            Cgroup::V1(dirs) => dirs.iter().map(|d| d.join("tasks")).collect(),
            Cgroup::Absent => Vec::new(),
        }
    }

    /// Moves the calling (single-threaded) process into the cgroup.
    pub fn join_self(&self) -> io::Result<()> {
        self.self_join_files()
            .iter()
            .try_for_each(|f| write(f, "0"))
    }

    /// Moves a process into the cgroup.
    pub fn add(&self, pid: i32) -> io::Result<()> {
        match self {
            Cgroup::V2(dir) => write(&dir.join("cgroup.procs"), &pid.to_string()),
            Cgroup::V1(dirs) => dirs
                .iter()
                .try_for_each(|d| write(&d.join("cgroup.procs"), &pid.to_string())),
            Cgroup::Absent => Ok(()),
        }
    }

    /// True when the kernel's OOM killer killed a process of the cgroup.
    pub fn oom_killed(&self) -> bool {
        let count = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        match self {
            Cgroup::V2(dir) => std::fs::read_to_string(dir.join("memory.events"))
                .is_ok_and(|t| count(&t, "oom_kill ") > 0),
            Cgroup::V1(dirs) => dirs.iter().any(|d| {
                std::fs::read_to_string(d.join("memory.oom_control"))
                    .is_ok_and(|t| count(&t, "oom_kill ") > 0)
            }),
            Cgroup::Absent => false,
        }
    }

    /// Removes the cgroup (its processes must have exited; retried briefly while the kernel
    /// finishes tearing them down).
    pub fn remove(&self) -> io::Result<()> {
        let dirs: Vec<&PathBuf> = match self {
            Cgroup::V2(d) => vec![d],
            Cgroup::V1(ds) => ds.iter().collect(),
            Cgroup::Absent => Vec::new(),
        };
        for d in dirs {
            let mut last = Ok(());
            for _ in 0..50 {
                last = match std::fs::remove_dir(d) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                };
                if last.is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            last?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delegated_subtree_is_the_user_service() {
        let own = "/user.slice/user-1000.slice/user@1000.service/app.slice/berth.scope";
        assert_eq!(
            delegated(own, |_| true).unwrap(),
            "user.slice/user-1000.slice/user@1000.service"
        );
        let e = delegated(own, |_| false).unwrap_err();
        assert!(e.contains("Delegate=yes"), "{e}");
        let e = delegated("/user.slice/user-1000.slice/session-3.scope", |_| true).unwrap_err();
        assert!(e.contains("systemd-run --user --scope"), "{e}");
    }

    #[test]
    fn v1_hierarchies_are_read_from_mountinfo() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(v1_hierarchies(info, &V1_CONTROLLERS), sample_v1());
    }
}
