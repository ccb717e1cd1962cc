//! `berth run`, `berth ps`, `berth rm`, and the hidden `__init` the container's PID 1 runs.

use miette::miette;
use serde_json::json;

use super::{CliError, ExitKind, GlobalOpts, Output};
use crate::runtime::cgroup::{self, Cgroup};
use crate::runtime::container::{ContainerState, Containers, Status, now, process_start_time};
use crate::runtime::process::{self, Launch, LaunchError, Network};
use crate::runtime::{bundle, caps, rootfs};
use crate::store::Store;

/// Networks `berth run` offers.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum NetworkArg {
    /// Only loopback, in the container's own network namespace.
    None,
    /// The host's network.
    Host,
}

/// Arguments of `berth run`.
#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
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
    /// Network.
    #[arg(long, value_enum, default_value = "none")]
    pub network: NetworkArg,
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

/// Arguments of `berth ps`.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// Show stopped containers too.
    #[arg(short, long)]
    pub all: bool,
}

/// Arguments of `berth rm`.
#[derive(Debug, clap::Args)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short, long)]
    pub force: bool,
    /// Containers (names, ids or id prefixes).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

fn failed(e: impl std::error::Error + Send + Sync + 'static) -> CliError {
    CliError::failed(miette::Report::from_err(e))
}

/// Writes `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` for the container.
fn etc_files(
    dir: &std::path::Path,
    hostname: &str,
    network: Network,
) -> std::io::Result<Vec<(std::path::PathBuf, &'static str)>> {
    let hosts = match network {
        Network::None => format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
        ),
        Network::Host => {
            std::fs::read_to_string("/etc/hosts").unwrap_or_default()
                + &format!("127.0.1.1\t{hostname}\n")
        }
    };
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let files = [
        ("hostname", format!("{hostname}\n"), "/etc/hostname"),
        ("hosts", hosts, "/etc/hosts"),
        ("resolv.conf", resolv, "/etc/resolv.conf"),
    ];
    let mut out = Vec::new();
    for (name, text, dest) in files {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        out.push((p, dest));
    }
    Ok(out)
}

/// Runs `berth run`: attached, exits with the container's code.
pub fn run(g: &GlobalOpts, args: &RunArgs, _out: &mut Output) -> Result<(), CliError> {
    let store = Store::open(&g.store_dir())?;
    let image = store.load_image(&args.image)?;
    let containers = Containers::new(&store).map_err(failed)?;
    let cfg = image.config.oci.config().clone().unwrap_or_default();
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
            return Err(CliError::invalid(miette!("`{kv}` is not K=V")));
        };
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k));
        env.push(kv.clone());
    }
    let network = match args.network {
        NetworkArg::None => Network::None,
        NetworkArg::Host => Network::Host,
    };
    let mut st = containers
        .create(
            args.name.as_deref(),
            &args.image,
            image.digest.as_str(),
            argv.clone(),
        )
        .map_err(|e| CliError::invalid(miette::Report::from_err(e)))?;
    let dir = containers.dir(&st.id);
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| st.short_id().to_string());
    let (fs, overlay) = rootfs::plan(&store, &image, &dir, true).map_err(failed)?;
    let launch = Launch {
        overlay,
        rootfs: fs.path.clone(),
        etc_files: etc_files(&dir, &hostname, network).map_err(|e| {
            CliError::failed(miette!("cannot write the container's /etc files: {e}"))
        })?,
        hostname,
        network,
        read_only: args.read_only,
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
        capabilities: caps::effective_set(&args.cap_add, &args.cap_drop)
            .map_err(|e| CliError::invalid(miette!("{e}")))?,
        stdout_to_stderr: false,
        stdin: args.interactive,
        tty: None,
    };
    let pty = if args.tty {
        Some(super::tty::Pty::open().map_err(|e| {
            CliError::failed(miette!("cannot open a terminal for the container: {e}"))
        })?)
    } else {
        None
    };
    let mut launch = launch;
    launch.tty = pty
        .as_ref()
        .map(|p| std::os::fd::AsRawFd::as_raw_fd(&p.slave));
    let finish = |st: &mut ContainerState, code: Option<i32>| {
        st.status = Status::Stopped;
        st.pid = None;
        st.exit_code = code;
        st.finished = Some(now());
    };
    if g.verbose > 0 {
        eprintln!("container {} ({}) in {}", st.name, st.id, dir.display());
        match &launch.overlay {
            Some(m) => eprintln!("root filesystem: {m}"),
            None => eprintln!("root filesystem: a copy in {}", launch.rootfs.display()),
        }
    }
    let limits = cgroup::Limits {
        memory: args.memory.map(|m| m.0),
        cpu_millis: args.cpus.map(|c| c.millis),
        pids: args.pids_limit,
    };
    let cg = Cgroup::create(&st.id, &limits)
        .map_err(|e| CliError::failed(miette!("cannot create the container's cgroup: {e}")))?;
    let started = match process::start(&launch, &mut |pid| cg.add(pid.as_raw())) {
        Ok(s) => s,
        Err(e) => {
            finish(&mut st, None);
            let _ = containers.save(&st);
            let _ = cg.remove();
            cleanup(&containers, &st, args.rm);
            return Err(match e {
                LaunchError::Container { message, code } => {
                    eprintln!("berth: {message}");
                    CliError {
                        kind: ExitKind::Code(code as u8),
                        report: None,
                    }
                }
                other => failed(other),
            });
        }
    };
    // The container holds the pty's slave now; ours must close so the output reaches EOF.
    let (master, output) = match pty {
        Some(p) => {
            drop(p.slave);
            let output = super::tty::pump(&p.master, args.interactive)
                .map_err(|e| CliError::failed(miette!("cannot attach the terminal: {e}")))?;
            (Some(p.master), Some(output))
        }
        None => (None, None),
    };
    let raw = master
        .as_ref()
        .filter(|_| args.interactive)
        .map(|_| super::tty::RawMode::enter());
    st.status = Status::Running;
    st.pid = Some(started.pid.as_raw());
    st.pid_start = process_start_time(started.pid.as_raw());
    st.started = Some(now());
    containers.save(&st).map_err(failed)?;
    let code = started
        .wait_with_tty(master.as_ref())
        .map_err(|e| CliError::failed(miette!("waiting for the container failed: {e}")))?;
    if let Some(output) = output {
        let _ = output.join();
    }
    drop(raw);
    finish(&mut st, Some(code));
    st.oom_killed = cg.oom_killed();
    containers.save(&st).map_err(failed)?;
    if let Err(e) = cg.remove() {
        eprintln!("berth: cannot remove the container's cgroup: {e}");
    }
    if st.oom_killed {
        eprintln!(
            "berth: container {} was killed by the kernel: out of memory (OOMKilled)",
            st.name
        );
    }
    cleanup(&containers, &st, args.rm);
    if code == 0 {
        Ok(())
    } else {
        Err(CliError {
            kind: ExitKind::Code(code as u8),
            report: None,
        })
    }
}

