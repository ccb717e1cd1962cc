//! Containers after `run`: `ps`, `logs`, `start`, `stop`, `kill`, `rm`, `exec`, and
//! `inspect` of a container.

use std::time::Duration;

use miette::miette;
use nix::sys::signal::Signal as NixSignal;
use nix::unistd::Pid;
use serde_json::json;

use super::run::{failed, remove_container};
use super::{CliError, ExitKind, GlobalOpts, Output};
use crate::manifest::values::Signal;
use crate::runtime::container::{ContainerState, Containers, Status};
use crate::runtime::instance::wait_until;
use crate::runtime::logs;
use crate::runtime::process::{LaunchError, Process};
use crate::runtime::{cgroup, exec, supervisor};
use crate::store::Store;

/// Arguments of `berth ps`.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// Show stopped containers too.
    #[arg(short, long)]
    pub all: bool,
    /// An environment: every replica of its live release on every host (through the
    /// agents).
    #[arg(long)]
    pub env: Option<String>,
    /// With --env: only the hosts whose `hosts` entry contains this.
    #[arg(long, requires = "env")]
    pub host: Option<String>,
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

/// Arguments of `berth start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Containers (names, ids or id prefixes).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// Arguments of `berth stop`.
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// Seconds to wait after the stop signal before SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10, value_name = "SECS")]
    pub time: u64,
    /// Containers (names, ids or id prefixes).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// Arguments of `berth kill`.
#[derive(Debug, clap::Args)]
pub struct KillArgs {
    /// Signal (name or number).
    #[arg(short, long, default_value = "KILL")]
    pub signal: Signal,
    /// Containers (names, ids or id prefixes).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// Arguments of `berth logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Keep printing new output until the container stops.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<usize>,
    /// Only lines since a time (RFC 3339) or for a duration back (10m, 1h30m).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Show each line's time.
    #[arg(short, long)]
    pub timestamps: bool,
    /// An environment: its live release's logs, merged (then the argument is a service).
    #[arg(long)]
    pub env: Option<String>,
    /// With --env: only the hosts whose `hosts` entry contains this.
    #[arg(long, requires = "env")]
    pub host: Option<String>,
    /// With --env and a service: only its replica N (1-based) on each host.
    #[arg(long, requires = "container", requires = "env")]
    pub replica: Option<usize>,
    /// The container (with --env: the service, or all of them when omitted).
    #[arg(required_unless_present = "env")]
    pub container: Option<String>,
}

