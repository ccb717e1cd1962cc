//! The commands that look at an environment — `status` (what every host runs, compared
//! with the ledger; `--reconcile` records what was left unrecorded), `releases`, and
//! `logs --env` — as argument structs and printing.

use std::sync::Arc;

use miette::miette;
use serde::Serialize;

use super::pipeline::{Shown, open, runtime};
use super::{CliError, GlobalOpts, Output};
use crate::deploy::api::LogsQuery;
use crate::promote::ledger::Release;

/// Arguments of `berth status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The environment (without: every environment, a line each).
    #[arg(long)]
    pub env: Option<String>,
    /// Record in the ledger how releases that were left without an end (berth killed,
    /// the ledger unwritable) ended, from what the hosts run.
    #[arg(long)]
    pub reconcile: bool,
}

/// `berth status`: every environment of the project at a glance (release, digest,
/// revision, age, replicas healthy/total per service); exit 1 when one is degraded.
fn status_all(g: &GlobalOpts, out: &mut Output) -> Result<(), CliError> {
    let project = crate::manifest::Project::load(&g.project_dir())?;
    let names = project.environments();
    if names.is_empty() {
        return Err(CliError::invalid(miette!(
            help = "add environments/<name>.toml, or name one with --env",
            "this project has no environments"
        )));
    }
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let mut views = Vec::new();
    for name in &names {
        let (env, _store) = open(g, name, &rt, &shown)?;
        let (history, ledger_problem) = match env.history() {
            Ok(h) => (h, None),
            Err(e) => (Vec::new(), Some(format!("the ledger cannot be read: {e}"))),
        };
        let mut v = env.status(&history);
        if let Some(p) = ledger_problem {
            v.problems.insert(0, p);
            v.state = "degraded";
        }
        views.push(v);
    }
    let degraded: Vec<&str> = views
        .iter()
        .filter(|v| v.state == "degraded")
        .map(|v| v.environment.as_str())
        .collect();
    if out.json {
        out.json_value(&views)?;
    } else {
        out.line(format!(
            "{:<12} {:<8} {:<14} {:<12} {:<10} {:<9} SERVICES",
            "ENVIRONMENT", "RELEASE", "DIGEST", "REVISION", "AGE", "STATE"
        ))?;
        for v in &views {
            let l = v.ledger.as_ref();
            let release = l.map_or("-".to_string(), |l| l["release"].to_string());
            let digest = l
                .and_then(|l| l["digest"].as_str())
                .and_then(|d| d.strip_prefix("sha256:"))
                .map_or("-".to_string(), |d| d[..12].to_string());
            let revision = l
                .and_then(|l| l["revision"].as_str())
                .map_or("-".to_string(), |r| r.chars().take(12).collect());
            let age = l
                .and_then(|l| l["time"].as_str())
                .map_or("-".to_string(), uptime);
            out.line(format!(
                "{:<12} {:<8} {:<14} {:<12} {:<10} {:<9} {}",
                v.environment,
                release,
                digest,
                revision,
                age,
                v.state,
                services_summary(v)
            ))?;
        }
        for v in &views {
            for p in &v.problems {
                out.line(format!("  {}: {p}", v.environment))?;
            }
        }
    }
    if degraded.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(miette!(
            help = "`berth status --env E` shows the hosts and replicas of one",
            "degraded: {}",
            degraded.join(", ")
        )))
    }
}

