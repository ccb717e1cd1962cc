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
    /// The environment.
    #[arg(long)]
    pub env: String,
    /// Record in the ledger how releases that were left without an end (berth killed,
    /// the ledger unwritable) ended, from what the hosts run.
    #[arg(long)]
    pub reconcile: bool,
}

/// `berth status --env E [--reconcile]`: what every host runs, compared with the ledger;
/// exit 1 when they disagree, a host does not answer or a replica is down.
pub fn status(g: &GlobalOpts, args: &StatusArgs, out: &mut Output) -> Result<(), CliError> {
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (env, _store) = open(g, &args.env, &rt, &shown)?;
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
                        out.line(format!("    {name}: {}/{} running", c.running, c.total))?;
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
    /// Only the last N lines of each replica.
    pub tail: Option<usize>,
    /// Keep printing new lines.
    pub follow: bool,
    /// Only lines since a time (RFC 3339) or for a duration back (10m, 1h30m).
    pub since: Option<String>,
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
    let (env, _store) = open(g, env_name, &rt, &shown)?;
    let deployment = env.deployment();
    let service = args.service.as_deref().map(str::parse).transpose()?;
    if args.follow && out.json {
        return Err(CliError::invalid(miette!(
            "--follow and --json do not go together: --json writes one document"
        )));
    }
    // One round: every host's lines (the last `tail`, or those since `since`), by time.
    let round =
        |tail: Option<usize>, since: Option<jiff::Timestamp>| -> Result<Vec<EnvLine>, CliError> {
            let q = LogsQuery {
                deployment: deployment.clone(),
                service: service.clone(),
                tail,
                since: since.map(|t| t.to_string()),
            };
            let mut lines = Vec::new();
            for h in &env.hosts {
                let got = h.logs(&q)?;
                let host = h.name().split("://").nth(1).unwrap_or(h.name()).to_string();
                lines.extend(got.into_iter().map(|l| EnvLine {
                    time: l.time,
                    host: host.clone(),
                    replica: l.replica,
                    log: l.log,
                }));
            }
            lines.sort();
            Ok(lines)
        };
    let since = args
        .since
        .as_deref()
        .map(super::containers::parse_since)
        .transpose()?;
    let first = round(args.tail, since)?;
    if out.json {
        return Ok(out.json_value(&first)?);
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
        return Ok(());
    }
    // Follow: ask again every half second for what came since the newest line printed
    // (lines of that same instant already printed are not printed twice).
    let mut last = first.last().map(|l| l.time.clone());
    let mut seen: Vec<EnvLine> = first
        .iter()
        .filter(|l| Some(&l.time) == last.as_ref())
        .cloned()
        .collect();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let since = last.as_deref().and_then(|t| t.parse().ok()).or(since);
        let fresh: Vec<EnvLine> = round(None, since)?
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
