//! `berth diff A B [--files] [--path P]`: what differs between two releases. A and B are
//! environment names (their current releases, read from their ledgers and registries) or
//! image references (local tags or digests, or registry references).

use std::collections::BTreeMap;
use std::sync::Arc;

use miette::miette;
use serde_json::{Value, json};

use super::{CliError, GlobalOpts, Output};
use crate::manifest::{AppConfig, Project};
use crate::promote::diff::{self, FileChange, Image, KeyChange, LayerDiff, Location};
use crate::promote::ledger::Release;
use crate::registry_client::{Client, ClientOptions, Reference};
use crate::store::{Digest, Store};

/// Arguments of `berth diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// An environment name or an image reference.
    pub a: String,
    /// An environment name or an image reference.
    pub b: String,
    /// Also compare files (reads only the layers that differ).
    #[arg(long)]
    pub files: bool,
    /// Only files under this path (implies --files).
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
}

/// One side of a diff.
struct Side {
    name: String,
    digest: Digest,
    release: Option<Release>,
    config: Option<AppConfig>,
    registry: Option<Reference>,
}

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::failed(miette!("{e}"))
}

/// A release of an environment as a side: its digest where that environment pulls it.
fn release_side(
    name: &str,
    config: crate::manifest::AppConfig,
    release: crate::promote::ledger::Release,
) -> Result<Side, CliError> {
    let registry = config
        .registry
        .as_ref()
        .map(|r| {
            r.to_string()
                .parse::<Reference>()
                .map(|x| x.with_digest(&release.digest))
        })
        .transpose()
        .map_err(|e| CliError::invalid(miette!("{e}")))?;
    Ok(Side {
        name: name.to_string(),
        digest: release.digest.clone(),
        release: Some(release),
        config: Some(config),
        registry,
    })
}

/// An environment of the project (its current release), `ENV@N` (its release N), an image
/// reference, or a digest prefix as `releases` prints it (found in the environments'
/// ledgers when the image is not in the store).
fn side(
    name: &str,
    project: Option<&Project>,
    store: &Store,
    rt: &tokio::runtime::Runtime,
) -> Result<Side, CliError> {
    if let Some(project) = project
        && let Some((env, n)) = name.split_once('@')
        && project.environments().iter().any(|e| e == env)
    {
        let n: u32 = n.parse().map_err(|_| {
            CliError::invalid(miette!(
                help = "ENV@N names release N of environment ENV (see `berth releases --env ENV`)",
                "`{name}`: `{n}` is not a release number"
            ))
        })?;
        let config = project.resolve(env)?;
        let history = super::status::history(store, &config, rt)?;
        let release = history
            .iter()
            .rev()
            .find(|r| r.number == n)
            .cloned()
            .ok_or_else(|| {
                CliError::failed(miette!(
                    help = format!("berth releases --env {env}"),
                    "environment {env} has no release {n}"
                ))
            })?;
        return release_side(name, config, release);
    }
    if let Some(project) = project
        && project.environments().iter().any(|e| e == name)
    {
        let config = project.resolve(name)?;
        let history = super::status::history(store, &config, rt)?;
        let Some(release) = crate::promote::ledger::current(&history).cloned() else {
            let down = history
                .iter()
                .rev()
                .find(|r| r.outcome == crate::promote::ledger::Verdict::Live);
            if let Some(d) = down.filter(|d| d.kind == crate::promote::ledger::Kind::Down) {
                return Err(CliError::failed(miette!(
                    help = format!("berth deploy --env {name} (or promote into it) runs it again"),
                    "environment {name} is down since release {} ({}): it runs nothing to compare",
                    d.number,
                    super::status::to_the_second(&d.time)
                )));
            }
            return Err(CliError::failed(miette!(
                help = format!("berth deploy --env {name}"),
                "environment {name} has no release to compare"
            )));
        };
        return release_side(name, config, release);
    }
    if let Ok(d) = store.resolve(name) {
        return Ok(Side {
            name: name.to_string(),
            digest: d,
            release: None,
            config: None,
            registry: None,
        });
    }
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if let Some(project) = project
        && hex.len() >= 6
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
    {
        for env in project.environments() {
            let Ok(config) = project.resolve(&env) else {
                continue;
            };
            let Ok(history) = super::status::history(store, &config, rt) else {
                continue;
            };
            if let Some(r) = history
                .iter()
                .rev()
                .find(|r| r.digest.hex().starts_with(hex))
                .cloned()
            {
                return release_side(name, config, r);
            }
        }
    }
    let reference: Reference = name.parse().map_err(|e: String| {
        CliError::invalid(miette!(
            help = "name an environment of this project, a local image, or REGISTRY/REPOSITORY[:TAG|@DIGEST]",
            "`{name}` is neither an environment nor a known image: {e}"
        ))
    })?;
    let not_found = |e: crate::registry_client::RegistryError| {
        CliError::failed(miette!(
            help = "name an environment of this project, a local image, or REGISTRY/REPOSITORY[:TAG|@DIGEST]",
            "`{name}` is neither an environment nor a local image, and as {reference}: {e}"
        ))
    };
    let client = Client::new(&reference, &ClientOptions::default()).map_err(not_found)?;
    let (_, _, digest) = rt
        .block_on(crate::registry_client::pull::fetch_manifest(
            &client,
            &reference.repository,
            &reference.manifest_ref(),
            reference.digest.as_ref(),
        ))
        .map_err(not_found)?;
    Ok(Side {
        name: name.to_string(),
        registry: Some(reference.with_digest(&digest)),
        digest,
        release: None,
        config: None,
    })
}

