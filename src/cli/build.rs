//! `berth build`: build the app's image from `[image]` steps or its Dockerfile.

use std::collections::BTreeMap;
use std::sync::Arc;

use miette::miette;
use serde_json::json;

use super::{CliError, GlobalOpts, Output};
use crate::build::layer::LayerCompression;
use crate::build::plan::BuildPlan;
use crate::build::{
    self, BuildError, BuildEvent, BuildOptions, StepReport, StepStatus, provenance,
};
use crate::manifest::{InvalidConfig, Project, SourceFile};
use crate::store::Store;

/// Arguments of `berth build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Validate this environment's configuration too.
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
    /// Tag the image (repeatable) [default: APP:latest].
    #[arg(long, short = 't', value_name = "NAME[:TAG]")]
    pub tag: Vec<String>,
    /// Rebuild every step, ignoring cached layers.
    #[arg(long)]
    pub no_cache: bool,
    /// Say for every step whether it hit the cache and, if not, why.
    #[arg(long)]
    pub explain: bool,
    /// Set a build argument (over `[image] args`).
    #[arg(long = "build-arg", value_name = "K=V", value_parser = parse_kv)]
    pub build_args: Vec<(String, String)>,
    /// Build this Dockerfile stage instead of the last.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Network for RUN steps: none (default) or host.
    #[arg(long, value_name = "none|host", default_value = "none", value_parser = ["none", "host"])]
    pub network: String,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not K=V"))
}

/// Pulls the stages' base images that name a registry (`127.0.0.1:5000/base:1`,
/// `ghcr.io/org/base:2`) and are not in the store yet. Bare names (`base:1`) stay local.
fn pull_missing_bases(store: &Store, plan: &BuildPlan, out: &mut Output) -> Result<(), CliError> {
    use crate::build::plan::Base;
    use crate::registry_client::{Client, ClientOptions, Reference, pull};
    let stage_names: Vec<&str> = plan
        .stages
        .iter()
        .filter_map(|s| s.name.as_deref())
        .collect();
    for stage in &plan.stages {
        let Base::Image(raw) = &stage.base else {
            continue;
        };
        let first = raw.split('/').next().unwrap_or_default();
        let names_registry = raw.contains('/')
            && (first.contains('.') || first.contains(':') || first == "localhost");
        if raw.contains('$') || stage_names.contains(&raw.as_str()) || !names_registry {
            continue;
        }
        if store.resolve(raw).is_ok() {
            continue;
        }
        let Ok(reference) = raw.parse::<Reference>() else {
            continue;
        };
        out.note(format!("pulling the base image {reference}"))?;
        let client = Client::new(&reference, &ClientOptions::default())
            .map_err(super::registry::registry_error)?;
        let runtime = crate::registry_client::runtime()
            .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))?;
        runtime
            .block_on(pull::pull(&client, store, &reference, &|_, _, _| {}, None))
            .map_err(super::registry::registry_error)?;
    }
    Ok(())
}

/// The build context directory of a project: `context` resolved from the project
/// directory, which it must not leave (a manifest from an untrusted branch cannot make
/// `/` or `..` its context and copy the builder's files into an image).
fn project_context(
    dir: &std::path::Path,
    context: &std::path::Path,
) -> Result<std::path::PathBuf, CliError> {
    let inside = |p: &std::path::Path| -> Option<std::path::PathBuf> {
        let base = std::fs::canonicalize(dir).ok()?;
        let full = std::fs::canonicalize(p).ok()?;
        full.starts_with(&base).then_some(full)
    };
    let joined = dir.join(context);
    match inside(&joined) {
        Some(p) => Ok(p),
        None if !joined.exists() => Err(CliError::failed(miette!(
            "the build context {} does not exist",
            joined.display()
        ))),
        None => Err(CliError::invalid(miette!(
            help = "put berth.toml at the top of what the image is built from",
            "the build context `{}` is outside the project directory {}",
            context.display(),
            dir.display()
        ))),
    }
}

