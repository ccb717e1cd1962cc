//! Container records and their state machine, kept in the store (`berth/containers/<id>/`).
//!
//! As in youki's `container/state.rs`: a status with `can_*` predicates; every verb refreshes
//! the status (a recorded process that is gone means the container stopped), checks the
//! predicate, acts, and saves. Ids are random hex looked up by unique prefix; names are
//! unique, as in Docker.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Its root filesystem exists; no process has started.
    Created,
    /// Its process runs.
    Running,
    /// It exited and its supervisor will start it again (restart policy, after a backoff).
    Restarting,
    /// Its process has exited.
    Stopped,
}

/// A container's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    /// 64 hex characters.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// The image as the user named it.
    pub image: String,
    /// The image's manifest digest.
    pub image_digest: String,
    /// The command line.
    pub command: Vec<String>,
    /// When it was created (RFC 3339).
    pub created: String,
    /// Status.
    pub status: Status,
    /// Host pid of its process, while running.
    pub pid: Option<i32>,
    /// Start time of that process (clock ticks since boot), to tell it from a reused pid.
    pub pid_start: Option<u64>,
    /// When its process started.
    pub started: Option<String>,
    /// When its process exited.
    pub finished: Option<String>,
    /// Exit code (128+n for signal n).
    pub exit_code: Option<i32>,
    /// The kernel's OOM killer ended it.
    #[serde(default)]
    pub oom_killed: bool,
    /// The supervisor process of a detached container, while it runs.
    #[serde(default)]
    pub supervisor: Option<ProcRef>,
    /// The supervisor died while the container was running or restarting (killed,
    /// crashed) and no other has taken over yet: the next berth command (or the agent's
    /// reconciler) adopts the container, or starts it again under its restart policy.
    #[serde(default)]
    pub supervisor_lost: bool,
    /// Descriptors the container's init holds for a new supervisor: `(stream, fd)`, stream
    /// 0 stdout (or the pty's master), 1 stderr. See [`super::process::Handover`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<(usize, i32)>,
    /// Its health, while it runs with a health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<super::health::HealthState>,
    /// How many times the restart policy started it again.
    #[serde(default)]
    pub restarts: u32,
    /// `stop`, `kill` or `rm -f` asked it to end: the restart policy does not apply.
    #[serde(default)]
    pub stop_requested: bool,
    /// Its address on its bridge network.
    #[serde(default)]
    pub ip: Option<std::net::IpAddr>,
}

/// A process identified beyond its pid (pids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    /// Host pid.
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start: u64,
}

impl ProcRef {
    /// The live process `pid`, if it exists.
    pub fn of(pid: i32) -> Option<ProcRef> {
        process_start_time(pid).map(|start| ProcRef { pid, start })
    }

    /// Whether it is still the same live process.
    pub fn alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start)
    }
}

impl ContainerState {
    /// A process can be started.
    pub fn can_start(&self) -> bool {
        self.status == Status::Created
    }

    /// Signals can be sent.
    pub fn can_kill(&self) -> bool {
        self.status == Status::Running
    }

    /// It can be removed without force.
    pub fn can_delete(&self) -> bool {
        matches!(self.status, Status::Created | Status::Stopped)
    }

    /// Its container process, while running.
    pub fn process(&self) -> Option<ProcRef> {
        match (self.status, self.pid, self.pid_start) {
            (Status::Running, Some(pid), Some(start)) => Some(ProcRef { pid, start }),
            _ => None,
        }
    }

    /// Whether its supervisor still runs.
    pub fn supervised(&self) -> bool {
        self.supervisor.is_some_and(|s| s.alive())
    }

