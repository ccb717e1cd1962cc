//! `berth init [NAME]`: scaffold a project in the project directory.

use std::path::Path;

use miette::miette;

use super::{CliError, GlobalOpts, Output};
use crate::manifest::values::valid_dns_label;

/// Arguments of `berth init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The app's name [default: the directory's name].
    pub name: Option<String>,
}

/// Runs `berth init`. Writes nothing if any of the files already exists.
pub fn run(g: &GlobalOpts, args: &InitArgs, out: &mut Output) -> Result<(), CliError> {
    let dir = g.project_dir();
    let name = match &args.name {
        Some(n) => n.clone(),
        None => default_name(&dir)?,
    };
    if !valid_dns_label(&name) {
        return Err(CliError::invalid(miette!(
            help = "use lower-case letters, digits and `-`, starting with a letter (at most 63)",
            "`{name}` is not a valid app name"
        )));
    }
    let files = scaffold(&name);
    let existing: Vec<&str> = files
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| dir.join(p).exists())
        .collect();
    if !existing.is_empty() {
        return Err(CliError::failed(miette!(
            help = "berth init never overwrites; remove or rename them first",
            "refusing to overwrite {}",
            existing.join(", ")
        )));
    }
    std::fs::create_dir_all(dir.join("environments"))?;
    for (path, text) in &files {
        std::fs::write(dir.join(path), text)?;
        out.note(format!("created {path}"))?;
    }
    out.note("next: edit berth.toml, then `berth check`")?;
    Ok(())
}

fn default_name(dir: &Path) -> Result<String, CliError> {
    let abs = std::fs::canonicalize(dir)?;
    let raw = abs.file_name().and_then(|n| n.to_str()).unwrap_or("app");
    let mut name: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name = name.trim_matches('-').to_string();
    if !valid_dns_label(&name) {
        return Err(CliError::invalid(miette!(
            help = "pass a name: berth init NAME",
            "cannot derive an app name from the directory `{raw}`"
        )));
    }
    Ok(name)
}

fn scaffold(name: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "berth.toml",
            format!(
                r#"# The app: shared by every environment. See `berth config --env dev` for the result
# of merging it with environments/dev.toml.
[app]
name = "{name}"

[image]
from = "scratch"       # a local tag (`berth import`), a registry reference, or "scratch"
context = "."          # .berthignore (or .containerignore, .dockerignore) is respected
# dockerfile = "Dockerfile"   # instead of the steps below

[[image.steps]]
copy = ["www/", "/www/"]

[[image.steps]]
cmd = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]

[services.web]
ports = ["8080:8080"]
health = {{ http = "/", port = 8080, interval = "1s", timeout = "2s", retries = 3 }}
"#
            ),
        ),
        (
            "environments/dev.toml",
            "# dev runs on this machine; the local store is its registry.\nhosts = [\"local\"]\n"
                .to_string(),
        ),
        (
            "environments/uat.toml",
            format!(
                r#"registry = "http://127.0.0.1:5000/{name}"
hosts = ["local"]      # or berth agents: ["https://198.18.0.12:7443"]
promote_from = "dev"

[env]
LOG_LEVEL = "debug"
"#
            ),
        ),
        (
            "environments/prod.toml",
            format!(
                r#"registry = "http://127.0.0.1:5000/{name}"
hosts = ["local"]
promote_from = "uat"
soak = "10m"           # a release must run this long in uat before promotion

[services.web]
replicas = 2

# [secrets]
# DB_PASSWORD = {{ env = "PROD_DB_PASSWORD" }}   # or {{ file = "/run/keys/db" }}
"#
            ),
        ),
        (".berthignore", ".git\ntarget/\n*.swp\n".to_string()),
    ]
}