fn location<'a>(
    side: &Side,
    store: &'a Store,
    rt: &'a tokio::runtime::Runtime,
) -> Result<Location<'a>, CliError> {
    Ok(match &side.registry {
        Some(r) => Location::Registry {
            client: Arc::new(
                Client::new(r, &ClientOptions::default())
                    .map_err(super::registry::registry_error)?,
            ),
            repository: r.repository.clone(),
            rt,
        },
        None => Location::Store(store),
    })
}

/// A resolved configuration as flat `a.b.c → value` pairs (secrets stay references).
fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, &key, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn config_map(config: &AppConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut v = serde_json::to_value(config).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("environment");
    }
    flatten(&v, "", &mut out);
    out
}

/// Commits between two revisions, when the project's repository knows both: those in B
/// and not A, and those in A and not B.
fn commits(project_dir: &std::path::Path, a: &str, b: &str) -> Result<Value, String> {
    let repo = git2::Repository::discover(project_dir).map_err(|e| e.message().to_string())?;
    let oid = |r: &str| {
        git2::Oid::from_str(r)
            .ok()
            .filter(|o| repo.find_commit(*o).is_ok())
            .ok_or_else(|| format!("revision {r} is not in this repository"))
    };
    let (oa, ob) = (oid(a)?, oid(b)?);
    let walk = |from: git2::Oid, hide: git2::Oid| -> Result<Vec<Value>, String> {
        let mut w = repo.revwalk().map_err(|e| e.message().to_string())?;
        w.push(from).map_err(|e| e.message().to_string())?;
        w.hide(hide).map_err(|e| e.message().to_string())?;
        Ok(w.flatten()
            .take(500)
            .filter_map(|o| repo.find_commit(o).ok())
            .map(|c| {
                json!({
                    "id": c.id().to_string(),
                    "summary": c.summary().unwrap_or_default(),
                    "author": c.author().name().unwrap_or_default(),
                    "time": c.time().seconds(),
                })
            })
            .collect())
    };
    Ok(json!({ "a": a, "b": b, "only_b": walk(ob, oa)?, "only_a": walk(oa, ob)? }))
}

fn revision(side: &Side, image: &Image<'_>) -> Option<String> {
    side.release
        .as_ref()
        .and_then(|r| r.revision.clone())
        .or_else(|| {
            image.config["config"]["Labels"]["org.opencontainers.image.revision"]
                .as_str()
                .map(str::to_string)
        })
}

fn size(n: u64) -> String {
    super::human_size(n)
}