    /// The first 12 characters of the id.
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Brings the record in line with the processes that really exist (after a crash of
    /// whatever waited for the container); returns whether anything changed.
    ///
    /// A running container whose process is gone has stopped — unless its supervisor lives
    /// and is about to record the exit itself. A container whose supervisor died is marked
    /// `supervisor_lost`: it keeps running, or, if it was restarting, stops (and is started
    /// again by whoever adopts it).
    pub fn refresh(&mut self) -> bool {
        let supervised = self.supervised();
        match self.status {
            Status::Created | Status::Stopped => {
                if self.supervisor.is_some() && !supervised {
                    self.supervisor = None;
                    return true;
                }
                false
            }
            Status::Restarting => {
                if supervised {
                    return false;
                }
                self.status = Status::Stopped;
                self.supervisor_lost = self.supervisor.is_some();
                self.supervisor = None;
                true
            }
            Status::Running => {
                let alive = self.process().is_some_and(|p| p.alive());
                if alive {
                    if self.supervisor.is_some() && !supervised && !self.supervisor_lost {
                        self.supervisor_lost = true;
                        return true;
                    }
                    return false;
                }
                if supervised {
                    return false;
                }
                self.status = Status::Stopped;
                self.pid = None;
                self.pid_start = None;
                self.supervisor_lost = self.supervisor.is_some();
                self.supervisor = None;
                self.finished.get_or_insert_with(now);
                true
            }
        }
    }
}

/// The start time (field 22 of `/proc/PID/stat`) of a live process.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields start after ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let state = rest.split(' ').next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    rest.split(' ').nth(19)?.parse().ok()
}

