//! The deploy engine on this machine (`hosts = ["local"]`): one deploy at a time per
//! deployment (a lock naming its holder), new replicas beside the old ones on the app's
//! bridge network (services reach each other by name), health checks, the switch by each
//! service's router, drain, and the old replicas stopped — kept for rollback up to
//! `keep` releases, removed beyond. State is `berth/deploy/<app>-<env>/releases.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::health;
use super::router::{Backend, Router};
use super::{
    DeployError, Outcome, ReleasePlan, ReleaseRecord, SecretValues, ServicePlan, state_dir,
};
use crate::runtime::container::{ContainerState, Containers, Status, now};
use crate::runtime::network::Networks;
use crate::runtime::spec::{ContainerSpec, NetworkMode, PortSpec};
use crate::runtime::{bundle, caps, exec, instance, logs, supervisor};
use crate::store::Store;

/// The recorded releases of a deployment, oldest first.
pub fn releases(store: &Store, deployment: &str) -> Vec<ReleaseRecord> {
    std::fs::read(state_dir(store, deployment).join("releases.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_releases(
    store: &Store,
    deployment: &str,
    list: &[ReleaseRecord],
) -> Result<(), DeployError> {
    let path = state_dir(store, deployment).join("releases.json");
    let bytes = serde_json::to_vec_pretty(list).expect("records serialise");
    store
        .write_atomic(&path, &bytes)
        .map_err(|e| DeployError::local("record the release")(e.to_string()))
}

/// The live release, if any.
pub fn current(store: &Store, deployment: &str) -> Option<ReleaseRecord> {
    releases(store, deployment)
        .into_iter()
        .rev()
        .find(|r| r.outcome == Outcome::Live)
}

/// The deployment's lock: held for the whole deploy, naming its holder.
struct Lock {
    file: std::fs::File,
}

impl Lock {
    /// Says the holder is only retiring release `number`, for at most `within`: deploys
    /// and rollbacks wait for that instead of being refused.
    fn retiring(&mut self, number: u32, within: Duration) {
        let until = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::try_from(within).unwrap_or_default())
            .unwrap_or_else(|_| jiff::Timestamp::now());
        let _ = self.file.set_len(0);
        let _ = std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(0));
        let _ = write!(self.file, "retiring release {number} until {until}");
    }
}

/// When the lock's holder only retires an old release: the time it will be done by.
fn retiring_until(holder: &str) -> Option<jiff::Timestamp> {
    holder
        .strip_prefix("retiring release ")?
        .split_once(" until ")?
        .1
        .trim()
        .parse()
        .ok()
}

fn lock(store: &Store, deployment: &str) -> Result<Lock, DeployError> {
    let dir = state_dir(store, deployment);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DeployError::local("create the state dir")(e.to_string()))?;
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| DeployError::local("open the deploy lock")(e.to_string()))?;
    // Brief holders (the agent's reconciler) are waited for, and so is the retiring of
    // an old release after its successor went live; a deploy is not.
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock)
                if retiring_until(&std::fs::read_to_string(&path).unwrap_or_default())
                    .is_some_and(|t| jiff::Timestamp::now() < t) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(DeployError::Locked {
                    deployment: deployment.to_string(),
                    holder: holder.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(DeployError::local("take the deploy lock")(e.to_string()));
            }
        }
    }
    // The kernel drops the lock when the holder dies: a stale lock cannot outlive it.
    let _ = file.set_len(0);
    let _ = write!(
        file,
        "{} (pid {}) since {}",
        actor(),
        std::process::id(),
        now()
    );
    Ok(Lock { file })
}

/// The deployment's lock if it is free right now (the reconciler never waits).
fn try_lock_now(store: &Store, deployment: &str) -> Option<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir(store, deployment).join("lock"))
        .ok()?;
    file.try_lock().ok()?;
    Some(file)
}

/// `user@host`.
pub fn actor() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "root".into());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// Each service of a release: replicas running, and replicas it should have.
pub fn replica_health(store: &Store, record: &ReleaseRecord) -> BTreeMap<String, ReplicaCount> {
    let mut counts: BTreeMap<String, ReplicaCount> = BTreeMap::new();
    for r in replicas(store, record) {
        let c = counts.entry(r.service.clone()).or_insert(ReplicaCount {
            running: 0,
            healthy: 0,
            total: 0,
        });
        c.total += 1;
        if r.status == "running" {
            c.running += 1;
            // Healthy: its last probe passed, or it has none. A replica still `starting`
            // is not counted yet.
            if matches!(
                r.health,
                None | Some(crate::runtime::health::Health::Healthy)
            ) {
                c.healthy += 1;
            }
        }
    }
    counts
}

