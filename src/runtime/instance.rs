//! Starting a recorded container from its spec: root filesystem, `/etc` files, volumes,
//! network, cgroup, then the process. Used by `berth run` in the foreground and by a
//! detached container's supervisor, for the first start and every restart.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::cgroup::Cgroup;
use super::container::{ContainerError, ContainerState, Containers, Status};
use super::network::{NetworkError, NetworkRecord, Networks};
use super::process::{self, ExtraMount, Launch, LaunchError, Network, Process, Started};
use super::rootfs::{self, RootfsError};
use super::spec::{ContainerSpec, MountSpec, NetworkMode};
use super::volume::{VolumeError, Volumes};
use crate::store::{Store, StoreError};

/// Where the command's standard streams go.
#[derive(Debug, Clone, Copy)]
pub enum Stdio {
    /// berth's own (foreground); stdin only with `-i`.
    Inherit {
        /// Keep stdin.
        stdin: bool,
    },
    /// These descriptors (a supervisor's pipes).
    Fds([RawFd; 3]),
    /// A pty slave.
    Tty(RawFd),
}

/// Why a container did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The process could not start.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The image or store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The root filesystem.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The network.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// A volume.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The container's record.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// A file or the cgroup.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// The exit code for the failure: inside the container, Docker's (127 command not
    /// found, 126 not executable, 125 anything else); on the host (the store, a full disk,
    /// the network), 1, berth's code for a failed operation.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Launch(LaunchError::Container { code, .. }) => *code,
            _ => 1,
        }
    }
}

/// A started container.
pub struct Instance {
    /// Its process.
    pub started: Started,
    /// Its cgroup.
    pub cgroup: Cgroup,
    /// Its address on its bridge network.
    pub ip: Option<Ipv4Addr>,
    /// How its root filesystem was made, for `-v`.
    pub rootfs_plan: String,
}

impl Instance {
    /// Waits for the exit; returns the code and whether the OOM killer ended it, and removes
    /// the cgroup.
    pub fn wait(&self, master: Option<&std::os::fd::OwnedFd>) -> std::io::Result<(i32, bool)> {
        let code = self.started.wait_with_tty(master)?;
        let oom = self.cgroup.oom_killed();
        let _ = self.cgroup.remove();
        Ok((code, oom))
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Io { what, source }
}

/// The secrets `spec` names, read from its 0600 secrets file: `K=V` entries for those
/// delivered as variables, `(name, value)` for those delivered as files.
type SecretParts = (Vec<String>, Vec<(String, process::SecretBytes)>);

fn secrets_of(spec: &ContainerSpec) -> Result<SecretParts, StartError> {
    use std::os::unix::fs::MetadataExt;
    if spec.secrets.is_empty() {
        return Ok(Default::default());
    }
    let Some(path) = &spec.secrets_file else {
        return Err(io("find the container's secrets")(std::io::Error::other(
            "the spec names secrets but no secrets file",
        )));
    };
    let md = std::fs::metadata(path).map_err(io("read the container's secrets file"))?;
    if md.mode() & 0o077 != 0 {
        return Err(io("read the container's secrets file")(
            std::io::Error::other(format!(
                "{} is readable by others (mode {:o})",
                path.display(),
                md.mode() & 0o777
            )),
        ));
    }
    let bytes = std::fs::read(path).map_err(io("read the container's secrets file"))?;
    let values: std::collections::BTreeMap<String, String> = serde_json::from_slice(&bytes)
        .map_err(|e| io("read the container's secrets file")(std::io::Error::other(e)))?;
    let (mut env, mut files) = (Vec::new(), Vec::new());
    for s in &spec.secrets {
        let Some(v) = values.get(&s.name) else {
            return Err(io("read the container's secrets file")(
                std::io::Error::other(format!("it has no value for secret `{}`", s.name)),
            ));
        };
        match s.delivery {
            super::spec::SecretDelivery::Env => env.push(format!("{}={v}", s.name)),
            super::spec::SecretDelivery::File => {
                files.push((s.name.clone(), process::SecretBytes(v.clone().into_bytes())))
            }
        }
    }
    Ok((env, files))
}

/// `env` with `vars` set over it (a later value of a name replaces the earlier).
fn with_vars(env: &[String], vars: Vec<String>) -> Vec<String> {
    let mut env = env.to_vec();
    for kv in vars {
        let k = kv
            .split_once('=')
            .map_or(kv.as_str(), |(k, _)| k)
            .to_string();
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k.as_str()));
        env.push(kv);
    }
    env
}

/// The environment a process of the container runs with (`exec` too): the spec's, and
/// the secrets delivered as variables over it.
pub fn process_env(spec: &ContainerSpec) -> Result<Vec<String>, StartError> {
    let (vars, _) = secrets_of(spec)?;
    Ok(with_vars(&spec.env, vars))
}

