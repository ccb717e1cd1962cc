//! What a container is asked to be: everything needed to start (and restart) it, saved as
//! `config.json` beside its state so a supervisor, `berth start` or a restart policy can
//! start the same container again without the command line that created it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::cgroup::Limits;

/// The container's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum NetworkMode {
    /// Its own network namespace with only loopback.
    None,
    /// The host's network namespace.
    Host,
    /// A berth bridge network: a veth into the network's bridge and an address from its
    /// subnet.
    Bridge {
        /// The network's name.
        network: String,
        /// Extra names other containers on the network reach it by.
        #[serde(default)]
        aliases: Vec<String>,
    },
}

/// Transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A published port: host address and port → container port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Host address to listen on (`0.0.0.0` for every address).
    pub host_ip: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Container port.
    pub container_port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

impl PortSpec {
    /// The host address the proxy listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}->{}/{}",
            self.listen_addr(),
            self.container_port,
            self.proto
        )
    }
}

/// A mount besides the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum MountSpec {
    /// A host path bind-mounted into the container.
    Bind {
        /// Absolute host path.
        source: PathBuf,
        /// Absolute path inside the container.
        target: String,
        /// Read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// A named volume kept under the store.
    Volume {
        /// The volume's name.
        name: String,
        /// Absolute path inside the container.
        target: String,
        /// Read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// A fresh tmpfs.
    Tmpfs {
        /// Absolute path inside the container.
        target: String,
    },
}

impl MountSpec {
    /// Where it is mounted inside the container.
    pub fn target(&self) -> &str {
        match self {
            MountSpec::Bind { target, .. }
            | MountSpec::Volume { target, .. }
            | MountSpec::Tmpfs { target } => target,
        }
    }
}

/// When a container that exited is started again by its supervisor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "name")]
pub enum Restart {
    /// Never.
    #[default]
    No,
    /// After a non-zero exit, at most `max_retries` times when given.
    OnFailure {
        /// Limit on restarts.
        max_retries: Option<u32>,
    },
    /// Whatever the exit code, until stopped by a command.
    Always,
    /// As `always` (berth keeps no daemon that would start it again after a reboot).
    UnlessStopped,
}

impl Restart {
    /// Whether a container that exited with `code`, restarted `restarts` times so far,
    /// starts again.
    pub fn should_restart(&self, code: i32, restarts: u32) -> bool {
        match self {
            Restart::No => false,
            Restart::Always | Restart::UnlessStopped => true,
            Restart::OnFailure { max_retries } => {
                code != 0 && max_retries.is_none_or(|max| restarts < max)
            }
        }
    }
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restart::No => f.write_str("no"),
            Restart::OnFailure { max_retries: None } => f.write_str("on-failure"),
            Restart::OnFailure {
                max_retries: Some(n),
            } => write!(f, "on-failure:{n}"),
            Restart::Always => f.write_str("always"),
            Restart::UnlessStopped => f.write_str("unless-stopped"),
        }
    }
}

/// Resource limits, serialisable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// CPU quota in thousandths of a CPU.
    pub cpu_millis: Option<u32>,
    /// Most processes and threads.
    pub pids: Option<u32>,
}

impl From<Resources> for Limits {
    fn from(r: Resources) -> Limits {
        Limits {
            memory: r.memory,
            cpu_millis: r.cpu_millis,
            pids: r.pids,
        }
    }
}

/// Everything needed to start a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// argv (entrypoint + command).
    pub args: Vec<String>,
    /// Environment, `K=V`.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// User as given (`name`, `uid`, `name:group`, `uid:gid`), resolved inside the root.
    pub user: String,
    /// Host name.
    pub hostname: String,
    /// Network.
    pub network: NetworkMode,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Bind mounts, volumes and tmpfs.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Capabilities of a root process (numbers).
    pub capabilities: Vec<u32>,
    /// Read-only root filesystem.
    #[serde(default)]
    pub read_only: bool,
    /// Resource limits.
    #[serde(default)]
    pub resources: Resources,
    /// Restart policy.
    #[serde(default)]
    pub restart: Restart,
    /// Signal `stop` sends first (the image's STOPSIGNAL; SIGTERM by default).
    pub stop_signal: i32,
    /// A terminal for the command.
    #[serde(default)]
    pub tty: bool,
    /// Standard input kept open.
    #[serde(default)]
    pub interactive: bool,
    /// Remove the container when it stops for good (`--rm`).
    #[serde(default)]
    pub auto_remove: bool,
    /// Secrets it receives, by name (their values are in `secrets_file`, never here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretUse>,
    /// The 0600 file holding the secrets' values (`{"NAME": "value"}`), read at each start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_file: Option<PathBuf>,
    /// The health check its supervisor keeps running (the service's, else the image's
    /// HEALTHCHECK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<super::health::Check>,
}

/// How a secret reaches a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretDelivery {
    /// As an environment variable of its name.
    #[default]
    Env,
    /// As the file `/run/secrets/NAME`: a tmpfs, mode 0400, owned by the container's user.
    File,
}

/// A secret a container receives: its name and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretUse {
    /// The secret's (and the variable's, or the file's) name.
    pub name: String,
    /// How.
    #[serde(default)]
    pub delivery: SecretDelivery,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies_decide_like_docker() {
        assert!(!Restart::No.should_restart(1, 0));
        assert!(Restart::Always.should_restart(0, 100));
        let of = Restart::OnFailure {
            max_retries: Some(2),
        };
        assert!(!of.should_restart(0, 0), "a clean exit is not a failure");
        assert!(of.should_restart(3, 1));
        assert!(!of.should_restart(3, 2), "at most two restarts");
        assert!(Restart::OnFailure { max_retries: None }.should_restart(1, 1000));
        assert_eq!(of.to_string(), "on-failure:2");
    }

    #[test]
    fn specs_round_trip_through_json() {
        let spec = ContainerSpec {
            args: vec!["httpd".into(), "-f".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: "".into(),
            hostname: "web".into(),
            network: NetworkMode::Bridge {
                network: "app".into(),
                aliases: vec!["www".into()],
            },
            ports: vec![PortSpec {
                host_ip: "127.0.0.1".parse().unwrap(),
                host_port: 8080,
                container_port: 80,
                proto: Proto::Tcp,
            }],
            mounts: vec![
                MountSpec::Volume {
                    name: "data".into(),
                    target: "/data".into(),
                    read_only: false,
                },
                MountSpec::Tmpfs {
                    target: "/tmp".into(),
                },
            ],
            capabilities: vec![0, 1],
            read_only: false,
            resources: Resources::default(),
            restart: Restart::OnFailure {
                max_retries: Some(3),
            },
            stop_signal: 15,
            tty: false,
            interactive: false,
            auto_remove: false,
            secrets: vec![SecretUse {
                name: "DB".into(),
                delivery: SecretDelivery::File,
            }],
            secrets_file: Some("/x/secrets.json".into()),
            health: Some(crate::runtime::health::Check {
                probe: crate::runtime::health::Probe::Http {
                    path: "/".into(),
                    port: 80,
                },
                interval: std::time::Duration::from_secs(1),
                timeout: std::time::Duration::from_secs(1),
                retries: 3,
                start_period: std::time::Duration::ZERO,
            }),
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ContainerSpec>(&json).unwrap(), spec);
        assert_eq!(spec.ports[0].to_string(), "127.0.0.1:8080->80/tcp");
    }
}