/// Each replica of a release as it stands on this host, in the release's order.
pub fn replicas(store: &Store, record: &ReleaseRecord) -> Vec<ReplicaView> {
    let Ok(containers) = Containers::new(store) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (service, ids) in &record.replicas {
        for (i, id) in ids.iter().enumerate() {
            let view = match containers.get(id) {
                Ok(c) => ReplicaView {
                    service: service.clone(),
                    replica: i + 1,
                    name: c.name.clone(),
                    id: c.id.clone(),
                    status: format!("{:?}", c.status).to_lowercase(),
                    health: c.health.as_ref().map(|h| h.status),
                    health_error: c
                        .health
                        .as_ref()
                        .filter(|h| h.status != crate::runtime::health::Health::Healthy)
                        .and_then(|h| h.last_error.clone()),
                    restarts: c.restarts,
                    last_exit: c.exit_code,
                    oom_killed: c.oom_killed,
                    started: c.started.clone(),
                },
                Err(_) => ReplicaView {
                    service: service.clone(),
                    replica: i + 1,
                    name: String::new(),
                    id: id.clone(),
                    status: "missing".into(),
                    health: None,
                    health_error: None,
                    restarts: 0,
                    last_exit: None,
                    oom_killed: false,
                    started: None,
                },
            };
            out.push(view);
        }
    }
    out
}

/// Replicas of a service: how many run, how many of those are not unhealthy, of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaCount {
    /// Running.
    pub running: usize,
    /// Running and not unhealthy (healthy, starting, or without a check).
    #[serde(default)]
    pub healthy: usize,
    /// Wanted.
    pub total: usize,
}

/// One replica on a host, for `status` and `ps --env`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaView {
    /// Its service.
    pub service: String,
    /// Its number within the service on this host (1-based).
    pub replica: usize,
    /// Its container's name.
    pub name: String,
    /// Its container's id.
    pub id: String,
    /// `running`, `restarting`, `stopped`, `created`, or `missing`.
    pub status: String,
    /// What its health check says (`null` without one, or while it is not running): the
    /// key is always there, as the README's `--json` shapes promise.
    #[serde(default)]
    pub health: Option<crate::runtime::health::Health>,
    /// What the last failing probe said, while not healthy (else `null`).
    #[serde(default)]
    pub health_error: Option<String>,
    /// Times its restart policy started it again.
    pub restarts: u32,
    /// Its last exit code.
    #[serde(default)]
    pub last_exit: Option<i32>,
    /// The OOM killer ended it last.
    #[serde(default)]
    pub oom_killed: bool,
    /// When it started (RFC 3339).
    #[serde(default)]
    pub started: Option<String>,
}

/// A replica's container spec: the image's config under the service's settings.
fn replica_spec(
    image: &crate::store::image::StoredImage,
    svc: &ServicePlan,
    network: &str,
    hostname: &str,
    secrets_file: Option<&Path>,
) -> ContainerSpec {
    let cfg = image.config.oci.config().clone().unwrap_or_default();
    let mut args = svc
        .entrypoint
        .clone()
        .unwrap_or_else(|| cfg.entrypoint().clone().unwrap_or_default());
    match &svc.command {
        Some(c) => args.extend(c.iter().cloned()),
        None if svc.entrypoint.is_none() => args.extend(cfg.cmd().clone().unwrap_or_default()),
        None => {}
    }
    let mut env = cfg.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, bundle::DEFAULT_PATH.to_string());
    }
    for kv in &svc.env {
        let k = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k));
        env.push(kv.clone());
    }
    let stop_signal = svc
        .stop_signal
        .or_else(|| {
            cfg.stop_signal()
                .as_ref()
                .and_then(|s| s.parse::<crate::manifest::values::Signal>().ok())
                .map(|s| s.0)
        })
        .unwrap_or(libc::SIGTERM);
    ContainerSpec {
        args,
        env,
        cwd: cfg
            .working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: cfg.user().clone().unwrap_or_default(),
        hostname: hostname.to_string(),
        network: NetworkMode::Bridge {
            network: network.to_string(),
            aliases: vec![svc.name.clone()],
        },
        ports: Vec::new(),
        mounts: svc.mounts.clone(),
        capabilities: caps::DOCKER_DEFAULT.to_vec(),
        read_only: false,
        resources: svc.resources,
        restart: svc.restart,
        stop_signal,
        tty: false,
        interactive: false,
        auto_remove: false,
        secrets: svc.secrets.clone(),
        secrets_file: (!svc.secrets.is_empty())
            .then(|| secrets_file.map(Path::to_path_buf))
            .flatten(),
        // Kept running after cutover by the replica's supervisor.
        health: svc.health.clone().or_else(|| image.config.health_check()),
    }
}

