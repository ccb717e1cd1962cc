//! Bridge networks: a record per network in the store (`berth/networks/<name>.json`), a
//! Linux bridge per network (created on first use, again after a reboot), one veth pair per
//! container and addresses leased from the network's subnet. A lease is a file named after
//! the address holding the container's id, created with `O_EXCL`, so two berth processes
//! never hand out one address twice; leases of containers that no longer exist are
//! reclaimed on the next allocation.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::netlink::Netlink;
use crate::store::{Store, StoreError};

/// The network `--network bridge` means.
pub const DEFAULT_NETWORK: &str = "bridge";

/// An IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Subnet {
    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let mask = self.mask() & other.mask();
        u32::from(self.addr) & mask == u32::from(other.addr) & mask
    }

    /// The `n`th host address (1 is the gateway).
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        (u64::from(n) < size.saturating_sub(1)).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a subnet like 10.89.0.0/24"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("prefix `/{p}` must be between /8 and /30"))?;
        let net = Subnet { addr, prefix };
        if u32::from(addr) & !net.mask() != 0 {
            return Err(format!(
                "`{s}` has host bits set; the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(addr) & net.mask())
            ));
        }
        Ok(net)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Subnet, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A network's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// Name.
    pub name: String,
    /// Random hex id.
    pub id: String,
    /// Subnet.
    pub subnet: Subnet,
    /// The bridge's address, the containers' default route.
    pub gateway: Ipv4Addr,
    /// The bridge device (`br-` and 12 hex characters of the id).
    pub bridge: String,
    /// When it was created.
    pub created: String,
}

/// What went wrong with a network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No such network.
    #[error("no network `{0}`")]
    NotFound(String),
    /// The name is taken.
    #[error("a network named `{0}` exists already")]
    Exists(String),
    /// The name is not valid.
    #[error("`{0}` is not a valid network name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")]
    BadName(String),
    /// Subnets overlap.
    #[error("subnet {subnet} overlaps {other}")]
    Overlap {
        /// Asked for.
        subnet: Subnet,
        /// What it overlaps.
        other: String,
    },
    /// Every address is leased.
    #[error("network {0} has no free address left")]
    Full(String),
    /// Still used.
    #[error("network {network} is used by container {container}")]
    InUse {
        /// The network.
        network: String,
        /// A container on it.
        container: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file or the kernel refused.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Io { what, source }
}

/// The container's side of its network, configured from inside its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The veth peer's name as it arrives in the namespace (renamed to `eth0`).
    pub peer: String,
    /// The container's address.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// Default route.
    pub gateway: Ipv4Addr,
}

impl Interface {
    /// Renames the peer to `eth0`, addresses it, brings it and loopback up, and routes
    /// through the gateway. Runs inside the container's network namespace.
    pub fn configure(&self) -> std::io::Result<()> {
        let mut nl = Netlink::open()?;
        nl.up("lo")?;
        nl.rename(&self.peer, "eth0")?;
        nl.add_address("eth0", self.ip, self.prefix)?;
        nl.up("eth0")?;
        nl.add_default_route(self.gateway)
    }
}

