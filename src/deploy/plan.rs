//! A release's plan from an environment's resolved configuration: what every host of the
//! environment is sent (the image by digest, each service's command, environment, ports,
//! volumes, health check, limits) and how the rollout proceeds.

use super::health::{Check, Probe};
use super::{ReleasePlan, RolloutPlan, ServicePlan};
use crate::manifest::schema::Delivery;
use crate::manifest::schema::{self, AppConfig, CommandLine};
use crate::manifest::values::{Protocol, RestartPolicy, VolumeSource};
use crate::runtime::spec::{
    MountSpec, PortSpec, Proto, Resources, Restart, SecretDelivery, SecretUse,
};
use crate::store::Digest;

fn argv(c: &CommandLine) -> Vec<String> {
    match c {
        CommandLine::Exec(v) => v.clone(),
        CommandLine::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
    }
}

fn health(h: &schema::HealthCheck) -> Check {
    Check {
        probe: match &h.probe {
            schema::Probe::Http { path, port } => Probe::Http {
                path: path.clone(),
                port: *port,
            },
            schema::Probe::Tcp { port } => Probe::Tcp { port: *port },
            schema::Probe::Exec { command } => Probe::Exec {
                command: argv(command),
            },
        },
        interval: h.interval.0,
        timeout: h.timeout.0,
        retries: h.retries,
        start_period: h.start_period.0,
    }
}

/// One service's plan.
pub fn service_plan(config: &AppConfig, name: &str, svc: &schema::Service) -> ServicePlan {
    let deployment = format!("{}-{}", config.app.name, config.environment);
    ServicePlan {
        name: name.to_string(),
        replicas: svc.replicas,
        entrypoint: svc.entrypoint.as_ref().map(argv),
        command: svc.command.as_ref().map(argv),
        env: svc
            .effective_env(config)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        ports: svc
            .ports
            .iter()
            .map(|p| PortSpec {
                host_ip: p
                    .host_ip
                    .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                host_port: p.published,
                container_port: p.container,
                proto: match p.protocol {
                    Protocol::Tcp => Proto::Tcp,
                    Protocol::Udp => Proto::Udp,
                },
            })
            .collect(),
        mounts: svc
            .volumes
            .iter()
            .map(|v| match &v.source {
                VolumeSource::Named(n) => MountSpec::Volume {
                    name: format!("{deployment}-{n}"),
                    target: v.target.clone(),
                    read_only: v.read_only,
                },
                VolumeSource::Bind(p) => MountSpec::Bind {
                    source: p.into(),
                    target: v.target.clone(),
                    read_only: v.read_only,
                },
            })
            .collect(),
        health: svc.health.as_ref().map(health),
        resources: Resources {
            memory: svc.resources.memory.map(|m| m.0),
            cpu_millis: svc.resources.cpus.map(|c| c.millis),
            pids: svc.resources.pids,
        },
        restart: match svc.restart {
            RestartPolicy::No => Restart::No,
            RestartPolicy::OnFailure { max_retries } => Restart::OnFailure { max_retries },
            RestartPolicy::Always => Restart::Always,
            RestartPolicy::UnlessStopped => Restart::UnlessStopped,
        },
        stop_signal: svc.stop_signal.map(|s| s.0),
        stop_timeout: svc.stop_timeout.0,
        secrets: config
            .secrets
            .iter()
            .map(|(name, spec)| SecretUse {
                name: name.clone(),
                delivery: match spec.delivery {
                    Delivery::Env => SecretDelivery::Env,
                    Delivery::File => SecretDelivery::File,
                },
            })
            .collect(),
    }
}

impl ReleasePlan {
    /// The plan of `digest` (built from `revision`) for `config`'s environment. Its
    /// release number is set when the ledger allocates one.
    pub fn for_environment(
        config: &AppConfig,
        digest: &Digest,
        revision: Option<String>,
    ) -> ReleasePlan {
        ReleasePlan {
            app: config.app.name.clone(),
            environment: config.environment.clone(),
            release: 0,
            digest: digest.clone(),
            revision,
            services: config
                .services
                .iter()
                .map(|(n, s)| service_plan(config, n, s))
                .collect(),
            rollout: RolloutPlan {
                drain: config.rollout.drain.0,
                timeout: config.rollout.timeout.0,
                keep: config.rollout.keep,
            },
        }
    }

    /// The same plan with other replica counts (`scale`); an unknown service is an error
    /// naming the ones there are.
    pub fn scaled(&self, counts: &[(String, u32)]) -> Result<ReleasePlan, String> {
        let mut plan = self.clone();
        for (name, n) in counts {
            let known: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
            let Some(svc) = plan.services.iter_mut().find(|s| &s.name == name) else {
                let near = known
                    .iter()
                    .min_by_key(|k| strsim::levenshtein(k, name))
                    .filter(|k| strsim::levenshtein(k, name) <= 2);
                return Err(format!(
                    "no service `{name}` in {} ({}{})",
                    self.deployment(),
                    match near {
                        Some(n) => format!("did you mean `{n}`? "),
                        None => String::new(),
                    },
                    format_args!("it has: {}", known.join(", "))
                ));
            };
            svc.replicas = *n;
        }
        Ok(plan)
    }
}
