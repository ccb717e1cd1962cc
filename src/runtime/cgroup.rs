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

/// True when the unified hierarchy has controllers (cgroup v2).
pub fn is_v2() -> bool {
    std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"))
        .is_ok_and(|c| !c.trim().is_empty())
}

/// Removes the empty cgroups `berth/{prefix}{owner}-…` whose owner process is gone (see
/// `store::owner`): what the RUN steps of a killed build leave.
pub fn sweep_abandoned(prefix: &str) {
    let parents: Vec<PathBuf> = if is_v2() {
        vec![Path::new(ROOT).join("berth")]
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

impl Cgroup {
    /// Creates the cgroup `berth/<id>` with `limits`.
    pub fn create(id: &str, limits: &Limits) -> io::Result<Cgroup> {
        if is_v2() {
            let parent = Path::new(ROOT).join("berth");
            std::fs::create_dir_all(&parent)?;
            // Let the controllers reach our level and the container's, one by one: a
            // controller that cannot be enabled (not delegated, or the level holds
            // processes) is remembered, and named if a limit then needs it.
            let mut refused: Vec<(&str, io::Error)> = Vec::new();
            for controller in ["memory", "pids", "cpu"] {
                for dir in [Path::new(ROOT), parent.as_path()] {
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
            std::fs::create_dir_all(&dir)?;
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
            std::fs::create_dir_all(&dir)?;
            dirs.push(dir);
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
        if is_v2() {
            return Cgroup::V2(Path::new(ROOT).join("berth").join(id));
        }
        Cgroup::V1(
            V1_CONTROLLERS
                .iter()
                .map(|c| Path::new(ROOT).join(c).join("berth").join(id))
                .filter(|d| d.is_dir())
                .collect(),
        )
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
        }
    }

    /// Removes the cgroup (its processes must have exited; retried briefly while the kernel
    /// finishes tearing them down).
    pub fn remove(&self) -> io::Result<()> {
        let dirs: Vec<&PathBuf> = match self {
            Cgroup::V2(d) => vec![d],
            Cgroup::V1(ds) => ds.iter().collect(),
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