/// Stops (and with `remove`, removes) containers by id; missing ones are skipped.
fn stop_all(store: &Store, containers: &Containers, ids: &[(String, i32, Duration)], remove: bool) {
    std::thread::scope(|s| {
        for (id, signal, grace) in ids {
            s.spawn(move || {
                let Ok(st) = containers.get(id) else { return };
                let st = if matches!(st.status, Status::Running | Status::Restarting) {
                    instance::stop_container(containers, id, *signal, *grace).unwrap_or(st)
                } else {
                    st
                };
                if remove {
                    let _ = instance::remove_container(store, containers, &st);
                }
            });
        }
    });
}

/// The last lines a container wrote.
fn last_lines(containers: &Containers, id: &str) -> String {
    let filter = logs::Filter {
        tail: Some(10),
        since: None,
    };
    logs::read(&containers.dir(id), &filter)
        .map(|(recs, _)| recs.iter().map(|r| r.log.as_str()).collect::<String>())
        .unwrap_or_default()
}

/// A replica as its router's backend: its id and address.
fn backend(containers: &Containers, id: &str) -> Option<Backend> {
    let ip = containers.get(id).ok()?.ip?;
    Some(Backend {
        id: Some(id.to_string()),
        ip,
    })
}

/// Runs `argv` in a running container; its exit code.
fn exec_in(containers: &Containers, st: &ContainerState, argv: &[String]) -> Result<i32, String> {
    let spec = containers.spec(&st.id).map_err(|e| e.to_string())?;
    let pid = st.pid.ok_or("not running")?;
    let process = crate::runtime::process::Process {
        args: argv.to_vec(),
        env: instance::process_env(&spec).map_err(|e| e.to_string())?,
        cwd: spec.cwd,
        user: spec.user,
        capabilities: spec.capabilities,
        ..Default::default()
    };
    let started = exec::exec(pid, &crate::runtime::cgroup::Cgroup::of(&st.id), &process)
        .map_err(|e| e.to_string())?;
    started.wait().map_err(|e| e.to_string())
}

/// Where release `number`'s secrets are kept: `deploy/<deployment>/secrets/<n>.json`, the
/// one 0600 file (in a 0700 directory) that holds secret values on a host.
pub fn secrets_path(store: &Store, deployment: &str, number: u32) -> std::path::PathBuf {
    state_dir(store, deployment)
        .join("secrets")
        .join(format!("{number}.json"))
}