/// Runs `berth build`.
pub fn run(g: &GlobalOpts, args: &BuildArgs, out: &mut Output) -> Result<(), CliError> {
    let dir = g.project_dir();
    let project = Project::load(&dir)?;
    let config = match &args.env {
        Some(env) => project.resolve(env)?,
        None => project.resolve_base()?,
    };
    let image = &config.image;
    let context = project_context(&dir, &image.context)?;
    let plan = match &image.dockerfile {
        None => BuildPlan::from_toml(image),
        Some(df) => {
            // Read inside the project: a Dockerfile that is a symlink to a host file is not
            // followed there (its lines would end up in error messages).
            let rel = image.context.join(df);
            let path = dir.join(&rel);
            let text = crate::build::scope::Root::new(&dir)
                .and_then(|root| root.read_to_string(&rel.to_string_lossy()))
                .map_err(|e| CliError::failed(miette!("cannot read {}: {e}", path.display())))?;
            let name = image.context.join(df).display().to_string();
            crate::build::dockerfile::parse(&SourceFile {
                name,
                text: Arc::new(text),
            })
            .map_err(|diagnostics| CliError::invalid(InvalidConfig { diagnostics }))?
        }
    };
    let mut build_args: BTreeMap<String, String> = image.args.clone();
    build_args.extend(args.build_args.iter().cloned());
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let abs_context = std::fs::canonicalize(&context).unwrap_or(context.clone());
    let opts = BuildOptions {
        no_cache: args.no_cache,
        build_args,
        target: args.target.clone().or_else(|| image.target.clone()),
        compression: LayerCompression {
            algorithm: image.compression,
            level: image.compression_level,
        },
        epoch,
        labels: provenance::labels(&dir),
        project_id: format!("{}\n{:?}", abs_context.display(), image.dockerfile),
        network_host: args.network == "host",
    };
    let store = Store::open(&g.store_dir())?;
    pull_missing_bases(&store, &plan, out)?;
    let (json, quiet, explain, verbose) = (out.json, out.quiet, args.explain, g.verbose > 0);
    let spinner = super::progress::Spinner::new(!json && !quiet);
    let mut printer = |event: BuildEvent<'_>| match event {
        BuildEvent::Started {
            stage,
            number,
            of,
            text,
        } => {
            let stage = if stage.parse::<usize>().is_ok() {
                String::new()
            } else {
                format!("{stage} ")
            };
            spinner.show(format!("[{stage}{number}/{of}] {text}"));
        }
        BuildEvent::Finished(r) => {
            if !json && !quiet {
                let _ = spinner.suspend(|| out.line(step_line(r, explain, verbose)));
            }
        }
    };
    let result = build::build(&store, &plan, &context, &opts, &mut printer);
    spinner.finish();
    let result = result.map_err(build_error)?;
    let tags = if args.tag.is_empty() {
        vec![format!("{}:latest", config.app.name)]
    } else {
        args.tag.clone()
    };
    for t in &tags {
        store.set_tag(t, &result.image.descriptor())?;
    }
    if out.json {
        let steps: Vec<_> = result
            .steps
            .iter()
            .map(|s| {
                let (status, reason) = match &s.status {
                    StepStatus::Hit => ("hit", None),
                    StepStatus::Miss(r) => ("miss", Some(r.as_str())),
                    StepStatus::Config => ("config", None),
                };
                json!({ "stage": s.stage, "step": s.text, "origin": s.origin, "status": status, "reason": reason,
                        "layer": s.layer.as_ref().map(|l| json!({"digest": l.digest, "diff_id": l.diff_id, "size": l.size})) })
            })
            .collect();
        out.json_value(&json!({ "digest": result.image.digest, "tags": tags, "steps": steps }))?;
    } else {
        out.line(&result.image.digest)?;
    }
    Ok(())
}

/// One step's line; with `-v` also where the step was written.
fn step_line(r: &StepReport, explain: bool, verbose: bool) -> String {
    let status = match (&r.status, explain) {
        (StepStatus::Hit, _) => "HIT ".to_string(),
        (StepStatus::Miss(_), false) => "BUILT".to_string(),
        (StepStatus::Miss(why), true) => format!("MISS  ({why})"),
        (StepStatus::Config, _) => "-".to_string(),
    };
    let layer = r
        .layer
        .as_ref()
        .map(|l| format!("  {} {}", l.digest.short(), super::human_size(l.size)))
        .unwrap_or_default();
    let stage = if r.stage.parse::<usize>().is_ok() {
        String::new()
    } else {
        format!("{} ", r.stage)
    };
    let line = format!(
        "[{stage}{}/{}] {:<48} {status}{layer}",
        r.number,
        r.of,
        truncate(&r.text, 48)
    );
    if verbose {
        format!("{line}  ({})", r.origin)
    } else {
        line
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// Build errors are the user's (exit 2) when they are about the input: a missing source, a
/// bad Dockerfile word, an unknown base, stage or user; anything else is a failure (exit 1).
fn build_error(e: BuildError) -> CliError {
    let input = match &e {
        BuildError::Step { source, .. } => !matches!(
            **source,
            BuildError::Store(_)
                | BuildError::Context { .. }
                | BuildError::RunFailed { .. }
                | BuildError::Runtime(_)
        ),
        BuildError::UnknownStage(_)
        | BuildError::OutsideContext(_)
        | BuildError::MissingSource(_) => true,
        _ => false,
    };
    let report = miette::Report::from_err(e);
    if input {
        CliError::invalid(report)
    } else {
        CliError::failed(report)
    }
}
