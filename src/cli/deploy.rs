//! The pipeline commands on an environment's hosts — `deploy`, `status`, `down`,
//! `rollback`, `releases`, `scale`, `logs --env` — for this machine (`hosts = ["local"]`)
//! and, through [`super::agents`], for agents; and the release ledger's records of them.

use miette::miette;
use serde_json::json;

use super::agents::{HostAnswer, agent_urls, apply_remote, each_agent, is_remote, scale_remote};
use super::{CliError, GlobalOpts, Output};
use crate::deploy::health::{Check, Probe};
use crate::deploy::{DeployError, ReleasePlan, RolloutPlan, ServicePlan, local};
use crate::manifest::schema::{AppConfig, CommandLine};
use crate::manifest::values::{HostUrl, Protocol, RestartPolicy, VolumeSource};
use crate::manifest::{Project, schema};
use crate::promote::ledger::{Kind, Ledger, LedgerError, Release, Verdict};
use crate::runtime::spec::{MountSpec, PortSpec, Proto, Resources, Restart};
use crate::store::Store;

/// Arguments of `berth deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
    /// Deploy this image (tag or digest) instead of building.
    #[arg(long)]
    pub image: Option<String>,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// When a host fails, leave the hosts already updated on the new release.
    #[arg(long)]
    pub no_rollback: bool,
}

/// Arguments of `berth status` and `berth down`.
#[derive(Debug, clap::Args)]
pub struct EnvArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
}

/// `app-environment`: a deployment's name on hosts (network, state, replicas' prefix).
pub(super) fn deployment_name(config: &AppConfig) -> String {
    format!("{}-{}", config.app.name, config.environment)
}

fn argv(c: &CommandLine) -> Vec<String> {
    match c {
        CommandLine::Exec(v) => v.clone(),
        CommandLine::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
    }
}

fn service_plan(config: &AppConfig, name: &str, svc: &schema::Service) -> ServicePlan {
    let mut env: Vec<String> = config
        .env
        .iter()
        .chain(svc.env.iter())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.dedup_by(|a, b| a.split_once('=').map(|x| x.0) == b.split_once('=').map(|x| x.0));
    ServicePlan {
        name: name.to_string(),
        replicas: svc.replicas,
        entrypoint: svc.entrypoint.as_ref().map(argv),
        command: svc.command.as_ref().map(argv),
        env,
        ports: svc
            .ports
            .iter()
            .map(|p| PortSpec {
                host_ip: p
                    .host_ip
                    .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                host_port: p.published,
                container_port: p.container,
                proto: match p.protocol {
                    Protocol::Tcp => Proto::Tcp,
                    Protocol::Udp => Proto::Udp,
                },
            })
            .collect(),
        mounts: svc
            .volumes
            .iter()
            .map(|v| match &v.source {
                VolumeSource::Named(n) => MountSpec::Volume {
                    name: format!("{}-{}-{n}", config.app.name, config.environment),
                    target: v.target.clone(),
                    read_only: v.read_only,
                },
                VolumeSource::Bind(p) => MountSpec::Bind {
                    source: p.into(),
                    target: v.target.clone(),
                    read_only: v.read_only,
                },
            })
            .collect(),
        health: svc.health.as_ref().map(|h| Check {
            probe: match &h.probe {
                schema::Probe::Http { path, port } => Probe::Http {
                    path: path.clone(),
                    port: *port,
                },
                schema::Probe::Tcp { port } => Probe::Tcp { port: *port },
                schema::Probe::Exec { command } => Probe::Exec {
                    command: argv(command),
                },
            },
            interval: h.interval.0,
            timeout: h.timeout.0,
            retries: h.retries,
            start_period: h.start_period.0,
        }),
        resources: Resources {
            memory: svc.resources.memory.map(|m| m.0),
            cpu_millis: svc.resources.cpus.map(|c| c.millis),
            pids: svc.resources.pids,
        },
        restart: match svc.restart {
            RestartPolicy::No => Restart::No,
            RestartPolicy::OnFailure { max_retries } => Restart::OnFailure { max_retries },
            RestartPolicy::Always => Restart::Always,
            RestartPolicy::UnlessStopped => Restart::UnlessStopped,
        },
        stop_signal: svc.stop_signal.map(|s| s.0),
        stop_timeout: svc.stop_timeout.0,
    }
}

