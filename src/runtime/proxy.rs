//! Published ports without iptables: a userspace proxy (TCP and UDP) from host addresses to
//! a set of backends. The backends can be switched at any time without closing the
//! listening sockets: connections already open stay on their backend, new ones go to the
//! new set — what zero-downtime deploys build on. Several backends are balanced round-robin;
//! a backend that refuses a connection is skipped for that connection.
//!
//! A container's supervisor runs its proxy in a child process ([`ProxyProcess`]) so that the
//! supervisor itself stays single-threaded (it clones containers); the child dies with it.

use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

use super::spec::{PortSpec, Proto};

/// How long a UDP flow without traffic keeps its backend socket.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long to wait for a backend to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The backend addresses of one published port.
pub type Backends = watch::Receiver<Vec<SocketAddr>>;

/// Listening sockets for a set of published ports and their switchable backends.
pub struct Proxy {
    ports: Vec<(PortSpec, watch::Sender<Vec<SocketAddr>>)>,
}

impl Proxy {
    /// Binds every port (so a port in use fails here, before anything starts) and serves
    /// them on the current tokio runtime. No backends yet: connections are closed.
    pub async fn bind(ports: &[PortSpec]) -> io::Result<Proxy> {
        let mut bound = Vec::new();
        let mut out = Vec::new();
        for p in ports {
            let addr = p.listen_addr();
            let what = |e: io::Error| {
                let help = if e.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
                    " (ports below 1024 need root, or a lower net.ipv4.ip_unprivileged_port_start)"
                } else {
                    ""
                };
                io::Error::new(e.kind(), format!("listen on {addr}/{}: {e}{help}", p.proto))
            };
            let (tx, rx) = watch::channel(Vec::new());
            match p.proto {
                Proto::Tcp => {
                    bound.push((Some(TcpListener::bind(addr).await.map_err(what)?), None, rx))
                }
                Proto::Udp => {
                    bound.push((None, Some(UdpSocket::bind(addr).await.map_err(what)?), rx))
                }
            }
            out.push((*p, tx));
        }
        for (tcp, udp, rx) in bound {
            if let Some(l) = tcp {
                tokio::spawn(serve_tcp(l, rx));
            } else if let Some(u) = udp {
                tokio::spawn(serve_udp(Arc::new(u), rx));
            }
        }
        Ok(Proxy { ports: out })
    }

    /// Points every port at the same container ports on `hosts` (one address per replica).
    pub fn set_hosts(&self, hosts: &[std::net::IpAddr]) {
        for (spec, tx) in &self.ports {
            let addrs = hosts
                .iter()
                .map(|h| SocketAddr::new(*h, spec.container_port))
                .collect();
            tx.send_replace(addrs);
        }
    }
}

fn pick(backends: &[SocketAddr], next: &AtomicUsize) -> Vec<SocketAddr> {
    if backends.is_empty() {
        return Vec::new();
    }
    let start = next.fetch_add(1, Ordering::Relaxed) % backends.len();
    backends[start..]
        .iter()
        .chain(&backends[..start])
        .copied()
        .collect()
}

/// A connection to a backend. Backends are containers: rootless, they live in berth's
/// own network namespace, where the socket is made (the listeners stay on the host's).
async fn connect_backend(addr: SocketAddr) -> io::Result<TcpStream> {
    match rootless_socket(addr, libc::SOCK_STREAM).await? {
        Some(fd) => {
            tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
                .connect(addr)
                .await
        }
        None => TcpStream::connect(addr).await,
    }
}

/// A UDP socket for one client's flow to a backend (see [`connect_backend`]).
async fn udp_backend_socket(local: SocketAddr) -> io::Result<UdpSocket> {
    match rootless_socket(local, libc::SOCK_DGRAM).await? {
        Some(fd) => UdpSocket::from_std(std::net::UdpSocket::from(fd)),
        None => UdpSocket::bind(local).await,
    }
}

/// Rootless, a socket of type `ty` for `addr`'s family made in the containers' network
/// namespace; as root, `None` (the caller makes one here).
async fn rootless_socket(
    addr: SocketAddr,
    ty: libc::c_int,
) -> io::Result<Option<std::os::fd::OwnedFd>> {
    if super::rootless::network_namespace().is_none() {
        return Ok(None);
    }
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    tokio::task::spawn_blocking(move || super::rootless::socket(domain, ty))
        .await
        .map_err(io::Error::other)?
        .map(Some)
}

async fn serve_tcp(listener: TcpListener, backends: Backends) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let order = pick(&backends.borrow(), &next);
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            for addr in order {
                if let Ok(Ok(mut upstream)) =
                    tokio::time::timeout(CONNECT_TIMEOUT, connect_backend(addr)).await
                {
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return;
                }
            }
        });
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, backends: Backends) {
    let flows: Arc<tokio::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<UdpSocket>>>> =
        Arc::default();
    let next = AtomicUsize::new(0);
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let existing = flows.lock().await.get(&client).cloned();
        let upstream = match existing {
            Some(u) => u,
            None => {
                let Some(addr) = pick(&backends.borrow(), &next).first().copied() else {
                    continue;
                };
                let local: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse().expect("literal")
                } else {
                    "[::]:0".parse().expect("literal")
                };
                let Ok(u) = udp_backend_socket(local).await else {
                    continue;
                };
                if u.connect(addr).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                flows.lock().await.insert(client, u.clone());
                let (socket, flows, reply) = (socket.clone(), flows.clone(), u.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, reply.recv(&mut buf)).await
                    {
                        let _ = socket.send_to(&buf[..n], client).await;
                    }
                    flows.lock().await.remove(&client);
                });
                u
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// A proxy in a child process, fed its backends over a pipe.
pub struct ProxyProcess {
    pid: nix::unistd::Pid,
    control: std::fs::File,
}

