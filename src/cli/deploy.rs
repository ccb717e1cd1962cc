//! The commands that make releases — `deploy`, `rollback`, `scale`, `down` — as argument
//! structs and printing around [`crate::promote::release`], which does the work.

use std::sync::Arc;

use miette::miette;
use serde_json::json;

use super::pipeline::{self, Shown, finish, open, runtime};
use super::{CliError, GlobalOpts, Output};
use crate::deploy::ReleasePlan;
use crate::promote::ledger::{Kind, Verdict, current};
use crate::promote::release::{ImageOrigin, ReleaseRequest};

/// Arguments of `berth deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
    /// Deploy this image (tag or digest) instead of building.
    #[arg(long)]
    pub image: Option<String>,
    /// Check everything and print the plan; change nothing (exit 1 if the checks fail).
    #[arg(long)]
    pub dry_run: bool,
    /// When a host fails, leave the hosts already updated on the new release.
    #[arg(long)]
    pub no_rollback: bool,
    /// Deploy into an environment that takes releases by promotion (`promote_from`).
    #[arg(long, requires = "reason")]
    pub force: bool,
    /// Why (recorded in the ledger with --force).
    #[arg(long, requires = "force")]
    pub reason: Option<String>,
}

/// Arguments of `berth down`.
#[derive(Debug, clap::Args)]
pub struct EnvArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
}

/// Arguments of `berth rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The environment.
    #[arg(long)]
    pub env: String,
    /// The release to go back to [default: the newest that served another image].
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

/// `berth deploy --env E [--image REF] [--dry-run]`.
pub fn deploy(g: &GlobalOpts, args: &DeployArgs, out: &mut Output) -> Result<(), CliError> {
    let project = crate::manifest::Project::load(&g.project_dir())?;
    let config = project.resolve(&args.env)?;
    // An environment fed by promotion takes a deploy only when forced, with a reason.
    if let Some(from) = &config.promote_from
        && !args.force
    {
        return Err(CliError::invalid(miette!(
            help = format!(
                "berth promote --to {} moves {from}'s release here; or deploy with --force --reason \"…\" (recorded)",
                args.env
            ),
            "environment {} takes releases by promotion from {from}",
            args.env
        )));
    }
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (env, store) = pipeline::open_config(g, config.clone(), &rt, &shown)?;
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
                file: None,
                pull: crate::build::PullPolicy::Missing,
                context: None,
                secret: Vec::new(),
            };
            // The build's own output goes to stderr: stdout is the deploy's.
            let mut to_stderr = Output::stderr(out.quiet || out.json);
            super::build::run(g, &build, &mut to_stderr)?;
            store.resolve(&config.app.name)?
        }
    };
    // The commit the image was built from, as its label says: `--image` may name an
    // older build than the working tree's commit (and the tree need not be read again).
    let revision = store
        .image(&digest)?
        .config
        .oci
        .config()
        .as_ref()
        .and_then(|c| {
            c.labels()
                .as_ref()?
                .get(crate::build::provenance::REVISION)
                .cloned()
        });
    let plan = ReleasePlan::for_environment(&config, &digest, revision);
    let origin = ImageOrigin::Store;
    if args.dry_run {
        return dry_run(&env, &plan, &origin, out);
    }
    let mut env = env;
    env.interrupt = pipeline::interrupt_on_signals(&shown);
    let request = ReleaseRequest {
        kind: Kind::Deploy,
        plan: plan.clone(),
        host_rollback: None,
        origin,
        source: None,
        forced: if args.force {
            vec!["promotion".to_string()]
        } else {
            Vec::new()
        },
        reason: args.reason.clone(),
        put_back: !args.no_rollback,
    };
    let result = env.release(request, Vec::new(), shown.as_ref());
    shown.finish();
    let ok = result.is_ok();
    finish(&config, result, None, out)?;
    if ok
        && !out.json
        && config
            .hosts
            .iter()
            .all(|h| matches!(h, crate::manifest::values::HostUrl::Local))
    {
        for s in &plan.services {
            for p in &s.ports {
                out.note(format!("  {} on {}", s.name, p.listen_addr()))?;
            }
        }
    }
    Ok(())
}

/// `deploy --dry-run`: the checks and the plan, nothing changed; exit 1 if a check fails.
fn dry_run(
    env: &crate::promote::release::Environment,
    plan: &ReleasePlan,
    origin: &ImageOrigin,
    out: &mut Output,
) -> Result<(), CliError> {
    let digest = &plan.digest;
    let problems = env.preflight(plan, origin, Vec::new());
    let transfer = env
        .publish_plan(digest, origin)
        .map_err(super::registry::registry_error)?;
    if out.json {
        out.json_value(&json!({
            "environment": env.config.environment, "digest": digest, "plan": plan,
            "hosts": env.host_names(), "transfer": transfer, "problems": problems,
        }))?;
    } else {
        out.line(format!(
            "deploy {} to {}: {digest}",
            plan.app, plan.environment
        ))?;
        print_plan(&env.host_names(), plan, transfer.as_ref(), out)?;
        for p in &problems {
            out.line(format!("  problem: {p}"))?;
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(miette!(
            "{} problem(s) would stop this deploy",
            problems.len()
        )))
    }
}

