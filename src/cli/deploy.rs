//! `berth deploy`, `berth status`, `berth down`: an environment's release on its hosts.
//! Today the hosts are this machine (`hosts = ["local"]`); agents come next.

use miette::miette;
use serde_json::json;

use super::{CliError, GlobalOpts, Output};
use crate::deploy::health::{Check, Probe};
use crate::deploy::{DeployError, ReleasePlan, RolloutPlan, ServicePlan, local};
use crate::manifest::schema::{AppConfig, CommandLine};
use crate::manifest::values::{HostUrl, Protocol, RestartPolicy, VolumeSource};
use crate::manifest::{Project, schema};
use crate::runtime::container::{Containers, Status};
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
fn deployment_name(config: &AppConfig) -> String {
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

/// `berth deploy --env E [--image REF] [--dry-run]`.
pub fn deploy(g: &GlobalOpts, args: &DeployArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir())?;
    let config = project.resolve(&args.env)?;
    let remote = !config.hosts.is_empty()
        && config
            .hosts
            .iter()
            .all(|h| matches!(h, HostUrl::Agent { .. }));
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
    let plan = ReleasePlan {
        app: config.app.name.clone(),
        environment: config.environment.clone(),
        digest: digest.clone(),
        revision: crate::build::provenance::labels(&g.project_dir())
            .into_iter()
            .find(|(k, _)| k == "org.opencontainers.image.revision")
            .map(|(_, v)| v),
        services: config
            .services
            .iter()
            .map(|(n, s)| service_plan(&config, n, s))
            .collect(),
        rollout: RolloutPlan {
            drain: config.rollout.drain.0,
            timeout: config.rollout.timeout.0,
            keep: config.rollout.keep,
        },
    };
    if args.dry_run {
        if out.json {
            return Ok(out.json_value(&plan)?);
        }
        let where_to = if remote {
            agent_urls(&config).join(", ")
        } else {
            "this machine".to_string()
        };
        out.line(format!(
            "deploy {} to {} on {where_to}: {digest}",
            plan.app, plan.environment
        ))?;
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
        return Ok(());
    }
    if remote {
        return deploy_remote(&config, &store, &plan, args.no_rollback, out);
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::failed(miette!("cannot find berth's own binary: {e}")))?;
    let quiet = out.quiet || out.json;
    let mut say = |line: String| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let record =
        local::apply(&store, &exe, &g.store_dir(), &plan, &mut say).map_err(deploy_error)?;
    if out.json {
        return Ok(out.json_value(&json!({
            "environment": plan.environment,
            "release": record.number,
            "digest": record.digest,
            "revision": record.revision,
            "replicas": record.replicas,
        }))?);
    }
    out.note(format!(
        "{} release {} is live: {}",
        plan.deployment(),
        record.number,
        record.digest
    ))?;
    for s in &plan.services {
        for p in &s.ports {
            out.note(format!("  {} on {}", s.name, p.listen_addr()))?;
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
                    Ok(v) => json!({ "host": h, "release": v["number"], "digest": v["digest"], "since": v["time"] }),
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
                Ok(v) => out.line(format!(
                    "{deployment} on {host}: release {} ({}) since {}",
                    v["number"],
                    v["digest"].as_str().unwrap_or("?"),
                    v["time"].as_str().unwrap_or("?")
                ))?,
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
    let containers = Containers::new(&store).map_err(super::run::failed)?;
    let Some(live) = local::current(&store, &deployment) else {
        if out.json {
            return Ok(
                out.json_value(&json!({ "environment": config.environment, "release": null }))?
            );
        }
        out.line(format!("{deployment}: nothing deployed"))?;
        return Ok(());
    };
    let mut services = serde_json::Map::new();
    for (name, ids) in &live.replicas {
        let running = ids
            .iter()
            .filter(|id| {
                containers
                    .get(id)
                    .is_ok_and(|c| c.status == Status::Running)
            })
            .count();
        services.insert(
            name.clone(),
            json!({ "running": running, "total": ids.len() }),
        );
    }
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
        "{deployment} on local: release {} ({}) since {}",
        live.number,
        live.digest.short(),
        live.time
    ))?;
    for (name, v) in services {
        out.line(format!("  {name}: {}/{} running", v["running"], v["total"]))?;
    }
    Ok(())
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

/// Arguments of `berth logs --env`.
#[derive(Debug, clap::Args)]
pub struct EnvLogsArgs {
    /// Only this service.
    pub service: Option<String>,
    /// Only the last N lines of each replica.
    #[arg(short = 'n', long)]
    pub tail: Option<usize>,
}

fn deployment_of(g: &GlobalOpts, env: &str) -> Result<(AppConfig, Store, String), CliError> {
    let project = Project::load(&g.project_dir())?;
    let config = project.resolve(env)?;
    local_only(&config)?;
    let store = Store::open(&g.store_dir())?;
    let deployment = deployment_name(&config);
    Ok((config, store, deployment))
}

fn apply_and_report(
    g: &GlobalOpts,
    store: &Store,
    plan: &ReleasePlan,
    out: &mut Output,
    what: &str,
) -> Result<(), CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::failed(miette!("cannot find berth's own binary: {e}")))?;
    let quiet = out.quiet || out.json;
    let mut say = |line: String| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let record = local::apply(store, &exe, &g.store_dir(), plan, &mut say).map_err(deploy_error)?;
    if out.json {
        return Ok(out.json_value(&json!({
            "environment": plan.environment,
            "release": record.number,
            "digest": record.digest,
        }))?);
    }
    out.note(format!(
        "{} release {} is live ({what}): {}",
        plan.deployment(),
        record.number,
        record.digest
    ))?;
    Ok(())
}

