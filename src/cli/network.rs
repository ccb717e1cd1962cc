//! `berth network create|ls|rm|inspect` and `berth volume create|ls|rm|inspect`.

use clap::Subcommand;
use miette::miette;
use serde_json::json;

use super::run::failed;
use super::{CliError, GlobalOpts, Output};
use crate::runtime::container::Containers;
use crate::runtime::network::{Networks, Subnet};
use crate::runtime::spec::{MountSpec, NetworkMode};
use crate::runtime::volume::Volumes;
use crate::store::Store;

/// `berth network …`.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Create a bridge network.
    Create {
        /// Its subnet [default: the first free /24 of 10.89.0.0/16].
        #[arg(long)]
        subnet: Option<Subnet>,
        /// The network's name.
        name: String,
    },
    /// List networks.
    Ls,
    /// Remove networks (refused while a container is on one).
    Rm {
        /// Network names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print a network's record and its containers as JSON.
    Inspect {
        /// The network's name.
        name: String,
    },
}

/// `berth volume …`.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a named volume.
    Create {
        /// The volume's name.
        name: String,
    },
    /// List volumes.
    Ls,
    /// Remove volumes and their data (refused while a container refers to one).
    Rm {
        /// Volume names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print a volume's record as JSON.
    Inspect {
        /// The volume's name.
        name: String,
    },
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> CliError {
    CliError::invalid(miette::Report::from_err(e))
}

/// Runs a `network` subcommand.
pub fn network(g: &GlobalOpts, cmd: &NetworkCommand, out: &mut Output) -> Result<(), CliError> {
    let store = Store::open(&g.store_dir())?;
    let nets = Networks::new(&store).map_err(failed)?;
    let containers = Containers::new(&store).map_err(failed)?;
    match cmd {
        NetworkCommand::Create { subnet, name } => {
            let rec = nets.create(name, *subnet).map_err(invalid)?;
            if out.json {
                out.json_value(&rec)?;
            } else {
                out.line(&rec.name)?;
            }
        }
        NetworkCommand::Ls => {
            let list = nets.list().map_err(failed)?;
            if out.json {
                return Ok(out.json_value(&list)?);
            }
            out.line(format!(
                "{:<14} {:<20} {:<18} {:<16} BRIDGE",
                "ID", "NAME", "SUBNET", "GATEWAY"
            ))?;
            for n in list {
                out.line(format!(
                    "{:<14} {:<20} {:<18} {:<16} {}",
                    &n.id[..12],
                    n.name,
                    n.subnet.to_string(),
                    n.gateway.to_string(),
                    n.bridge
                ))?;
            }
        }
        NetworkCommand::Rm { names } => {
            let all = containers.list().map_err(failed)?;
            for name in names {
                let user = all.iter().find(|c| {
                    containers.spec(&c.id).is_ok_and(|s| {
                        matches!(&s.network, NetworkMode::Bridge { network, .. } if network == name)
                    })
                });
                nets.remove(name, user.map(|c| c.name.clone()))
                    .map_err(|e| match e {
                        crate::runtime::network::NetworkError::InUse { .. } => CliError::failed(
                            miette!(help = "remove the containers on it first", "{e}"),
                        ),
                        e => invalid(e),
                    })?;
                out.line(name)?;
            }
        }
        NetworkCommand::Inspect { name } => {
            let rec = nets.get(name).map_err(invalid)?;
            let all = containers.list().map_err(failed)?;
            let members: Vec<serde_json::Value> = nets
                .leases(&rec)
                .map_err(failed)?
                .into_iter()
                .map(|(ip, id)| {
                    let name = all.iter().find(|c| c.id == id).map(|c| c.name.clone());
                    json!({ "id": id, "name": name, "ip": ip })
                })
                .collect();
            out.json_value(&json!({ "network": rec, "containers": members }))?;
        }
    }
    Ok(())
}

/// Runs a `volume` subcommand.
pub fn volume(g: &GlobalOpts, cmd: &VolumeCommand, out: &mut Output) -> Result<(), CliError> {
    let store = Store::open(&g.store_dir())?;
    let volumes = Volumes::new(&store);
    match cmd {
        VolumeCommand::Create { name } => {
            let (rec, _) = volumes.ensure(name).map_err(invalid)?;
            out.line(&rec.name)?;
        }
        VolumeCommand::Ls => {
            let list = volumes.list().map_err(failed)?;
            if out.json {
                return Ok(out.json_value(&list)?);
            }
            out.line(format!("{:<30} MOUNTPOINT", "NAME"))?;
            for v in list {
                out.line(format!("{:<30} {}", v.name, v.mountpoint.display()))?;
            }
        }
        VolumeCommand::Rm { names } => {
            let containers = Containers::new(&store).map_err(failed)?;
            let all = containers.list().map_err(failed)?;
            for name in names {
                let user = all.iter().find(|c| {
                    containers.spec(&c.id).is_ok_and(|s| {
                        s.mounts
                            .iter()
                            .any(|m| matches!(m, MountSpec::Volume { name: n, .. } if n == name))
                    })
                });
                volumes
                    .remove(name, user.map(|c| c.name.clone()))
                    .map_err(|e| match e {
                        crate::runtime::volume::VolumeError::InUse { .. } => CliError::failed(
                            miette!(help = "remove the containers using it first", "{e}"),
                        ),
                        e => invalid(e),
                    })?;
                out.line(name)?;
            }
        }
        VolumeCommand::Inspect { name } => {
            let rec = volumes.get(name).map_err(invalid)?;
            out.json_value(&rec)?;
        }
    }
    Ok(())
}
