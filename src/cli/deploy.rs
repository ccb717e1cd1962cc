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
}

/// Arguments of `berth status` and `berth down`.
#[derive(Debug, clap::Args)]
pub struct EnvArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
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
        "environment {} names remote hosts",
        config.environment
    )))
}

/// `berth deploy --env E [--image REF] [--dry-run]`.
pub fn deploy(g: &GlobalOpts, args: &DeployArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir())?;
    let config = project.resolve(&args.env)?;
    local_only(&config)?;
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
        out.line(format!(
            "deploy {} to {} (local): {digest}",
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
    let deployment = format!("{}-{}", config.app.name, config.environment);
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
    local_only(&config)?;
    let store = Store::open(&g.store_dir())?;
    let deployment = format!("{}-{}", config.app.name, config.environment);
    let n = local::down(&store, &deployment).map_err(deploy_error)?;
    out.note(format!("{deployment}: removed {n} container(s)"))?;
    Ok(())
}