/// Prints each agent's answer; fails if any host failed.
fn report_hosts(
    answers: Vec<HostAnswer>,
    out: &mut Output,
    ok: impl Fn(&serde_json::Value) -> String,
) -> Result<(), CliError> {
    let mut failed = Vec::new();
    for (host, answer) in answers {
        match answer {
            Ok(v) => out.line(format!("{host}: {}", ok(&v)))?,
            Err(e) => {
                out.line(format!("{host}: failed: {e}"))?;
                failed.push(host);
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(miette!("failed on {}", failed.join(", "))))
    }
}

/// The environment's config when its hosts are agents.
fn remote_config(g: &GlobalOpts, env: &str) -> Result<Option<AppConfig>, CliError> {
    let config = Project::load(&g.project_dir())?.resolve(env)?;
    Ok(is_remote(&config).then_some(config))
}

/// `berth rollback --env E [--to N]`: the plan of an earlier release, rolled out again as
/// a new release (same digest, same settings), with the same health checks and switch.
pub fn rollback(g: &GlobalOpts, args: &RollbackArgs, out: &mut Output) -> Result<(), CliError> {
    if let Some(config) = remote_config(g, &args.env)? {
        let deployment = deployment_name(&config);
        let answers = each_agent(
            &config,
            reqwest::Method::POST,
            "/v1/rollback",
            Some(json!({ "deployment": deployment, "to": args.to })),
        )?;
        return report_hosts(answers, out, |v| format!("release {} is live", v["number"]));
    }
    let (_, store, deployment) = deployment_of(g, &args.env)?;
    let all = local::releases(&store, &deployment);
    let live = all
        .iter()
        .rev()
        .find(|r| r.outcome == crate::deploy::Outcome::Live)
        .map(|r| r.number);
    let target = match args.to {
        Some(n) => all.iter().find(|r| r.number == n),
        None => all
            .iter()
            .rev()
            .find(|r| r.outcome == crate::deploy::Outcome::Retired && Some(r.number) != live),
    };
    let Some(target) = target else {
        return Err(CliError::failed(miette!(
            help = "`berth releases --env E` lists them",
            "{deployment} has no earlier release to go back to"
        )));
    };
    if target.outcome == crate::deploy::Outcome::Failed {
        return Err(CliError::failed(miette!(
            "release {} never became healthy; roll back to one that served",
            target.number
        )));
    }
    let what = format!("rollback to release {}", target.number);
    apply_and_report(g, &store, &target.plan, out, &what)
}

/// `berth releases --env E`.
pub fn releases(g: &GlobalOpts, args: &EnvArgs, out: &mut Output) -> Result<(), CliError> {
    if let Some(config) = remote_config(g, &args.env)? {
        let deployment = deployment_name(&config);
        let answers = each_agent(
            &config,
            reqwest::Method::GET,
            &format!("/v1/releases?deployment={deployment}"),
            None,
        )?;
        if out.json {
            let rows: Vec<serde_json::Value> = answers
                .iter()
                .map(|(h, a)| match a {
                    Ok(v) => json!({ "host": h, "releases": v }),
                    Err(e) => json!({ "host": h, "error": e }),
                })
                .collect();
            return Ok(out.json_value(&rows)?);
        }
        return report_hosts(answers, out, |v| {
            v.as_array()
                .into_iter()
                .flatten()
                .rev()
                .map(|r| format!("{} {}", r["release"], r["outcome"].as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        });
    }
    let (_, store, deployment) = deployment_of(g, &args.env)?;
    let all = local::releases(&store, &deployment);
    if out.json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|r| {
                json!({
                    "release": r.number, "digest": r.digest, "revision": r.revision,
                    "time": r.time, "actor": r.actor, "outcome": r.outcome, "error": r.error,
                })
            })
            .collect();
        return Ok(out.json_value(&rows)?);
    }
    out.line(format!(
        "{:<8} {:<10} {:<14} {:<32} {:<20} REVISION",
        "RELEASE", "OUTCOME", "DIGEST", "TIME", "ACTOR"
    ))?;
    for r in all.iter().rev() {
        out.line(format!(
            "{:<8} {:<10} {:<14} {:<32} {:<20} {}",
            r.number,
            format!("{:?}", r.outcome).to_lowercase(),
            r.digest.short(),
            r.time,
            r.actor,
            r.revision.as_deref().unwrap_or("-")
        ))?;
    }
    Ok(())
}

/// `berth scale --env E web=3`: the live release's plan with other replica counts, rolled
/// out as a new release.
pub fn scale(g: &GlobalOpts, args: &ScaleArgs, out: &mut Output) -> Result<(), CliError> {
    if let Some(config) = remote_config(g, &args.env)? {
        return scale_remote(&config, args, out);
    }
    let (_, store, deployment) = deployment_of(g, &args.env)?;
    let Some(live) = local::current(&store, &deployment) else {
        return Err(CliError::failed(miette!(
            help = "deploy it first",
            "{deployment} runs nothing to scale"
        )));
    };
    let mut plan = live.plan.clone();
    for (name, n) in &args.services {
        let Some(svc) = plan.services.iter_mut().find(|s| &s.name == name) else {
            let known: Vec<&str> = live.plan.services.iter().map(|s| s.name.as_str()).collect();
            return Err(CliError::invalid(miette!(
                "no service `{name}` in {deployment} (it has: {})",
                known.join(", ")
            )));
        };
        svc.replicas = *n;
    }
    let what: Vec<String> = args
        .services
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect();
    apply_and_report(g, &store, &plan, out, &format!("scaled {}", what.join(" ")))
}

/// `berth logs --env E [SERVICE]`: the live release's replicas' logs, merged by time and
/// prefixed by replica.
pub fn env_logs(
    g: &GlobalOpts,
    env: &str,
    args: &EnvLogsArgs,
    out: &mut Output,
) -> Result<(), CliError> {
    let mut lines: Vec<(String, String)> = Vec::new();
    if let Some(config) = remote_config(g, env)? {
        let deployment = deployment_name(&config);
        let mut query = format!("/v1/logs?deployment={deployment}");
        if let Some(s) = &args.service {
            query += &format!("&service={s}");
        }
        if let Some(t) = args.tail {
            query += &format!("&tail={t}");
        }
        for (host, answer) in each_agent(&config, reqwest::Method::GET, &query, None)? {
            let list = answer.map_err(|e| CliError::failed(miette!("{host}: {e}")))?;
            let list: Vec<local::ReplicaLine> = serde_json::from_value(list).unwrap_or_default();
            let name = host.split("://").nth(1).unwrap_or(&host).to_string();
            lines.extend(
                list.into_iter()
                    .map(|l| (l.time, format!("{name} {} | {}", l.replica, l.log))),
            );
        }
    } else {
        let (_, store, deployment) = deployment_of(g, env)?;
        let list = local::replica_logs(&store, &deployment, args.service.as_deref(), args.tail)
            .map_err(deploy_error)?;
        lines.extend(
            list.into_iter()
                .map(|l| (l.time, format!("local {} | {}", l.replica, l.log))),
        );
    }
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, l) in lines {
        out.text(&l)?;
        if !l.ends_with('\n') {
            out.text("\n")?;
        }
    }
    Ok(())
}