fn deploy_error(e: DeployError) -> CliError {
    let help = match &e {
        DeployError::Unhealthy { .. } => Some("the previous release is still serving"),
        DeployError::Locked { .. } => Some("wait for it to finish"),
        _ => None,
    };
    CliError::failed(match help {
        Some(h) => miette!(help = h, "{e}"),
        None => miette!("{e}"),
    })
}

fn local_only(config: &AppConfig) -> Result<(), CliError> {
    if config.hosts.iter().all(|h| matches!(h, HostUrl::Local)) && !config.hosts.is_empty() {
        return Ok(());
    }
    Err(CliError::failed(miette!(
        help = "use hosts = [\"local\"] for this machine; deploying through berth agents is not built yet",
        "environment {} mixes this machine and agents, or names remote hosts where only local ones are supported",
        config.environment
    )))
}

/// The plan of `digest` for `config`'s environment.
pub(super) fn release_plan(
    config: &AppConfig,
    digest: &crate::store::Digest,
    revision: Option<String>,
) -> ReleasePlan {
    ReleasePlan {
        app: config.app.name.clone(),
        environment: config.environment.clone(),
        digest: digest.clone(),
        revision,
        services: config
            .services
            .iter()
            .map(|(n, s)| service_plan(config, n, s))
            .collect(),
        rollout: RolloutPlan {
            drain: config.rollout.drain.0,
            timeout: config.rollout.timeout.0,
            keep: config.rollout.keep,
        },
    }
}

/// Prints a plan's hosts and services (for `--dry-run`).
pub(super) fn print_plan(
    config: &AppConfig,
    plan: &ReleasePlan,
    out: &mut Output,
) -> Result<(), CliError> {
    let where_to = if is_remote(config) {
        agent_urls(config).join(", ")
    } else {
        "this machine".to_string()
    };
    out.line(format!("  hosts: {where_to}"))?;
    for s in &plan.services {
        let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
        out.line(format!(
            "  {}: {} replica(s){}{}",
            s.name,
            s.replicas,
            if ports.is_empty() {
                String::new()
            } else {
                format!(", ports {}", ports.join(", "))
            },
            if s.health.is_some() {
                ", health-checked"
            } else {
                ""
            }
        ))?;
    }
    Ok(())
}

/// The hosts of an environment, as the ledger names them.
pub(super) fn host_names(config: &AppConfig) -> Vec<String> {
    if is_remote(config) {
        agent_urls(config)
    } else {
        vec!["local".to_string()]
    }
}

/// A rollout that failed, and whether it got as far as touching a host (a deploy refused
/// by the lock did not, and is no release).
pub(super) struct RolloutFailure {
    pub error: CliError,
    pub attempted: bool,
}

/// Rolls `plan` out to `config`'s hosts: this machine, or the agents (which pull
/// `plan.digest` from the environment's registry, where it must already be). Returns each
/// host's answer.
pub(super) fn roll_out(
    g: &GlobalOpts,
    config: &AppConfig,
    store: &Store,
    plan: &ReleasePlan,
    no_rollback: bool,
    out: &mut Output,
) -> Result<Vec<serde_json::Value>, RolloutFailure> {
    if is_remote(config) {
        return apply_remote(config, plan, no_rollback, out).map_err(|error| RolloutFailure {
            error,
            attempted: true,
        });
    }
    local_only(config).map_err(|error| RolloutFailure {
        error,
        attempted: false,
    })?;
    let exe = std::env::current_exe().map_err(|e| RolloutFailure {
        error: CliError::failed(miette!("cannot find berth's own binary: {e}")),
        attempted: false,
    })?;
    let quiet = out.quiet || out.json;
    // Each step is a line; on a terminal a spinner shows what is being waited for.
    let spinner = super::progress::Spinner::new(!quiet);
    let mut say = |line: String| {
        if !quiet {
            spinner.suspend(|| eprintln!("{line}"));
        }
        spinner.show(if line.starts_with("starting ") {
            "waiting for the new replicas to be healthy".to_string()
        } else {
            "draining the previous release".to_string()
        });
    };
    let applied = local::apply(store, &exe, &g.store_dir(), plan, &mut say);
    // This process is all there is: the previous release drains and stops before it ends.
    let applied = applied.map(|(record, retire)| {
        retire.run(store, &mut say);
        record
    });
    spinner.finish();
    match applied {
        Ok(record) => Ok(vec![json!({
            "host": "local",
            "release": record.number,
            "replicas": record.replicas,
        })]),
        Err(e) => Err(RolloutFailure {
            attempted: !matches!(e, DeployError::Locked { .. }),
            error: deploy_error(e),
        }),
    }
}

