//! Secrets: named references to a process environment variable or a file, never literal
//! values in a configuration file. A value is read only when a command needs it, and the
//! type that holds it prints as `<redacted>`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// Where a secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// A variable in the environment of the berth process (`{ env = "UAT_DB_PASSWORD" }`).
    Env(String),
    /// A file, absolute or relative to the project directory (`{ file = "/run/keys/db" }`).
    File(PathBuf),
}

/// The text shown wherever a secret's value would be.
pub const REDACTED: &str = "<redacted>";

impl Serialize for SecretRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        match self {
            SecretRef::Env(var) => map.serialize_entry("env", var)?,
            SecretRef::File(path) => map.serialize_entry("file", path)?,
        }
        map.serialize_entry("value", REDACTED)?;
        map.end()
    }
}

/// A secret's value. Neither `Debug` nor any other formatting reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that must hand it on (a container's environment).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A secret whose source cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The variable is not set (or not valid UTF-8).
    #[error("secret `{name}`: environment variable `{var}` is not set")]
    MissingEnv {
        /// The secret's name.
        name: String,
        /// The variable it reads.
        var: String,
    },
    /// The file cannot be read.
    #[error("secret `{name}`: cannot read {}", path.display())]
    File {
        /// The secret's name.
        name: String,
        /// The file it reads.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl SecretRef {
    /// Reads the value. `name` is the secret's name (for errors); relative file paths are
    /// taken from `project_dir`. A single trailing newline in a file is dropped, as
    /// `docker secret` and Kubernetes do.
    pub fn resolve(&self, name: &str, project_dir: &Path) -> Result<Secret, SecretError> {
        match self {
            SecretRef::Env(var) => {
                std::env::var(var)
                    .map(Secret)
                    .map_err(|_| SecretError::MissingEnv {
                        name: name.to_string(),
                        var: var.clone(),
                    })
            }
            SecretRef::File(path) => {
                let full = project_dir.join(path);
                let mut text =
                    std::fs::read_to_string(&full).map_err(|source| SecretError::File {
                        name: name.to_string(),
                        path: full.clone(),
                        source,
                    })?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                Ok(Secret(text))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print_their_value() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "hunter2\n").unwrap();
        let s = SecretRef::File("key".into())
            .resolve("db", dir.path())
            .unwrap();
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        let json = serde_json::to_string(&SecretRef::File("key".into())).unwrap();
        assert_eq!(json, r#"{"file":"key","value":"<redacted>"}"#);
    }

    #[test]
    fn a_missing_source_is_an_error_naming_the_secret() {
        let err = SecretRef::Env("BERTH_TEST_SURELY_UNSET".into())
            .resolve("db", Path::new("/"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "secret `db`: environment variable `BERTH_TEST_SURELY_UNSET` is not set"
        );
    }
}
