//! `berth promote --to E [--from S]`: arguments and printing around
//! [`crate::promote::promotion`], which checks the gates, copies the image byte for byte,
//! reads it back and rolls it out as a release of the target. Never builds.

use std::sync::Arc;

use miette::miette;
use serde_json::json;

use super::pipeline::{self, Shown, finish, open, release_error, runtime};
use super::{CliError, GlobalOpts, Output};
use crate::manifest::Project;
use crate::promote::Gate;
use crate::promote::promotion::{self, PromoteError};

/// Arguments of `berth promote`.
#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// The environment to promote into.
    #[arg(long, value_name = "ENV")]
    pub to: String,
    /// The environment to promote from [default: the target's `promote_from`].
    #[arg(long, value_name = "ENV")]
    pub from: Option<String>,
    /// Check the gates and everything else, print the plan (blobs to mount or copy,
    /// hosts); change nothing (exit 1 if anything would stop it).
    #[arg(long)]
    pub dry_run: bool,
    /// Promote even though gates fail; the ledger records which, and `--reason`.
    #[arg(long, requires = "reason")]
    pub force: bool,
    /// Why the gates are overridden (recorded in the ledger).
    #[arg(long, requires = "force")]
    pub reason: Option<String>,
    /// When a host fails, leave the hosts already updated on the new release.
    #[arg(long)]
    pub no_rollback: bool,
}

fn gate_lines(gates: &[Gate], out: &mut Output) -> Result<(), CliError> {
    for g in gates {
        out.line(format!(
            "  {} {:<8} {}",
            if g.passed { "ok  " } else { "FAIL" },
            g.name,
            g.detail
        ))?;
    }
    Ok(())
}

/// `berth promote`.
pub fn promote(g: &GlobalOpts, args: &PromoteArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir())?;
    let target_config = project.resolve(&args.to)?;
    let Some(from) = args
        .from
        .clone()
        .or_else(|| target_config.promote_from.clone())
    else {
        return Err(CliError::invalid(miette!(
            help = format!(
                "pass --from ENV, or set promote_from in environments/{}.toml",
                args.to
            ),
            "environment {} names no environment to promote from",
            args.to
        )));
    };
    if from == args.to {
        return Err(CliError::invalid(miette!(
            "cannot promote {} into itself",
            args.to
        )));
    }
    let rt = runtime()?;
    let shown = Arc::new(Shown::new(out));
    // Both environments open first: a missing token or trust setting stops it here.
    let (mut target, _store) = pipeline::open_config(g, target_config, &rt, &shown)?;
    let (source, _) = open(g, &from, &rt, &shown)?;
    let mut required = Vec::new();
    for env in &target.config.require.clone() {
        let h = if *env == from {
            source.history()
        } else {
            open(g, env, &rt, &shown)?.0.history()
        }?;
        required.push((env.clone(), h));
    }
    let plan = promotion::plan(&source, &target, &required).map_err(promote_error)?;
    let refused = plan.refused();
    if args.dry_run {
        let problems = target.preflight(&plan.plan, &plan.origin, Vec::new());
        let transfer = target
            .publish_plan(&plan.digest, &plan.origin)
            .map_err(super::registry::registry_error)?;
        if out.json {
            out.json_value(&json!({
                "from": plan.from, "to": plan.to, "digest": plan.digest, "gates": plan.gates,
                "transfer": transfer, "hosts": target.host_names(), "plan": plan.plan,
                "problems": problems,
            }))?;
        } else {
            out.line(format!(
                "promote {} from {} to {}:",
                plan.digest, plan.from, plan.to
            ))?;
            gate_lines(&plan.gates, out)?;
            super::deploy::print_plan(&target.host_names(), &plan.plan, transfer.as_ref(), out)?;
            for p in &problems {
                out.line(format!("  problem: {p}"))?;
            }
        }
        return if problems.is_empty() && (refused.is_empty() || args.force) {
            Ok(())
        } else {
            Err(CliError::failed(miette!(
                "this promotion would not go through ({} gate(s) refuse, {} problem(s))",
                refused.len(),
                problems.len()
            )))
        };
    }
    if !refused.is_empty() && !args.force {
        if out.json {
            out.json_value(&json!({
                "from": plan.from, "to": plan.to, "digest": plan.digest,
                "outcome": "refused", "gates": plan.gates,
            }))?;
        } else {
            out.line(format!(
                "promote {} from {} to {}:",
                plan.digest, plan.from, plan.to
            ))?;
            gate_lines(&plan.gates, out)?;
        }
        let names: Vec<String> = refused
            .iter()
            .map(|g| format!("{} ({})", g.name, g.detail))
            .collect();
        return Err(CliError::failed(miette!(
            help = "--force --reason \"…\" overrides the gates and records why",
            "promotion to {} refused by {}",
            args.to,
            names.join("; ")
        )));
    }
    target.interrupt = pipeline::interrupt_on_signals(&shown);
    let force = args.force.then(|| args.reason.clone().unwrap_or_default());
    let result = promotion::run(
        &target,
        &plan,
        force.as_deref(),
        !args.no_rollback,
        Vec::new(),
        shown.as_ref(),
    );
    shown.finish();
    let result = match result {
        Ok(r) => Ok(r),
        Err(PromoteError::Release(e)) => Err(e),
        Err(e) => return Err(promote_error(e)),
    };
    finish(
        &target.config,
        result,
        Some(&format!("promoted from {from}")),
        out,
    )
}

fn promote_error(e: PromoteError) -> CliError {
    match e {
        PromoteError::NothingReleased(env) => CliError::failed(miette!(
            help = format!("deploy it first: berth deploy --env {env}"),
            "{env} has no release to promote"
        )),
        PromoteError::Release(e) => release_error(e),
        other => CliError::failed(miette!("{other}")),
    }
}