/// `web 2/2, worker 1/1` over every host: replicas healthy of wanted.
fn services_summary(v: &crate::promote::release::StatusView) -> String {
    let mut totals: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for h in &v.hosts {
        for (name, c) in &h.services {
            let t = totals.entry(name.as_str()).or_default();
            t.0 += c.healthy.min(c.running);
            t.1 += c.total;
        }
    }
    if totals.is_empty() {
        return "-".into();
    }
    totals
        .iter()
        .map(|(n, (h, t))| format!("{n} {h}/{t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `berth status [--env E] [--reconcile]`: what every host runs, compared with the ledger;
/// exit 1 when they disagree, a host does not answer or a replica is down or unhealthy.
pub fn status(g: &GlobalOpts, args: &StatusArgs, out: &mut Output) -> Result<(), CliError> {
    let Some(name) = &args.env else {
        if args.reconcile {
            return Err(CliError::invalid(miette!(
                "--reconcile needs --env: it records one environment's releases"
            )));
        }
        return status_all(g, out);
    };
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (env, _store) = open(g, name, &rt, &shown)?;
    // A ledger that cannot be read is a problem to show, not a reason to hide the hosts.
    let (mut history, ledger_problem) = match env.history() {
        Ok(h) => (h, None),
        Err(e) => (Vec::new(), Some(format!("the ledger cannot be read: {e}"))),
    };
    if args.reconcile && ledger_problem.is_none() {
        for line in env.reconcile(&history) {
            shown.line(&line);
        }
        history = env.history()?;
    }
    let mut v = env.status(&history);
    if let Some(p) = ledger_problem {
        v.problems.insert(0, p);
        v.state = "degraded";
    }
    if out.json {
        out.json_value(&v)?;
    } else {
        match &v.ledger {
            Some(l) => out.line(format!(
                "{}: release {} ({}) is {}",
                v.deployment,
                l["release"],
                l["digest"]
                    .as_str()
                    .and_then(|d| d.strip_prefix("sha256:"))
                    .map_or("?", |d| &d[..12]),
                v.state
            ))?,
            None => out.line(format!("{}: {}", v.deployment, v.state))?,
        }
        for h in &v.hosts {
            match (&h.error, h.release) {
                (Some(e), _) => out.line(format!("  {}: unreachable: {e}", h.host))?,
                (None, None) => out.line(format!("  {}: nothing deployed", h.host))?,
                (None, Some(n)) => {
                    out.line(format!(
                        "  {}: release {n} ({}), up {}",
                        h.host,
                        h.digest.as_ref().map_or("?", |d| d.short()),
                        uptime(h.since.as_deref().unwrap_or_default())
                    ))?;
                    for (name, c) in &h.services {
                        let per_host = if v.hosts.len() > 1 {
                            format!(" ({} per host × {} hosts)", c.total, v.hosts.len())
                        } else {
                            String::new()
                        };
                        out.line(format!(
                            "    {name}: {}/{} running, {} healthy{per_host}",
                            c.running, c.total, c.healthy
                        ))?;
                        for r in h.replicas.iter().filter(|r| &r.service == name) {
                            out.line(format!("      {}", replica_line(r)))?;
                        }
                    }
                }
            }
        }
        for p in &v.problems {
            out.line(format!("  problem: {p}"))?;
        }
    }
    if v.problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(miette!(
            "{} is not as the ledger says ({} problem(s))",
            v.deployment,
            v.problems.len()
        )))
    }
}

/// One replica for people: `web.2  running  unhealthy (GET / answered 404)  1 restart
/// (last exit 137, OOM)`.
pub(super) fn replica_line(r: &crate::deploy::local::ReplicaView) -> String {
    let health = match (&r.health, &r.health_error) {
        (Some(h), Some(e)) => format!("{h} ({e})"),
        (Some(h), None) => h.to_string(),
        (None, _) => "-".into(),
    };
    let restarts = match r.restarts {
        0 => String::new(),
        n => format!(
            "{n} restart{}{}",
            if n == 1 { "" } else { "s" },
            match (r.last_exit, r.oom_killed) {
                (Some(c), true) => format!(" (last exit {c}, OOM)"),
                (Some(c), false) => format!(" (last exit {c})"),
                (None, _) => String::new(),
            }
        ),
    };
    format!(
        "{:<14} {:<10} {:<12} {restarts}",
        format!("{}.{}", r.service, r.replica),
        r.status,
        health
    )
    .trim_end()
    .to_string()
}

/// An RFC 3339 time to the second, for people (records keep full precision).
pub(super) fn to_the_second(t: &str) -> String {
    t.split_once('.')
        .map_or(t.to_string(), |(s, _)| format!("{s}Z"))
}

/// How long since an RFC 3339 time, as `1h2m3s`.
fn uptime(since: &str) -> String {
    since
        .parse::<jiff::Timestamp>()
        .map(|t| {
            let secs = jiff::Timestamp::now().as_second() - t.as_second();
            crate::promote::human(std::time::Duration::from_secs(secs.max(0) as u64))
        })
        .unwrap_or_else(|_| "?".into())
}

/// Arguments of `berth releases`.
#[derive(Debug, clap::Args)]
pub struct ReleasesArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
}

