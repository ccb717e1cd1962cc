//! The agent's HTTP API as types: every request and query the agent accepts, shared by the
//! server ([`super::agent`]) and its clients, so both sides parse the same shapes. Names
//! are checked as they are decoded (a request that names `../x`, an absolute path, a NUL
//! byte or 10 kB of text never reaches the filesystem), and bodies are bounded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ReleasePlan;
use super::local::ReplicaCount;
use crate::store::Digest;

/// The largest request body the agent reads (a release plan is a few kilobytes).
pub const MAX_BODY: usize = 1 << 20;

/// Why a request was refused before it did anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A name is not one berth would have made.
    #[error("`{value}` is not a valid {what} name")]
    BadName {
        /// What kind of name.
        what: &'static str,
        /// The value, cut to 80 characters.
        value: String,
    },
    /// The plan in an apply request cannot be run.
    #[error("the release plan is invalid: {0}")]
    BadPlan(String),
}

fn shown(value: &str) -> String {
    let mut s: String = value.chars().take(80).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    s.escape_debug().to_string()
}

macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = RequestError;
            fn try_from(s: String) -> Result<Self, RequestError> {
                if $check(&s) {
                    Ok($name(s))
                } else {
                    Err(RequestError::BadName { what: $what, value: shown(&s) })
                }
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = RequestError;
            fn from_str(s: &str) -> Result<Self, RequestError> {
                Self::try_from(s.to_string())
            }
        }
    };
}

checked_name!(
    /// `app-environment`: what names a deployment's state, network and replicas on a host.
    DeploymentName,
    "deployment",
    crate::names::valid_deployment
);
checked_name!(
    /// A service of an app: a DNS label.
    ServiceName,
    "service",
    crate::names::valid_dns_label
);

/// `POST /v1/apply`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The release.
    pub plan: ReleasePlan,
    /// `registry/repository@sha256:…`: where to pull the image from.
    pub image: String,
    /// Registry user, if it wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Registry password (kept in memory only, never logged).
    #[serde(default)]
    pub password: Option<String>,
    /// The values of the secrets the plan names (kept on the host in one 0600 file).
    #[serde(default)]
    pub secrets: super::SecretValues,
}

/// `POST /v1/down`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentRequest {
    /// `app-environment`.
    pub deployment: DeploymentName,
}

/// `POST /v1/rollback`: run again what release `to` ran on this host (else the newest
/// release of `digest` that served), as release `release`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// `app-environment`.
    pub deployment: DeploymentName,
    /// The new release's number (the ledger's).
    pub release: u32,
    /// The release whose plan runs again.
    #[serde(default)]
    pub to: Option<u32>,
    /// Or: the newest release of this image that served.
    #[serde(default)]
    pub digest: Option<Digest>,
    /// The values of the secrets that release's plan names, as they are now.
    #[serde(default)]
    pub secrets: super::SecretValues,
}

/// `POST /v1/revert`: undo release `release` on this host — back to the release that
/// served before it, or to nothing when it was the first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevertRequest {
    /// `app-environment`.
    pub deployment: DeploymentName,
    /// The release to undo.
    pub release: u32,
    /// Why (recorded on the host with the undone release).
    #[serde(default)]
    pub why: String,
}

/// What a host runs of a deployment (the answer to `status`, `apply`, `rollback` and
/// `revert`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    /// The live release's number, if one serves.
    pub release: Option<u32>,
    /// Its image.
    pub digest: Option<Digest>,
    /// Its git revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// Since when it serves (RFC 3339).
    #[serde(default)]
    pub since: Option<String>,
    /// Each service's replicas: running, of how many.
    #[serde(default)]
    pub services: BTreeMap<String, ReplicaCount>,
    /// Each replica: status, health, restarts, last exit.
    #[serde(default)]
    pub replicas: Vec<super::local::ReplicaView>,
    /// What is wrong on the host beyond its replicas (a router that is not running).
    #[serde(default)]
    pub problems: Vec<String>,
}

/// The answer to `POST /v1/preflight`: every problem found (none: go).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightAnswer {
    /// What would stop the release on this host.
    pub problems: Vec<String>,
}

/// The answer to `POST /v1/down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownAnswer {
    /// Containers removed.
    pub removed: usize,
}

/// One release as a host recorded it (`GET /v1/releases`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRelease {
    /// Its number.
    pub release: u32,
    /// Its image.
    pub digest: Digest,
    /// When (RFC 3339).
    pub time: String,
    /// What happened to it on this host.
    pub outcome: super::Outcome,
    /// Why it failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
}

/// Every refusal or failure an agent answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// What went wrong.
    pub error: String,
    /// `unhealthy`, `start`, `locked`, `local`, `pull`, `invalid`, `conflict`.
    #[serde(default)]
    pub kind: String,
    /// The service, for `unhealthy` and `start`.
    #[serde(default)]
    pub service: Option<String>,
    /// The replica's last log lines, for `unhealthy`.
    #[serde(default)]
    pub logs: String,
}