/// Removes the container (record and directory, root filesystem included) when `--rm` was
/// given. Its overlay lived in the container's mount namespace, which is gone.
fn cleanup(containers: &Containers, st: &ContainerState, remove: bool) {
    if remove {
        let _ = containers.remove(st);
    }
}

fn status_text(st: &ContainerState) -> String {
    match st.status {
        Status::Created => "Created".into(),
        Status::Running => format!("Up since {}", st.started.as_deref().unwrap_or("?")),
        Status::Stopped => match st.exit_code {
            Some(c) if st.oom_killed => format!(
                "Exited ({c}, OOMKilled) at {}",
                st.finished.as_deref().unwrap_or("?")
            ),
            Some(c) => format!("Exited ({c}) at {}", st.finished.as_deref().unwrap_or("?")),
            None => format!("Exited at {}", st.finished.as_deref().unwrap_or("?")),
        },
    }
}

/// `berth ps [-a]`.
pub fn ps(g: &GlobalOpts, args: &PsArgs, out: &mut Output) -> Result<(), CliError> {
    let store = Store::open(&g.store_dir())?;
    let list: Vec<ContainerState> = Containers::new(&store)
        .map_err(failed)?
        .list()
        .map_err(failed)?
        .into_iter()
        .filter(|c| args.all || c.status == Status::Running)
        .collect();
    if out.json {
        return Ok(out.json_value(&list)?);
    }
    out.line(format!(
        "{:<14} {:<20} {:<24} {:<40} {}",
        "ID", "NAME", "IMAGE", "STATUS", "COMMAND"
    ))?;
    for c in &list {
        out.line(format!(
            "{:<14} {:<20} {:<24} {:<40} {}",
            c.short_id(),
            c.name,
            c.image,
            status_text(c),
            c.command.join(" ")
        ))?;
    }
    Ok(())
}

/// `berth rm [-f] NAME...`.
pub fn rm(g: &GlobalOpts, args: &RmArgs, out: &mut Output) -> Result<(), CliError> {
    let store = Store::open(&g.store_dir())?;
    let containers = Containers::new(&store).map_err(failed)?;
    for reference in &args.containers {
        let mut st = containers
            .get(reference)
            .map_err(|e| CliError::invalid(miette::Report::from_err(e)))?;
        if !st.can_delete() {
            if !args.force {
                return Err(CliError::failed(miette!(
                    help = "stop it first, or use rm -f",
                    "container {} is running",
                    st.name
                )));
            }
            if let Some(pid) = st.pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                for _ in 0..200 {
                    if !st.refresh() {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                    break;
                }
            }
        }
        containers.remove(&st).map_err(failed)?;
        if out.json {
            out.json_value(&json!({ "removed": st.id }))?;
        } else {
            out.line(&st.name)?;
        }
    }
    Ok(())
}