/// Prints a plan's hosts, the blobs that would move, and its services.
pub(super) fn print_plan(
    hosts: &[String],
    plan: &ReleasePlan,
    transfer: Option<&crate::promote::release::Transfer>,
    out: &mut Output,
) -> Result<(), CliError> {
    use crate::registry_client::push::BlobAction;
    if let Some(t) = transfer {
        let (mut n, mut bytes) = (0, 0);
        for b in &t.blobs {
            let what = match &b.action {
                BlobAction::Present => continue,
                BlobAction::Mount { from } => format!("mount from {from}"),
                BlobAction::Upload => "copy".to_string(),
            };
            n += 1;
            bytes += b.size;
            out.line(format!("  {what} {} ({} bytes)", b.digest, b.size))?;
        }
        out.line(format!("  {n} blob(s) to move ({}), {bytes} bytes", t.how))?;
    }
    out.line(format!("  hosts: {}", hosts.join(", ")))?;
    for s in &plan.services {
        let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
        out.line(format!(
            "  {}: {} replica(s) per host{}{}",
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

/// `berth rollback --env E [--to N]`: an earlier release's image and settings rolled out
/// again as a new release (by default the newest that served another image than the
/// current one).
pub fn rollback(g: &GlobalOpts, args: &RollbackArgs, out: &mut Output) -> Result<(), CliError> {
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (mut env, _store) = open(g, &args.env, &rt, &shown)?;
    let history = env.history()?;
    let live = current(&history).map(|r| r.digest.clone());
    let target = match args.to {
        Some(n) => history.iter().find(|r| r.number == n),
        None => history.iter().rev().find(|r| {
            r.outcome == Verdict::Live && r.kind != Kind::Down && Some(&r.digest) != live.as_ref()
        }),
    };
    let deployment = env.deployment();
    let Some(target) = target.cloned() else {
        return Err(CliError::failed(miette!(
            help = format!("`berth releases --env {}` lists them", args.env),
            "{deployment} has no {} to go back to",
            match args.to {
                Some(n) => format!("release {n}"),
                None => "earlier release".to_string(),
            }
        )));
    };
    if target.outcome != Verdict::Live || target.kind == Kind::Down {
        return Err(CliError::failed(miette!(
            "release {} never served; roll back to one that did",
            target.number
        )));
    }
    // The plan the ledger recorded for it, else each host's own record of that image.
    let (plan, host_rollback) = match &target.plan {
        Some(p) => (p.clone(), None),
        None => (
            ReleasePlan::for_environment(&env.config, &target.digest, target.revision.clone()),
            Some((Some(target.number), target.digest.clone())),
        ),
    };
    env.interrupt = pipeline::interrupt_on_signals(&shown);
    let request = ReleaseRequest {
        kind: Kind::Rollback,
        plan,
        host_rollback,
        origin: ImageOrigin::InPlace,
        source: None,
        forced: Vec::new(),
        reason: None,
        put_back: true,
    };
    let result = env.release(request, Vec::new(), shown.as_ref());
    shown.finish();
    finish(
        &env.config,
        result,
        Some(&format!("rollback to release {}", target.number)),
        out,
    )
}

/// `berth scale --env E web=3`: the current release's plan with other replica counts,
/// rolled out as a new release.
pub fn scale(g: &GlobalOpts, args: &ScaleArgs, out: &mut Output) -> Result<(), CliError> {
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (mut env, _store) = open(g, &args.env, &rt, &shown)?;
    let history = env.history()?;
    let deployment = env.deployment();
    let Some(live) = current(&history).cloned() else {
        return Err(CliError::failed(miette!(
            help = "deploy it first",
            "{deployment} runs nothing to scale"
        )));
    };
    let base = live.plan.clone().unwrap_or_else(|| {
        ReleasePlan::for_environment(&env.config, &live.digest, live.revision.clone())
    });
    let plan = base
        .scaled(&args.services)
        .map_err(|e| CliError::invalid(miette!("{e}")))?;
    let what: Vec<String> = args
        .services
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect();
    env.interrupt = pipeline::interrupt_on_signals(&shown);
    let request = ReleaseRequest {
        kind: Kind::Scale,
        plan,
        host_rollback: None,
        origin: ImageOrigin::InPlace,
        source: None,
        forced: Vec::new(),
        reason: None,
        put_back: true,
    };
    let result = env.release(request, Vec::new(), shown.as_ref());
    shown.finish();
    finish(
        &env.config,
        result,
        Some(&format!("scaled {}", what.join(" "))),
        out,
    )
}

/// `berth down --env E`: everything the environment runs stopped and removed on every
/// host, recorded as a `down` release.
pub fn down(g: &GlobalOpts, args: &EnvArgs, out: &mut Output) -> Result<(), CliError> {
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    let (env, _store) = open(g, &args.env, &rt, &shown)?;
    let result = env.down(shown.as_ref());
    shown.finish();
    match result {
        Ok(None) => {
            if out.json {
                out.json_value(&json!({
                    "environment": env.config.environment,
                    "deployment": env.deployment(),
                    "outcome": "nothing to stop",
                }))?;
            } else {
                out.note(format!(
                    "{}: nothing runs, nothing to stop",
                    env.deployment()
                ))?;
            }
            Ok(())
        }
        Ok(Some(r)) if !out.json => {
            out.note(format!(
                "{} is down (release {}) on {} host(s)",
                env.deployment(),
                r.release.number,
                r.report.hosts.len()
            ))?;
            for w in &r.warnings {
                crate::say!("warning: {w}");
            }
            Ok(())
        }
        Ok(Some(r)) => Ok(out.json_value(&pipeline::release_json(&env.config, &r))?),
        Err(e) => finish(&env.config, Err(e), Some("down"), out),
    }
}