/// Arguments of `berth exec`.
#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
pub struct ExecArgs {
    /// Keep standard input open.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable.
    #[arg(short = 'e', value_name = "K=V")]
    pub vars: Vec<String>,
    /// An environment to run in (then the argument is its service), or, as Docker's
    /// --env, a variable K=V.
    #[arg(long = "env", value_name = "ENV|K=V")]
    pub env: Vec<String>,
    /// With --env ENV: the host whose `hosts` entry contains this [default: the first].
    #[arg(long)]
    pub host: Option<String>,
    /// With --env ENV: the service's replica N on that host (1-based) [default: the first
    /// running].
    #[arg(long)]
    pub replica: Option<usize>,
    /// User (name, uid, name:group or uid:gid) [default: the container's].
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Working directory [default: the container's].
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// The container (with --env ENV: the service).
    pub container: String,
    /// Command and arguments.
    #[arg(required = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn open(g: &GlobalOpts) -> Result<(Store, Containers), CliError> {
    let store = Store::open(&g.store_dir())?;
    let containers = Containers::new(&store).map_err(failed)?;
    Ok((store, containers))
}

fn get(containers: &Containers, reference: &str) -> Result<ContainerState, CliError> {
    containers
        .get(reference)
        .map_err(|e| CliError::invalid(miette::Report::from_err(e)))
}

/// `3 seconds`, `5 minutes`, `2 hours`, `4 days`: how long ago `time` was.
fn ago(time: Option<&str>) -> String {
    let Some(t) = time.and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
        return "?".into();
    };
    let secs = (jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    let (n, unit) = match secs {
        0..60 => (secs, "second"),
        60..3600 => (secs / 60, "minute"),
        3600..172_800 => (secs / 3600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Docker-style status text, with restarts and a lost supervisor spelt out.
pub fn status_text(st: &ContainerState) -> String {
    let restarts = match (st.restarts, st.exit_code) {
        (0, _) => String::new(),
        (n, Some(c)) => format!(
            ", {n} restart{} (last exit {c})",
            if n == 1 { "" } else { "s" }
        ),
        (n, None) => format!(", {n} restart{}", if n == 1 { "" } else { "s" }),
    };
    match st.status {
        Status::Created => "Created".into(),
        Status::Running if st.supervisor_lost => format!(
            "Up {} (supervisor lost){restarts}",
            ago(st.started.as_deref())
        ),
        Status::Running => format!(
            "Up {}{}{restarts}",
            ago(st.started.as_deref()),
            st.health
                .as_ref()
                .map(|h| format!(" ({})", h.status))
                .unwrap_or_default()
        ),
        Status::Restarting => format!(
            "Restarting ({}) {} ago{restarts}",
            st.exit_code.map_or("?".into(), |c| c.to_string()),
            ago(st.finished.as_deref())
        ),
        Status::Stopped => {
            let code = match st.exit_code {
                Some(c) if st.oom_killed => format!("{c}, OOMKilled"),
                Some(c) => c.to_string(),
                None => "unknown".into(),
            };
            format!(
                "Exited ({code}) {} ago{restarts}",
                ago(st.finished.as_deref())
            )
        }
    }
}

/// `berth ps [-a]`.
pub fn ps(g: &GlobalOpts, args: &PsArgs, out: &mut Output) -> Result<(), CliError> {
    let (_, containers) = open(g)?;
    let list: Vec<ContainerState> = containers
        .list()
        .map_err(failed)?
        .into_iter()
        .filter(|c| args.all || matches!(c.status, Status::Running | Status::Restarting))
        .collect();
    let ports = |c: &ContainerState| {
        containers
            .spec(&c.id)
            .map(|s| {
                s.ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    if out.json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).expect("state serialises");
                v["status_text"] = json!(status_text(c));
                v["ports"] = json!(containers.spec(&c.id).map(|s| s.ports).unwrap_or_default());
                v
            })
            .collect();
        return Ok(out.json_value(&rows)?);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                c.short_id().to_string(),
                c.name.clone(),
                short_image(&c.image),
                status_text(c),
                ports(c),
                c.command.join(" "),
            ]
        })
        .collect();
    for l in super::table::lines(
        &["ID", "NAME", "IMAGE", "STATUS", "PORTS", "COMMAND"],
        &rows,
    ) {
        out.line(l)?;
    }
    Ok(())
}

/// An image reference for a table: `name@sha256:` and 12 digits of a digest (`rmi`,
/// `inspect` and `run` take that form).
fn short_image(image: &str) -> String {
    match image.split_once("@sha256:") {
        Some((name, hex)) if hex.len() > 12 => format!("{name}@sha256:{}", &hex[..12]),
        _ => image.to_string(),
    }
}

fn stop_container(
    containers: &Containers,
    st: &ContainerState,
    signal: i32,
    grace: Duration,
) -> Result<ContainerState, CliError> {
    crate::runtime::instance::stop_container(containers, &st.id, signal, grace).map_err(failed)
}

/// `berth stop [-t SECS] NAME...`: the image's STOPSIGNAL, then SIGKILL after the grace.
pub fn stop(g: &GlobalOpts, args: &StopArgs, out: &mut Output) -> Result<(), CliError> {
    let (_, containers) = open(g)?;
    for r in &args.containers {
        let st = get(&containers, r)?;
        if matches!(st.status, Status::Running | Status::Restarting) {
            let signal = containers
                .spec(&st.id)
                .map(|s| s.stop_signal)
                .unwrap_or(libc::SIGTERM);
            stop_container(&containers, &st, signal, Duration::from_secs(args.time))?;
        }
        out.line(&st.name)?;
    }
    Ok(())
}

/// `berth kill [-s SIG] NAME...`.
pub fn kill(g: &GlobalOpts, args: &KillArgs, out: &mut Output) -> Result<(), CliError> {
    let (_, containers) = open(g)?;
    let sig = NixSignal::try_from(args.signal.0)
        .map_err(|_| CliError::invalid(miette!("signal {} cannot be sent", args.signal.0)))?;
    for r in &args.containers {
        let st = get(&containers, r)?;
        let Some(p) = st.process().filter(|p| p.alive()) else {
            return Err(CliError::failed(miette!(
                "container {} is not running",
                st.name
            )));
        };
        // Signals that end a process count as a stop: the restart policy stays out of it.
        if matches!(
            sig,
            NixSignal::SIGKILL | NixSignal::SIGTERM | NixSignal::SIGINT | NixSignal::SIGQUIT
        ) {
            containers
                .update(&st.id, |s| s.stop_requested = true)
                .map_err(failed)?;
        }
        nix::sys::signal::kill(Pid::from_raw(p.pid), sig)
            .map_err(|e| CliError::failed(miette!("cannot signal {}: {e}", st.name)))?;
        out.line(&st.name)?;
    }
    Ok(())
}

/// `berth start NAME...`: a stopped container runs again, detached, under a new supervisor.
pub fn start(g: &GlobalOpts, args: &StartArgs, out: &mut Output) -> Result<(), CliError> {
    let (_, containers) = open(g)?;
    let exe = std::env::current_exe()
        .map_err(|e| CliError::failed(miette!("cannot find berth's own binary: {e}")))?;
    for r in &args.containers {
        let st = get(&containers, r)?;
        match st.status {
            Status::Running | Status::Restarting => {
                out.line(&st.name)?;
                continue;
            }
            Status::Created | Status::Stopped => {}
        }
        containers.spec(&st.id).map_err(failed)?;
        if let Err((code, message)) =
            supervisor::spawn(&exe, &g.store_dir(), &containers.dir(&st.id), &st.id)
        {
            crate::say!("berth: {message}");
            return Err(CliError {
                kind: ExitKind::Code(code as u8),
                report: None,
            });
        }
        out.line(&st.name)?;
    }
    Ok(())
}

/// `berth rm [-f] NAME...`.
pub fn rm(g: &GlobalOpts, args: &RmArgs, out: &mut Output) -> Result<(), CliError> {
    let (store, containers) = open(g)?;
    for reference in &args.containers {
        let mut st = get(&containers, reference)?;
        if !st.can_delete() {
            if !args.force {
                return Err(CliError::failed(miette!(
                    help = "stop it first, or use rm -f",
                    "container {} is {}",
                    st.name,
                    if st.status == Status::Running {
                        "running"
                    } else {
                        "restarting"
                    }
                )));
            }
            st = stop_container(&containers, &st, libc::SIGKILL, Duration::ZERO)?;
        }
        if let Some(s) = st.supervisor.filter(|s| s.alive()) {
            // A supervisor that outlived its container (it should have left): end it.
            let _ = nix::sys::signal::kill(Pid::from_raw(s.pid), NixSignal::SIGKILL);
            wait_until(Duration::from_secs(5), || !s.alive());
        }
        remove_container(&store, &containers, &st)?;
        if out.json {
            out.json_value(&json!({ "removed": st.id }))?;
        } else {
            out.line(&st.name)?;
        }
    }
    Ok(())
}

/// Parses `--since`: an RFC 3339 time or a duration back from now.
pub(super) fn parse_since(s: &str) -> Result<jiff::Timestamp, CliError> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let d: crate::manifest::values::Duration = s.parse().map_err(|e: String| {
        CliError::invalid(miette!(
            help = "a time like 2026-11-29T10:00:00Z, or a duration like 10m",
            "--since {s}: {e}"
        ))
    })?;
    let back = jiff::SignedDuration::try_from(d.0)
        .map_err(|e| CliError::invalid(miette!("--since {s}: {e}")))?;
    Ok(jiff::Timestamp::now() - back)
}

