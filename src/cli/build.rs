//! `berth build`: build the app's image from `[image]` steps or its Dockerfile.

use std::collections::BTreeMap;
use std::sync::Arc;

use miette::miette;
use serde_json::json;

use super::{CliError, GlobalOpts, Output};
use std::path::{Path, PathBuf};

use crate::build::layer::LayerCompression;
use crate::build::plan::BuildPlan;
use crate::build::{
    self, BuildError, BuildEvent, BuildOptions, PullPolicy, Puller, StepReport, StepStatus,
    provenance,
};
use crate::manifest::secrets::SecretRef;
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
    /// Build this Dockerfile, without a berth.toml (as `docker build -f`).
    #[arg(long, short = 'f', value_name = "DOCKERFILE")]
    pub file: Option<PathBuf>,
    /// Pull the images the build names: when missing (default), always, or never.
    #[arg(long, value_enum, value_name = "POLICY", default_value = "missing")]
    pub pull: PullPolicy,
    /// A secret for `RUN --mount=type=secret,id=ID`: from a file or a variable (over
    /// `[image.secrets]`).
    #[arg(long, value_name = "id=ID,src=FILE|env=VAR", value_parser = parse_secret)]
    pub secret: Vec<(String, SecretRef)>,
    /// The build context, without a berth.toml [default: .]; its Dockerfile (or
    /// Containerfile) is built unless -f names another.
    #[arg(value_name = "CONTEXT")]
    pub context: Option<PathBuf>,
}

/// `id=ID,src=FILE` / `id=ID,env=VAR` (also `source=`, `type=file|env`), as
/// `docker buildx build --secret` reads it; `id=ID` alone reads the variable `ID`.
fn parse_secret(s: &str) -> Result<(String, SecretRef), String> {
    let (mut id, mut src, mut env, mut kind) = (None, None, None, None);
    for field in s.split(',') {
        match field.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(v.to_string()),
            Some(("env", v)) => env = Some(v.to_string()),
            Some(("type", v)) => kind = Some(v.to_string()),
            _ => return Err(format!("`{field}` is not id=, src=, env= or type=")),
        }
    }
    let id = id.ok_or("a secret needs id=")?;
    let r = match (src, env, kind.as_deref()) {
        (Some(p), None, None | Some("file")) => SecretRef::File(p.into()),
        (None, Some(v), None | Some("env")) => SecretRef::Env(v),
        (None, None, Some("env") | None) => SecretRef::Env(id.clone()),
        _ => return Err("give one of src=FILE or env=VAR".into()),
    };
    Ok((id, r))
}

/// Reads a build secret: a file's exact bytes (relative to `dir`), or a variable.
fn read_secret(
    id: &str,
    r: &SecretRef,
    dir: &Path,
) -> Result<crate::runtime::process::SecretBytes, CliError> {
    use crate::runtime::process::SecretBytes;
    match r {
        SecretRef::File(p) => {
            let full = dir.join(p);
            std::fs::read(&full).map(SecretBytes).map_err(|e| {
                CliError::invalid(miette!(
                    "cannot read the secret `{id}` from {}: {e}",
                    full.display()
                ))
            })
        }
        SecretRef::Env(var) => std::env::var_os(var)
            .map(|v| SecretBytes(std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec()))
            .ok_or_else(|| {
                CliError::invalid(miette!(
                    "the secret `{id}` comes from the variable {var}, which is not set"
                ))
            }),
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not K=V"))
}

/// Pulls an image a build names (as `berth pull` does: credentials from `config.json`),
/// saying so on standard error unless quiet.
pub(super) fn puller(store: &Store, quiet: bool) -> Puller {
    use crate::registry_client::{Client, ClientOptions, Reference, pull};
    let store = store.clone();
    Puller(Arc::new(move |reference: &str| {
        let reference: Reference = reference.parse()?;
        if !quiet {
            crate::say!("pulling {reference}");
        }
        let client =
            Client::new(&reference, &ClientOptions::default()).map_err(|e| e.to_string())?;
        let runtime = crate::registry_client::runtime()
            .map_err(|e| format!("cannot start the network runtime: {e}"))?;
        runtime
            .block_on(pull::pull(&client, &store, &reference, &|_, _, _| {}, None))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }))
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

/// What a build reads: the plan, its context and where they came from.
struct Input {
    plan: BuildPlan,
    context: PathBuf,
    /// Where provenance (git) labels are read.
    project: PathBuf,
    build_args: BTreeMap<String, String>,
    target: Option<String>,
    compression: LayerCompression,
    ignore_file: Option<PathBuf>,
    /// `APP:latest` for a project; none for a bare Dockerfile.
    default_tag: Option<String>,
    /// Identifies the Dockerfile, so `--explain` compares with its last build.
    id: String,
    /// `[image.secrets]`.
    secrets: BTreeMap<String, SecretRef>,
}

/// A project's `[image]`: its steps or Dockerfile, context, args and compression.
fn project_input(g: &GlobalOpts, args: &BuildArgs) -> Result<Input, CliError> {
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
            parse_dockerfile(rel.display().to_string(), text)?
        }
    };
    let abs_context = std::fs::canonicalize(&context).unwrap_or(context.clone());
    Ok(Input {
        plan,
        id: format!("{}\n{:?}", abs_context.display(), image.dockerfile),
        context,
        project: dir,
        build_args: image.args.clone(),
        target: image.target.clone(),
        compression: LayerCompression {
            algorithm: image.compression,
            level: image.compression_level,
        },
        ignore_file: None,
        default_tag: Some(format!("{}:latest", config.app.name)),
        secrets: image.secrets.clone(),
    })
}