/// Arguments of `berth agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", required_unless_present = "init_tls")]
    pub listen: Option<std::net::SocketAddr>,
    /// The agent's store: images, containers, releases.
    #[arg(long, value_name = "DIR", required_unless_present = "init_tls")]
    pub state: Option<std::path::PathBuf>,
    /// A file holding the bearer token clients must send.
    #[arg(long, value_name = "FILE", required_unless_present = "init_tls")]
    pub token_file: Option<std::path::PathBuf>,
    /// TLS certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Write a self-signed certificate and key (agent.crt, agent.key) into DIR, print the
    /// certificate's SHA-256 fingerprint, and exit.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["listen", "state", "token_file"])]
    pub init_tls: Option<std::path::PathBuf>,
    /// Names and addresses the certificate is for (with --init-tls) [default: localhost,
    /// 127.0.0.1 and this host's name].
    #[arg(long, value_name = "NAME")]
    pub san: Vec<String>,
}

/// Writes a self-signed pair for the agent; returns the certificate's fingerprint.
fn init_tls(dir: &std::path::Path, sans: &[String]) -> Result<String, CliError> {
    use sha2::Digest as _;
    let mut names = sans.to_vec();
    if names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into()];
        if let Ok(h) = nix::unistd::gethostname()
            && let Ok(h) = h.into_string()
        {
            names.push(h);
        }
    }
    let pair = rcgen::generate_simple_self_signed(names)
        .map_err(|e| CliError::failed(miette!("cannot make a certificate: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::failed(miette!("cannot create {}: {e}", dir.display())))?;
    let write = |name: &str, text: String, mode: u32| -> Result<(), CliError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| CliError::failed(miette!("cannot write {}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .map_err(|e| CliError::failed(miette!("cannot write {}: {e}", path.display())))
    };
    write("agent.key", pair.signing_key.serialize_pem(), 0o600)?;
    write("agent.crt", pair.cert.pem(), 0o644)?;
    let digest = sha2::Sha256::digest(pair.cert.der());
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// `berth agent --listen ADDR --state DIR --token-file FILE [--tls-cert C --tls-key K]`, or
/// `berth agent --init-tls DIR`.
pub fn agent(_g: &GlobalOpts, args: &AgentArgs, out: &mut Output) -> Result<(), CliError> {
    if let Some(dir) = &args.init_tls {
        let fingerprint = init_tls(dir, &args.san)?;
        out.note(format!(
            "wrote {} and {}; start the agent with --tls-cert and --tls-key, and trust the\n\
             certificate on clients with BERTH_AGENT_CA={}",
            dir.join("agent.crt").display(),
            dir.join("agent.key").display(),
            dir.join("agent.crt").display()
        ))?;
        out.line(format!("SHA-256 fingerprint: {fingerprint}"))?;
        return Ok(());
    }
    let (Some(listen), Some(state), Some(token_file)) =
        (&args.listen, &args.state, &args.token_file)
    else {
        return Err(CliError::invalid(miette!(
            "--listen, --state and --token-file are required"
        )));
    };
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| CliError::failed(miette!("cannot read {}: {e}", token_file.display())))?
        .trim()
        .to_string();
    if token.len() < 16 {
        return Err(CliError::invalid(miette!(
            help = "head -c 32 /dev/urandom | base64 > token",
            "the token in {} is shorter than 16 characters",
            token_file.display()
        )));
    }
    let program = std::env::current_exe()
        .map_err(|e| CliError::failed(miette!("cannot find berth's own binary: {e}")))?;
    let cfg = crate::deploy::agent::AgentConfig {
        listen: *listen,
        state: state.clone(),
        token,
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
        program,
    };
    crate::deploy::agent::serve(cfg, &|addr| eprintln!("berth agent listening on {addr}"))
        .map_err(|e| CliError::failed(miette!("the agent stopped: {e}")))
}

/// A client for agents: trusts the system roots and `BERTH_AGENT_CA` (an agent's
/// self-signed certificate, from `berth agent --init-tls`).
fn agent_http(timeout: std::time::Duration) -> Result<reqwest::Client, CliError> {
    crate::registry_client::install_crypto();
    let mut b = reqwest::Client::builder().timeout(timeout);
    if let Some(ca) = std::env::var_os("BERTH_AGENT_CA") {
        let pem = std::fs::read(&ca).map_err(|e| {
            CliError::failed(miette!(
                "cannot read BERTH_AGENT_CA {}: {e}",
                ca.to_string_lossy()
            ))
        })?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
            CliError::failed(miette!("BERTH_AGENT_CA is not a PEM certificate: {e}"))
        })?;
        b = b.add_root_certificate(cert);
    }
    b.build().map_err(|e| CliError::failed(miette!("{e}")))
}

/// One request to an agent: its JSON answer, or its error message.
async fn agent_call(
    http: reqwest::Client,
    token: String,
    method: reqwest::Method,
    url: String,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let mut req = http.request(method, &url).bearer_auth(&token);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    let v: serde_json::Value =
        serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or_default();
    if status.is_success() {
        Ok(v)
    } else {
        Err(v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{url} answered {status}")))
    }
}

/// A host and its agent's answer (or what went wrong).
type HostAnswer = (String, Result<serde_json::Value, String>);

/// Calls every agent of `config` with `method path [body]`; each host's answer or error.
fn each_agent(
    config: &AppConfig,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Vec<HostAnswer>, CliError> {
    let token = std::env::var("BERTH_AGENT_TOKEN").map_err(|_| {
        CliError::invalid(miette!(
            help = "export BERTH_AGENT_TOKEN with the agents' token",
            "talking to agents needs their token"
        ))
    })?;
    let rt = crate::registry_client::runtime()
        .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))?;
    let http = agent_http(std::time::Duration::from_secs(120))?;
    let hosts = agent_urls(config);
    let answers = rt.block_on(futures_util::future::join_all(hosts.iter().map(|base| {
        let (http, token, method, body) =
            (http.clone(), token.clone(), method.clone(), body.clone());
        agent_call(http, token, method, format!("{base}{path}"), body)
    })));
    Ok(hosts.into_iter().zip(answers).collect())
}

fn is_remote(config: &AppConfig) -> bool {
    !config.hosts.is_empty()
        && config
            .hosts
            .iter()
            .all(|h| matches!(h, HostUrl::Agent { .. }))
}

/// The agents of an environment: base URLs.
fn agent_urls(config: &AppConfig) -> Vec<String> {
    config.hosts.iter().filter_map(agent_urls_of).collect()
}

/// Deploys through agents: push to the environment's registry, then each host in turn;
/// a host that fails puts the hosts already updated back on their previous release.
fn deploy_remote(
    config: &AppConfig,
    store: &Store,
    plan: &ReleasePlan,
    no_rollback: bool,
    out: &mut Output,
) -> Result<(), CliError> {
    use crate::registry_client::{Client, ClientOptions, Reference, push};
    let Some(registry) = &config.registry else {
        return Err(CliError::invalid(miette!(
            help = "set registry = \"host:port/repository\" in environments/{}.toml",
            "environment {} deploys to agents, which pull from a registry, but names none",
            config.environment
        )));
    };
    let token = std::env::var("BERTH_AGENT_TOKEN").map_err(|_| {
        CliError::invalid(miette!(
            help = "export BERTH_AGENT_TOKEN with the agents' token",
            "deploying to agents needs their token"
        ))
    })?;
    let dst: Reference = format!("{registry}:{}", config.environment)
        .parse()
        .map_err(|e: String| CliError::invalid(miette!("registry {registry}: {e}")))?;
    let rt = crate::registry_client::runtime()
        .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))?;
    let client =
        Client::new(&dst, &ClientOptions::default()).map_err(super::registry::registry_error)?;
    let pushed = rt
        .block_on(push::push(
            &client,
            store,
            &plan.digest,
            &dst,
            false,
            &|_| {},
            None,
        ))
        .map_err(super::registry::registry_error)?;
    let quiet = out.quiet || out.json;
    if !quiet {
        eprintln!("pushed {dst}: {} bytes of blobs sent", pushed.bytes_sent);
    }
    let image = agent_image(&dst, &plan.digest);
    let (username, password) = match crate::registry_client::auth::credential_for(&dst.registry) {
        Ok(Some(crate::registry_client::auth::Credential::Basic { username, password })) => {
            (Some(username), Some(password.0))
        }
        _ => (None, None),
    };
    let request = crate::deploy::agent::ApplyRequest {
        plan: plan.clone(),
        image,
        username,
        password,
    };
    let http = agent_http(plan.rollout.timeout + std::time::Duration::from_secs(120))?;
    let call = |url: String, body: serde_json::Value| {
        agent_call(
            http.clone(),
            token.clone(),
            reqwest::Method::POST,
            url,
            Some(body),
        )
    };
    // Batches of `rollout.batch` hosts at once, each batch done before the next; up to
    // `rollout.max_failures` hosts may fail before the rollout stops.
    let batch = config.rollout.batch.max(1) as usize;
    let mut updated: Vec<String> = Vec::new();
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut results = Vec::new();
    let hosts = agent_urls(config);
    for group in hosts.chunks(batch) {
        let outcomes = rt.block_on(futures_util::future::join_all(group.iter().map(|base| {
            let body = serde_json::to_value(&request).expect("a request serialises");
            call(format!("{base}/v1/apply"), body)
        })));
        for (base, outcome) in group.iter().zip(outcomes) {
            match outcome {
                Ok(record) => {
                    if !quiet {
                        eprintln!("{base}: release {} is live", record["number"]);
                    }
                    results.push(json!({ "host": base, "release": record["number"] }));
                    updated.push(base.clone());
                }
                Err(message) => {
                    if !quiet {
                        eprintln!("{base}: failed: {message}");
                    }
                    failures.push((base.clone(), message));
                }
            }
        }
        if failures.len() > config.rollout.max_failures as usize {
            if !no_rollback {
                for done in &updated {
                    let body = json!({ "deployment": plan.deployment() });
                    let back = rt.block_on(call(format!("{done}/v1/rollback"), body));
                    if !quiet {
                        match back {
                            Ok(_) => eprintln!("{done}: rolled back"),
                            Err(e) => eprintln!("{done}: rollback failed: {e}"),
                        }
                    }
                }
            }
            let (host, message) = &failures[0];
            return Err(CliError::failed(miette!(
                help = if no_rollback {
                    "--no-rollback: the hosts already updated keep the new release"
                } else {
                    "the hosts already updated were put back on their previous release"
                },
                "host {host} failed: {message}"
            )));
        }
    }
    if out.json {
        return Ok(out.json_value(&json!({
            "environment": plan.environment,
            "digest": plan.digest,
            "hosts": results,
        }))?);
    }
    out.note(format!(
        "{} {} is live on {} host(s)",
        plan.deployment(),
        plan.digest,
        results.len()
    ))?;
    Ok(())
}

