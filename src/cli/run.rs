//! `berth run`: a container from an image, attached or detached (`-d`, supervised).

use std::net::{IpAddr, Ipv4Addr};

use miette::miette;
use serde_json::json;

use super::{CliError, ExitKind, GlobalOpts, Output};
use crate::manifest::values::{PortMapping, Protocol, RestartPolicy, VolumeMount, VolumeSource};
use crate::runtime::container::{
    ContainerError, ContainerState, Containers, Status, now, process_start_time,
};
use crate::runtime::instance::{self, StartError, Stdio};
use crate::runtime::process::LaunchError;
use crate::runtime::proxy::ProxyProcess;
use crate::runtime::spec::{
    ContainerSpec, MountSpec, NetworkMode, PortSpec, Proto, Resources, Restart,
};
use crate::runtime::{bundle, caps, supervisor};
use crate::store::Store;

/// Arguments of `berth run`.
#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Pull the image: when missing from the store (default), always, or never.
    #[arg(long, value_enum, value_name = "POLICY", default_value = "missing")]
    pub pull: crate::build::PullPolicy,
    /// Do not run the image's HEALTHCHECK.
    #[arg(long)]
    pub no_healthcheck: bool,
    /// Keep standard input open (otherwise the container reads /dev/null).
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a terminal (with -i: an interactive shell).
    #[arg(short, long)]
    pub tty: bool,
    /// The container's name [default: generated].
    #[arg(long)]
    pub name: Option<String>,
    /// Set an environment variable.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// User (name, uid, name:group or uid:gid).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Host name [default: the container's short id].
    #[arg(long)]
    pub hostname: Option<String>,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Network: none (loopback only), host, bridge (berth's default network) or a
    /// network's name [default: bridge with -p, else none].
    #[arg(long, value_name = "NETWORK")]
    pub network: Option<String>,
    /// Another name the container has on its network.
    #[arg(long, value_name = "NAME")]
    pub network_alias: Vec<String>,
    /// Publish a port: [IP:]HOST:CONTAINER[/udp].
    #[arg(short, long, value_name = "PORTS")]
    pub publish: Vec<String>,
    /// Mount a named volume (NAME:/path) or a host path (/host:/path), [:ro].
    #[arg(short, long, value_name = "SRC:DST[:ro]")]
    pub volume: Vec<String>,
    /// Mount a fresh tmpfs at a path.
    #[arg(long, value_name = "PATH")]
    pub tmpfs: Vec<String>,
    /// Run in the background, supervised; prints the container's id.
    #[arg(short, long)]
    pub detach: bool,
    /// Restart policy of a detached container: no, on-failure[:N], always, unless-stopped.
    #[arg(long, default_value = "no", value_name = "POLICY")]
    pub restart: RestartPolicy,
    /// Memory limit (e.g. 256M); the kernel's OOM killer ends the container beyond it.
    #[arg(short, long, value_name = "SIZE")]
    pub memory: Option<crate::manifest::values::ByteSize>,
    /// CPU quota (e.g. 0.5).
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<crate::manifest::values::Cpus>,
    /// Most processes and threads.
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u32>,
    /// Add a capability to Docker's default set (e.g. NET_ADMIN; ALL).
    #[arg(long, value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Remove a capability from the set (e.g. NET_RAW; ALL).
    #[arg(long, value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// The image.
    pub image: String,
    /// Command and arguments (over the image's CMD).
    #[arg(allow_hyphen_values = true)]
    pub command: Vec<String>,
}

pub(crate) fn failed(e: impl std::error::Error + Send + Sync + 'static) -> CliError {
    CliError::failed(miette::Report::from_err(e))
}

