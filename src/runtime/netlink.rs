//! The few rtnetlink requests berth's networks need: bridges, veth pairs, addresses, links
//! up, a default route. Messages are built with `netlink-packet-route` and sent on a plain
//! synchronous socket; a socket acts in the network namespace it was created in, so a
//! process inside a container's namespace configures the container's side with its own.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A route netlink socket in the calling thread's network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl Netlink {
    /// A socket in the network namespace of berth's bridges: the host's as root, the
    /// rootless one without (see [`super::rootless::in_network`]).
    pub fn open_host() -> io::Result<Netlink> {
        super::rootless::in_network(Netlink::open)
    }

    /// A socket in the caller's network namespace.
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends one request and collects the replies until the kernel's acknowledgement.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(message));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut replies = Vec::new();
        let mut recv = vec![0u8; 64 * 1024];
        loop {
            let n = self.socket.recv(&mut &mut recv[..], 0)?;
            let mut off = 0;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes(recv[off..off + 4].try_into().expect("4 bytes")) as usize;
                if len < 16 || off + len > n {
                    return Err(other("netlink", "truncated reply"));
                }
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&recv[off..off + len])
                        .map_err(|e| other("netlink reply", e))?;
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
            }
        }
    }

    /// The index of the interface `name`, if it exists.
    pub fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn index(&mut self, name: &str) -> io::Result<u32> {
        self.link_index(name)?
            .ok_or_else(|| other(name, "no such network interface"))
    }

    /// Creates a bridge.
    pub fn create_bridge(&mut self, name: &str) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
            .map_err(|e| other(&format!("create bridge {name}"), e))
    }

    /// Creates a veth pair: `host` stays here, `peer` goes into the network namespace of
    /// process `pid`.
    pub fn create_veth(&mut self, host: &str, peer: &str, pid: i32) -> io::Result<()> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        peer_msg
            .attributes
            .push(LinkAttribute::NetNsPid(pid as u32));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(host.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
            .map_err(|e| other(&format!("create veth pair {host}"), e))
    }

    /// Changes a link: renames it, enslaves it to `master`, brings it up.
    fn set_link(
        &mut self,
        name: &str,
        rename: Option<&str>,
        master: Option<u32>,
        up: bool,
    ) -> io::Result<()> {
        let index = self.index(name)?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if up {
            msg.header.flags = LinkFlags::Up;
            msg.header.change_mask = LinkFlags::Up;
        }
        if let Some(n) = rename {
            msg.attributes.push(LinkAttribute::IfName(n.to_string()));
        }
        if let Some(m) = master {
            msg.attributes.push(LinkAttribute::Controller(m));
        }
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map(drop)
            .map_err(|e| other(&format!("configure {name}"), e))
    }

    /// Sets a link's hardware address.
    pub fn set_mac(&mut self, name: &str, mac: [u8; 6]) -> io::Result<()> {
        let index = self.index(name)?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map(drop)
            .map_err(|e| other(&format!("set the address of {name}"), e))
    }

    /// Brings a link up.
    pub fn up(&mut self, name: &str) -> io::Result<()> {
        self.set_link(name, None, None, true)
    }

    /// Renames a link (it must be down).
    pub fn rename(&mut self, name: &str, to: &str) -> io::Result<()> {
        self.set_link(name, Some(to), None, false)
    }

    /// Enslaves `name` to the bridge `bridge` and brings it up.
    pub fn attach(&mut self, name: &str, bridge: &str) -> io::Result<()> {
        let master = self.index(bridge)?;
        self.set_link(name, None, Some(master), true)
    }

    /// Deletes a link (a veth's peer goes with it).
    pub fn delete(&mut self, name: &str) -> io::Result<()> {
        let Some(index) = self.link_index(name)? else {
            return Ok(());
        };
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), 0)
            .map(drop)
            .map_err(|e| other(&format!("delete {name}"), e))
    }

    /// Adds an IPv4 address with its prefix length to a link.
    pub fn add_address(&mut self, name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let index = self.index(name)?;
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(ip)));
        let bits = u32::from(ip);
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        msg.attributes
            .push(AddressAttribute::Broadcast(Ipv4Addr::from(bits | !mask)));
        match self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r
                .map(drop)
                .map_err(|e| other(&format!("add {ip}/{prefix} to {name}"), e)),
        }
    }

    /// Adds the default route through `gateway`.
    pub fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = libc::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
        .map_err(|e| other(&format!("add the default route via {gateway}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a fresh network namespace (a thread of its own), loopback comes up and a bridge
    /// is created, addressed, found and deleted.
    #[test]
    fn configures_links_in_a_private_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (CI runs tests as root)");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut nl = Netlink::open().unwrap();
            nl.up("lo").unwrap();
            assert!(nl.link_index("nope0").unwrap().is_none());
            nl.create_bridge("br-test").unwrap();
            nl.add_address("br-test", Ipv4Addr::new(198, 18, 7, 1), 24)
                .unwrap();
            nl.add_address("br-test", Ipv4Addr::new(198, 18, 7, 1), 24)
                .unwrap();
            nl.up("br-test").unwrap();
            assert!(nl.link_index("br-test").unwrap().is_some());
            assert!(nl.create_bridge("br-test").is_err(), "exists already");
            nl.delete("br-test").unwrap();
            assert!(nl.link_index("br-test").unwrap().is_none());
        })
        .join()
        .unwrap();
    }
}