fn parse_dockerfile(name: String, text: String) -> Result<BuildPlan, CliError> {
    crate::build::dockerfile::parse(&SourceFile {
        name,
        text: Arc::new(text),
    })
    .map_err(|diagnostics| CliError::invalid(InvalidConfig { diagnostics }))
}

/// A Dockerfile and a context named on the command line, as `docker build -f F CONTEXT`:
/// the Dockerfile is read where it is (the user named it), the context is the directory
/// given, and `F.dockerignore` next to the Dockerfile replaces the context's ignore file.
fn dockerfile_input(g: &GlobalOpts, args: &BuildArgs) -> Result<Input, CliError> {
    let base = g.project_dir();
    let context = base.join(args.context.as_deref().unwrap_or(Path::new(".")));
    if !context.is_dir() {
        return Err(CliError::invalid(miette!(
            "the build context {} is not a directory",
            context.display()
        )));
    }
    if args.file.as_deref() == Some(Path::new("-")) {
        // `-f -`: the Dockerfile on standard input, as `docker build -f - CONTEXT`.
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| {
            CliError::invalid(miette!("cannot read the Dockerfile from stdin: {e}"))
        })?;
        let plan = parse_dockerfile("<stdin>".into(), text)?;
        let abs_context = std::fs::canonicalize(&context).unwrap_or(context.clone());
        return Ok(Input {
            plan,
            id: format!("{}\n<stdin>", abs_context.display()),
            project: context.clone(),
            context,
            build_args: BTreeMap::new(),
            target: None,
            compression: LayerCompression::default(),
            ignore_file: None,
            default_tag: None,
            secrets: BTreeMap::new(),
        });
    }
    let file = match &args.file {
        Some(f) => base.join(f),
        None => ["Dockerfile", "Containerfile"]
            .iter()
            .map(|n| context.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CliError::invalid(miette!(
                    help = "name one with -f",
                    "{} has no Dockerfile or Containerfile",
                    context.display()
                ))
            })?,
    };
    let file: PathBuf = file.components().collect();
    let text = std::fs::read_to_string(&file)
        .map_err(|e| CliError::invalid(miette!("cannot read {}: {e}", file.display())))?;
    let plan = parse_dockerfile(file.display().to_string(), text)?;
    let ignore_file = [".dockerignore", ".containerignore"]
        .iter()
        .map(|ext| {
            let mut name = file.file_name().unwrap_or_default().to_os_string();
            name.push(ext);
            file.with_file_name(name)
        })
        .find(|p| p.is_file());
    let abs_context = std::fs::canonicalize(&context).unwrap_or(context.clone());
    let abs_file = std::fs::canonicalize(&file).unwrap_or(file.clone());
    Ok(Input {
        plan,
        id: format!("{}\n{}", abs_context.display(), abs_file.display()),
        project: context.clone(),
        context,
        build_args: BTreeMap::new(),
        target: None,
        compression: LayerCompression::default(),
        ignore_file,
        default_tag: None,
        secrets: BTreeMap::new(),
    })
}

/// Runs `berth build`.
pub fn run(g: &GlobalOpts, args: &BuildArgs, out: &mut Output) -> Result<(), CliError> {
    let standalone = args.file.is_some() || args.context.is_some();
    if standalone && args.env.is_some() {
        return Err(CliError::invalid(miette!(
            "--env belongs to a project's build; with -f or a context there is no berth.toml"
        )));
    }
    let input = if standalone {
        dockerfile_input(g, args)?
    } else {
        project_input(g, args)?
    };
    let mut build_args = input.build_args.clone();
    build_args.extend(args.build_args.iter().cloned());
    let source_date = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let epoch = source_date.unwrap_or(0);
    // The config's date: a clean checkout's commit time is as reproducible as 0 and says
    // when the source was written (as several reproducible-build tools default it).
    let provenance = provenance::of(&input.project);
    let created = source_date.or(provenance.clean_commit_time).unwrap_or(0);
    let mut refs = input.secrets.clone();
    refs.extend(args.secret.iter().cloned());
    let mut secrets = BTreeMap::new();
    for (id, r) in &refs {
        // `[image.secrets]` files are relative to the project; --secret ones to where
        // berth runs (`-C` included).
        let dir = if args.secret.iter().any(|(i, _)| i == id) {
            g.project_dir()
        } else {
            input.project.clone()
        };
        secrets.insert(id.clone(), read_secret(id, r, &dir)?);
    }
    let store = Store::open(&g.store_dir())?;
    let opts = BuildOptions {
        secrets,
        no_cache: args.no_cache,
        build_args,
        target: args.target.clone().or_else(|| input.target.clone()),
        compression: input.compression,
        epoch,
        created,
        labels: provenance.labels,
        project_id: input.id.clone(),
        network_host: args.network == "host",
        pull: args.pull,
        puller: Some(puller(&store, out.quiet || out.json)),
        ignore_file: input.ignore_file.clone(),
    };
    let (plan, context) = (&input.plan, &input.context);
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
    let result = build::build(&store, plan, context, &opts, &mut printer);
    spinner.finish();
    let result = result.map_err(build_error)?;
    let tags = if args.tag.is_empty() {
        input.default_tag.into_iter().collect()
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
                        "layer": s.layer.as_ref().map(|l| json!({"digest": l.digest, "diff_id": l.diff_id, "size": l.size, "unchanged_prefix": l.unchanged_prefix})) })
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
                | BuildError::Fetch(_)
                | BuildError::PullFailed { .. }
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
