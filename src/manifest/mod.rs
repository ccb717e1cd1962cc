//! `berth.toml` and `environments/<env>.toml`: reading, merging and validating them into a
//! resolved [`AppConfig`] per environment, with diagnostics that point at file, line and
//! column.
//!
//! The merge rule: tables merge key by key, scalars and arrays replace (see [`node::merge`]).

pub mod decode;
pub mod diag;
pub mod dotenv;
pub mod node;
pub mod resolve;
pub mod schema;
pub mod secrets;
pub mod steps;
pub mod values;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use diag::{ConfigDiagnostic, Diagnostics, InvalidConfig, SourceFile};
pub use schema::AppConfig;

use node::{Node, Value};
use resolve::EnvInput;

/// The app manifest's file name.
pub const MANIFEST: &str = "berth.toml";
/// The folder of environment files.
pub const ENV_DIR: &str = "environments";

/// Errors loading a project (not problems in its files: those are [`InvalidConfig`]).
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// The directory has no `berth.toml`.
    #[error("no {MANIFEST} in {}", dir.display())]
    NoManifest {
        /// The project directory.
        dir: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The requested environment has no file.
    #[error("no environment `{name}` (there is no {ENV_DIR}/{name}.toml)")]
    UnknownEnvironment {
        /// The name asked for.
        name: String,
        /// The environments that exist.
        available: Vec<String>,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
}

impl ProjectError {
    /// A hint for the user, where one helps.
    pub fn help(&self) -> Option<String> {
        match self {
            ProjectError::NoManifest { .. } => {
                Some("run `berth init` to create one, or pass the project directory with -C".into())
            }
            ProjectError::UnknownEnvironment { name, available } => Some(
                match decode::suggest(name, available.iter().map(String::as_str)) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None if available.is_empty() => format!("create {ENV_DIR}/{name}.toml"),
                    None => format!("environments: {}", available.join(", ")),
                },
            ),
            _ => None,
        }
    }
}

/// A project directory with its parsed files.
pub struct Project {
    /// The project directory.
    pub dir: PathBuf,
    base: Result<Node, Diagnostics>,
    envs: BTreeMap<String, Result<Node, Diagnostics>>,
}

fn read_source(dir: &Path, rel: &str) -> Result<SourceFile, ProjectError> {
    let path = dir.join(rel);
    let text =
        std::fs::read_to_string(&path).map_err(|source| ProjectError::Io { path, source })?;
    Ok(SourceFile {
        name: rel.to_string(),
        text: Arc::new(text),
    })
}