/// `berth releases --env E`: the environment's ledger, newest first (text and JSON).
pub fn releases(g: &GlobalOpts, args: &ReleasesArgs, out: &mut Output) -> Result<(), CliError> {
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (env, _store) = open(g, &args.env, &rt, &shown)?;
    let mut hist = env.history()?;
    hist.reverse();
    if out.json {
        return Ok(out.json_value(&hist)?);
    }
    if hist.is_empty() {
        out.line(format!("{}: no releases", env.deployment()))?;
        return Ok(());
    }
    out.line(format!(
        "{:<8} {:<9} {:<12} {:<14} {:<21} {:<20} {:<8} REVISION",
        "RELEASE", "KIND", "OUTCOME", "DIGEST", "TIME", "ACTOR", "FROM"
    ))?;
    for r in &hist {
        out.line(format!(
            "{:<8} {:<9} {:<12} {:<14} {:<21} {:<20} {:<8} {}",
            r.number,
            r.kind.to_string(),
            r.outcome.to_string(),
            r.digest.short(),
            to_the_second(&r.time),
            r.actor,
            r.source.as_deref().unwrap_or("-"),
            r.revision.as_deref().unwrap_or("-")
        ))?;
        if let Some(e) = &r.error {
            out.line(format!(
                "         error: {}",
                e.lines().next().unwrap_or("")
            ))?;
        }
        if !r.forced.is_empty() {
            out.line(format!(
                "         forced past {}: {}",
                r.forced.join(", "),
                r.reason.as_deref().unwrap_or("")
            ))?;
        }
    }
    Ok(())
}

/// What `berth logs --env E` was asked for (its flags are `berth logs`'s).
#[derive(Debug)]
pub struct EnvLogsArgs {
    /// Only this service.
    pub service: Option<String>,
    /// Only its replica N (1-based) on each host.
    pub replica: Option<usize>,
    /// Only these hosts (a name or address each `hosts` entry contains).
    pub host: Option<String>,
    /// Only the last N lines of each replica.
    pub tail: Option<usize>,
    /// Keep printing new lines.
    pub follow: bool,
    /// Only lines since a time (RFC 3339) or for a duration back (10m, 1h30m).
    pub since: Option<String>,
}

