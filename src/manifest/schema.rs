//! The resolved configuration of an app in one environment: what every other part of berth
//! reads. Built by [`super::resolve`] from `berth.toml` merged with `environments/<env>.toml`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::secrets::SecretRef;
use super::values::{
    ByteSize, Cpus, Duration, ExposedPort, Fingerprint, HostUrl, ImageRef, PortMapping,
    RegistryRepo, RestartPolicy, Signal, VolumeMount,
};

/// Keys allowed at the top of `berth.toml`.
pub const BASE_KEYS: &[&str] = &[
    "app", "image", "services", "env", "env_file", "rollout", "hooks",
];
/// Keys allowed at the top of an environment file.
pub const ENV_KEYS: &[&str] = &[
    "registry",
    "hosts",
    "promote_from",
    "soak",
    "require",
    "env",
    "env_file",
    "secrets",
    "services",
    "rollout",
    "agent",
    "hooks",
];
/// Keys of `[hooks]`: when each runs.
pub const HOOK_KEYS: &[&str] = &[
    "pre_deploy",
    "post_deploy",
    "pre_promote",
    "post_promote",
    "post_rollback",
];
/// Keys of an environment's `[agent]` table.
pub const AGENT_KEYS: &[&str] = &["token", "fingerprint", "ca", "insecure"];
/// Keys of a secret's table.
pub const SECRET_KEYS: &[&str] = &["env", "file", "as"];
/// Keys of a host written as a table in `hosts`.
pub const HOST_KEYS: &[&str] = &["url", "fingerprint"];
/// Keys of `[app]`.
pub const APP_KEYS: &[&str] = &["name"];
/// Keys of `[image]`.
pub const IMAGE_KEYS: &[&str] = &[
    "from",
    "context",
    "dockerfile",
    "target",
    "args",
    "steps",
    "compression",
    "compression_level",
    "secrets",
];
/// Keys of `[services.NAME]`, in `berth.toml` and environment files alike.
pub const SERVICE_KEYS: &[&str] = &[
    "command",
    "entrypoint",
    "ports",
    "expose",
    "health",
    "volumes",
    "env",
    "env_file",
    "replicas",
    "resources",
    "restart",
    "stop_signal",
    "stop_timeout",
];
/// Keys of a service's `health` table.
pub const HEALTH_KEYS: &[&str] = &[
    "http",
    "tcp",
    "exec",
    "port",
    "interval",
    "timeout",
    "retries",
    "start_period",
];
/// Keys of a service's `resources` table.
pub const RESOURCE_KEYS: &[&str] = &["memory", "cpus", "pids"];
/// Keys of `[rollout]`.
pub const ROLLOUT_KEYS: &[&str] = &["batch", "max_failures", "drain", "timeout", "keep"];

/// Everything berth knows about the app in one environment.
#[derive(Debug, Clone, Serialize)]
pub struct AppConfig {
    /// The environment's name (the file stem of `environments/<env>.toml`).
    pub environment: String,
    /// The `[app]` table.
    pub app: App,
    /// Repository this environment pulls from; `None` means the local store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryRepo>,
    /// Where the app runs.
    pub hosts: Vec<HostUrl>,
    /// The environment promotions into this one come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promote_from: Option<String>,
    /// How long a release must have run in the source before promotion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<Duration>,
    /// Environments a release must have passed before it may run here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<String>,
    /// Variables for every service: the `[env]` tables and top-level `env_file`s of
    /// `berth.toml` and the environment file, in that order of precedence (a service's
    /// own `env` is in [`Service::env`], which holds its effective environment).
    pub env: BTreeMap<String, String>,
    /// Secrets for every service, by reference; values are read only when needed.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretSpec>,
    /// How releases roll out.
    pub rollout: Rollout,
    /// How berth reaches the environment's agents.
    #[serde(skip_serializing_if = "AgentAccess::is_default")]
    pub agent: AgentAccess,
    /// The project directory (relative secret files are read from it).
    #[serde(skip)]
    pub project_dir: PathBuf,
    /// What to build.
    pub image: ImageSpec,
    /// The services, by name.
    pub services: BTreeMap<String, Service>,
    /// Commands run on the deploying machine around releases (`[hooks]` of `berth.toml`,
    /// each overridden by the environment file's), by when: `pre_deploy`, `post_deploy`,
    /// `pre_promote`, `post_promote`, `post_rollback`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub hooks: BTreeMap<String, CommandLine>,
}

/// An environment's `[agent]` table: how berth reaches and trusts its agents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentAccess {
    /// The agents' bearer token, by reference (else `BERTH_AGENT_TOKEN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretRef>,
    /// SHA-256 fingerprint of the agents' certificate (`berth agent --init-tls` prints
    /// it): trusted by that alone, with no CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// A CA certificate (PEM file, relative to the project) that signed the agents'
    /// certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Fingerprints pinned per host (`hosts = [{ url = "…", fingerprint = "…" }]`), by
    /// the host's URL; over the environment-wide `fingerprint`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pins: BTreeMap<String, Fingerprint>,
    /// Send secrets to agents reached over plain `http://` (only where the network is
    /// trusted; the deploy says so each time).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// How a secret reaches a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// As an environment variable of its name (the default).
    #[default]
    Env,
    /// As the file `/run/secrets/NAME` (tmpfs, mode 0400, owned by the container's user).
    File,
}