/// The container's spec from the image's config and the command line.
fn build_spec(
    args: &RunArgs,
    image: &crate::store::ImageConfig,
    short_id: &str,
) -> Result<ContainerSpec, CliError> {
    let cfg = &image.oci.config().clone().unwrap_or_default();
    let invalid = |m: String| CliError::invalid(miette!("{m}"));
    let mut argv = cfg.entrypoint().clone().unwrap_or_default();
    if args.command.is_empty() {
        argv.extend(cfg.cmd().clone().unwrap_or_default());
    } else {
        argv.extend(args.command.iter().cloned());
    }
    if argv.is_empty() {
        return Err(CliError::invalid(miette!(
            help = "give a command after the image",
            "the image has no command (neither ENTRYPOINT nor CMD)"
        )));
    }
    let mut env = cfg.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, bundle::DEFAULT_PATH.to_string());
    }
    for kv in &args.env {
        let Some((k, _)) = kv.split_once('=') else {
            return Err(CliError::invalid(miette!(
                help = format!(
                    "on `run`, -e/--env sets a variable K=V; to run a command in a replica of environment `{kv}`: berth exec --env {kv} SERVICE -- CMD"
                ),
                "`--env {kv}` is not K=V"
            )));
        };
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k));
        env.push(kv.clone());
    }
    let default = if args.publish.is_empty() {
        "none"
    } else {
        "bridge"
    };
    let network = match args.network.as_deref().unwrap_or(default) {
        "none" => NetworkMode::None,
        "host" => NetworkMode::Host,
        name => NetworkMode::Bridge {
            network: name.to_string(),
            aliases: args.network_alias.clone(),
        },
    };
    if !args.network_alias.is_empty() && !matches!(network, NetworkMode::Bridge { .. }) {
        return Err(invalid(
            "--network-alias needs a bridge network (--network bridge or a network's name)".into(),
        ));
    }
    let mut ports = Vec::new();
    for p in &args.publish {
        let m: PortMapping = p
            .parse()
            .map_err(|e: String| invalid(format!("-p {p}: {e}")))?;
        ports.push(PortSpec {
            host_ip: m.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            host_port: m.published,
            container_port: m.container,
            proto: match m.protocol {
                Protocol::Tcp => Proto::Tcp,
                Protocol::Udp => Proto::Udp,
            },
        });
    }
    match (&network, ports.is_empty()) {
        (_, true) | (NetworkMode::Bridge { .. }, false) => {}
        (NetworkMode::Host, false) => {
            return Err(invalid(
                "-p has no effect with --network host: the container uses the host's ports".into(),
            ));
        }
        (NetworkMode::None, false) => {
            return Err(CliError::invalid(miette!(
                help = "add --network bridge (or a network's name)",
                "-p needs a network: --network none has only loopback"
            )));
        }
    }
    let mut mounts = Vec::new();
    for v in &args.volume {
        let m: VolumeMount = v
            .parse()
            .map_err(|e: String| invalid(format!("-v {v}: {e}")))?;
        mounts.push(match m.source {
            VolumeSource::Named(name) => MountSpec::Volume {
                name,
                target: m.target,
                read_only: m.read_only,
            },
            VolumeSource::Bind(path) => {
                if !std::path::Path::new(&path).exists() {
                    return Err(invalid(format!(
                        "-v {v}: the host path {path} does not exist"
                    )));
                }
                MountSpec::Bind {
                    source: path.into(),
                    target: m.target,
                    read_only: m.read_only,
                }
            }
        });
    }
    for t in &args.tmpfs {
        if !t.starts_with('/') || t.split('/').any(|c| c == "..") {
            return Err(invalid(format!(
                "--tmpfs {t}: the path must be absolute, without `..`"
            )));
        }
        mounts.push(MountSpec::Tmpfs { target: t.clone() });
    }
    let restart = match args.restart {
        RestartPolicy::No => Restart::No,
        RestartPolicy::OnFailure { max_retries } => Restart::OnFailure { max_retries },
        RestartPolicy::Always => Restart::Always,
        RestartPolicy::UnlessStopped => Restart::UnlessStopped,
    };
    if restart != Restart::No && !args.detach {
        return Err(invalid(
            "--restart needs -d (a supervisor restarts containers)".into(),
        ));
    }
    if restart != Restart::No && args.rm {
        return Err(invalid("--restart and --rm exclude each other".into()));
    }
    let stop_signal = match cfg.stop_signal() {
        Some(s) => {
            s.parse::<crate::manifest::values::Signal>()
                .map_err(|e| invalid(format!("the image's STOPSIGNAL: {e}")))?
                .0
        }
        None => libc::SIGTERM,
    };
    Ok(ContainerSpec {
        args: argv,
        env,
        cwd: args
            .workdir
            .clone()
            .or_else(|| cfg.working_dir().clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: args
            .user
            .clone()
            .or_else(|| cfg.user().clone())
            .unwrap_or_default(),
        hostname: args
            .hostname
            .clone()
            .unwrap_or_else(|| short_id.to_string()),
        network,
        ports,
        mounts,
        capabilities: caps::effective_set(&args.cap_add, &args.cap_drop)
            .map_err(|e| CliError::invalid(miette!("{e}")))?,
        read_only: args.read_only,
        resources: Resources {
            memory: args.memory.map(|m| m.0),
            cpu_millis: args.cpus.map(|c| c.millis),
            pids: args.pids_limit,
        },
        restart,
        stop_signal,
        tty: args.tty,
        interactive: args.interactive,
        auto_remove: args.rm,
        secrets: Vec::new(),
        secrets_file: None,
        // The image's HEALTHCHECK, kept running by a detached container's supervisor.
        health: if args.no_healthcheck {
            None
        } else {
            image.health_check()
        },
    })
}