/// Records a rollout's result in the environment's ledger: the recorded release, or the
/// rollout's own error (recorded as a failed release when it touched a host).
pub(super) fn record_outcome(
    store: &Store,
    config: &AppConfig,
    mut release: Release,
    result: Result<Vec<serde_json::Value>, RolloutFailure>,
    out: &mut Output,
) -> Result<(Release, Vec<serde_json::Value>), CliError> {
    match result {
        Ok(hosts) => {
            let recorded = record(store, config, release).map_err(|e| {
                CliError::failed(miette!(
                    help = "the hosts run it; `berth releases` will not list it",
                    "the release went live but could not be recorded: {e}"
                ))
            })?;
            Ok((recorded, hosts))
        }
        Err(f) => {
            if f.attempted {
                release.outcome = Verdict::Failed;
                release.error = f.error.report.as_ref().map(|r| r.to_string());
                if let Err(e) = record(store, config, release)
                    && !out.quiet
                {
                    eprintln!("warning: the failed release could not be recorded: {e}");
                }
            }
            Err(f.error)
        }
    }
}

/// The summary of a rollout: each host and the release number it gave the release.
pub(super) fn host_table(hosts: &[serde_json::Value], out: &mut Output) -> Result<(), CliError> {
    if out.quiet {
        return Ok(());
    }
    let width = hosts
        .iter()
        .filter_map(|h| h["host"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(4)
        .max(4);
    out.line(format!("{:<width$}  RELEASE ON HOST", "HOST"))?;
    for h in hosts {
        out.line(format!(
            "{:<width$}  {}",
            h["host"].as_str().unwrap_or("?"),
            h["release"]
        ))?;
    }
    Ok(())
}

/// Appends a release to the environment's ledger.
pub(super) fn record(
    store: &Store,
    config: &AppConfig,
    release: Release,
) -> Result<Release, LedgerError> {
    let ledger = Ledger::open(store, config)?;
    let rt = crate::registry_client::runtime().map_err(|e| LedgerError::Local {
        path: "tokio".into(),
        message: e.to_string(),
    })?;
    rt.block_on(ledger.append(release))
}

/// The environment's ledger, oldest first.
pub(super) fn history(store: &Store, config: &AppConfig) -> Result<Vec<Release>, CliError> {
    let ledger = Ledger::open(store, config).map_err(|e| CliError::failed(miette!("{e}")))?;
    let rt = crate::registry_client::runtime()
        .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))?;
    rt.block_on(ledger.history())
        .map_err(|e| CliError::failed(miette!("{e}")))
}