/// Starts container `st` as `spec` says.
pub fn start(
    store: &Store,
    containers: &Containers,
    st: &ContainerState,
    spec: &ContainerSpec,
    stdio: Stdio,
    handover: Option<process::Handover>,
) -> Result<Instance, StartError> {
    let image = store.load_image(&st.image_digest)?;
    let dir = containers.dir(&st.id);
    let (fs, overlay) = rootfs::plan(store, &image, &dir, true)?;
    let rootfs_plan = match &overlay {
        Some(m) => m.to_string(),
        None => format!("a copy in {}", fs.path.display()),
    };

    let mut mounts = Vec::new();
    let volumes = Volumes::new(store);
    for m in &spec.mounts {
        mounts.push(match m {
            MountSpec::Bind {
                source,
                target,
                read_only,
            } => ExtraMount {
                source: Some(source.clone()),
                target: target.clone(),
                read_only: *read_only,
                seed: false,
                tmpfs_size: None,
            },
            MountSpec::Volume {
                name,
                target,
                read_only,
            } => {
                let (v, created) = volumes.ensure(name)?;
                ExtraMount {
                    source: Some(v.mountpoint),
                    target: target.clone(),
                    read_only: *read_only,
                    seed: created,
                    tmpfs_size: None,
                }
            }
            MountSpec::Tmpfs { target } => ExtraMount {
                source: None,
                target: target.clone(),
                read_only: false,
                seed: false,
                tmpfs_size: None,
            },
        });
    }

    let networks = Networks::new(store)?;
    let (network, bridge) = match &spec.network {
        NetworkMode::None => (Network::None, None),
        NetworkMode::Host => (Network::Host, None),
        NetworkMode::Bridge { network, .. } => {
            let rec = networks.get(network)?;
            let live = |id: &str| containers.dir(id).join("state.json").exists();
            let ip = networks.lease(&rec, &st.id, &live)?;
            (Network::Bridge, Some((rec, ip)))
        }
    };
    let hosts = match &bridge {
        Some((rec, ip)) => hosts_file(containers, &networks, rec, st, spec, *ip)?,
        None => default_hosts(network, &spec.hostname),
    };
    let mut etc_files = Vec::new();
    for (name, text, dest) in [
        ("hostname", format!("{}\n", spec.hostname), "/etc/hostname"),
        ("hosts", hosts, "/etc/hosts"),
        (
            "resolv.conf",
            std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            "/etc/resolv.conf",
        ),
    ] {
        let p = dir.join(name);
        write_in_place(&p, &text).map_err(io("write the container's /etc files"))?;
        etc_files.push((p, dest));
    }
    if bridge.is_some() {
        // Bound, not copied: when containers join or leave the network, berth rewrites the
        // file and the container sees the change.
        mounts.push(ExtraMount {
            source: Some(dir.join("hosts")),
            target: "/etc/hosts".into(),
            read_only: false,
            seed: false,
            tmpfs_size: None,
        });
    }

    let (tty, stdin, fds) = match stdio {
        Stdio::Inherit { stdin } => (None, stdin, None),
        Stdio::Fds(fds) => (None, true, Some(fds)),
        Stdio::Tty(fd) => (Some(fd), true, None),
    };
    let (secret_env, secret_files) = secrets_of(spec)?;
    let env = with_vars(&spec.env, secret_env);
    let launch = Launch {
        overlay,
        rootfs: fs.path.clone(),
        etc_files,
        hostname: spec.hostname.clone(),
        network,
        read_only: spec.read_only,
        mounts,
        interface: bridge
            .as_ref()
            .map(|(rec, ip)| Networks::interface(rec, &st.id, *ip)),
        cgroup_join: Vec::new(),
        cgroupfs: None,
        secret_files,
        handover,
        die_with_parent: false,
        process: Process {
            args: spec.args.clone(),
            env,
            cwd: spec.cwd.clone(),
            user: spec.user.clone(),
            capabilities: spec.capabilities.clone(),
            stdout_to_stderr: false,
            stdin,
            tty,
            stdio: fds,
        },
    };
    let cgroup = Cgroup::create(&st.id, &spec.resources.into())
        .map_err(io("create the container's cgroup"))?;
    let launch = Launch {
        cgroup_join: cgroup.self_join_files(),
        cgroupfs: cgroup.fs(),
        ..launch
    };
    let started = process::start(&launch, &mut |pid| {
        if let Some((rec, _)) = &bridge {
            networks
                .attach(rec, &st.id, pid.as_raw())
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    });
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = cgroup.remove();
            return Err(e.into());
        }
    };
    if let Some((rec, _)) = &bridge {
        // The others learn about this one.
        let _ = refresh_hosts(store, containers, rec, Some(&st.id));
    }
    Ok(Instance {
        started,
        cgroup,
        ip: bridge.map(|(_, ip)| ip),
        rootfs_plan,
    })
}

/// Rewrites a file keeping its inode (it is bind-mounted into a container).
fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn default_hosts(network: Network, hostname: &str) -> String {
    match network {
        Network::Host => {
            std::fs::read_to_string("/etc/hosts").unwrap_or_default()
                + &format!("127.0.1.1\t{hostname}\n")
        }
        _ => format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
        ),
    }
}