/// `berth ps --env E [--host H]`: every replica of the live release on every host (or
/// those `--host` picks), as the hosts report them; exit 1 if a host does not answer.
pub fn env_ps(
    g: &GlobalOpts,
    env_name: &str,
    host: Option<&str>,
    out: &mut Output,
) -> Result<(), CliError> {
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (env, _store) = open(g, env_name, &rt, &shown)?;
    let deployment = env.deployment();
    let mut rows = Vec::new();
    let mut unreachable = Vec::new();
    for h in pick_hosts(&env, host)? {
        match h.status(&deployment) {
            Ok(s) => rows.extend(
                s.replicas
                    .into_iter()
                    .map(|r| (h.name().to_string(), s.release, r)),
            ),
            Err(e) => unreachable.push(e.to_string()),
        }
    }
    if out.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(host, release, r)| {
                let mut v = serde_json::to_value(r).expect("a replica serialises");
                v["host"] = serde_json::json!(host);
                v["release"] = serde_json::json!(release);
                v
            })
            .collect();
        out.json_value(&v)?;
    } else {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|(host, release, r)| {
                vec![
                    host.split("://").nth(1).unwrap_or(host).to_string(),
                    format!("{}.{}", r.service, r.replica),
                    release.map_or("-".into(), |n| n.to_string()),
                    r.name.clone(),
                    r.status.clone(),
                    r.health.map_or("-".into(), |h| h.to_string()),
                    r.restarts.to_string(),
                    match (r.last_exit, r.oom_killed) {
                        (Some(c), true) => format!("{c} (OOM)"),
                        (Some(c), false) => c.to_string(),
                        (None, _) => "-".into(),
                    },
                ]
            })
            .collect();
        let header = [
            "HOST",
            "REPLICA",
            "RELEASE",
            "CONTAINER",
            "STATUS",
            "HEALTH",
            "RESTARTS",
            "LAST EXIT",
        ];
        for l in super::table::lines(&header, &table) {
            out.line(l)?;
        }
    }
    if unreachable.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(miette!(
            "{} host(s) did not answer: {}",
            unreachable.len(),
            unreachable.join("; ")
        )))
    }
}

/// `berth exec --env E SERVICE [--host H] [--replica N] [-it] -- CMD`: the command in one
/// replica of the live release, on its host (through its agent), with this terminal.
pub fn env_exec(
    g: &GlobalOpts,
    env_name: &str,
    args: &super::containers::ExecArgs,
    vars: Vec<String>,
) -> Result<(), CliError> {
    let rt = runtime()?;
    let sink = Output::stderr(true);
    let shown = Arc::new(Shown::new(&sink));
    let (env, _store) = open(g, env_name, &rt, &shown)?;
    let host = pick_hosts(&env, args.host.as_deref())?[0];
    let service = args
        .container
        .parse()
        .map_err(|e| CliError::invalid(miette!("{e}")))?;
    let size = if args.tty {
        super::tty::window_size(&std::io::stdin()).map(|w| (w.ws_row, w.ws_col))
    } else {
        None
    };
    let request = crate::deploy::api::ExecRequest {
        deployment: env.deployment(),
        service,
        replica: args.replica,
        command: args.command.clone(),
        tty: args.tty,
        interactive: args.interactive,
        env: vars,
        user: args.user.clone(),
        workdir: args.workdir.clone(),
        size,
    };
    request
        .validate()
        .map_err(|e| CliError::invalid(miette!("{e}")))?;
    let stream = host
        .exec(&request, rt.handle())
        .map_err(|e| CliError::failed(miette!("{e}")))?;
    let raw = (args.tty && args.interactive).then(super::tty::RawMode::enter);
    let ended = rt.block_on(remote_exec(stream, args.tty, args.interactive));
    drop(raw);
    match ended {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(code)) => Err(CliError {
            kind: super::ExitKind::Code(code as u8),
            report: None,
        }),
        Ok(Err(message)) => Err(CliError::failed(miette!("{}: {message}", host.name()))),
        Err(e) => Err(CliError::failed(miette!(
            "{}: the exec stream broke: {e}",
            host.name()
        ))),
    }
}