/// `berth logs [-f] [--tail N] [--since T] [-t] NAME`: stdout lines to stdout, stderr lines
/// to stderr.
pub fn logs(g: &GlobalOpts, args: &LogsArgs, out: &mut Output) -> Result<(), CliError> {
    use std::io::Write;
    let (_, containers) = open(g)?;
    let st = get(&containers, args.container.as_deref().unwrap_or_default())?;
    let dir = containers.dir(&st.id);
    let filter = logs::Filter {
        tail: args.tail,
        since: args.since.as_deref().map(parse_since).transpose()?,
    };
    let (records, end) = logs::read(&dir, &filter)
        .map_err(|e| CliError::failed(miette!("cannot read the log of {}: {e}", st.name)))?;
    let timestamps = args.timestamps;
    let json = out.json;
    // One document: the records so far; following, one object per line (JSON Lines).
    if json && !args.follow {
        return Ok(out.json_value(&records)?);
    }
    if json {
        out.streamed();
    }
    let mut print = |r: &logs::LogRecord| -> std::io::Result<()> {
        if json {
            let mut o = std::io::stdout().lock();
            serde_json::to_writer(&mut o, r)?;
            return writeln!(o);
        }
        let text = if timestamps {
            format!("{} {}", r.time, r.log)
        } else {
            r.log.clone()
        };
        if r.stream == "stderr" {
            std::io::stderr().lock().write_all(text.as_bytes())
        } else {
            let mut o = std::io::stdout().lock();
            o.write_all(text.as_bytes())?;
            o.flush()
        }
    };
    for r in &records {
        print(r)?;
    }
    if args.follow {
        let id = st.id.clone();
        logs::follow(&dir, end, &mut print, &|| {
            containers.get(&id).map_or(true, |s| {
                !matches!(s.status, Status::Running | Status::Restarting)
            })
        })
        .map_err(|e| CliError::failed(miette!("cannot follow the log of {}: {e}", st.name)))?;
    }
    Ok(())
}

