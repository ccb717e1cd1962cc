//! `berth promote --to E [--from S]`: the image the source environment runs, checked
//! against the gates, copied byte for byte into the target's registry (mounts within one
//! registry, only the missing blobs across registries), read back and compared by digest,
//! rolled out to the target's hosts and recorded in its ledger. Never builds, never
//! re-encodes.

use miette::miette;
use serde_json::json;

use super::agents::{each_agent, is_remote};
use super::deploy::{
    deployment_name, host_names, print_plan, record_outcome, release_plan, roll_out,
};
use super::{CliError, GlobalOpts, Output};
use crate::deploy::local;
use crate::manifest::{AppConfig, Project};
use crate::promote::ledger::{Kind, Release};
use crate::promote::{Evidence, Gate, HostState, check};
use crate::registry_client::push::{BlobAction, BlobReport};
use crate::registry_client::{Client, ClientOptions, Reference, copy, pull, push};
use crate::store::{Digest, Store};

/// Arguments of `berth promote`.
#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// The environment to promote into.
    #[arg(long, value_name = "ENV")]
    pub to: String,
    /// The environment to promote from [default: the target's `promote_from`].
    #[arg(long, value_name = "ENV")]
    pub from: Option<String>,
    /// Check the gates and print the plan (blobs to mount or copy, hosts); change nothing.
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

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::failed(miette!("{e}"))
}

/// What each host of an environment runs.
pub(super) fn host_states(store: &Store, config: &AppConfig) -> Result<Vec<HostState>, CliError> {
    let deployment = deployment_name(config);
    if !is_remote(config) {
        let live = local::current(store, &deployment);
        let (running, total) = live
            .as_ref()
            .map(|r| {
                local::replica_health(store, r)
                    .values()
                    .fold((0, 0), |(a, b), c| (a + c.running, b + c.total))
            })
            .unwrap_or_default();
        return Ok(vec![HostState {
            host: "local".into(),
            digest: live.map(|r| r.digest),
            running,
            total,
            error: None,
        }]);
    }
    let answers = each_agent(
        config,
        reqwest::Method::GET,
        &format!("/v1/status?deployment={deployment}"),
        None,
    )?;
    Ok(answers
        .into_iter()
        .map(|(host, answer)| match answer {
            Ok(v) => {
                let (running, total) = v["services"]
                    .as_object()
                    .into_iter()
                    .flat_map(|m| m.values())
                    .fold((0, 0), |(a, b), c| {
                        (
                            a + c["running"].as_u64().unwrap_or(0) as usize,
                            b + c["total"].as_u64().unwrap_or(0) as usize,
                        )
                    });
                HostState {
                    host,
                    digest: v["digest"].as_str().and_then(|d| d.parse().ok()),
                    running,
                    total,
                    error: None,
                }
            }
            Err(e) => HostState {
                host,
                digest: None,
                running: 0,
                total: 0,
                error: Some(e),
            },
        })
        .collect())
}

/// Where an environment's images are: a registry repository, or the local store.
fn image_home(config: &AppConfig) -> Result<Option<Reference>, CliError> {
    config
        .registry
        .as_ref()
        .map(|r| {
            format!("{r}:{}", config.environment)
                .parse()
                .map_err(|e: String| CliError::invalid(miette!("registry {r}: {e}")))
        })
        .transpose()
}

fn client(r: &Reference) -> Result<Client, CliError> {
    Client::new(r, &ClientOptions::default()).map_err(super::registry::registry_error)
}

/// The copy of a promotion: what moved (or would), and the digest the target holds.
struct Copied {
    blobs: Vec<BlobReport>,
    bytes: u64,
    how: &'static str,
}