/// A network's bridge address: locally administered, unicast, from its id (so a bridge
/// made again after a reboot has the same).
pub fn bridge_mac(network_id: &str) -> [u8; 6] {
    let b = hex::decode(&network_id[..10]).unwrap_or_else(|_| vec![0; 5]);
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// The host-side veth name of a container.
pub fn host_veth(container_id: &str) -> String {
    format!("vb{}", &container_id[..10])
}

/// The networks of a store.
pub struct Networks {
    store: Store,
    dir: PathBuf,
}

impl Networks {
    /// The networks of `store`.
    pub fn new(store: &Store) -> Result<Networks, NetworkError> {
        let dir = store.state_dir().join("networks");
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        Ok(Networks {
            store: store.clone(),
            dir,
        })
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn leases_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("leases")
    }

    /// Every network, by name.
    pub fn list(&self) -> Result<Vec<NetworkRecord>, NetworkError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)
            .map_err(io("list networks"))?
            .flatten()
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json")
                && let Ok(bytes) = std::fs::read(&p)
                && let Ok(rec) = serde_json::from_slice::<NetworkRecord>(&bytes)
            {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The network `name`; the default network is created on first use.
    pub fn get(&self, name: &str) -> Result<NetworkRecord, NetworkError> {
        match std::fs::read(self.record_path(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| NetworkError::Io {
                what: format!("parse the record of network {name}"),
                source: std::io::Error::other(e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if name == DEFAULT_NETWORK {
                    self.create(name, None).or_else(|e| match e {
                        NetworkError::Exists(_) => self.get(name),
                        e => Err(e),
                    })
                } else {
                    Err(NetworkError::NotFound(name.to_string()))
                }
            }
            Err(e) => Err(io(format!("read network {name}"))(e)),
        }
    }

    /// Records a network; without a subnet, the first free /24 of 10.89.0.0/16 (one that no
    /// other network and no host route uses).
    pub fn create(
        &self,
        name: &str,
        subnet: Option<Subnet>,
    ) -> Result<NetworkRecord, NetworkError> {
        if !crate::manifest::values::valid_object_name(name) || name.len() > 64 {
            return Err(NetworkError::BadName(name.to_string()));
        }
        let _lock = self.store.lock()?;
        if self.record_path(name).exists() {
            return Err(NetworkError::Exists(name.to_string()));
        }
        let mut taken: Vec<(Subnet, String)> = self
            .list()?
            .into_iter()
            .map(|n| (n.subnet, format!("network {}", n.name)))
            .collect();
        taken.extend(
            host_routes()
                .into_iter()
                .map(|(s, dev)| (s, format!("a route of the host (via {dev})"))),
        );
        let subnet = match subnet {
            Some(s) => {
                if let Some((_, other)) = taken.iter().find(|(t, _)| t.overlaps(&s)) {
                    return Err(NetworkError::Overlap {
                        subnet: s,
                        other: other.clone(),
                    });
                }
                s
            }
            None => (0..=255u8)
                .map(|n| Subnet {
                    addr: Ipv4Addr::new(10, 89, n, 0),
                    prefix: 24,
                })
                .find(|s| !taken.iter().any(|(t, _)| t.overlaps(s)))
                .ok_or_else(|| NetworkError::Full("10.89.0.0/16".into()))?,
        };
        let id = super::container::random_id();
        let rec = NetworkRecord {
            name: name.to_string(),
            bridge: format!("br-{}", &id[..12]),
            id,
            gateway: subnet.host(1).expect("a /30 or larger has a first host"),
            subnet,
            created: super::container::now(),
        };
        std::fs::create_dir_all(self.leases_dir(name)).map_err(io("create the lease directory"))?;
        let bytes = serde_json::to_vec_pretty(&rec).expect("record serialises");
        self.store.replace_file(&self.record_path(name), &bytes)?;
        Ok(rec)
    }

    /// Removes a network and its bridge. `in_use` names a container still on it.
    pub fn remove(&self, name: &str, in_use: Option<String>) -> Result<(), NetworkError> {
        let rec = self.get(name)?;
        if let Some(container) = in_use {
            return Err(NetworkError::InUse {
                network: name.to_string(),
                container,
            });
        }
        if let Ok(mut nl) = Netlink::open_host() {
            nl.delete(&rec.bridge)
                .map_err(io(format!("delete bridge {}", rec.bridge)))?;
        }
        std::fs::remove_file(self.record_path(name)).map_err(io("remove the record"))?;
        let _ = std::fs::remove_dir_all(self.dir.join(name));
        Ok(())
    }

    /// Makes sure the network's bridge exists, has the gateway address and is up.
    pub fn ensure_bridge(&self, rec: &NetworkRecord) -> Result<(), NetworkError> {
        let mut nl = Netlink::open_host().map_err(io("open a netlink socket"))?;
        let what = format!("set up bridge {} of network {}", rec.bridge, rec.name);
        if nl.link_index(&rec.bridge).map_err(io(&what))?.is_none() {
            match nl.create_bridge(&rec.bridge) {
                Err(e) if e.to_string().contains("exists") => {}
                r => r.map_err(io(&what))?,
            }
        }
        // A fixed address: a bridge left to itself takes the lowest address of its ports,
        // so it would change as containers come and go, and containers holding the old one
        // for their gateway would stop getting answers until their ARP entry expired.
        nl.set_mac(&rec.bridge, bridge_mac(&rec.id))
            .map_err(io(&what))?;
        nl.add_address(&rec.bridge, rec.gateway, rec.subnet.prefix)
            .map_err(io(&what))?;
        nl.up(&rec.bridge).map_err(io(&what))
    }

    /// The address leased to `container_id` on `rec`, leasing a free one if it has none.
    /// `live` tells whether a container id still exists (leases of others are reclaimed).
    pub fn lease(
        &self,
        rec: &NetworkRecord,
        container_id: &str,
        live: &dyn Fn(&str) -> bool,
    ) -> Result<Ipv4Addr, NetworkError> {
        let dir = self.leases_dir(&rec.name);
        std::fs::create_dir_all(&dir).map_err(io("create the lease directory"))?;
        for (ip, holder) in self.leases(rec)? {
            if holder == container_id {
                return Ok(ip);
            }
            if !live(&holder) {
                let _ = std::fs::remove_file(dir.join(ip.to_string()));
            }
        }
        for n in 2.. {
            let Some(ip) = rec.subnet.host(n) else { break };
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(ip.to_string()))
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(container_id.as_bytes())
                        .map_err(io("write a lease"))?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("write a lease")(e)),
            }
        }
        Err(NetworkError::Full(rec.name.clone()))
    }

    /// Every lease of a network: address and container id.
    pub fn leases(&self, rec: &NetworkRecord) -> Result<Vec<(Ipv4Addr, String)>, NetworkError> {
        let dir = self.leases_dir(&rec.name);
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            if let Some(ip) = e.file_name().to_str().and_then(|n| n.parse().ok())
                && let Ok(holder) = std::fs::read_to_string(e.path())
            {
                out.push((ip, holder));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Gives up the leases of `container_id` on every network.
    pub fn release(&self, container_id: &str) -> Result<(), NetworkError> {
        for rec in self.list()? {
            for (ip, holder) in self.leases(&rec)? {
                if holder == container_id {
                    let _ = std::fs::remove_file(self.leases_dir(&rec.name).join(ip.to_string()));
                }
            }
        }
        Ok(())
    }

    /// The container's side of its interface on `rec` (the veth peer's name follows from
    /// the id).
    pub fn interface(rec: &NetworkRecord, container_id: &str, ip: Ipv4Addr) -> Interface {
        Interface {
            peer: format!("vp{}", &container_id[..10]),
            ip,
            prefix: rec.subnet.prefix,
            gateway: rec.gateway,
        }
    }

    /// Creates the container's veth pair, its host end on the network's bridge and its
    /// other end (named as [`Networks::interface`] says) in the network namespace of
    /// process `pid`.
    pub fn attach(
        &self,
        rec: &NetworkRecord,
        container_id: &str,
        pid: i32,
    ) -> Result<(), NetworkError> {
        self.ensure_bridge(rec)?;
        let host = host_veth(container_id);
        let peer = format!("vp{}", &container_id[..10]);
        let what = format!("connect the container to network {}", rec.name);
        let mut nl = Netlink::open_host().map_err(io(&what))?;
        // A veth left by a crash (its namespace still alive) would block the name.
        nl.delete(&host).map_err(io(&what))?;
        nl.create_veth(&host, &peer, pid).map_err(io(&what))?;
        nl.attach(&host, &rec.bridge).map_err(io(&what))
    }
}

/// The host's IPv4 routes (except default routes) from `/proc/net/route`, with their device.
pub fn host_routes() -> Vec<(Subnet, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    // The kernel prints each big-endian address as a native integer.
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, mask) = (hex(f.get(1)?)?, hex(f.get(7)?)?);
            let prefix = u32::from_be_bytes(mask).count_ones() as u8;
            let dest = Ipv4Addr::from(dest);
            (prefix > 0).then(|| (Subnet { addr: dest, prefix }, f[0].to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_overlap() {
        let a: Subnet = "198.18.4.0/24".parse().unwrap();
        assert_eq!(a.host(1), Some(Ipv4Addr::new(198, 18, 4, 1)));
        assert_eq!(a.host(254), Some(Ipv4Addr::new(198, 18, 4, 254)));
        assert_eq!(a.host(255), None, "the broadcast address is not a host");
        assert!(a.contains(Ipv4Addr::new(198, 18, 4, 9)));
        assert!(a.overlaps(&"198.18.0.0/16".parse().unwrap()));
        assert!(!a.overlaps(&"198.18.5.0/24".parse().unwrap()));
        assert!("198.18.4.1/24".parse::<Subnet>().is_err(), "host bits");
        assert!("198.18.4.0".parse::<Subnet>().is_err());
        assert!("198.18.4.0/31".parse::<Subnet>().is_err());
    }

    #[test]
    fn leases_are_unique_and_reclaimed() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let nets = Networks::new(&store).unwrap();
        let rec = nets
            .create("app", Some("198.18.200.0/29".parse().unwrap()))
            .unwrap();
        assert!(matches!(
            nets.create("app", None),
            Err(NetworkError::Exists(_))
        ));
        assert!(matches!(
            nets.create("other", Some("198.18.200.0/24".parse().unwrap())),
            Err(NetworkError::Overlap { .. })
        ));
        let all = |_: &str| true;
        let a = nets.lease(&rec, "a", &all).unwrap();
        assert_eq!(a, Ipv4Addr::new(198, 18, 200, 2));
        assert_eq!(nets.lease(&rec, "a", &all).unwrap(), a, "stable");
        let ips: Vec<_> = ["b", "c", "d", "e"]
            .iter()
            .map(|id| nets.lease(&rec, id, &all).unwrap())
            .collect();
        assert_eq!(ips.last(), Some(&Ipv4Addr::new(198, 18, 200, 6)));
        assert!(matches!(
            nets.lease(&rec, "f", &all),
            Err(NetworkError::Full(_))
        ));
        // "c" no longer exists: its address goes to "f".
        let f = nets.lease(&rec, "f", &|id| id != "c").unwrap();
        assert_eq!(f, Ipv4Addr::new(198, 18, 200, 4));
        nets.release("a").unwrap();
        assert_eq!(nets.leases(&rec).unwrap().len(), 4);
        assert!(matches!(
            nets.remove("app", Some("x".into())),
            Err(NetworkError::InUse { .. })
        ));
    }
}