/// Now, RFC 3339.
pub fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Errors about containers.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No container matches.
    #[error("no container `{0}`")]
    NotFound(String),
    /// An id prefix matches several.
    #[error("`{reference}` matches several containers: {}", candidates.join(", "))]
    Ambiguous {
        /// The prefix.
        reference: String,
        /// Short ids of the matches.
        candidates: Vec<String>,
    },
    /// The name is taken.
    #[error("the name `{0}` is already used by container {1}")]
    NameInUse(String, String),
    /// The name is not valid.
    #[error("`{0}` is not a valid container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")]
    BadName(String),
    /// The state forbids the action.
    #[error("container {name} is {status:?}: cannot {action}")]
    Forbidden {
        /// The container.
        name: String,
        /// Its status.
        status: Status,
        /// What was asked.
        action: &'static str,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record could not be read or written.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

const ADJECTIVES: [&str; 16] = [
    "brave", "calm", "eager", "fond", "gentle", "happy", "keen", "lucid", "merry", "nimble",
    "proud", "quiet", "sharp", "swift", "tender", "witty",
];
const NAMES: [&str; 16] = [
    "babbage", "curie", "dijkstra", "euler", "franklin", "goldberg", "hopper", "knuth", "lamport",
    "liskov", "lovelace", "noether", "ritchie", "thompson", "turing", "wirth",
];

/// The file in a container's directory its init writes the exit code to.
pub const EXIT_STATUS: &str = "exit-status";

/// The containers of a store.
pub struct Containers {
    store: Store,
    dir: PathBuf,
}

impl Containers {
    /// The containers of `store`.
    pub fn new(store: &Store) -> Result<Containers, ContainerError> {
        let dir = store.state_dir().join("containers");
        std::fs::create_dir_all(&dir).map_err(|source| ContainerError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(Containers {
            store: store.clone(),
            dir,
        })
    }

    /// A container's directory (its record, root filesystem and files).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Every container, refreshed, oldest first.
    pub fn list(&self) -> Result<Vec<ContainerState>, ContainerError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|source| ContainerError::Io {
            what: "list",
            path: self.dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            if e.file_name().as_encoded_bytes().starts_with(b".") {
                // A container being created (see `create`).
                continue;
            }
            let path = e.path().join("state.json");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok(mut st) = serde_json::from_slice::<ContainerState>(&bytes) else {
                continue;
            };
            if st.clone().refresh() {
                // Re-read under the lock: the supervisor may have written meanwhile.
                let before = st.status;
                let status_file = self.dir(&st.id).join(EXIT_STATUS);
                st = self.update(&st.id, |s| {
                    let pid = s.pid;
                    s.refresh();
                    if before == Status::Running
                        && s.status == Status::Stopped
                        && let Some(pid) = pid
                    {
                        // It ended while nobody watched; its init left the code behind,
                        // and the file's time is when.
                        s.exit_code = super::process::orphan_exit_code(pid, &status_file);
                        if let Ok(t) = std::fs::metadata(&status_file).and_then(|m| m.modified())
                            && s.exit_code.is_some()
                            && let Ok(t) = jiff::Timestamp::try_from(t)
                        {
                            s.finished = Some(t.to_string());
                        }
                    }
                })?;
                if before != Status::Stopped && st.status == Status::Stopped {
                    // Nobody else will: the cgroup of a container whose supervisor died.
                    let _ = super::cgroup::Cgroup::of(&st.id).remove();
                }
            }
            out.push(st);
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Finds a container by name, full id or unique id prefix.
    pub fn get(&self, reference: &str) -> Result<ContainerState, ContainerError> {
        let all = self.list()?;
        if let Some(c) = all
            .iter()
            .find(|c| c.name == reference || c.id == reference)
        {
            return Ok(c.clone());
        }
        let hits: Vec<&ContainerState> = all
            .iter()
            .filter(|c| !reference.is_empty() && c.id.starts_with(reference))
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ContainerError::NotFound(reference.to_string())),
            many => Err(ContainerError::Ambiguous {
                reference: reference.to_string(),
                candidates: many.iter().map(|c| c.short_id().to_string()).collect(),
            }),
        }
    }

    /// Records a new container (status created). The name, if given, must be free.
    pub fn create(
        &self,
        name: Option<&str>,
        image: &str,
        image_digest: &str,
        command: Vec<String>,
    ) -> Result<ContainerState, ContainerError> {
        let _lock = self.store.lock()?;
        let existing = self.list()?;
        let id = random_id();
        let name = match name {
            Some(n) if !crate::manifest::values::valid_object_name(n) => {
                return Err(ContainerError::BadName(n.to_string()));
            }
            Some(n) => {
                if let Some(c) = existing.iter().find(|c| c.name == n) {
                    return Err(ContainerError::NameInUse(
                        n.to_string(),
                        c.short_id().to_string(),
                    ));
                }
                n.to_string()
            }
            None => {
                let bytes = hex::decode(&id[..4]).expect("hex");
                let base = format!(
                    "{}_{}",
                    ADJECTIVES[bytes[0] as usize % 16],
                    NAMES[bytes[1] as usize % 16]
                );
                let mut name = base.clone();
                let mut n = 1;
                while existing.iter().any(|c| c.name == name) {
                    n += 1;
                    name = format!("{base}{n}");
                }
                name
            }
        };
        let st = ContainerState {
            id,
            name,
            image: image.to_string(),
            image_digest: image_digest.to_string(),
            command,
            created: now(),
            status: Status::Created,
            pid: None,
            pid_start: None,
            started: None,
            finished: None,
            exit_code: None,
            oom_killed: false,
            supervisor: None,
            supervisor_lost: false,
            held: Vec::new(),
            health: None,
            restarts: 0,
            stop_requested: false,
            ip: None,
        };
        // Made whole under a temporary name, then renamed into place: a failure (a full
        // disk) or a crash never leaves a directory without a record, which no command
        // would list or remove. Abandoned ones are swept by owner (`Store::recover`).
        let staging = tempfile::Builder::new()
            .prefix(&Store::temp_prefix(".new-"))
            .tempdir_in(&self.dir)
            .map_err(|source| ContainerError::Io {
                what: "create",
                path: self.dir.clone(),
                source,
            })?;
        let bytes = serde_json::to_vec_pretty(&st).expect("state serialises");
        std::fs::write(staging.path().join("state.json"), bytes).map_err(|source| {
            ContainerError::Io {
                what: "write",
                path: staging.path().join("state.json"),
                source,
            }
        })?;
        std::fs::rename(staging.path(), self.dir(&st.id)).map_err(|source| ContainerError::Io {
            what: "create",
            path: self.dir(&st.id),
            source,
        })?;
        // Renamed away: nothing left for the guard to delete.
        let _ = staging.keep();
        Ok(st)
    }

    /// Reads, changes and writes a container's record under its lock, so a supervisor and a
    /// command never overwrite each other's changes. Returns the record as written.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut ContainerState),
    ) -> Result<ContainerState, ContainerError> {
        let _lock = self.lock(id)?;
        let path = self.dir(id).join("state.json");
        let bytes = std::fs::read(&path).map_err(|source| ContainerError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        let mut st: ContainerState =
            serde_json::from_slice(&bytes).map_err(|e| ContainerError::Io {
                what: "parse",
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        change(&mut st);
        self.save(&st)?;
        Ok(st)
    }

    /// An exclusive lock on one container's record (released when dropped).
    pub fn lock(&self, id: &str) -> Result<std::fs::File, ContainerError> {
        let path = self.dir(id).join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| ContainerError::Io {
                what: "open",
                path: path.clone(),
                source,
            })?;
        file.lock().map_err(|source| ContainerError::Io {
            what: "lock",
            path,
            source,
        })?;
        Ok(file)
    }

    /// The container's spec (what `run` asked for).
    pub fn spec(&self, id: &str) -> Result<super::spec::ContainerSpec, ContainerError> {
        let path = self.dir(id).join("config.json");
        let bytes = std::fs::read(&path).map_err(|source| ContainerError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ContainerError::Io {
            what: "parse",
            path,
            source: std::io::Error::other(e),
        })
    }

    /// Saves the container's spec.
    pub fn save_spec(
        &self,
        id: &str,
        spec: &super::spec::ContainerSpec,
    ) -> Result<(), ContainerError> {
        let bytes = serde_json::to_vec_pretty(spec).expect("spec serialises");
        Ok(self
            .store
            .replace_file(&self.dir(id).join("config.json"), &bytes)?)
    }

    /// Writes a record atomically.
    pub fn save(&self, st: &ContainerState) -> Result<(), ContainerError> {
        let path = self.dir(&st.id).join("state.json");
        let bytes = serde_json::to_vec_pretty(st).expect("state serialises");
        Ok(self.store.replace_file(&path, &bytes)?)
    }

    /// Deletes a container's record and directory (its root filesystem must be torn down).
    pub fn remove(&self, st: &ContainerState) -> Result<(), ContainerError> {
        let dir = self.dir(&st.id);
        std::fs::remove_dir_all(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|source| ContainerError::Io {
                what: "remove",
                path: dir,
                source,
            })
    }
}

/// 64 random hex characters from the kernel's generator.
pub fn random_id() -> String {
    let mut bytes = [0u8; 32];
    // getrandom(2) with no flags blocks only before the pool is initialised at boot.
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length describe the unfilled part of `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n > 0 {
            filled += n as usize;
        }
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn containers() -> (tempfile::TempDir, Containers) {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let c = Containers::new(&store).unwrap();
        (d, c)
    }

    #[test]
    fn names_are_unique_and_ids_resolve_by_prefix() {
        let (_d, c) = containers();
        let a = c
            .create(Some("web"), "base:1", "sha256:x", vec!["sh".into()])
            .unwrap();
        assert!(matches!(
            c.create(Some("web"), "base:1", "sha256:x", vec![]),
            Err(ContainerError::NameInUse(..))
        ));
        assert!(matches!(
            c.create(Some("-bad"), "base:1", "sha256:x", vec![]),
            Err(ContainerError::BadName(_))
        ));
        let b = c.create(None, "base:1", "sha256:x", vec![]).unwrap();
        assert!(b.name.contains('_'), "a generated name: {}", b.name);
        assert_eq!(a.id.len(), 64);
        assert_eq!(c.get("web").unwrap().id, a.id);
        assert_eq!(c.get(&a.id[..12]).unwrap().id, a.id);
        assert!(matches!(c.get("nope"), Err(ContainerError::NotFound(_))));
        assert_eq!(c.list().unwrap().len(), 2);
        c.remove(&a).unwrap();
        assert_eq!(c.list().unwrap().len(), 1);
    }

    #[test]
    fn a_running_container_whose_process_is_gone_is_stopped() {
        let (_d, c) = containers();
        let mut st = c
            .create(Some("gone"), "base:1", "sha256:x", vec![])
            .unwrap();
        assert!(st.can_start() && st.can_delete() && !st.can_kill());
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let mut child = child;
        child.wait().unwrap();
        st.status = Status::Running;
        st.pid = Some(pid);
        st.pid_start = Some(1);
        c.save(&st).unwrap();
        let listed = c.get("gone").unwrap();
        assert_eq!(listed.status, Status::Stopped, "refreshed on read");
        assert!(listed.can_delete());
        let me = std::process::id() as i32;
        let mut alive = listed.clone();
        alive.status = Status::Running;
        alive.pid = Some(me);
        alive.pid_start = process_start_time(me);
        assert!(!alive.refresh(), "a live process keeps it running");
        alive.pid_start = Some(alive.pid_start.unwrap() + 1);
        assert!(
            alive.refresh(),
            "a reused pid is not the container's process"
        );
    }
}