/// Bridges this process's stdio (and window size) to a replica's command until it exits;
/// its exit code, or what the host said instead.
async fn remote_exec(
    stream: crate::deploy::host::ExecStream,
    tty: bool,
    interactive: bool,
) -> std::io::Result<Result<i32, String>> {
    use crate::deploy::frames::{self, Frame};
    use std::io::Write;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(16);
    if interactive {
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 8192];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(Frame::StdinClosed);
                        break;
                    }
                    Ok(n) => {
                        if tx.blocking_send(Frame::Stdin(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    if tty {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(w) = super::tty::window_size(&std::io::stdin())
                    && tx.send(Frame::Resize(w.ws_row, w.ws_col)).await.is_err()
                {
                    break;
                }
            }
        });
    }
    drop(tx);
    // The write half stays open until the end: the host takes its close for the client
    // going away.
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if frames::write(&mut wr, &f).await.is_err() {
                break;
            }
        }
        wr
    });
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let ended = loop {
        match frames::read(&mut rd).await? {
            Some(Frame::Stdout(b)) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Some(Frame::Stderr(b)) => {
                err.write_all(&b)?;
                err.flush()?;
            }
            Some(Frame::Exit(code)) => break Ok(code),
            Some(Frame::Error(m)) => break Err(m),
            Some(_) => {}
            None => {
                return Err(std::io::Error::other(
                    "the host closed the stream before the command ended",
                ));
            }
        }
    };
    writer.abort();
    Ok(ended)
}

/// The environment's hosts whose name (`local`, an agent's URL) contains `filter`; all
/// without one. None matching is bad input, naming the hosts there are.
pub(super) fn pick_hosts<'a>(
    env: &'a crate::promote::release::Environment,
    filter: Option<&str>,
) -> Result<Vec<&'a dyn crate::deploy::host::Host>, CliError> {
    let all: Vec<&dyn crate::deploy::host::Host> = env.hosts.iter().map(|h| h.as_ref()).collect();
    let Some(f) = filter else {
        return Ok(all);
    };
    let picked: Vec<_> = all
        .iter()
        .copied()
        .filter(|h| h.name().contains(f))
        .collect();
    if picked.is_empty() {
        return Err(CliError::invalid(miette!(
            help = format!(
                "its hosts: {}",
                all.iter().map(|h| h.name()).collect::<Vec<_>>().join(", ")
            ),
            "no host of {} matches `{f}`",
            env.deployment()
        )));
    }
    Ok(picked)
}

/// A line of an environment's logs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
struct EnvLine {
    time: String,
    host: String,
    replica: String,
    log: String,
}