/// Runs `berth run`: attached (exits with the container's code) or detached (`-d`: prints
/// the id and leaves the container to its supervisor).
pub fn run(g: &GlobalOpts, args: &RunArgs, out: &mut Output) -> Result<(), CliError> {
    if out.json && !args.detach {
        return Err(super::no_json(
            "an attached `run` (its output is the container's)",
        ));
    }
    let store = Store::open(&g.store_dir())?;
    // As `docker run`: an image the store lacks is pulled (`--pull`).
    let image = crate::build::find_or_pull(
        &store,
        &args.image,
        args.pull,
        Some(&super::build::puller(&store, out.quiet || out.json)),
    )
    .map_err(|e| match e {
        crate::build::BuildError::Store(s) => CliError::from(s),
        crate::build::BuildError::UnknownBase(_) => CliError::invalid(miette::Report::from_err(e)),
        e => CliError::failed(miette::Report::from_err(e)),
    })?;
    let containers = Containers::new(&store).map_err(failed)?;
    if args.detach && args.interactive {
        return Err(CliError::invalid(miette!(
            "-d and -i exclude each other: a detached container's stdin is closed"
        )));
    }
    let st = containers
        .create(
            args.name.as_deref(),
            &args.image,
            image.digest.as_str(),
            Vec::new(),
        )
        .map_err(|e| match e {
            // The user's name: bad input. Anything else (a full disk) is a failure.
            ContainerError::NameInUse(..) | ContainerError::BadName(_) => {
                CliError::invalid(miette::Report::from_err(e))
            }
            e => failed(e),
        })?;
    let spec = match build_spec(args, &image.config, st.short_id()) {
        Ok(s) => s,
        Err(e) => {
            let _ = containers.remove(&st);
            return Err(e);
        }
    };
    let recorded = containers
        .update(&st.id, |s| s.command = spec.args.clone())
        .and_then(|st| containers.save_spec(&st.id, &spec).map(|()| st));
    let st = match recorded {
        Ok(st) => st,
        Err(e) => {
            // Not half a container: one that cannot be recorded whole is not kept.
            let _ = containers.remove(&st);
            return Err(failed(e));
        }
    };
    let dir = containers.dir(&st.id);
    if g.verbose > 0 {
        crate::say!("container {} ({}) in {}", st.name, st.id, dir.display());
    }
    if args.detach {
        let exe = std::env::current_exe()
            .map_err(|e| CliError::failed(miette!("cannot find berth's own binary: {e}")))?;
        return match supervisor::spawn(&exe, &g.store_dir(), &dir, &st.id) {
            Ok(()) => {
                if out.json {
                    out.json_value(&json!({ "id": st.id, "name": st.name }))?;
                } else {
                    out.line(&st.id)?;
                }
                Ok(())
            }
            Err((code, message)) => {
                crate::say!("berth: {message}");
                if spec.auto_remove {
                    let _ = remove_container(&store, &containers, &st);
                }
                Err(CliError {
                    kind: ExitKind::Code(code as u8),
                    report: None,
                })
            }
        };
    }
    run_attached(g, &store, &containers, st, &spec)
}