/// `/etc/hosts` for a container on a bridge network: itself, then every other container
/// holding an address on the network, by name, aliases and short id.
fn hosts_file(
    containers: &Containers,
    networks: &Networks,
    rec: &NetworkRecord,
    st: &ContainerState,
    spec: &ContainerSpec,
    ip: Ipv4Addr,
) -> Result<String, StartError> {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    out += &format!("{ip}\t{} {}\n", spec.hostname, st.name);
    let all = containers.list()?;
    for (peer_ip, holder) in networks.leases(rec)? {
        if holder == st.id {
            continue;
        }
        let Some(peer) = all.iter().find(|c| c.id == holder) else {
            continue;
        };
        let mut names = vec![peer.name.clone()];
        if let Ok(NetworkMode::Bridge { aliases, .. }) =
            containers.spec(&peer.id).map(|s| s.network)
        {
            names.extend(aliases);
        }
        names.push(peer.short_id().to_string());
        out += &format!("{peer_ip}\t{}\n", names.join(" "));
    }
    Ok(out)
}

/// Rewrites `/etc/hosts` of every running container on `rec` (but `except`), after a
/// container joined or left.
pub fn refresh_hosts(
    store: &Store,
    containers: &Containers,
    rec: &NetworkRecord,
    except: Option<&str>,
) -> Result<(), StartError> {
    let networks = Networks::new(store)?;
    for (ip, holder) in networks.leases(rec)? {
        if Some(holder.as_str()) == except {
            continue;
        }
        let Ok(st) = containers.get(&holder) else {
            continue;
        };
        if !matches!(st.status, Status::Running) {
            continue;
        }
        let Ok(spec) = containers.spec(&st.id) else {
            continue;
        };
        let text = hosts_file(containers, &networks, rec, &st, &spec, ip)?;
        let path: PathBuf = containers.dir(&st.id).join("hosts");
        write_in_place(&path, &text).map_err(io("update a container's /etc/hosts"))?;
    }
    Ok(())
}

/// Releases what a removed container held on its networks and tells the others.
pub fn release_network(store: &Store, containers: &Containers, id: &str) -> Result<(), StartError> {
    let networks = Networks::new(store)?;
    let mut was_on = Vec::new();
    for rec in networks.list()? {
        if networks.leases(&rec)?.iter().any(|(_, h)| h == id) {
            was_on.push(rec);
        }
    }
    networks.release(id)?;
    if let Ok(mut nl) = super::netlink::Netlink::open_host() {
        let _ = nl.delete(&super::network::host_veth(id));
    }
    for rec in was_on {
        refresh_hosts(store, containers, &rec, Some(id))?;
    }
    Ok(())
}

/// The address of a container's `ip` for a proxy.
pub fn backend(ip: Option<Ipv4Addr>) -> Vec<IpAddr> {
    ip.map(IpAddr::V4).into_iter().collect()
}

/// Removes a stopped container: its cgroup (if a crash left it), network leases and veth,
/// then its record and directory (root filesystem included: its overlay lived in the
/// container's mount namespace, which is gone).
pub fn remove_container(
    store: &Store,
    containers: &Containers,
    st: &ContainerState,
) -> Result<(), StartError> {
    let _ = Cgroup::of(&st.id).remove();
    // A network that cannot be updated must not keep the container: its lease is
    // reclaimed by the next allocation anyway.
    let _ = release_network(store, containers, &st.id);
    Ok(containers.remove(st)?)
}

/// Polls `done` every 20 ms until it holds (true) or `limit` passes (false).
pub fn wait_until(limit: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Ends a container: marks the stop as asked for (no restart), sends `signal`, and after
/// `grace` SIGKILL; then waits for its supervisor to record the exit.
pub fn stop_container(
    containers: &Containers,
    id: &str,
    signal: i32,
    grace: std::time::Duration,
) -> Result<ContainerState, ContainerError> {
    use nix::sys::signal::Signal as NixSignal;
    let st = containers.update(id, |s| s.stop_requested = true)?;
    if let Some(p) = st.process().filter(|p| p.alive()) {
        let pid = nix::unistd::Pid::from_raw(p.pid);
        if let Ok(sig) = NixSignal::try_from(signal) {
            let _ = nix::sys::signal::kill(pid, sig);
        }
        if !wait_until(grace, || !p.alive()) {
            let _ = nix::sys::signal::kill(pid, NixSignal::SIGKILL);
            wait_until(std::time::Duration::from_secs(10), || !p.alive());
        }
    }
    wait_until(std::time::Duration::from_secs(10), || {
        match containers.get(id) {
            Ok(s) => s.status == Status::Stopped && !s.supervised(),
            Err(ContainerError::NotFound(_)) => true,
            Err(_) => false,
        }
    });
    match containers.get(id) {
        // Removed once stopped (`run -d --rm`): stopped, as asked.
        Err(ContainerError::NotFound(_)) => Ok(ContainerState {
            status: Status::Stopped,
            pid: None,
            ..st
        }),
        other => other,
    }
}