impl Project {
    /// Reads and parses `berth.toml` and every `environments/*.toml` in `dir`.
    pub fn load(dir: &Path) -> Result<Project, ProjectError> {
        if !dir.join(MANIFEST).is_file() {
            return Err(ProjectError::NoManifest {
                dir: dir.to_path_buf(),
            });
        }
        let base = node::parse(&read_source(dir, MANIFEST)?);
        let mut envs = BTreeMap::new();
        let env_dir = dir.join(ENV_DIR);
        match std::fs::read_dir(&env_dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|source| ProjectError::Io {
                        path: env_dir.clone(),
                        source,
                    })?;
                    let file_name = entry.file_name();
                    let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".toml"))
                    else {
                        continue;
                    };
                    let source = read_source(dir, &format!("{ENV_DIR}/{name}.toml"))?;
                    let parsed = if values::valid_dns_label(name) {
                        node::parse(&source)
                    } else {
                        let mut diags = Diagnostics::default();
                        let mut d = Node {
                            file: source,
                            span: 0..0,
                            value: Value::Bool(false),
                        }
                        .diag(
                            "berth::invalid-environment-name",
                            format!("`{name}` is not a valid environment name"),
                            "file name",
                        );
                        d.help = Some("rename the file: lower-case letters, digits and `-`, starting with a letter".into());
                        diags.push(d);
                        Err(diags)
                    };
                    envs.insert(name.to_string(), parsed);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ProjectError::Io {
                    path: env_dir,
                    source,
                });
            }
        }
        Ok(Project {
            dir: dir.to_path_buf(),
            base,
            envs,
        })
    }

    /// Names of the environments, sorted.
    pub fn environments(&self) -> Vec<String> {
        self.envs.keys().cloned().collect()
    }

    /// Checks `berth.toml` and the named environment, or every environment when `only` is
    /// `None`. Returns the environments checked, or every problem found.
    pub fn check(&self, only: Option<&str>) -> Result<Vec<String>, ProjectError> {
        let names = match only {
            Some(name) => {
                self.env_node(name)?;
                vec![name.to_string()]
            }
            None => self.environments(),
        };
        let mut diags = Diagnostics::default();
        match &self.base {
            Err(e) => diags.extend(e.clone()),
            Ok(base) => {
                diags.extend(resolve::resolve(base, None, &self.dir).1.diags);
                for name in &names {
                    match &self.envs[name] {
                        Err(e) => diags.extend(e.clone()),
                        Ok(env) => diags.extend(
                            resolve::resolve(base, Some(EnvInput { name, node: env }), &self.dir)
                                .1
                                .diags,
                        ),
                    }
                }
            }
        }
        for name in &names {
            diags.extend(self.check_promotion(name));
        }
        if diags.is_empty() {
            Ok(names)
        } else {
            diags.sort();
            Err(InvalidConfig { diagnostics: diags }.into())
        }
    }

    /// The resolved configuration of one environment.
    pub fn resolve(&self, name: &str) -> Result<AppConfig, ProjectError> {
        let env = self.env_node(name)?;
        let mut diags = Diagnostics::default();
        if let Err(e) = &self.base {
            diags.extend(e.clone());
        }
        if let Err(e) = env {
            diags.extend(e.clone());
        }
        let (Ok(base), Ok(env)) = (&self.base, env) else {
            return Err(InvalidConfig { diagnostics: diags }.into());
        };
        let (config, decoder) =
            resolve::resolve(base, Some(EnvInput { name, node: env }), &self.dir);
        diags.extend(decoder.diags);
        diags.extend(self.check_promotion(name));
        match config {
            Some(mut c) if diags.is_empty() => {
                c.project_dir = self.dir.clone();
                Ok(c)
            }
            _ => {
                diags.sort();
                Err(InvalidConfig { diagnostics: diags }.into())
            }
        }
    }

    /// The configuration of `berth.toml` alone (no environment): what a build needs.
    pub fn resolve_base(&self) -> Result<AppConfig, ProjectError> {
        let base = self.base.as_ref().map_err(|d| InvalidConfig {
            diagnostics: d.clone(),
        })?;
        let (config, decoder) = resolve::resolve(base, None, &self.dir);
        match config {
            Some(c) if decoder.diags.is_empty() => Ok(c),
            _ => {
                let mut diags = decoder.diags;
                diags.sort();
                Err(InvalidConfig { diagnostics: diags }.into())
            }
        }
    }

    fn env_node(&self, name: &str) -> Result<&Result<Node, Diagnostics>, ProjectError> {
        self.envs
            .get(name)
            .ok_or_else(|| ProjectError::UnknownEnvironment {
                name: name.to_string(),
                available: self.environments(),
            })
    }

    /// The `promote_from` value and node of an environment, if it parsed and has one.
    fn promote_from(&self, name: &str) -> Option<(&str, &Node)> {
        let node = self
            .envs
            .get(name)?
            .as_ref()
            .ok()?
            .as_table()?
            .get("promote_from")?;
        match &node.value {
            Value::String(s) => Some((s.as_str(), node)),
            _ => None,
        }
    }

    /// Checks that `name`'s promotion source and `require` list name existing environments
    /// and that following `promote_from` from `name` never comes back to it.
    fn check_promotion(&self, name: &str) -> Diagnostics {
        let mut diags = Diagnostics::default();
        let names = self.environments();
        let unknown = |node: &Node, target: &str, what: &str| {
            let mut d = node.diag(
                "berth::unknown-environment",
                format!("{what} names environment `{target}`, which does not exist"),
                format!("no {ENV_DIR}/{target}.toml"),
            );
            d.help = Some(
                match decode::suggest(target, names.iter().map(String::as_str)) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("environments: {}", names.join(", ")),
                },
            );
            d
        };
        if let Some(Ok(table)) = self
            .envs
            .get(name)
            .map(|r| r.as_ref().map(|n| n.as_table()))
            && let Some(Value::Array(reqs)) = table.and_then(|t| t.get("require")).map(|n| &n.value)
        {
            for r in reqs {
                if let Value::String(s) = &r.value
                    && !self.envs.contains_key(s)
                {
                    diags.push(unknown(r, s, "`require`"));
                }
            }
        }
        let Some((first, node)) = self.promote_from(name) else {
            return diags;
        };
        let mut chain = vec![name.to_string()];
        let mut current = first;
        loop {
            if !self.envs.contains_key(current) {
                if chain.len() == 1 {
                    diags.push(unknown(node, current, "`promote_from`"));
                }
                break;
            }
            chain.push(current.to_string());
            if current == name {
                let mut d = node.diag(
                    "berth::promotion-cycle",
                    format!(
                        "the promotion chain of `{name}` has a cycle: {}",
                        chain.join(" ← ")
                    ),
                    "promotion source",
                );
                d.help = Some("promotion runs one way (dev → uat → prod); remove `promote_from` from the first environment".into());
                diags.push(d);
                break;
            }
            if chain[1..chain.len() - 1].contains(&current.to_string()) {
                break; // A cycle further up the chain; reported for its own members.
            }
            match self.promote_from(current) {
                Some((next, _)) => current = next,
                None => break,
            }
        }
        diags
    }
}

#[cfg(test)]
mod tests;