/// `scale` through agents: each host's live plan with the new counts, applied there.
fn scale_remote(config: &AppConfig, args: &ScaleArgs, out: &mut Output) -> Result<(), CliError> {
    let deployment = deployment_name(config);
    let Some(registry) = &config.registry else {
        return Err(CliError::invalid(miette!(
            "environment {} deploys to agents but names no registry",
            config.environment
        )));
    };
    let dst: crate::registry_client::Reference = format!("{registry}:{}", config.environment)
        .parse()
        .map_err(|e: String| CliError::invalid(miette!("registry {registry}: {e}")))?;
    let live = each_agent(
        config,
        reqwest::Method::GET,
        &format!("/v1/status?deployment={deployment}"),
        None,
    )?;
    let mut answers = Vec::new();
    for (host, answer) in live {
        let record = match answer {
            Ok(v) if !v.is_null() => v,
            Ok(_) => {
                answers.push((host, Err("nothing deployed".to_string())));
                continue;
            }
            Err(e) => {
                answers.push((host, Err(e)));
                continue;
            }
        };
        let mut plan: ReleasePlan = serde_json::from_value(record["plan"].clone())
            .map_err(|e| CliError::failed(miette!("{host} sent a plan berth cannot read: {e}")))?;
        for (name, n) in &args.services {
            let Some(svc) = plan.services.iter_mut().find(|s| &s.name == name) else {
                return Err(CliError::invalid(miette!(
                    "no service `{name}` in {deployment}"
                )));
            };
            svc.replicas = *n;
        }
        let request = crate::deploy::agent::ApplyRequest {
            image: agent_image(&dst, &plan.digest),
            plan,
            username: None,
            password: None,
        };
        let one = AppConfig {
            hosts: config
                .hosts
                .iter()
                .filter(|h| agent_urls_of(h).as_deref() == Some(host.as_str()))
                .cloned()
                .collect(),
            ..config.clone()
        };
        let mut r = each_agent(
            &one,
            reqwest::Method::POST,
            "/v1/apply",
            Some(serde_json::to_value(&request).expect("a request serialises")),
        )?;
        answers.push(r.remove(0));
    }
    report_hosts(answers, out, |v| format!("release {} is live", v["number"]))
}

/// `[http://]registry/repository@digest`: how an agent is told where to pull an image.
fn agent_image(dst: &crate::registry_client::Reference, digest: &crate::store::Digest) -> String {
    format!(
        "{}{}/{}@{digest}",
        if dst.plain_http { "http://" } else { "" },
        dst.registry,
        dst.repository
    )
}

/// An agent host's base URL.
fn agent_urls_of(h: &HostUrl) -> Option<String> {
    match h {
        HostUrl::Agent { tls, host, port } => Some(format!(
            "{}://{host}:{port}",
            if *tls { "https" } else { "http" }
        )),
        HostUrl::Local => None,
    }
}