fn run_attached(
    g: &GlobalOpts,
    store: &Store,
    containers: &Containers,
    st: ContainerState,
    spec: &ContainerSpec,
) -> Result<(), CliError> {
    let mut proxy = if spec.ports.is_empty() {
        None
    } else {
        match ProxyProcess::spawn(&spec.ports) {
            Ok(p) => Some(p),
            Err(e) => {
                let _ = remove_container(store, containers, &st);
                return Err(CliError::failed(miette!("{e}")));
            }
        }
    };
    let pty = if spec.tty {
        Some(super::tty::Pty::open().map_err(|e| {
            CliError::failed(miette!("cannot open a terminal for the container: {e}"))
        })?)
    } else {
        None
    };
    let stdio = match &pty {
        Some(p) => Stdio::Tty(std::os::fd::AsRawFd::as_raw_fd(&p.slave)),
        None => Stdio::Inherit {
            stdin: spec.interactive,
        },
    };
    let finish = |code: Option<i32>, oom: bool| {
        let st = containers.update(&st.id, |s| {
            s.status = Status::Stopped;
            s.pid = None;
            s.exit_code = code;
            s.oom_killed = oom;
            s.finished = Some(now());
        });
        if spec.auto_remove
            && let Ok(st) = st
        {
            let _ = remove_container(store, containers, &st);
        }
    };
    let inst = match instance::start(store, containers, &st, spec, stdio, None) {
        Ok(i) => i,
        Err(e) => {
            finish(Some(e.exit_code()), false);
            return Err(match e {
                StartError::Launch(LaunchError::Container { message, code }) => {
                    crate::say!("berth: {message}");
                    CliError {
                        kind: ExitKind::Code(code as u8),
                        report: None,
                    }
                }
                other => failed(other),
            });
        }
    };
    if g.verbose > 0 {
        crate::say!("root filesystem: {}", inst.rootfs_plan);
    }
    if let Some(p) = proxy.as_mut() {
        let _ = p.set_hosts(&instance::backend(inst.ip));
    }
    let attached = super::tty::Attached::new(pty, spec.interactive)
        .map_err(|e| CliError::failed(miette!("cannot attach the terminal: {e}")))?;
    let pid = inst.started.pid.as_raw();
    containers
        .update(&st.id, |s| {
            s.status = Status::Running;
            s.pid = Some(pid);
            s.pid_start = process_start_time(pid);
            s.started = Some(now());
            s.ip = inst.ip.map(Into::into);
        })
        .map_err(failed)?;
    let waited = inst.wait(attached.master());
    attached.finish();
    drop(proxy);
    let (code, oom) =
        waited.map_err(|e| CliError::failed(miette!("waiting for the container failed: {e}")))?;
    finish(Some(code), oom);
    if oom {
        crate::say!(
            "berth: container {} was killed by the kernel: out of memory (OOMKilled)",
            st.name
        );
    }
    if code == 0 {
        Ok(())
    } else {
        Err(CliError {
            kind: ExitKind::Code(code as u8),
            report: None,
        })
    }
}

/// Removes a stopped container with everything it holds.
pub(crate) fn remove_container(
    store: &Store,
    containers: &Containers,
    st: &ContainerState,
) -> Result<(), CliError> {
    instance::remove_container(store, containers, st).map_err(failed)
}
