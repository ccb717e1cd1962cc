//! Releases and rollouts. A [`ReleasePlan`] is everything a host needs to run one release
//! of an app's environment — the image *by digest* and each service's replicas, ports,
//! volumes and health check — in a serialisable form (what an agent will receive). The
//! [`local`] engine applies it on this machine: new replicas next to the old ones,
//! health-checked, then the traffic switched in one step by each service's [`router`],
//! the old replicas drained and stopped; if anything fails before the switch, the new
//! replicas go and the old release keeps serving.

pub mod agent;
pub mod api;
pub mod client;
pub mod exec;
pub mod frames;
pub use crate::runtime::health;
pub mod host;
pub mod local;
pub mod plan;
pub mod rollout;
pub mod router;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::spec::{MountSpec, PortSpec, Resources, Restart};
use crate::store::Digest;

/// One service of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    /// Its name (also its name on the app's network).
    pub name: String,
    /// Replicas to run.
    pub replicas: u32,
    /// Entrypoint over the image's, if set.
    pub entrypoint: Option<Vec<String>>,
    /// Command over the image's CMD, if set.
    pub command: Option<Vec<String>>,
    /// Environment (`K=V`) over the image's.
    pub env: Vec<String>,
    /// Published ports (held by the service's router, not by replicas).
    pub ports: Vec<PortSpec>,
    /// Volumes and bind mounts.
    pub mounts: Vec<MountSpec>,
    /// How readiness is judged.
    pub health: Option<health::Check>,
    /// Limits per replica.
    pub resources: Resources,
    /// Restart policy of each replica.
    pub restart: Restart,
    /// Stop signal (else the image's, else SIGTERM).
    pub stop_signal: Option<i32>,
    /// Grace time before SIGKILL.
    pub stop_timeout: Duration,
    /// The environment's secrets this service receives, by name; their values travel
    /// beside the plan ([`SecretValues`]), never in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::runtime::spec::SecretUse>,
}

/// The values of a release's secrets, by name: resolved on the deploying machine, sent to
/// a host beside the plan (over TLS), kept there in one 0600 file. `Debug` shows only the
/// names.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValues(pub BTreeMap<String, String>);

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl SecretValues {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ReleasePlan {
    /// Every secret some service of the plan receives.
    pub fn secret_names(&self) -> std::collections::BTreeSet<String> {
        self.services
            .iter()
            .flat_map(|s| s.secrets.iter().map(|u| u.name.clone()))
            .collect()
    }
}

/// How a rollout proceeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutPlan {
    /// How long old replicas keep serving open connections after the switch.
    pub drain: Duration,
    /// Deadline for new replicas to become healthy.
    pub timeout: Duration,
    /// Stopped releases kept for rollback.
    pub keep: u32,
}

/// A release for one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasePlan {
    /// The app.
    pub app: String,
    /// The environment.
    pub environment: String,
    /// The release's number in the environment's ledger, which every host uses for it
    /// (0 in plans from before numbers were the ledger's: the host numbers it).
    #[serde(default)]
    pub release: u32,
    /// The image's manifest digest.
    pub digest: Digest,
    /// The git revision it was built from, if known.
    pub revision: Option<String>,
    /// The services.
    pub services: Vec<ServicePlan>,
    /// Rollout settings.
    pub rollout: RolloutPlan,
}

impl ReleasePlan {
    /// `app-environment`: the name of the deployment's network and state.
    pub fn deployment(&self) -> String {
        format!("{}-{}", self.app, self.environment)
    }
}

/// What happened to a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It serves.
    Live,
    /// It served, and a later release replaced it (its replicas may be kept, stopped).
    Retired,
    /// It never served: it failed before the switch.
    Failed,
}

/// A release as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// 1, 2, …
    pub number: u32,
    /// The image.
    pub digest: Digest,
    /// The git revision.
    pub revision: Option<String>,
    /// When (RFC 3339).
    pub time: String,
    /// Who (`user@host`).
    pub actor: String,
    /// What happened.
    pub outcome: Outcome,
    /// Why it failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
    /// Container ids of each service's replicas.
    pub replicas: BTreeMap<String, Vec<String>>,
    /// The plan, for rollbacks.
    pub plan: ReleasePlan,
}

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Another deploy holds the lock.
    #[error("another deploy of {deployment} is running: {holder}")]
    Locked {
        /// The deployment.
        deployment: String,
        /// Who holds it and since when.
        holder: String,
    },
    /// A replica did not become healthy; the previous release still serves.
    #[error("service {service} did not become healthy: {reason}{}", if logs.is_empty() { String::new() } else { format!("\n--- its last log lines:\n{logs}") })]
    Unhealthy {
        /// The service.
        service: String,
        /// The last probe's failure.
        reason: String,
        /// The replica's last log lines.
        logs: String,
    },
    /// A replica could not be started.
    #[error("cannot start a replica of {service}: {message}")]
    Start {
        /// The service.
        service: String,
        /// Why.
        message: String,
    },
    /// Something local failed.
    #[error("{what}: {message}")]
    Local {
        /// What was being done.
        what: String,
        /// Why.
        message: String,
    },
}

impl DeployError {
    fn local(what: impl Into<String>) -> impl FnOnce(String) -> DeployError {
        let what = what.into();
        move |message| DeployError::Local { what, message }
    }
}

/// Where a deployment's state lives in the store.
pub fn state_dir(store: &crate::store::Store, deployment: &str) -> PathBuf {
    store.state_dir().join("deploy").join(deployment)
}
