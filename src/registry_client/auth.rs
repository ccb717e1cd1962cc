//! Registry credentials, where Docker keeps them: `$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json` (`auths`, `credHelpers`, `credsStore` through
//! `docker-credential-*` programs), or `BERTH_REGISTRY_USER` / `BERTH_REGISTRY_PASSWORD`
//! for CI. And the two challenges a registry answers 401 with: Basic, and Bearer (a token
//! from the realm for a service and scopes).
//!
//! Credentials never appear in `Debug` output, errors or logs.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;

use base64::Engine;
use serde_json::{Map, Value};

/// A secret that prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// User name and password (or personal access token).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken`), exchanged at the token realm.
    IdentityToken(Secret),
}

/// What went wrong reading or writing credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The config file is not valid JSON or has the wrong shape.
    #[error("{} is not a valid Docker config file: {message}", path.display())]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A credential helper failed.
    #[error("credential helper docker-credential-{helper} failed: {message}")]
    Helper {
        /// The helper's name.
        helper: String,
        /// What it said (never the secret).
        message: String,
    },
    /// The file could not be read or written.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Docker's config file.
pub fn config_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("config.json");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".docker").join("config.json")
}

/// The keys Docker may have filed a registry's credentials under.
fn keys_for(registry: &str) -> Vec<String> {
    if registry == super::reference::DOCKER_HUB {
        return vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ];
    }
    vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ]
}

fn read_config() -> Result<(PathBuf, Map<String, Value>), CredentialError> {
    let path = config_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((path, Map::new())),
        Err(source) => {
            return Err(CredentialError::Io {
                what: "read",
                path,
                source,
            });
        }
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok((path, m)),
        Ok(_) => Err(CredentialError::BadConfig {
            path,
            message: "not a JSON object".into(),
        }),
        Err(e) => Err(CredentialError::BadConfig {
            path,
            message: e.to_string(),
        }),
    }
}

/// Asks `docker-credential-<helper> get` for `server`'s credentials.
fn from_helper(helper: &str, server: &str) -> Result<Option<Credential>, CredentialError> {
    let program = format!("docker-credential-{helper}");
    let fail = |message: String| CredentialError::Helper {
        helper: helper.to_string(),
        message,
    };
    let mut child = std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(server.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // "credentials not found in native keychain" is not an error: there are none.
        if said.contains("not found") {
            return Ok(None);
        }
        return Err(fail(format!("exit status {}", out.status)));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|_| fail("output is not JSON".into()))?;
    let user = v["Username"].as_str().unwrap_or_default();
    let secret = v["Secret"].as_str().unwrap_or_default().to_string();
    Ok(Some(if user == "<token>" {
        Credential::IdentityToken(Secret(secret))
    } else {
        Credential::Basic {
            username: user.to_string(),
            password: Secret(secret),
        }
    }))
}

/// The registries `BERTH_REGISTRY_USER`/`_PASSWORD` may be sent to in this process, when
/// `BERTH_REGISTRY_HOST` does not say: those the project's environments name and those
/// the command line names. A registry named only by a build's `FROM` (which an untrusted
/// branch can change) never gets them.
static ENV_SCOPE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Lets the environment's credentials go to `registries` (hosts, `host:port`).
pub fn scope_env_credentials(registries: impl IntoIterator<Item = String>) {
    ENV_SCOPE.lock().expect("not poisoned").extend(registries);
}

/// Whether `BERTH_REGISTRY_USER`/`_PASSWORD` are meant for `registry`:
/// `BERTH_REGISTRY_HOST` (a comma-separated list) when set, else the scope above.
fn env_credentials_for(registry: &str) -> bool {
    match std::env::var("BERTH_REGISTRY_HOST") {
        Ok(hosts) => hosts.split(',').any(|h| h.trim() == registry),
        Err(_) => ENV_SCOPE
            .lock()
            .expect("not poisoned")
            .iter()
            .any(|h| h == registry),
    }
}

