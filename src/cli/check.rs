//! `berth check [--env E]`: validate the project's configuration files.

use serde_json::json;

use super::{CliError, ExitKind, GlobalOpts, Output};
use crate::manifest::{Project, ProjectError};

/// Arguments of `berth check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Check only this environment (and berth.toml); default: every environment.
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
}

/// Runs `berth check`.
pub fn run(g: &GlobalOpts, args: &CheckArgs, out: &mut Output) -> Result<(), CliError> {
    let project = Project::load(&g.project_dir())?;
    match project.check(args.env.as_deref()) {
        Ok(envs) => {
            if out.json {
                out.json_value(&json!({ "ok": true, "environments": envs, "diagnostics": [] }))?;
            } else if envs.is_empty() {
                out.note("ok: berth.toml (no environments yet)")?;
            } else {
                out.note(format!(
                    "ok: berth.toml and {} ({})",
                    plural(envs.len()),
                    envs.join(", ")
                ))?;
            }
            Ok(())
        }
        Err(ProjectError::Invalid(invalid)) if out.json => {
            let records: Vec<_> = invalid.diagnostics.0.iter().map(|d| d.record()).collect();
            out.json_value(&json!({ "ok": false, "diagnostics": records }))?;
            Err(CliError::reported(ExitKind::Invalid))
        }
        Err(e) => Err(e.into()),
    }
}

fn plural(n: usize) -> String {
    if n == 1 {
        "1 environment".into()
    } else {
        format!("{n} environments")
    }
}