/// Copies `digest` from the source's home to the target's, then reads the target's
/// manifest back and refuses unless its digest is `digest`.
fn copy_image(
    store: &Store,
    source: &AppConfig,
    target: &AppConfig,
    digest: &Digest,
    dry_run: bool,
) -> Result<Copied, CliError> {
    let rt = crate::registry_client::runtime()
        .map_err(|e| failed(format!("cannot start the network runtime: {e}")))?;
    let reg = super::registry::registry_error;
    let (src, dst) = (image_home(source)?, image_home(target)?);
    let copied = match (&src, &dst) {
        (Some(from), Some(to)) => {
            let from = from.with_digest(digest);
            let (s, d) = (client(&from)?, client(to)?);
            let r = rt
                .block_on(copy::copy(&s, &d, &from, to, dry_run))
                .map_err(reg)?;
            Copied {
                blobs: r.blobs,
                bytes: r.bytes_copied,
                how: if s.registry() == d.registry() {
                    "within one registry"
                } else {
                    "between registries"
                },
            }
        }
        (None, Some(to)) => {
            let d = client(to)?;
            let r = rt
                .block_on(push::push(&d, store, digest, to, dry_run, &|_| {}, None))
                .map_err(reg)?;
            Copied {
                blobs: r.blobs,
                bytes: r.bytes_sent,
                how: "from the local store",
            }
        }
        (Some(from), None) => {
            let from = from.with_digest(digest);
            let s = client(&from)?;
            if dry_run {
                Copied {
                    blobs: Vec::new(),
                    bytes: 0,
                    how: "into the local store",
                }
            } else {
                let r = rt
                    .block_on(pull::pull(&s, store, &from, &|_, _, _| {}, None))
                    .map_err(reg)?;
                Copied {
                    blobs: Vec::new(),
                    bytes: r.bytes,
                    how: "into the local store",
                }
            }
        }
        (None, None) => Copied {
            blobs: Vec::new(),
            bytes: 0,
            how: "the local store already has it",
        },
    };
    if dry_run {
        return Ok(copied);
    }
    // Read back what the target now calls the environment's image.
    let held = match &dst {
        Some(to) => {
            let d = client(to)?;
            rt.block_on(pull::fetch_manifest(
                &d,
                &to.repository,
                &to.manifest_ref(),
                None,
            ))
            .map_err(reg)?
            .2
        }
        None => store.resolve(digest.as_str())?,
    };
    if held != *digest {
        return Err(CliError::failed(miette!(
            help = "nothing was rolled out; the target registry rewrote the manifest",
            "the target holds {held}, not the promoted {digest}"
        )));
    }
    Ok(copied)
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
    let target = project.resolve(&args.to)?;
    let Some(source_name) = args.from.clone().or_else(|| target.promote_from.clone()) else {
        return Err(CliError::invalid(miette!(
            help = format!(
                "pass --from ENV, or set promote_from in environments/{}.toml",
                args.to
            ),
            "environment {} names no environment to promote from",
            args.to
        )));
    };
    if source_name == args.to {
        return Err(CliError::invalid(miette!(
            "cannot promote {} into itself",
            args.to
        )));
    }
    let source = project.resolve(&source_name)?;
    let store = Store::open(&g.store_dir())?;
    let source_history = super::deploy::history(&store, &source)?;
    let Some(released) = crate::promote::ledger::current(&source_history).cloned() else {
        return Err(CliError::failed(miette!(
            help = format!("deploy it first: berth deploy --env {source_name}"),
            "{source_name} has no release to promote"
        )));
    };
    let digest = released.digest.clone();
    let hosts = host_states(&store, &source)?;
    let mut required = Vec::new();
    for env in &target.require {
        let h = if *env == source_name {
            source_history.clone()
        } else {
            super::deploy::history(&store, &project.resolve(env)?)?
        };
        required.push((env.clone(), h));
    }
    let gates = check(&Evidence {
        source: &source_name,
        source_history: &source_history,
        digest: &digest,
        hosts: &hosts,
        soak: target.soak.map(|s| s.0),
        required: &required,
        now: jiff::Timestamp::now(),
    });
    let refused: Vec<&Gate> = gates.iter().filter(|g| !g.passed).collect();
    if !refused.is_empty() && !args.force {
        if out.json {
            out.json_value(&json!({
                "from": source_name, "to": args.to, "digest": digest,
                "promoted": false, "gates": gates,
            }))?;
        } else {
            out.line(format!(
                "promote {} from {source_name} to {}:",
                digest, args.to
            ))?;
            gate_lines(&gates, out)?;
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
    let copied = copy_image(&store, &source, &target, &digest, args.dry_run)?;
    let plan = release_plan(&target, &digest, released.revision.clone());
    if args.dry_run {
        if out.json {
            return Ok(out.json_value(&json!({
                "from": source_name, "to": args.to, "digest": digest, "gates": gates,
                "copy": copied.how, "blobs": copied.blobs, "hosts": host_names(&target),
                "plan": plan,
            }))?);
        }
        out.line(format!(
            "promote {digest} from {source_name} to {} (copy {}):",
            args.to, copied.how
        ))?;
        gate_lines(&gates, out)?;
        let (mut n, mut bytes) = (0, 0);
        for b in &copied.blobs {
            let what = match &b.action {
                BlobAction::Present => continue,
                BlobAction::Mount { from } => format!("mount from {from}"),
                BlobAction::Upload => "copy".to_string(),
            };
            n += 1;
            bytes += b.size;
            out.line(format!("  {what} {} ({} bytes)", b.digest, b.size))?;
        }
        out.line(format!("  {n} blob(s) to move, {bytes} bytes"))?;
        return print_plan(&target, &plan, out);
    }
    if !out.quiet && !out.json {
        eprintln!(
            "copied {digest} to {} {}: {} bytes of blobs moved",
            args.to, copied.how, copied.bytes
        );
    }
    let mut release = Release::new(&target, digest.clone(), Kind::Promote);
    release.source = Some(source_name.clone());
    release.revision = released.revision.clone();
    release.hosts = host_names(&target);
    if args.force {
        release.forced = refused.iter().map(|g| g.name.to_string()).collect();
        release.reason = args.reason.clone();
    }
    let result = roll_out(g, &target, &store, &plan, args.no_rollback, out);
    let (recorded, answers) = record_outcome(&store, &target, release, result, out)?;
    if out.json {
        return Ok(out.json_value(&json!({
            "from": source_name, "to": args.to, "digest": digest, "promoted": true,
            "release": recorded.number, "gates": gates, "forced": recorded.forced,
            "copy": copied.how, "bytes_copied": copied.bytes, "blobs": copied.blobs,
            "hosts": answers,
        }))?);
    }
    super::deploy::host_table(&answers, out)?;
    out.note(format!(
        "{} release {} is live on {} host(s), promoted from {source_name}: {digest}",
        deployment_name(&target),
        recorded.number,
        answers.len()
    ))?;
    Ok(())
}