/// The credentials for `registry`: the environment first (CI; only for the registries
/// they are meant for), then Docker's config file.
pub fn credential_for(registry: &str) -> Result<Option<Credential>, CredentialError> {
    if let (Ok(username), Ok(password), true) = (
        std::env::var("BERTH_REGISTRY_USER"),
        std::env::var("BERTH_REGISTRY_PASSWORD"),
        env_credentials_for(registry),
    ) {
        return Ok(Some(Credential::Basic {
            username,
            password: Secret(password),
        }));
    }
    let (path, config) = read_config()?;
    let keys = keys_for(registry);
    if let Some(helpers) = config.get("credHelpers").and_then(Value::as_object) {
        for k in &keys {
            if let Some(h) = helpers.get(k).and_then(Value::as_str) {
                return from_helper(h, k);
            }
        }
    }
    if let Some(auths) = config.get("auths").and_then(Value::as_object) {
        for k in &keys {
            let Some(entry) = auths.get(k) else { continue };
            if let Some(t) = entry["identitytoken"].as_str().filter(|t| !t.is_empty()) {
                return Ok(Some(Credential::IdentityToken(Secret(t.to_string()))));
            }
            if let Some(auth) = entry["auth"].as_str().filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| CredentialError::BadConfig {
                        path: path.clone(),
                        message: format!("the auth of {k} is not base64 of user:password"),
                    })?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| CredentialError::BadConfig {
                        path: path.clone(),
                        message: format!("the auth of {k} is not base64 of user:password"),
                    })?;
                return Ok(Some(Credential::Basic {
                    username: u.to_string(),
                    password: Secret(p.to_string()),
                }));
            }
        }
    }
    if let Some(store) = config.get("credsStore").and_then(Value::as_str) {
        return from_helper(store, &keys[0]);
    }
    Ok(None)
}

fn write_config(path: &PathBuf, config: &Map<String, Value>) -> Result<(), CredentialError> {
    let io = |what| {
        move |source| CredentialError::Io {
            what,
            path: path.clone(),
            source,
        }
    };
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io("write"))?;
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(io("write"))?;
    let mut text = serde_json::to_string_pretty(config).expect("a map serialises");
    text.push('\n');
    tmp.write_all(text.as_bytes()).map_err(io("write"))?;
    tmp.as_file().sync_all().map_err(io("write"))?;
    tmp.persist(path).map_err(|e| io("replace")(e.error))?;
    Ok(())
}

/// Stores credentials for `registry` in Docker's config file (`auths`), as `docker login`.
pub fn login(registry: &str, username: &str, password: &str) -> Result<PathBuf, CredentialError> {
    let (path, mut config) = read_config()?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let key = keys_for(registry).remove(0);
    let auths = config
        .entry("auths")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(auths) = auths else {
        return Err(CredentialError::BadConfig {
            path,
            message: "`auths` is not an object".into(),
        });
    };
    auths.insert(key, serde_json::json!({ "auth": auth }));
    write_config(&path, &config)?;
    Ok(path)
}

/// Forgets `registry`'s credentials; whether there were any.
pub fn logout(registry: &str) -> Result<bool, CredentialError> {
    let (path, mut config) = read_config()?;
    let mut removed = false;
    if let Some(Value::Object(auths)) = config.get_mut("auths") {
        for k in keys_for(registry) {
            removed |= auths.remove(&k).is_some();
        }
    }
    if removed {
        write_config(&path, &config)?;
    }
    Ok(removed)
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP Basic.
    Basic,
    /// A token from `realm` for `service`.
    Bearer {
        /// Where tokens come from.
        realm: String,
        /// The service to name.
        service: Option<String>,
    },
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut map = BTreeMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], q[end + 1..].trim_start())
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        map.insert(key, value.to_string());
        rest = next.trim_start_matches(',').trim_start();
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: map.remove("realm")?,
            service: map.remove("service"),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Credential::Basic {
            username: "ci".into(),
            password: Secret("hunter2".into()),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