/// `berth deploy --env E [--image REF] [--dry-run]`.
pub fn deploy(g: &GlobalOpts, args: &DeployArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir())?;
    let config = project.resolve(&args.env)?;
    let remote = is_remote(&config);
    if !remote {
        local_only(&config)?;
    }
    let store = Store::open(&g.store_dir())?;
    let digest = match &args.image {
        Some(r) => store.resolve(r)?,
        None if args.dry_run => store.resolve(&config.app.name)?,
        None => {
            let build = super::build::BuildArgs {
                env: Some(args.env.clone()),
                tag: Vec::new(),
                no_cache: false,
                explain: false,
                build_args: Vec::new(),
                target: None,
                network: "none".into(),
            };
            let mut quiet = Output::new(false, true);
            super::build::run(g, &build, if out.json { &mut quiet } else { out })?;
            store.resolve(&config.app.name)?
        }
    };
    let revision = crate::build::provenance::labels(&g.project_dir())
        .into_iter()
        .find(|(k, _)| k == "org.opencontainers.image.revision")
        .map(|(_, v)| v);
    let plan = release_plan(&config, &digest, revision);
    if args.dry_run {
        let blobs = if config.registry.is_some() {
            push_to_env(&config, &store, &digest, true, out)?.blobs
        } else {
            Vec::new()
        };
        if out.json {
            return Ok(out.json_value(&json!({ "plan": plan, "blobs": blobs }))?);
        }
        out.line(format!(
            "deploy {} to {}: {digest}",
            plan.app, plan.environment
        ))?;
        if config.registry.is_some() {
            let (mut n, mut bytes) = (0, 0);
            for b in &blobs {
                if !matches!(b.action, crate::registry_client::push::BlobAction::Present) {
                    n += 1;
                    bytes += b.size;
                    out.line(format!(
                        "  push {} ({} bytes, {:?})",
                        b.digest, b.size, b.action
                    ))?;
                }
            }
            out.line(format!("  {n} blob(s) to push, {bytes} bytes"))?;
        }
        return print_plan(&config, &plan, out);
    }
    // The environment's registry gets the image first: agents pull it from there, and
    // promotions and other machines find it there.
    if config.registry.is_some() {
        push_to_env(&config, &store, &digest, false, out)?;
    }
    let mut release = Release::new(&config, digest.clone(), Kind::Deploy);
    release.revision = plan.revision.clone();
    release.hosts = host_names(&config);
    let result = roll_out(g, &config, &store, &plan, args.no_rollback, out);
    finish(&store, &config, release, result, out, None)?;
    if !remote && !out.json {
        for s in &plan.services {
            for p in &s.ports {
                out.note(format!("  {} on {}", s.name, p.listen_addr()))?;
            }
        }
    }
    Ok(())
}

/// `berth status --env E`.
pub fn status(g: &GlobalOpts, args: &EnvArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir())?;
    let config = project.resolve(&args.env)?;
    let store = Store::open(&g.store_dir())?;
    let deployment = deployment_name(&config);
    if is_remote(&config) {
        let answers = each_agent(
            &config,
            reqwest::Method::GET,
            &format!("/v1/status?deployment={deployment}"),
            None,
        )?;
        if out.json {
            let rows: Vec<serde_json::Value> = answers
                .iter()
                .map(|(h, a)| match a {
                    Ok(v) => json!({
                        "host": h, "release": v["number"], "digest": v["digest"],
                        "since": v["time"], "services": v["services"],
                    }),
                    Err(e) => json!({ "host": h, "error": e }),
                })
                .collect();
            out.json_value(&rows)?;
            if rows.iter().any(|r| !r["error"].is_null()) {
                return Err(CliError {
                    kind: super::ExitKind::Failed,
                    report: None,
                });
            }
            return Ok(());
        }
        let mut failed = false;
        for (host, answer) in answers {
            match answer {
                Ok(v) if v.is_null() => {
                    out.line(format!("{deployment} on {host}: nothing deployed"))?
                }
                Ok(v) => {
                    out.line(format!(
                        "{deployment} on {host}: release {} ({}), up {}",
                        v["number"],
                        v["digest"]
                            .as_str()
                            .and_then(|d| d.strip_prefix("sha256:"))
                            .map_or("?", |d| &d[..d.len().min(12)]),
                        uptime(v["time"].as_str().unwrap_or_default())
                    ))?;
                    for (name, c) in v["services"].as_object().into_iter().flatten() {
                        out.line(format!("  {name}: {}/{} running", c["running"], c["total"]))?;
                    }
                }
                Err(e) => {
                    failed = true;
                    out.line(format!("{deployment} on {host}: unreachable: {e}"))?;
                }
            }
        }
        return if failed {
            Err(CliError::failed(miette!("some hosts did not answer")))
        } else {
            Ok(())
        };
    }
    let Some(live) = local::current(&store, &deployment) else {
        if out.json {
            return Ok(
                out.json_value(&json!({ "environment": config.environment, "release": null }))?
            );
        }
        out.line(format!("{deployment}: nothing deployed"))?;
        return Ok(());
    };
    let services: serde_json::Map<String, serde_json::Value> = local::replica_health(&store, &live)
        .into_iter()
        .map(|(name, c)| (name, json!({ "running": c.running, "total": c.total })))
        .collect();
    if out.json {
        return Ok(out.json_value(&json!({
            "environment": config.environment,
            "host": "local",
            "release": live.number,
            "digest": live.digest,
            "revision": live.revision,
            "since": live.time,
            "services": services,
        }))?);
    }
    out.line(format!(
        "{deployment} on local: release {} ({}), up {}",
        live.number,
        live.digest.short(),
        uptime(&live.time)
    ))?;
    for (name, v) in services {
        out.line(format!("  {name}: {}/{} running", v["running"], v["total"]))?;
    }
    Ok(())
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