/// `berth logs --env E [SERVICE]`: the live replicas' logs on every host, merged by time
/// and prefixed by host and replica (with `--json`, one document: the lines).
pub fn env_logs(
    g: &GlobalOpts,
    env_name: &str,
    args: &EnvLogsArgs,
    out: &mut Output,
) -> Result<(), CliError> {
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (env, store) = open(g, env_name, &rt, &shown)?;
    let deployment = env.deployment();
    // Replicas per host as the live release has them (a `scale` may have changed them).
    let live = history(&store, &env.config, &rt)
        .ok()
        .and_then(|h| crate::promote::ledger::current(&h).and_then(|r| r.plan.clone()));
    // A service or replica the environment does not have is an error, not silence.
    if let Some(name) = args.service.as_deref() {
        let services = &env.config.services;
        match services.get(name) {
            None => {
                let near = services
                    .keys()
                    .min_by_key(|k| strsim::levenshtein(k, name))
                    .filter(|k| strsim::levenshtein(k, name) <= 2);
                return Err(CliError::invalid(miette!(
                    "no service `{name}` in {env_name} ({}it has: {})",
                    near.map(|n| format!("did you mean `{n}`? "))
                        .unwrap_or_default(),
                    services.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            Some(svc) => {
                let count = live
                    .as_ref()
                    .and_then(|p| p.services.iter().find(|s| s.name == name))
                    .map_or(svc.replicas, |s| s.replicas);
                if let Some(n) = args.replica
                    && (n == 0 || n > count as usize)
                {
                    return Err(CliError::invalid(miette!(
                        "{name} has replicas 1 to {count} on each host; there is no replica {n}"
                    )));
                }
            }
        }
    } else if args.replica.is_some() {
        return Err(CliError::invalid(miette!(
            "--replica needs a service: berth logs --env {env_name} SERVICE --replica N"
        )));
    }
    let service = args.service.as_deref().map(str::parse).transpose()?;
    if args.follow && out.json {
        return Err(CliError::invalid(miette!(
            "--follow and --json do not go together: --json writes one document"
        )));
    }
    // One round: every host's lines (the last `tail`, or those since `since`), by time.
    let round = |tail: Option<usize>,
                 since: Option<jiff::Timestamp>|
     -> Result<(Vec<EnvLine>, Vec<String>), CliError> {
        let q = LogsQuery {
            deployment: deployment.clone(),
            service: service.clone(),
            replica: args.replica,
            tail,
            since: since.map(|t| t.to_string()),
        };
        let mut lines = Vec::new();
        // A host that does not answer does not hide the others' lines.
        let mut failed = Vec::new();
        for h in pick_hosts(&env, args.host.as_deref())? {
            let got = match h.logs(&q) {
                Ok(got) => got,
                Err(e) => {
                    failed.push(format!("{}: {e}", h.name()));
                    continue;
                }
            };
            let host = h.name().split("://").nth(1).unwrap_or(h.name()).to_string();
            lines.extend(got.into_iter().map(|l| EnvLine {
                time: l.time,
                host: host.clone(),
                replica: l.replica,
                log: l.log,
            }));
        }
        lines.sort();
        Ok((lines, failed))
    };
    let since = args
        .since
        .as_deref()
        .map(super::containers::parse_since)
        .transpose()?;
    let (first, failed) = round(args.tail, since)?;
    let failure = |failed: &[String]| {
        CliError::failed(miette!(
            "no logs from {} host(s): {}",
            failed.len(),
            failed.join("; ")
        ))
    };
    if out.json {
        out.json_value(&first)?;
        return if failed.is_empty() {
            Ok(())
        } else {
            Err(failure(&failed))
        };
    }
    let mut print = |lines: &[EnvLine]| -> Result<(), CliError> {
        for l in lines {
            out.text(&format!("{} {} | {}", l.host, l.replica, l.log))?;
            if !l.log.ends_with('\n') {
                out.text("\n")?;
            }
        }
        Ok(())
    };
    print(&first)?;
    if !args.follow {
        return if failed.is_empty() {
            Ok(())
        } else {
            Err(failure(&failed))
        };
    }
    for f in &failed {
        crate::say!("berth: no logs from {f} (following the others)");
    }
    // Follow: ask again every half second for what came since the newest line printed
    // (lines of that same instant already printed are not printed twice).
    let mut last = first.last().map(|l| l.time.clone());
    // Nothing shown yet (`-n 0`, or no output): follow from now, not from the beginning.
    let since = since.or_else(|| first.is_empty().then(jiff::Timestamp::now));
    let mut seen: Vec<EnvLine> = first
        .iter()
        .filter(|l| Some(&l.time) == last.as_ref())
        .cloned()
        .collect();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let since = last.as_deref().and_then(|t| t.parse().ok()).or(since);
        let fresh: Vec<EnvLine> = round(None, since)?
            .0
            .into_iter()
            .filter(|l| match &last {
                Some(lt) => l.time > *lt || (l.time == *lt && !seen.contains(l)),
                None => true,
            })
            .collect();
        if let Some(l) = fresh.last() {
            if Some(&l.time) != last.as_ref() {
                seen.clear();
            }
            last = Some(l.time.clone());
            seen.extend(
                fresh
                    .iter()
                    .filter(|x| Some(&x.time) == last.as_ref())
                    .cloned(),
            );
        }
        print(&fresh)?;
    }
}

/// The environment's ledger, oldest first (for `diff`).
pub(super) fn history(
    store: &crate::store::Store,
    config: &crate::manifest::AppConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<Vec<Release>, CliError> {
    let ledger = crate::promote::ledger::Ledger::open(store, config)?;
    Ok(rt.block_on(ledger.history())?)
}