impl ProxyProcess {
    /// Forks a process that binds `ports` and serves them; returns once they are bound (or
    /// with the reason they could not be). The caller must be single-threaded. The child
    /// dies with its parent.
    pub fn spawn(ports: &[PortSpec]) -> io::Result<ProxyProcess> {
        let (ctl_r, ctl_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (st_r, st_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // SAFETY: the caller is single-threaded; the child only runs Rust code of its own.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => {
                drop(ctl_w);
                drop(st_r);
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                let code = child(ports, ctl_r, st_w);
                // SAFETY: leave without running the parent's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(ctl_r);
                drop(st_w);
                let mut status = String::new();
                io::BufReader::new(std::fs::File::from(st_r)).read_line(&mut status)?;
                let status = status.trim_end();
                if status != "ok" {
                    let _ = nix::sys::wait::waitpid(child, None);
                    return Err(io::Error::other(if status.is_empty() {
                        "the port proxy failed to start".to_string()
                    } else {
                        status.to_string()
                    }));
                }
                Ok(ProxyProcess {
                    pid: child,
                    control: std::fs::File::from(ctl_w),
                })
            }
        }
    }

    /// Points the ports at `hosts`.
    pub fn set_hosts(&mut self, hosts: &[std::net::IpAddr]) -> io::Result<()> {
        let line: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        writeln!(self.control, "{}", line.join(" "))
    }

    /// The proxy's pid.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

fn child(ports: &[PortSpec], control: OwnedFd, status: OwnedFd) -> i32 {
    let mut status = std::fs::File::from(status);
    // Descriptors of the parent (a container's pty or pipes) must not stay open here.
    for fd in 3..1024 {
        if fd != control.as_raw_fd() && fd != status.as_raw_fd() {
            // SAFETY: closing descriptors this process does not use.
            unsafe { libc::close(fd) };
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(status, "cannot start the port proxy: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let proxy = match Proxy::bind(ports).await {
            Ok(p) => p,
            Err(e) => {
                let _ = writeln!(status, "{e}");
                return 1;
            }
        };
        let _ = writeln!(status, "ok");
        drop(status);
        let control = std::fs::File::from(control);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<std::net::IpAddr>>(4);
        std::thread::spawn(move || {
            for line in io::BufReader::new(control).lines() {
                let Ok(line) = line else { break };
                let hosts = line
                    .split_whitespace()
                    .filter_map(|h| h.parse().ok())
                    .collect();
                if tx.blocking_send(hosts).is_err() {
                    break;
                }
            }
        });
        while let Some(hosts) = rx.recv().await {
            proxy.set_hosts(&hosts);
        }
        // The parent closed the pipe: it is gone or done.
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server(tag: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf).await.unwrap();
                    s.write_all(tag).await.unwrap();
                    s.write_all(&buf[..n]).await.unwrap();
                });
            }
        });
        addr
    }

    async fn ask(port: u16) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn switches_backends_without_closing_the_listener() {
        let a = echo_server(b"a:").await;
        let b = echo_server(b"b:").await;
        // Find a free port, then proxy it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = PortSpec {
            host_ip: "127.0.0.1".parse().unwrap(),
            host_port: port,
            container_port: 0,
            proto: Proto::Tcp,
        };
        let proxy = Proxy::bind(&[spec]).await.unwrap();
        let (_, tx) = &proxy.ports[0];
        // No backend: the connection is closed at once (reset, as "hi" was never read).
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 8];
        assert!(matches!(s.read(&mut buf).await, Ok(0) | Err(_)));
        tx.send_replace(vec![a]);
        assert_eq!(ask(port).await, b"a:hi");
        // An open connection stays on its backend across the switch.
        let mut held = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        // Let the proxy accept it (and pick its backend) before the switch.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send_replace(vec![b]);
        assert_eq!(ask(port).await, b"b:hi");
        held.write_all(b"yo").await.unwrap();
        let mut out = Vec::new();
        held.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"a:yo");
        // Two backends: both get traffic; a dead one is skipped.
        tx.send_replace(vec![a, b]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            seen.insert(ask(port).await[..2].to_vec());
        }
        assert_eq!(seen.len(), 2);
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        tx.send_replace(vec![dead, b]);
        for _ in 0..3 {
            assert_eq!(ask(port).await, b"b:hi");
        }
        assert!(
            Proxy::bind(&[spec]).await.is_err(),
            "a port in use is an error at bind time"
        );
    }

    #[tokio::test]
    async fn relays_udp_both_ways() {
        let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let baddr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let (n, from) = backend.recv_from(&mut buf).await.unwrap();
                let mut reply = b"re:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                backend.send_to(&reply, from).await.unwrap();
            }
        });
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = PortSpec {
            host_ip: "127.0.0.1".parse().unwrap(),
            host_port: port,
            container_port: baddr.port(),
            proto: Proto::Udp,
        };
        let proxy = Proxy::bind(&[spec]).await.unwrap();
        proxy.set_hosts(&[baddr.ip()]);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(("127.0.0.1", port)).await.unwrap();
        client.send(b"ping").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"re:ping");
    }
}