/// `berth down --env E`.
pub fn down(g: &GlobalOpts, args: &EnvArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir())?;
    let config = project.resolve(&args.env)?;
    if is_remote(&config) {
        let deployment = deployment_name(&config);
        let answers = each_agent(
            &config,
            reqwest::Method::POST,
            "/v1/down",
            Some(json!({ "deployment": deployment })),
        )?;
        let mut failed = None;
        for (host, answer) in answers {
            match answer {
                Ok(v) => out.note(format!(
                    "{deployment} on {host}: removed {} container(s)",
                    v["removed"]
                ))?,
                Err(e) => failed = Some(format!("{host}: {e}")),
            }
        }
        return match failed {
            Some(e) => Err(CliError::failed(miette!("{e}"))),
            None => Ok(()),
        };
    }
    local_only(&config)?;
    let store = Store::open(&g.store_dir())?;
    let deployment = deployment_name(&config);
    let n = local::down(&store, &deployment).map_err(deploy_error)?;
    out.note(format!("{deployment}: removed {n} container(s)"))?;
    Ok(())
}

/// Arguments of `berth rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
    /// The release to go back to [default: the one before the live one].
    #[arg(long, value_name = "RELEASE")]
    pub to: Option<u32>,
}

/// Arguments of `berth scale`.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
    /// SERVICE=REPLICAS, one or more.
    #[arg(required = true, value_parser = parse_scale)]
    pub services: Vec<(String, u32)>,
}

fn parse_scale(s: &str) -> Result<(String, u32), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not SERVICE=REPLICAS"))?;
    let n = n
        .parse()
        .map_err(|_| format!("`{n}` is not a number of replicas"))?;
    Ok((name.to_string(), n))
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

fn deployment_of(g: &GlobalOpts, env: &str) -> Result<(AppConfig, Store, String), CliError> {
    let project = Project::load(&g.project_dir())?;
    let config = project.resolve(env)?;
    local_only(&config)?;
    let store = Store::open(&g.store_dir())?;
    let deployment = deployment_name(&config);
    Ok((config, store, deployment))
}