/// `berth exec [-i] [-t] [-e K=V] [-u USER] [-w DIR] NAME CMD...`.
/// `exec`'s `-e` and `--env` values: the environment to run in (an `--env` value without
/// `=`), and the variables. Nothing is silently taken for the other.
pub fn exec_target(
    g: &GlobalOpts,
    args: &ExecArgs,
) -> Result<(Option<String>, Vec<String>), CliError> {
    let mut vars = Vec::new();
    for v in &args.vars {
        if !v.contains('=') {
            return Err(CliError::invalid(miette!(
                help = "-e sets a variable; to run in an environment's replica: `berth exec --env ENV SERVICE -- CMD`",
                "`-e {v}` is not K=V"
            )));
        }
        vars.push(v.clone());
    }
    let mut target: Option<String> = None;
    for v in &args.env {
        if v.contains('=') {
            vars.push(v.clone());
            continue;
        }
        let known = crate::manifest::Project::load(&g.project_dir())
            .map(|p| p.environments())
            .unwrap_or_default();
        if !known.iter().any(|k| k == v) {
            return Err(CliError::invalid(miette!(
                help = format!(
                    "--env takes an environment ({}) or a variable K=V",
                    if known.is_empty() {
                        "this directory has none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
                "`--env {v}` is neither an environment of this project nor K=V"
            )));
        }
        if let Some(t) = &target {
            return Err(CliError::invalid(miette!(
                "two environments: --env {t} and --env {v}"
            )));
        }
        target = Some(v.clone());
    }
    if target.is_none() && (args.host.is_some() || args.replica.is_some()) {
        return Err(CliError::invalid(miette!(
            "--host and --replica pick a replica of an environment: give --env ENV"
        )));
    }
    Ok((target, vars))
}

pub fn exec_cmd(g: &GlobalOpts, args: &ExecArgs, out: &mut Output) -> Result<(), CliError> {
    if out.json {
        return Err(super::no_json("`exec` (its output is the command's)"));
    }
    let (target, vars) = exec_target(g, args)?;
    if let Some(env) = target {
        return super::status::env_exec(g, &env, args, vars);
    }
    let (_, containers) = open(g)?;
    let st = get(&containers, &args.container)?;
    let Some(p) = st.process().filter(|p| p.alive()) else {
        return Err(CliError::failed(miette!(
            "container {} is not running",
            st.name
        )));
    };
    let spec = containers.spec(&st.id).map_err(failed)?;
    let mut env = crate::runtime::instance::process_env(&spec)
        .map_err(|e| CliError::failed(miette::Report::from_err(e)))?;
    for kv in &vars {
        let Some((k, _)) = kv.split_once('=') else {
            return Err(CliError::invalid(miette!("`{kv}` is not K=V")));
        };
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k));
        env.push(kv.clone());
    }
    let pty = if args.tty {
        Some(super::tty::Pty::open().map_err(|e| {
            CliError::failed(miette!("cannot open a terminal for the process: {e}"))
        })?)
    } else {
        None
    };
    let process = Process {
        args: args.command.clone(),
        env,
        cwd: args.workdir.clone().unwrap_or_else(|| spec.cwd.clone()),
        user: args.user.clone().unwrap_or_else(|| spec.user.clone()),
        capabilities: spec.capabilities.clone(),
        stdout_to_stderr: false,
        stdin: args.interactive,
        tty: pty
            .as_ref()
            .map(|p| std::os::fd::AsRawFd::as_raw_fd(&p.slave)),
        stdio: None,
    };
    let started = match exec::exec(p.pid, &cgroup::Cgroup::of(&st.id), &process) {
        Ok(s) => s,
        Err(LaunchError::Container { message, code }) => {
            crate::say!("berth: {message}");
            return Err(CliError {
                kind: ExitKind::Code(code as u8),
                report: None,
            });
        }
        Err(e) => return Err(failed(e)),
    };
    let attached = super::tty::Attached::new(pty, args.interactive)
        .map_err(|e| CliError::failed(miette!("cannot attach the terminal: {e}")))?;
    let code = started
        .wait_with_tty(attached.master())
        .map_err(|e| CliError::failed(miette!("waiting for the process failed: {e}")))?;
    attached.finish();
    if code == 0 {
        Ok(())
    } else {
        Err(CliError {
            kind: ExitKind::Code(code as u8),
            report: None,
        })
    }
}

/// A container's record, spec and files as JSON, if `reference` names a container.
pub fn inspect_container(
    g: &GlobalOpts,
    reference: &str,
) -> Result<Option<serde_json::Value>, CliError> {
    let (_, containers) = open(g)?;
    let Ok(st) = containers.get(reference) else {
        return Ok(None);
    };
    let spec = containers.spec(&st.id).ok();
    let dir = containers.dir(&st.id);
    Ok(Some(json!({
        "Id": st.id,
        "Name": st.name,
        "Image": st.image,
        "ImageDigest": st.image_digest,
        "State": st,
        "StatusText": status_text(&st),
        "Config": spec,
        "LogPath": logs::log_path(&dir),
        "Dir": dir,
    })))
}