/// The secrets file of release `number`: written from `values` (only the names the plan
/// uses; each must be there), or, without values, the one already kept for it. `None`
/// when the plan uses no secrets; the flag says whether it was written now.
fn secrets_for(
    store: &Store,
    deployment: &str,
    number: u32,
    plan: &ReleasePlan,
    values: Option<&SecretValues>,
) -> Result<(Option<std::path::PathBuf>, bool), DeployError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let names = plan.secret_names();
    if names.is_empty() {
        return Ok((None, false));
    }
    let path = secrets_path(store, deployment, number);
    let Some(values) = values else {
        return if path.is_file() {
            Ok((Some(path), false))
        } else {
            Err(DeployError::local("find the release's secrets")(format!(
                "release {number} of {deployment} has no secrets on this host"
            )))
        };
    };
    let mut kept = BTreeMap::new();
    for n in &names {
        let v = values.0.get(n).ok_or_else(|| {
            DeployError::local("write the release's secrets")(format!("no value for secret `{n}`"))
        })?;
        kept.insert(n.clone(), v.clone());
    }
    let dir = path.parent().expect("a file in a directory");
    let err = |e: std::io::Error| DeployError::local("write the release's secrets")(e.to_string());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    let tmp = dir.join(format!(".{number}.json.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    serde_json::to_writer(&mut f, &kept).map_err(|e| err(std::io::Error::other(e)))?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok((Some(path), true))
}

/// Applies `plan` on this machine. `say` hears each step. Returns the live release.
pub fn apply(
    store: &Store,
    program: &Path,
    store_dir: &Path,
    plan: &ReleasePlan,
    secrets: Option<&SecretValues>,
    say: &mut dyn FnMut(String),
) -> Result<(ReleaseRecord, Retire), DeployError> {
    let deployment = plan.deployment();
    let lock = lock(store, &deployment)?;
    let containers =
        Containers::new(store).map_err(|e| DeployError::local("open containers")(e.to_string()))?;
    let image = store
        .image(&plan.digest)
        .map_err(|e| DeployError::local("load the image")(e.to_string()))?;
    let networks =
        Networks::new(store).map_err(|e| DeployError::local("networks")(e.to_string()))?;
    if networks.get(&deployment).is_err() {
        networks.create(&deployment, None).map_err(|e| {
            DeployError::local(format!("create network {deployment}"))(e.to_string())
        })?;
        // Made here, so `down` removes it (a network made by hand is left alone).
        let _ = std::fs::write(state_dir(store, &deployment).join("network-created"), "");
    }
    let mut list = releases(store, &deployment);
    // The ledger's number; a plan without one (from an older client) gets the next.
    let number = match plan.release {
        0 => list.iter().map(|r| r.number).max().unwrap_or(0) + 1,
        n => n,
    };
    let previous = list
        .iter()
        .rev()
        .find(|r| r.outcome == Outcome::Live)
        .cloned();
    if let Some(live) = &previous
        && live.number == number
        && live.digest == plan.digest
    {
        // Applied already (a retried request): nothing to do.
        return Ok((live.clone(), Retire::nothing(lock)));
    }
    // The secrets' values in one 0600 file the replicas read at each start: given with
    // the release, or (putting an earlier release back) the one it was given.
    let (secrets_file, wrote_secrets) = secrets_for(store, &deployment, number, plan, secrets)?;
    let mut record = ReleaseRecord {
        number,
        digest: plan.digest.clone(),
        revision: plan.revision.clone(),
        time: now(),
        actor: actor(),
        outcome: Outcome::Failed,
        error: None,
        replicas: BTreeMap::new(),
        plan: plan.clone(),
    };

    // New replicas beside the old ones.
    let mut started: Vec<(String, ContainerState)> = Vec::new();
    let fail = |record: &mut ReleaseRecord,
                list: &mut Vec<ReleaseRecord>,
                started: &[(String, ContainerState)],
                e: DeployError| {
        let ids: Vec<(String, i32, Duration)> = started
            .iter()
            .map(|(_, st)| (st.id.clone(), libc::SIGKILL, Duration::ZERO))
            .collect();
        stop_all(store, &containers, &ids, true);
        record.error = Some(e.to_string());
        if wrote_secrets && let Some(f) = &secrets_file {
            let _ = std::fs::remove_file(f);
        }
        // A release that failed here keeps an earlier record of the same number (one
        // being put back) as it was.
        if !list.iter().any(|r| r.number == record.number) {
            list.push(record.clone());
            let _ = save_releases(store, &deployment, list);
        }
        e
    };
    for svc in &plan.services {
        for i in 0..svc.replicas {
            let name = format!("{deployment}-{}-{number}-{i}", svc.name);
            if let Ok(old) = containers.get(&name) {
                // Left by a deploy that crashed before recording.
                stop_all(
                    store,
                    &containers,
                    &[(old.id, libc::SIGKILL, Duration::ZERO)],
                    true,
                );
            }
            let st = containers
                .create(
                    Some(&name),
                    &format!("{}@{}", plan.app, plan.digest),
                    plan.digest.as_str(),
                    Vec::new(),
                )
                .map_err(|e| DeployError::Start {
                    service: svc.name.clone(),
                    message: e.to_string(),
                });
            let st = match st {
                Ok(st) => st,
                Err(e) => return Err(fail(&mut record, &mut list, &started, e)),
            };
            let spec = replica_spec(
                &image,
                svc,
                &deployment,
                &format!("{}-{i}", svc.name),
                secrets_file.as_deref(),
            );
            let _ = containers.update(&st.id, |s| s.command = spec.args.clone());
            if let Err(e) = containers.save_spec(&st.id, &spec) {
                let e = DeployError::Start {
                    service: svc.name.clone(),
                    message: e.to_string(),
                };
                return Err(fail(&mut record, &mut list, &started, e));
            }
            record
                .replicas
                .entry(svc.name.clone())
                .or_default()
                .push(st.id.clone());
            started.push((svc.name.clone(), st.clone()));
            say(format!("starting {name}"));
            if let Err((_, message)) =
                supervisor::spawn(program, store_dir, &containers.dir(&st.id), &st.id)
            {
                let e = DeployError::Start {
                    service: svc.name.clone(),
                    message,
                };
                return Err(fail(&mut record, &mut list, &started, e));
            }
        }
    }

    // Health checks, all replicas at once.
    let deadline = Instant::now() + plan.rollout.timeout;
    let verdicts: Vec<Result<(), DeployError>> = std::thread::scope(|s| {
        let handles: Vec<_> = started
            .iter()
            .map(|(service, st)| {
                let containers = &containers;
                s.spawn(move || {
                    let svc = plan
                        .services
                        .iter()
                        .find(|p| &p.name == service)
                        .expect("planned");
                    let Some(check) = &svc.health else {
                        return Ok(());
                    };
                    let id = st.id.clone();
                    let current = || containers.get(&id).ok();
                    let ip = current().and_then(|c| c.ip);
                    let alive = || current().is_some_and(|c| c.status == Status::Running);
                    let exec = |argv: &[String]| match current() {
                        Some(c) => exec_in(containers, &c, argv),
                        None => Err("gone".into()),
                    };
                    health::wait_healthy(check, ip, deadline, &alive, &exec).map_err(|reason| {
                        DeployError::Unhealthy {
                            service: service.clone(),
                            reason,
                            logs: last_lines(containers, &id),
                        }
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a health thread"))
            .collect()
    });
    if let Some(Err(e)) = verdicts.into_iter().find(|v| v.is_err()) {
        return Err(fail(&mut record, &mut list, &started, e));
    }
    say("all replicas healthy".into());

    // The switch: each router to its service's new replicas, in one step.
    let routers_dir = state_dir(store, &deployment).join("routers");
    for svc in &plan.services {
        let router = Router::new(routers_dir.join(&svc.name));
        if svc.ports.is_empty() {
            let _ = router.remove();
            continue;
        }
        let ips: Vec<Backend> = started
            .iter()
            .filter(|(s, _)| s == &svc.name)
            .filter_map(|(_, st)| backend(&containers, &st.id))
            .collect();
        let switched = router
            .ensure(program, store_dir, &svc.ports)
            .and_then(|()| router.switch(&ips));
        if let Err(e) = switched {
            let e =
                DeployError::local(format!("switch the traffic of {}", svc.name))(e.to_string());
            // Routers already switched go back to the previous replicas.
            if let Some(prev) = &previous {
                for (name, ids) in &prev.replicas {
                    let back: Vec<Backend> = ids
                        .iter()
                        .filter_map(|id| backend(&containers, id))
                        .collect();
                    let _ = Router::new(routers_dir.join(name)).switch(&back);
                }
            }
            return Err(fail(&mut record, &mut list, &started, e));
        }
        say(format!(
            "{}: traffic on {} now goes to release {number}",
            svc.name,
            svc.ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    record.outcome = Outcome::Live;
    for r in list.iter_mut() {
        if r.outcome == Outcome::Live {
            r.outcome = Outcome::Retired;
        }
    }
    // A release applied again (put back after a later one failed) replaces its record.
    list.retain(|r| r.number != number);
    list.push(record.clone());
    save_releases(store, &deployment, &list)?;

    Ok((
        record,
        Retire {
            lock,
            previous,
            list,
            drain: plan.rollout.drain,
            keep: plan.rollout.keep,
            remove_previous: false,
        },
    ))
}

/// What is left of a release once its traffic is switched: draining and stopping the
/// release before it, and removing releases beyond `keep`. It holds the deployment's lock
/// until done, so it can run after the caller has heard that the release is live (an
/// agent answers first, so the next host's rollout does not wait for this one's drain).
pub struct Retire {
    lock: Lock,
    previous: Option<ReleaseRecord>,
    list: Vec<ReleaseRecord>,
    drain: Duration,
    keep: u32,
    /// Remove the previous release's replicas rather than keep them (it is being undone).
    remove_previous: bool,
}

impl Retire {
    /// Nothing to retire (the release was live already).
    fn nothing(lock: Lock) -> Retire {
        Retire {
            lock,
            previous: None,
            list: Vec::new(),
            drain: Duration::ZERO,
            keep: u32::MAX,
            remove_previous: false,
        }
    }

    /// Drains and stops the previous release; removes releases beyond `keep`.
    pub fn run(mut self, store: &Store, say: &mut dyn FnMut(String)) {
        let Ok(containers) = Containers::new(store) else {
            return;
        };
        if let Some(prev) = &self.previous {
            let grace = prev
                .plan
                .services
                .iter()
                .map(|s| s.stop_timeout)
                .max()
                .unwrap_or_default();
            self.lock
                .retiring(prev.number, self.drain + grace + Duration::from_secs(2));
            std::thread::sleep(self.drain);
            let remove = self.keep == 0 || self.remove_previous;
            stop_all(store, &containers, &graceful_stops(prev), remove);
            say(format!("stopped release {}", prev.number));
        }
        let retired: Vec<&ReleaseRecord> = self
            .list
            .iter()
            .filter(|r| r.outcome == Outcome::Retired)
            .collect();
        let excess = retired.len().saturating_sub(self.keep as usize);
        let ids: Vec<(String, i32, Duration)> = retired[..excess]
            .iter()
            .flat_map(|r| r.replicas.values().flatten())
            .map(|id| (id.clone(), libc::SIGKILL, Duration::ZERO))
            .collect();
        stop_all(store, &containers, &ids, true);
        // Releases no longer kept need no secrets; one being undone neither.
        for r in &retired[..excess] {
            let _ = std::fs::remove_file(secrets_path(store, &r.plan.deployment(), r.number));
        }
        if self.remove_previous
            && let Some(prev) = &self.previous
        {
            let _ = std::fs::remove_file(secrets_path(store, &prev.plan.deployment(), prev.number));
        }
        // Images and unpacked layers no kept release or container needs.
        drop(self.lock);
        if let Some(r) = prune(store)
            && r.blobs + r.snapshots > 0
        {
            say(format!(
                "pruned {} blob(s) and {} unpacked layer(s), {} bytes",
                r.blobs,
                r.snapshots,
                r.bytes + r.snapshot_bytes
            ));
        }
    }
}

/// What the store must keep besides its tags: every container's image, and the images of
/// each deployment's live release and of the releases kept for rollback (`keep`).
pub fn roots(store: &Store) -> Vec<crate::store::Root> {
    let mut roots = Vec::new();
    if let Ok(containers) = Containers::new(store) {
        for c in containers.list().unwrap_or_default() {
            if let Ok(digest) = c.image_digest.parse() {
                roots.push(crate::store::Root {
                    digest,
                    why: format!("container {} ({:?})", c.name, c.status).to_lowercase(),
                });
            }
        }
    }
    let deployments = std::fs::read_dir(store.state_dir().join("deploy"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string));
    for deployment in deployments {
        let list = releases(store, &deployment);
        let keep = list
            .iter()
            .rev()
            .find(|r| r.outcome == Outcome::Live)
            .map_or(1, |r| r.plan.rollout.keep as usize);
        let live = list.iter().filter(|r| r.outcome == Outcome::Live);
        let kept = list
            .iter()
            .rev()
            .filter(|r| r.outcome == Outcome::Retired)
            .take(keep);
        for r in live {
            roots.push(crate::store::Root {
                digest: r.digest.clone(),
                why: format!("release {} of {deployment} (live)", r.number),
            });
        }
        for r in kept {
            roots.push(crate::store::Root {
                digest: r.digest.clone(),
                why: format!("release {} of {deployment} (kept for rollback)", r.number),
            });
        }
    }
    roots
}

/// Removes what no root needs (old images, unused unpacked layers), unless a build or pull
/// is writing: what a host does after each release so it does not fill up over time.
pub fn prune(store: &Store) -> Option<crate::store::GcReport> {
    store.try_gc(&roots(store)).ok().flatten()
}

/// What this machine runs of a deployment.
pub fn status(store: &Store, deployment: &str) -> super::api::HostState {
    let Some(live) = current(store, deployment) else {
        return super::api::HostState::default();
    };
    // A service whose router is not running publishes nothing, whatever its replicas do.
    let mut problems = Vec::new();
    for svc in live.plan.services.iter().filter(|s| !s.ports.is_empty()) {
        let router = Router::new(state_dir(store, deployment).join("routers").join(&svc.name));
        if router.process().is_none() {
            problems.push(format!(
                "{}: the router of {} is not running",
                svc.name,
                svc.ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    super::api::HostState {
        release: Some(live.number),
        digest: Some(live.digest.clone()),
        revision: live.revision.clone(),
        since: Some(live.time.clone()),
        services: replica_health(store, &live),
        replicas: replicas(store, &live),
        problems,
    }
}

/// Undoes release `number` on this machine after it failed elsewhere (or was
/// interrupted): the release that served before it serves again, its replicas started
/// anew and the traffic switched back; with none before it (a first release), everything
/// of the deployment stops. The undone release is recorded as failed with `why`. Returns
/// what the machine runs afterwards.
pub fn revert(
    store: &Store,
    program: &Path,
    store_dir: &Path,
    deployment: &str,
    number: u32,
    why: &str,
    say: &mut dyn FnMut(String),
) -> Result<super::api::HostState, DeployError> {
    let list = releases(store, deployment);
    let Some(pos) = list.iter().position(|r| r.number == number) else {
        return Ok(status(store, deployment));
    };
    if list[pos].outcome != Outcome::Live {
        return Ok(status(store, deployment));
    }
    let before = list[..pos]
        .iter()
        .rev()
        .find(|r| r.outcome == Outcome::Retired)
        .cloned();
    match before {
        Some(prev) => {
            let mut plan = prev.plan.clone();
            plan.release = prev.number;
            let (_, mut retire) = apply(store, program, store_dir, &plan, None, say)?;
            retire.remove_previous = true;
            retire.run(store, say);
        }
        None => {
            down(store, deployment)?;
        }
    }
    let _lock = lock(store, deployment)?;
    let mut list = releases(store, deployment);
    if let Some(r) = list.iter_mut().find(|r| r.number == number) {
        r.outcome = Outcome::Failed;
        r.error = Some(why.to_string());
    }
    save_releases(store, deployment, &list)?;
    let _ = std::fs::remove_file(secrets_path(store, deployment, number));
    Ok(status(store, deployment))
}

/// What would stop `plan` on this machine, every problem at once: another deploy holding
/// the deployment's lock, a published port another program holds, an image the store
/// lacks (when `need_image`).
pub fn preflight(store: &Store, plan: &ReleasePlan, need_image: bool) -> Vec<String> {
    let deployment = plan.deployment();
    let mut problems = Vec::new();
    if let Ok(holder) = std::fs::read_to_string(state_dir(store, &deployment).join("lock"))
        && try_lock_now(store, &deployment).is_none()
        && retiring_until(&holder).is_none()
    {
        problems.push(format!(
            "another deploy of {deployment} is running: {}",
            holder.trim()
        ));
    }
    let routers = state_dir(store, &deployment).join("routers");
    for svc in &plan.services {
        // Ports this deployment's own router holds are handed over, not taken.
        let router = Router::new(routers.join(&svc.name));
        let owned: Vec<PortSpec> = match router.process() {
            Some(_) => router.ports(),
            None => Vec::new(),
        };
        let all_owned: Vec<PortSpec> = std::fs::read_dir(&routers)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| Router::new(e.path()))
            .filter(|r| r.process().is_some())
            .flat_map(|r| r.ports())
            .collect();
        for port in &svc.ports {
            if owned.contains(port) || all_owned.contains(port) {
                continue;
            }
            if let Err(e) = port_free(port) {
                problems.push(format!(
                    "{}: port {} is not free on this host: {e}",
                    svc.name,
                    port.listen_addr()
                ));
            }
        }
    }
    if need_image && !store.has_blob(&plan.digest) {
        problems.push(format!("the image {} is not in the store", plan.digest));
    }
    problems
}

/// Whether a published port can be bound right now.
fn port_free(port: &PortSpec) -> std::io::Result<()> {
    let addr = std::net::SocketAddr::new(port.host_ip, port.host_port);
    match port.proto {
        crate::runtime::spec::Proto::Tcp => std::net::TcpListener::bind(addr).map(drop),
        crate::runtime::spec::Proto::Udp => std::net::UdpSocket::bind(addr).map(drop),
    }
}

/// Stops and removes every replica and router of a deployment.
pub fn down(store: &Store, deployment: &str) -> Result<usize, DeployError> {
    let _lock = lock(store, deployment)?;
    let containers =
        Containers::new(store).map_err(|e| DeployError::local("open containers")(e.to_string()))?;
    let prefix = format!("{deployment}-");
    let mine: Vec<(String, i32, Duration)> = containers
        .list()
        .map_err(|e| DeployError::local("list containers")(e.to_string()))?
        .into_iter()
        .filter(|c| c.name.starts_with(&prefix))
        .map(|c| (c.id, libc::SIGTERM, Duration::from_secs(10)))
        .collect();
    let n = mine.len();
    stop_all(store, &containers, &mine, true);
    let routers = state_dir(store, deployment).join("routers");
    if let Ok(entries) = std::fs::read_dir(&routers) {
        for e in entries.flatten() {
            let _ = Router::new(e.path()).remove();
        }
    }
    let _ = std::fs::remove_dir_all(state_dir(store, deployment).join("secrets"));
    let marker = state_dir(store, deployment).join("network-created");
    if marker.exists()
        && let Ok(networks) = Networks::new(store)
        && networks.remove(deployment, None).is_ok()
    {
        let _ = std::fs::remove_file(marker);
    }
    let mut list = releases(store, deployment);
    for r in list.iter_mut() {
        if r.outcome == Outcome::Live {
            r.outcome = Outcome::Retired;
        }
    }
    save_releases(store, deployment, &list)?;
    Ok(n)
}

/// Brings every deployment's live release back after a reboot or a crash: replicas that
/// are not running (and were not stopped on purpose) start again under new supervisors,
/// and each service's router serves them. Running replicas are left as they are (adopted).
/// Deployments a deploy is working on are skipped. Returns how many replicas were started.
pub fn recover(store: &Store, program: &Path, store_dir: &Path) -> usize {
    let Ok(containers) = Containers::new(store) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(store.state_dir().join("deploy")) else {
        return 0;
    };
    let mut started = 0;
    for e in entries.flatten() {
        let Some(deployment) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        // A deploy in progress owns its deployment.
        let Some(_lock) = try_lock_now(store, &deployment) else {
            continue;
        };
        remove_unrecorded(store, &containers, &deployment);
        stop_retired(store, &containers, &deployment);
        let Some(live) = current(store, &deployment) else {
            continue;
        };
        for (service, ids) in &live.replicas {
            let mut ips = Vec::new();
            for id in ids {
                let Ok(st) = containers.get(id) else { continue };
                if st.status == Status::Stopped
                    && !st.stop_requested
                    && supervisor::spawn(program, store_dir, &containers.dir(id), id).is_ok()
                {
                    started += 1;
                }
                if let Some(b) = backend(&containers, id) {
                    ips.push(b);
                }
            }
            let Some(svc) = live.plan.services.iter().find(|s| &s.name == service) else {
                continue;
            };
            if !svc.ports.is_empty() {
                let router =
                    Router::new(state_dir(store, &deployment).join("routers").join(service));
                if router.ensure(program, store_dir, &svc.ports).is_ok() {
                    let _ = router.switch(&ips);
                }
            }
        }
    }
    started
}

/// Each replica of a release with its service's stop signal and grace time.
fn graceful_stops(r: &ReleaseRecord) -> Vec<(String, i32, Duration)> {
    r.plan
        .services
        .iter()
        .flat_map(|svc| {
            let signal = svc.stop_signal.unwrap_or(libc::SIGTERM);
            r.replicas
                .get(&svc.name)
                .into_iter()
                .flatten()
                .map(move |id| (id.clone(), signal, svc.stop_timeout))
        })
        .collect()
}

/// Stops replicas of retired releases that still run: a deploy (or agent) that died
/// between the switch and the end of the old release's drain leaves them.
fn stop_retired(store: &Store, containers: &Containers, deployment: &str) {
    let ids: Vec<(String, i32, Duration)> = releases(store, deployment)
        .iter()
        .filter(|r| r.outcome == Outcome::Retired)
        .flat_map(graceful_stops)
        .filter(|(id, _, _)| {
            containers
                .get(id)
                .is_ok_and(|c| matches!(c.status, Status::Running | Status::Restarting))
        })
        .collect();
    if !ids.is_empty() {
        stop_all(store, containers, &ids, false);
    }
}

/// Removes the replicas of a release that was being applied when its deploy died (the
/// process killed, the host rebooted): `<deployment>-<service>-<n>-<i>` with `n` above
/// every recorded release. The next deploy would reuse their names and remove them too;
/// this keeps them from running (and writing to shared volumes) until then.
fn remove_unrecorded(store: &Store, containers: &Containers, deployment: &str) -> usize {
    let recorded = releases(store, deployment)
        .iter()
        .map(|r| r.number)
        .max()
        .unwrap_or(0);
    let prefix = format!("{deployment}-");
    let orphans: Vec<(String, i32, Duration)> = containers
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            let Some(rest) = c.name.strip_prefix(&prefix) else {
                return false;
            };
            let mut parts = rest.rsplitn(3, '-');
            let (i, n) = (parts.next(), parts.next());
            i.is_some_and(|i| i.parse::<u32>().is_ok())
                && n.and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n > recorded)
        })
        .map(|c| (c.id, libc::SIGKILL, Duration::ZERO))
        .collect();
    stop_all(store, containers, &orphans, true);
    orphans.len()
}

/// A line of a live replica's log.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplicaLine {
    /// When (RFC 3339).
    pub time: String,
    /// `service-release-index`.
    pub replica: String,
    /// The text.
    pub log: String,
}

/// The logs of the live release's replicas (of `service`, and of its replica number
/// `replica`, if given; the last `tail` lines of each), merged by time.
pub fn replica_logs(
    store: &Store,
    deployment: &str,
    service: Option<&str>,
    replica: Option<usize>,
    tail: Option<usize>,
    since: Option<jiff::Timestamp>,
) -> Result<Vec<ReplicaLine>, DeployError> {
    let containers =
        Containers::new(store).map_err(|e| DeployError::local("open containers")(e.to_string()))?;
    let Some(live) = current(store, deployment) else {
        return Ok(Vec::new());
    };
    let mut lines = Vec::new();
    for (name, ids) in &live.replicas {
        if service.is_some_and(|s| s != name) {
            continue;
        }
        for (i, id) in ids.iter().enumerate() {
            if replica.is_some_and(|n| n != i + 1) {
                continue;
            }
            let Ok(st) = containers.get(id) else { continue };
            let filter = logs::Filter { tail, since };
            let (recs, _) = logs::read(&containers.dir(id), &filter).map_err(|e| {
                DeployError::local(format!("read the log of {}", st.name))(e.to_string())
            })?;
            let replica = st
                .name
                .trim_start_matches(&format!("{deployment}-"))
                .to_string();
            lines.extend(recs.into_iter().map(|r| ReplicaLine {
                time: r.time,
                replica: replica.clone(),
                log: r.log,
            }));
        }
    }
    lines.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retiring_holder_says_until_when() {
        let t = retiring_until("retiring release 3 until 2026-11-30T01:00:00Z").unwrap();
        assert_eq!(t.to_string(), "2026-11-30T01:00:00Z");
        assert!(retiring_until("ci@runner (pid 1) since then").is_none());
        assert!(retiring_until("retiring release 3 until never").is_none());
    }
}