/// `GET /v1/status` and `/v1/releases`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentQuery {
    /// `app-environment`.
    pub deployment: DeploymentName,
}

/// `POST /v1/exec`, upgraded to `berth-exec` (the request rides in the `x-berth-exec`
/// header, JSON): a command in one replica of a live release, its stdio then framed on
/// the connection ([`super::frames`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    /// `app-environment`.
    pub deployment: DeploymentName,
    /// The service.
    pub service: ServiceName,
    /// Its replica on that host, 1-based (default: the first that runs).
    #[serde(default)]
    pub replica: Option<usize>,
    /// Command and arguments.
    pub command: Vec<String>,
    /// Give it a terminal.
    #[serde(default)]
    pub tty: bool,
    /// Keep its stdin open.
    #[serde(default)]
    pub interactive: bool,
    /// Extra variables, `K=V`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Its user.
    #[serde(default)]
    pub user: Option<String>,
    /// Its working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// The terminal's size (rows, columns), with `tty`.
    #[serde(default)]
    pub size: Option<(u16, u16)>,
}

impl ExecRequest {
    /// Checks what reaches the host beyond the typed names: a command, variables that are
    /// `K=V`, no NUL anywhere.
    pub fn validate(&self) -> Result<(), RequestError> {
        let bad = |m: String| Err(RequestError::BadPlan(m));
        if self.command.is_empty() {
            return bad("no command".into());
        }
        let texts = self
            .command
            .iter()
            .chain(&self.env)
            .chain(self.user.iter())
            .chain(self.workdir.iter());
        if texts.clone().any(|t| t.contains('\0')) {
            return bad("a NUL byte in the command".into());
        }
        if let Some(kv) = self.env.iter().find(|kv| {
            kv.split_once('=')
                .is_none_or(|(k, _)| !crate::manifest::values::valid_env_name(k))
        }) {
            return bad(format!("`{}` is not K=V", shown(kv)));
        }
        if self.replica == Some(0) {
            return bad("replicas are numbered from 1".into());
        }
        Ok(())
    }
}

/// `GET /v1/logs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogsQuery {
    /// `app-environment`.
    pub deployment: DeploymentName,
    /// Only this service's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
    /// Only this replica of the service (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<usize>,
    /// The last N lines of each replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
    /// Only lines since this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl ReleasePlan {
    /// Checks every name in the plan that reaches the host's filesystem or its network:
    /// the app, environment and service names (DNS labels) and named volumes. What an
    /// agent is sent passes the same checks `berth check` makes of a manifest.
    pub fn validate(&self) -> Result<(), RequestError> {
        let label = |what: &'static str, v: &str| {
            if crate::names::valid_dns_label(v) {
                Ok(())
            } else {
                Err(RequestError::BadName {
                    what,
                    value: shown(v),
                })
            }
        };
        label("app", &self.app)?;
        label("environment", &self.environment)?;
        for s in &self.services {
            label("service", &s.name)?;
            if s.replicas > 1000 {
                return Err(RequestError::BadPlan(format!(
                    "{} replicas of {} (at most 1000)",
                    s.replicas, s.name
                )));
            }
            for u in &s.secrets {
                if !crate::manifest::values::valid_env_name(&u.name) {
                    return Err(RequestError::BadName {
                        what: "secret",
                        value: shown(&u.name),
                    });
                }
            }
            for m in &s.mounts {
                if let crate::runtime::spec::MountSpec::Volume { name, .. } = m
                    && !crate::names::valid_object_name(name)
                {
                    return Err(RequestError::BadName {
                        what: "volume",
                        value: shown(name),
                    });
                }
                let t = m.target();
                if !t.starts_with('/') || t.contains('\0') || t.split('/').any(|c| c == "..") {
                    return Err(RequestError::BadPlan(format!(
                        "mount target `{}` is not an absolute path without `..`",
                        shown(t)
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_as_they_decode() {
        let ok: DeploymentQuery = serde_urlencoded::from_str("deployment=hello-uat").unwrap();
        assert_eq!(&*ok.deployment, "hello-uat");
        let long = format!("deployment=a-{}", "b".repeat(10_000));
        for bad in [
            "deployment=..%2F..%2Ftmp%2Fx",
            "deployment=%2Ftmp%2Fx",
            "deployment=a-b%00",
            "deployment=",
            long.as_str(),
        ] {
            assert!(
                serde_urlencoded::from_str::<DeploymentQuery>(bad).is_err(),
                "{bad:.60}"
            );
        }
        let r: Result<DeploymentRequest, _> =
            serde_json::from_str(r#"{"deployment":"../../../../tmp/x"}"#);
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("not a valid deployment name")
        );
        let r: Result<RevertRequest, _> =
            serde_json::from_str(r#"{"deployment":"/tmp/x","release":1}"#);
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("not a valid deployment name")
        );
        let q: Result<LogsQuery, _> = serde_urlencoded::from_str("deployment=a-b&service=..%2Fx");
        assert!(q.is_err());
    }
}