/// `berth diff`.
pub fn run(g: &GlobalOpts, args: &DiffArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir()).ok();
    let store = Store::open(&g.store_dir())?;
    let rt = crate::registry_client::runtime()
        .map_err(|e| failed(format!("cannot start the network runtime: {e}")))?;
    let (sa, sb) = (
        side(&args.a, project.as_ref(), &store, &rt)?,
        side(&args.b, project.as_ref(), &store, &rt)?,
    );
    let ia = Image::load(location(&sa, &store, &rt)?, &sa.digest).map_err(failed)?;
    let ib = Image::load(location(&sb, &store, &rt)?, &sb.digest).map_err(failed)?;
    let identical = ia.digest == ib.digest;
    let (config_changes, config_text) = diff::keyed(
        &diff::config_keys(&ia.config),
        &diff::config_keys(&ib.config),
        (&sa.name, &sb.name),
    );
    let layer_diff = diff::layers(&ia.layers, &ib.layers);
    let files: Option<Vec<FileChange>> = if (args.files || args.path.is_some()) && !identical {
        let indexes = diff::Indexes(store.state_dir().join("layer-index"));
        Some(
            diff::files(&ia, &ib, args.path.as_deref().unwrap_or(""), Some(&indexes))
                .map_err(failed)?,
        )
    } else if args.files || args.path.is_some() {
        Some(Vec::new())
    } else {
        None
    };
    let (ra, rb) = (revision(&sa, &ia), revision(&sb, &ib));
    let commits = match (&ra, &rb) {
        (Some(a), Some(b)) if a != b => Some(commits(&g.project_dir(), a, b)),
        _ => None,
    };
    let environment: Option<(Vec<KeyChange>, String)> = match (&sa.config, &sb.config) {
        (Some(a), Some(b)) => Some(diff::keyed(
            &config_map(a),
            &config_map(b),
            (&sa.name, &sb.name),
        )),
        _ => None,
    };
    let summary = |s: &Side, rev: &Option<String>| {
        json!({
            "name": s.name,
            "digest": s.digest,
            "release": s.release.as_ref().map(|r| json!({
                "number": r.number, "time": r.time, "kind": r.kind, "source": r.source,
            })),
            "revision": rev,
        })
    };
    if out.json {
        return Ok(out.json_value(&json!({
            "a": summary(&sa, &ra),
            "b": summary(&sb, &rb),
            "identical": identical,
            "config": { "changes": config_changes, "diff": config_text },
            "layers": layer_diff,
            "files": files,
            "commits": commits.map(|c| c.unwrap_or_else(|e| json!({ "error": e }))),
            "environment": environment.map(|(c, d)| json!({ "changes": c, "diff": d })),
        }))?);
    }
    for (tag, s, rev) in [("A", &sa, &ra), ("B", &sb, &rb)] {
        let release = s
            .release
            .as_ref()
            .map(|r| {
                format!(
                    ", release {} of {}{}",
                    r.number,
                    super::status::to_the_second(&r.time),
                    r.source
                        .as_ref()
                        .map(|x| format!(" (promoted from {x})"))
                        .unwrap_or_default()
                )
            })
            .unwrap_or_default();
        out.line(format!(
            "{tag} {}: {}{release}{}",
            s.name,
            s.digest,
            rev.as_ref()
                .map(|r| format!(", revision {}", &r[..r.len().min(12)]))
                .unwrap_or_default()
        ))?;
    }
    out.line(if identical {
        "the same image".to_string()
    } else {
        "different images".to_string()
    })?;
    out.line("\n== config".to_string())?;
    if config_changes.is_empty() {
        out.line("no differences".to_string())?;
    } else {
        out.text(&config_text)?;
    }
    print_layers(&layer_diff, out)?;
    if let Some(files) = &files {
        out.line(format!("\n== files ({} changed)", files.len()))?;
        for f in files {
            let detail = match (f.change, &f.a, &f.b) {
                ("added", _, Some(b)) => format!("{} {}", b.kind, size(b.size)),
                ("removed", Some(a), _) => format!("{} {}", a.kind, size(a.size)),
                (_, Some(a), Some(b)) => f
                    .what
                    .iter()
                    .map(|w| match *w {
                        "mode" => format!("mode {}→{}", a.mode, b.mode),
                        "owner" => format!("owner {}:{}→{}:{}", a.uid, a.gid, b.uid, b.gid),
                        "content" if a.size == b.size => format!("content, {}", size(b.size)),
                        "content" => format!("size {}→{}", size(a.size), size(b.size)),
                        "link" => format!(
                            "link {}→{}",
                            a.link.as_deref().unwrap_or("-"),
                            b.link.as_deref().unwrap_or("-")
                        ),
                        other => format!("{other} {}→{}", a.kind, b.kind),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => String::new(),
            };
            let mark = match f.change {
                "added" => "A",
                "removed" => "D",
                _ => "M",
            };
            out.line(format!("{mark} /{} ({detail})", f.path))?;
            if let Some(d) = &f.diff {
                out.text(d)?;
            }
        }
    }
    if let Some(c) = &commits {
        out.line("\n== commits".to_string())?;
        match c {
            Ok(v) => {
                for (key, label) in [("only_b", "in B, not A"), ("only_a", "in A, not B")] {
                    let list = v[key].as_array().cloned().unwrap_or_default();
                    if list.is_empty() {
                        continue;
                    }
                    out.line(format!("{label}:"))?;
                    for c in list {
                        out.line(format!(
                            "  {} {}",
                            &c["id"].as_str().unwrap_or_default()[..10],
                            c["summary"].as_str().unwrap_or_default()
                        ))?;
                    }
                }
            }
            Err(e) => out.line(format!("({e})"))?,
        }
    }
    if let Some((changes, text)) = &environment {
        out.line("\n== environment".to_string())?;
        if changes.is_empty() {
            out.line("no differences".to_string())?;
        } else {
            out.text(text)?;
        }
    }
    Ok(())
}

fn print_layers(d: &LayerDiff, out: &mut Output) -> Result<(), CliError> {
    let total = |v: &[diff::Layer]| v.iter().map(|l| l.size).sum::<u64>();
    out.line("\n== layers".to_string())?;
    out.line(format!(
        "{} shared ({}), {} only in A ({}), {} only in B ({})",
        d.shared.len(),
        size(total(&d.shared)),
        d.only_a.len(),
        size(total(&d.only_a)),
        d.only_b.len(),
        size(total(&d.only_b))
    ))?;
    for (mark, list) in [("-", &d.only_a), ("+", &d.only_b)] {
        for l in list {
            out.line(format!(
                "{mark} {} {} (diff_id {})",
                l.digest.short(),
                size(l.size),
                &l.diff_id[..l.diff_id.len().min(19)]
            ))?;
        }
    }
    Ok(())
}