/// A secret: where its value comes from, how it reaches containers, and where it is
/// declared (for messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretSpec {
    /// The source.
    #[serde(flatten)]
    pub source: SecretRef,
    /// How it is delivered.
    #[serde(rename = "as")]
    pub delivery: Delivery,
    /// `environments/uat.toml:7`.
    #[serde(skip)]
    pub origin: String,
}

impl AgentAccess {
    fn is_default(&self) -> bool {
        *self == AgentAccess::default()
    }
}

/// The `[app]` table.
#[derive(Debug, Clone, Serialize)]
pub struct App {
    /// The app's name: a DNS label, also the default repository and network name.
    pub name: String,
}

/// Layer compression for built images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`.
    #[default]
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`.
    Zstd,
}

/// The `[image]` table: what to build.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSpec {
    /// The base image (of `steps`; a Dockerfile's FROM lines decide for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<ImageRef>,
    /// The build context, relative to the project directory.
    pub context: PathBuf,
    /// A Dockerfile/Containerfile in the context, instead of `steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<PathBuf>,
    /// The Dockerfile stage to build (default: the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Build arguments (`ARG` values).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    /// Build steps, when no Dockerfile is used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<super::steps::StepSpec>,
    /// Layer compression.
    pub compression: Compression,
    /// Compression level (gzip 0-9, zstd 1-19); `None` is the algorithm's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,
    /// Secrets for `RUN --mount=type=secret,id=NAME`, by reference (`[image.secrets]`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, super::secrets::SecretRef>,
}

/// A process command: exec form (an argv) or shell form (a string for `/bin/sh -c`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CommandLine {
    /// Run this argv directly.
    Exec(Vec<String>),
    /// Run through the image's shell.
    Shell(String),
}

/// One service of the app.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    /// Overrides the image's CMD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandLine>,
    /// Overrides the image's ENTRYPOINT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<CommandLine>,
    /// Published ports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Container ports reachable by other services but not published.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<ExposedPort>,
    /// How berth decides a replica is ready and alive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Volumes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// The variables this service runs with, over the image's `ENV`, later winning:
    /// `berth.toml`'s `env_file`s and `[env]`, its `[services.S]` `env_file`s and `env`,
    /// then the same four of the environment file. (Secrets come last, at deploy time.)
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Number of replicas.
    pub replicas: u32,
    /// Resource limits.
    #[serde(skip_serializing_if = "Resources::is_unlimited")]
    pub resources: Resources,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Signal that asks the service to stop (default: the image's STOPSIGNAL, else SIGTERM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<Signal>,
    /// Grace time between the stop signal and SIGKILL.
    pub stop_timeout: Duration,
}

/// Resource limits of one replica.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Resources {
    /// Memory limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// CPU quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    /// Limit on processes and threads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

impl Resources {
    /// True when no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.memory.is_none() && self.cpus.is_none() && self.pids.is_none()
    }
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// An HTTP GET that must answer 2xx or 3xx.
    Http {
        /// Request path.
        path: String,
        /// Container port.
        port: u16,
    },
    /// A TCP connection that must be accepted.
    Tcp {
        /// Container port.
        port: u16,
    },
    /// A command run in the container that must exit 0.
    Exec {
        /// The command.
        command: CommandLine,
    },
}

/// A service's health check.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// What to probe.
    pub probe: Probe,
    /// Time between probes.
    pub interval: Duration,
    /// Time a probe may take.
    pub timeout: Duration,
    /// Consecutive failures before the replica counts as unhealthy.
    pub retries: u32,
    /// Grace time after start during which failures do not count.
    pub start_period: Duration,
}

impl Serialize for HealthCheck {
    /// Serialises in the shape it is written: `{ http = "/", port = 8080, interval = … }`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match &self.probe {
            Probe::Http { path, port } => {
                m.serialize_entry("http", path)?;
                m.serialize_entry("port", port)?;
            }
            Probe::Tcp { port } => m.serialize_entry("tcp", port)?,
            Probe::Exec { command } => m.serialize_entry("exec", command)?,
        }
        m.serialize_entry("interval", &self.interval)?;
        m.serialize_entry("timeout", &self.timeout)?;
        m.serialize_entry("retries", &self.retries)?;
        m.serialize_entry("start_period", &self.start_period)?;
        m.end()
    }
}

impl HealthCheck {
    /// Default time between probes.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
    /// Default probe timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default failure count.
    pub const DEFAULT_RETRIES: u32 = 3;
}

/// How a release rolls out across an environment's hosts.
#[derive(Debug, Clone, Serialize)]
pub struct Rollout {
    /// Hosts updated at once.
    pub batch: u32,
    /// Hosts that may fail before the rollout stops and rolls back.
    pub max_failures: u32,
    /// How long old replicas keep serving open connections after cutover.
    pub drain: Duration,
    /// Deadline for new replicas to become healthy.
    pub timeout: Duration,
    /// Stopped releases kept per host for fast rollback.
    pub keep: u32,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            batch: 1,
            max_failures: 0,
            drain: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
            keep: 3,
        }
    }
}

impl Service {
    /// Default grace time before SIGKILL (Docker's).
    pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

    /// The variables this service runs with, over the image's (see [`Service::env`]).
    /// Secrets are not included; they are resolved when needed.
    pub fn effective_env(&self, _config: &AppConfig) -> BTreeMap<String, String> {
        self.env.clone()
    }

    /// Container ports this service listens on: published and exposed.
    pub fn container_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports
            .iter()
            .map(|p| p.container)
            .chain(self.expose.iter().map(|e| e.port))
    }
}
