//! `berth config --env E [--diff E2]`: print an environment's resolved configuration
//! (TOML, or JSON with `--json`), or a unified diff of two.

use std::collections::BTreeMap;

use miette::miette;
use serde_json::{Value, json};

use super::{CliError, GlobalOpts, Output};
use crate::manifest::{AppConfig, Project};

/// Arguments of `berth config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The environment to resolve.
    #[arg(long, value_name = "ENV")]
    pub env: String,
    /// Show how ENV2's resolved configuration differs from ENV's.
    #[arg(long, value_name = "ENV2")]
    pub diff: Option<String>,
}

/// Runs `berth config`.
pub fn run(g: &GlobalOpts, args: &ConfigArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir())?;
    let a = project.resolve(&args.env)?;
    let Some(other) = &args.diff else {
        if out.json {
            out.json_value(&a)?;
        } else {
            out.text(&to_toml(&a)?)?;
            // `replicas` counts per host: what that makes over the environment.
            let hosts = a.hosts.len();
            for (name, svc) in &a.services {
                out.text(&format!(
                    "# {name}: {} replica(s) per host × {hosts} host(s) = {}\n",
                    svc.replicas,
                    svc.replicas as usize * hosts
                ))?;
            }
        }
        return Ok(());
    };
    let b = project.resolve(other)?;
    if out.json {
        out.json_value(&json_diff(&a, &b)?)?;
    } else {
        let (ta, tb) = (to_toml(&a)?, to_toml(&b)?);
        let diff = similar::TextDiff::from_lines(&ta, &tb);
        let text = diff
            .unified_diff()
            .context_radius(3)
            .header(&args.env, other)
            .to_string();
        out.text(&text)?;
    }
    Ok(())
}

/// The resolved configuration as TOML. Secrets appear as their source and `<redacted>`.
pub fn to_toml(config: &AppConfig) -> Result<String, CliError> {
    toml::to_string(config)
        .map_err(|e| CliError::failed(miette!("cannot render the configuration as TOML: {e}")))
}

/// The keys whose values differ between two configurations, as `{path: {a, b}}`.
fn json_diff(a: &AppConfig, b: &AppConfig) -> Result<Value, CliError> {
    let to_value =
        |c: &AppConfig| serde_json::to_value(c).map_err(|e| CliError::failed(miette!("{e}")));
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &to_value(a)?, &mut fa);
    flatten("", &to_value(b)?, &mut fb);
    let mut changes = serde_json::Map::new();
    for key in fa
        .keys()
        .chain(fb.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (va, vb) = (fa.get(key), fb.get(key));
        if va != vb {
            changes.insert(key.clone(), json!({ "a": va, "b": vb }));
        }
    }
    Ok(json!({ "a": a.environment, "b": b.environment, "changes": changes }))
}

/// Flattens objects into dotted paths; arrays and scalars are leaves.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}