/// Agents' answers as a rollout's result: every host's answer, or which hosts failed.
fn hosts_result(answers: Vec<HostAnswer>) -> Result<Vec<serde_json::Value>, RolloutFailure> {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (host, answer) in answers {
        match answer {
            Ok(v) => ok.push(json!({ "host": host, "release": v["number"] })),
            Err(e) => failed.push(format!("{host}: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(ok)
    } else {
        Err(RolloutFailure {
            error: CliError::failed(miette!("failed on {}", failed.join("; "))),
            attempted: true,
        })
    }
}

/// Records a rollout's result and says so: the host table, then what is live (`what`
/// says why, for a rollback or a scale).
fn finish(
    store: &Store,
    config: &AppConfig,
    release: Release,
    result: Result<Vec<serde_json::Value>, RolloutFailure>,
    out: &mut Output,
    what: Option<&str>,
) -> Result<(), CliError> {
    let (recorded, hosts) = record_outcome(store, config, release, result, out)?;
    if out.json {
        return Ok(out.json_value(&json!({
            "environment": recorded.environment,
            "release": recorded.number,
            "kind": recorded.kind,
            "digest": recorded.digest,
            "revision": recorded.revision,
            "hosts": hosts,
        }))?);
    }
    host_table(&hosts, out)?;
    out.note(format!(
        "{} release {} is live{} on {} host(s): {}",
        deployment_name(config),
        recorded.number,
        what.map(|w| format!(" ({w})")).unwrap_or_default(),
        hosts.len(),
        recorded.digest
    ))?;
    Ok(())
}

/// The environment's config when its hosts are agents.
fn remote_config(g: &GlobalOpts, env: &str) -> Result<Option<AppConfig>, CliError> {
    let config = Project::load(&g.project_dir())?.resolve(env)?;
    Ok(is_remote(&config).then_some(config))
}

/// `berth rollback --env E [--to N]`: the image of an earlier release (by default the
/// newest that served with another image than the current one) rolled out again, with
/// the settings it had on each host, health-checked and switched like any release, and
/// recorded as a new release.
pub fn rollback(g: &GlobalOpts, args: &RollbackArgs, out: &mut Output) -> Result<(), CliError> {
    let config = Project::load(&g.project_dir())?.resolve(&args.env)?;
    let store = Store::open(&g.store_dir())?;
    let deployment = deployment_name(&config);
    let hist = history(&store, &config)?;
    let current = crate::promote::ledger::current(&hist).map(|r| r.digest.clone());
    let target = match args.to {
        Some(n) => hist.iter().find(|r| r.number == n),
        None => hist
            .iter()
            .rev()
            .find(|r| r.outcome == Verdict::Succeeded && Some(&r.digest) != current.as_ref()),
    };
    let Some(target) = target.cloned() else {
        return Err(CliError::failed(miette!(
            help = "`berth releases --env E` lists them",
            "{deployment} has no {} to go back to",
            match args.to {
                Some(n) => format!("release {n}"),
                None => "earlier release".to_string(),
            }
        )));
    };
    if target.outcome == Verdict::Failed {
        return Err(CliError::failed(miette!(
            "release {} never went live; roll back to one that served",
            target.number
        )));
    }
    let mut release = Release::new(&config, target.digest.clone(), Kind::Rollback);
    release.revision = target.revision.clone();
    release.hosts = host_names(&config);
    let what = format!("rollback to release {}", target.number);
    let result = if is_remote(&config) {
        hosts_result(each_agent(
            &config,
            reqwest::Method::POST,
            "/v1/rollback",
            Some(json!({ "deployment": deployment, "digest": target.digest })),
        )?)
    } else {
        local_only(&config)?;
        let Some(on_host) = local::releases(&store, &deployment)
            .into_iter()
            .rev()
            .find(|r| r.digest == target.digest && r.outcome != crate::deploy::Outcome::Failed)
        else {
            return Err(CliError::failed(miette!(
                "this machine never ran {} for {deployment}",
                target.digest
            )));
        };
        roll_out(g, &config, &store, &on_host.plan, false, out)
    };
    finish(&store, &config, release, result, out, Some(&what))
}

/// `berth releases --env E`: the environment's ledger, newest first.
pub fn releases(g: &GlobalOpts, args: &EnvArgs, out: &mut Output) -> Result<(), CliError> {
    let config = Project::load(&g.project_dir())?.resolve(&args.env)?;
    let store = Store::open(&g.store_dir())?;
    let hist = history(&store, &config)?;
    if out.json {
        return Ok(out.json_value(&hist)?);
    }
    if hist.is_empty() {
        out.line(format!("{}: no releases", deployment_name(&config)))?;
        return Ok(());
    }
    out.line(format!(
        "{:<8} {:<9} {:<10} {:<14} {:<21} {:<20} {:<8} REVISION",
        "RELEASE", "KIND", "OUTCOME", "DIGEST", "TIME", "ACTOR", "FROM"
    ))?;
    let lower = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
    for r in hist.iter().rev() {
        out.line(format!(
            "{:<8} {:<9} {:<10} {:<14} {:<21} {:<20} {:<8} {}",
            r.number,
            lower(&r.kind),
            lower(&r.outcome),
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

/// `berth scale --env E web=3`: the live release's plan on each host with other replica
/// counts, rolled out as a new release.
pub fn scale(g: &GlobalOpts, args: &ScaleArgs, out: &mut Output) -> Result<(), CliError> {
    let config = Project::load(&g.project_dir())?.resolve(&args.env)?;
    let store = Store::open(&g.store_dir())?;
    let deployment = deployment_name(&config);
    let what: Vec<String> = args
        .services
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect();
    let what = format!("scaled {}", what.join(" "));
    if is_remote(&config) {
        let (digest, answers) = scale_remote(&config, args)?;
        let mut release = Release::new(&config, digest, Kind::Scale);
        release.hosts = host_names(&config);
        release.revision = crate::promote::ledger::current(&history(&store, &config)?)
            .and_then(|r| r.revision.clone());
        return finish(
            &store,
            &config,
            release,
            hosts_result(answers),
            out,
            Some(&what),
        );
    }
    local_only(&config)?;
    let Some(live) = local::current(&store, &deployment) else {
        return Err(CliError::failed(miette!(
            help = "deploy it first",
            "{deployment} runs nothing to scale"
        )));
    };
    let plan = scaled(&live.plan, args)?;
    let mut release = Release::new(&config, live.digest.clone(), Kind::Scale);
    release.revision = live.revision.clone();
    release.hosts = host_names(&config);
    let result = roll_out(g, &config, &store, &plan, false, out);
    finish(&store, &config, release, result, out, Some(&what))
}

/// `plan` with the replica counts of `args`.
pub(super) fn scaled(plan: &ReleasePlan, args: &ScaleArgs) -> Result<ReleasePlan, CliError> {
    let mut plan = plan.clone();
    for (name, n) in &args.services {
        let known: Vec<String> = plan.services.iter().map(|s| s.name.clone()).collect();
        let Some(svc) = plan.services.iter_mut().find(|s| &s.name == name) else {
            return Err(CliError::invalid(miette!(
                "no service `{name}` in {} (it has: {})",
                plan.deployment(),
                known.join(", ")
            )));
        };
        svc.replicas = *n;
    }
    Ok(plan)
}

/// `berth logs --env E [SERVICE]`: the live release's replicas' logs, merged by time and
/// prefixed by replica.
pub fn env_logs(
    g: &GlobalOpts,
    env: &str,
    args: &EnvLogsArgs,
    out: &mut Output,
) -> Result<(), CliError> {
    let remote = remote_config(g, env)?;
    let local = match &remote {
        Some(_) => None,
        None => Some(deployment_of(g, env)?),
    };
    // One round: every host's lines (the last `tail`, or those since `since`), by time.
    let round = |tail: Option<usize>,
                 since: Option<jiff::Timestamp>|
     -> Result<Vec<(String, String)>, CliError> {
        let mut lines: Vec<(String, String)> = Vec::new();
        if let Some(config) = &remote {
            let deployment = deployment_name(config);
            let mut query = format!("/v1/logs?deployment={deployment}");
            if let Some(s) = &args.service {
                query += &format!("&service={s}");
            }
            if let Some(t) = tail {
                query += &format!("&tail={t}");
            }
            if let Some(t) = since {
                query += &format!("&since={t}");
            }
            for (host, answer) in each_agent(config, reqwest::Method::GET, &query, None)? {
                let list = answer.map_err(|e| CliError::failed(miette!("{host}: {e}")))?;
                let list: Vec<local::ReplicaLine> =
                    serde_json::from_value(list).unwrap_or_default();
                let name = host.split("://").nth(1).unwrap_or(&host).to_string();
                lines.extend(
                    list.into_iter()
                        .map(|l| (l.time, format!("{name} {} | {}", l.replica, l.log))),
                );
            }
        } else if let Some((_, store, deployment)) = &local {
            let list = local::replica_logs(store, deployment, args.service.as_deref(), tail, since)
                .map_err(deploy_error)?;
            lines.extend(
                list.into_iter()
                    .map(|l| (l.time, format!("local {} | {}", l.replica, l.log))),
            );
        }
        lines.sort();
        Ok(lines)
    };
    let mut print = |lines: &[(String, String)]| -> Result<(), CliError> {
        for (_, l) in lines {
            out.text(l)?;
            if !l.ends_with('\n') {
                out.text("\n")?;
            }
        }
        Ok(())
    };
    let since = args
        .since
        .as_deref()
        .map(super::containers::parse_since)
        .transpose()?;
    let first = round(args.tail, since)?;
    print(&first)?;
    if !args.follow {
        return Ok(());
    }
    // Follow: ask again every half second for what came since the newest line printed
    // (lines of that same instant already printed are not printed twice).
    let mut last = first.last().map(|(t, _)| t.clone());
    let mut seen: Vec<String> = first
        .iter()
        .filter(|(t, _)| Some(t) == last.as_ref())
        .map(|(_, l)| l.clone())
        .collect();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let since = last.as_deref().and_then(|t| t.parse().ok()).or(since);
        let fresh: Vec<(String, String)> = round(None, since)?
            .into_iter()
            .filter(|(t, l)| match &last {
                Some(lt) => t > lt || (t == lt && !seen.contains(l)),
                None => true,
            })
            .collect();
        if let Some((t, _)) = fresh.last() {
            if Some(t) != last.as_ref() {
                seen.clear();
            }
            last = Some(t.clone());
            seen.extend(
                fresh
                    .iter()
                    .filter(|(x, _)| Some(x) == last.as_ref())
                    .map(|(_, l)| l.clone()),
            );
        }
        print(&fresh)?;
    }
}

/// The environment's registry repository, tagged with the environment's name.
pub(super) fn env_reference(
    config: &AppConfig,
) -> Result<crate::registry_client::Reference, CliError> {
    let Some(registry) = &config.registry else {
        return Err(CliError::invalid(miette!(
            help = "set registry = \"host:port/repository\" in environments/{}.toml",
            "environment {} names no registry (agents pull from one, promotions copy into one)",
            config.environment
        )));
    };
    format!("{registry}:{}", config.environment)
        .parse()
        .map_err(|e: String| CliError::invalid(miette!("registry {registry}: {e}")))
}

/// Pushes the image to the environment's registry (only the blobs it lacks).
pub(super) fn push_to_env(
    config: &AppConfig,
    store: &Store,
    digest: &crate::store::Digest,
    dry_run: bool,
    out: &mut Output,
) -> Result<crate::registry_client::push::PushReport, CliError> {
    use crate::registry_client::{Client, ClientOptions, push};
    let dst = env_reference(config)?;
    let rt = crate::registry_client::runtime()
        .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))?;
    let client =
        Client::new(&dst, &ClientOptions::default()).map_err(super::registry::registry_error)?;
    // On a terminal, a bar per blob while it uploads; nothing otherwise.
    let transfers = super::progress::Transfers::new(!(dry_run || out.quiet || out.json));
    let on_blob = |b: &push::BlobReport| transfers.done(b.digest.short(), None);
    let bars = transfers.clone();
    let progress: push::BytesProgress =
        std::sync::Arc::new(move |d, total, n| bars.advance(d.short(), total, n));
    let pushed = rt
        .block_on(push::push(
            &client,
            store,
            digest,
            &dst,
            dry_run,
            &on_blob,
            transfers.active().then_some(progress),
        ))
        .map_err(super::registry::registry_error)?;
    if !(dry_run || out.quiet || out.json) {
        eprintln!("pushed {dst}: {} bytes of blobs sent", pushed.bytes_sent);
    }
    Ok(pushed)
}
