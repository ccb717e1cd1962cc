//! A service's published ports across releases: one small process per service (the
//! router) holds the listening sockets and proxies to the service's current replicas. A
//! deploy tells it the new replicas' addresses over a unix socket; the switch is one step
//! and the listeners never close, so clients see no gap. It remembers its backends in a
//! file, so a router that is restarted serves the same replicas. It also reads its
//! replicas' records a few times a second: one that is not running, or that its
//! supervisor's health check found unhealthy, gets no new connections until it is well
//! again (unless no replica is, when all get them).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::runtime::container::ProcRef;
use crate::runtime::proxy::Proxy;
use crate::runtime::spec::PortSpec;

/// One replica a router sends connections to: its container (whose record says whether it
/// runs and is healthy) and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The container's id (none: always used).
    pub id: Option<String>,
    /// Its address.
    pub ip: IpAddr,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.id {
            Some(id) => write!(f, "{id}@{}", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = ();

    fn from_str(s: &str) -> Result<Backend, ()> {
        match s.split_once('@') {
            Some((id, ip)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(Backend {
                    id: Some(id.to_string()),
                    ip: ip.parse().map_err(drop)?,
                })
            }
            Some(_) => Err(()),
            None => Ok(Backend {
                id: None,
                ip: s.parse().map_err(drop)?,
            }),
        }
    }
}

/// The backends that should get new connections: those whose container runs and is not
/// unhealthy; if none is, every one that runs; if none runs, all (a connection that fails
/// moves on to the next).
fn in_rotation(containers_dir: &Path, backends: &[Backend]) -> Vec<IpAddr> {
    let fit = |b: &Backend, need_health: bool| {
        let Some(id) = &b.id else { return true };
        let Ok(bytes) = std::fs::read(containers_dir.join(id).join("state.json")) else {
            return false;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return false;
        };
        v["status"] == "running" && (!need_health || v["health"]["status"] != "unhealthy")
    };
    for need_health in [true, false] {
        let ips: Vec<IpAddr> = backends
            .iter()
            .filter(|b| fit(b, need_health))
            .map(|b| b.ip)
            .collect();
        if !ips.is_empty() {
            return ips;
        }
    }
    backends.iter().map(|b| b.ip).collect()
}

/// A router's directory: `ports.json`, `router.sock`, `backends`, `pid`, `router.log`.
#[derive(Debug, Clone)]
pub struct Router {
    /// Its directory.
    pub dir: PathBuf,
}

fn socket_path(dir: &Path) -> PathBuf {
    dir.join("router.sock")
}

impl Router {
    /// The router whose state lives in `dir`.
    pub fn new(dir: PathBuf) -> Router {
        Router { dir }
    }

    /// The ports it serves, as last configured.
    pub fn ports(&self) -> Vec<PortSpec> {
        std::fs::read(self.dir.join("ports.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Its process, if running.
    pub fn process(&self) -> Option<ProcRef> {
        let text = std::fs::read_to_string(self.dir.join("pid")).ok()?;
        let (pid, start) = text.trim().split_once(' ')?;
        let p = ProcRef {
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        };
        p.alive().then_some(p)
    }

    /// Makes sure a router serves `ports` (restarting it if the ports changed).
    pub fn ensure(&self, program: &Path, store_dir: &Path, ports: &[PortSpec]) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        if let Some(p) = self.process() {
            if self.ports() == ports {
                return Ok(());
            }
            self.stop_process(p);
        }
        std::fs::write(
            self.dir.join("ports.json"),
            serde_json::to_vec(ports).expect("ports serialise"),
        )?;
        self.spawn(program, store_dir)
    }

    fn stop_process(&self, p: ProcRef) {
        let pid = nix::unistd::Pid::from_raw(p.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        for _ in 0..200 {
            if !p.alive() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Stops the router and forgets it.
    pub fn remove(&self) -> io::Result<()> {
        if let Some(p) = self.process() {
            self.stop_process(p);
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn spawn(&self, program: &Path, store_dir: &Path) -> io::Result<()> {
        let args = [
            std::ffi::OsStr::new("--store"),
            store_dir.as_os_str(),
            std::ffi::OsStr::new("__router"),
            self.dir.as_os_str(),
        ];
        match crate::runtime::daemon::spawn(
            program,
            "berth-router",
            &args,
            &self.dir.join("router.log"),
        )? {
            Ok(()) => Ok(()),
            Err(status) if status.is_empty() => Err(io::Error::other(format!(
                "the router exited at start (see {})",
                self.dir.join("router.log").display()
            ))),
            Err(status) => Err(io::Error::other(status)),
        }
    }

    /// Points the router at `backends` (one per replica), at once.
    pub fn switch(&self, backends: &[Backend]) -> io::Result<()> {
        let mut s = UnixStream::connect(socket_path(&self.dir))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let line: Vec<String> = backends.iter().map(ToString::to_string).collect();
        writeln!(s, "set {}", line.join(" "))?;
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply)?;
        if reply.trim_end() == "ok" {
            Ok(())
        } else {
            Err(io::Error::other(format!("the router answered {reply:?}")))
        }
    }

    /// The backends it serves now.
    pub fn backends(&self) -> Vec<Backend> {
        std::fs::read_to_string(self.dir.join("backends"))
            .map(|t| {
                t.split_whitespace()
                    .filter_map(|a| a.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The router process's main: serves the ports in `dir`, switching backends on request
/// and keeping those that do not run or are unhealthy out of rotation (their records are
/// in `store_dir`).
pub fn run(dir: &Path, store_dir: &Path, ready: RawFd) -> i32 {
    // SAFETY: the descriptor was passed to us by `spawn` and is ours alone.
    let mut ready = unsafe { File::from_raw_fd(ready) };
    // SAFETY: fcntl on that descriptor; ignoring SIGHUP.
    unsafe {
        libc::fcntl(ready.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let router = Router::new(dir.to_path_buf());
    let rt = match crate::registry_client::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = write!(ready, "cannot start the router: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let proxy = match Proxy::bind(&router.ports()).await {
            Ok(p) => p,
            Err(e) => {
                let _ = write!(ready, "{e}");
                return 1;
            }
        };
        let containers_dir = store_dir.join("berth/containers");
        let backends = std::sync::Arc::new(std::sync::Mutex::new(router.backends()));
        let proxy = std::sync::Arc::new(proxy);
        let serving = std::sync::Arc::new(std::sync::Mutex::new(in_rotation(
            &containers_dir,
            &backends.lock().expect("backends"),
        )));
        proxy.set_hosts(&serving.lock().expect("serving"));
        {
            let (backends, proxy, serving) = (backends.clone(), proxy.clone(), serving.clone());
            let containers_dir = containers_dir.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    let all = backends.lock().expect("backends").clone();
                    let now = in_rotation(&containers_dir, &all);
                    let mut serving = serving.lock().expect("serving");
                    if *serving != now {
                        proxy.set_hosts(&now);
                        *serving = now;
                    }
                }
            });
        }
        let sock = socket_path(dir);
        let _ = std::fs::remove_file(&sock);
        let listener = match tokio::net::UnixListener::bind(&sock) {
            Ok(l) => l,
            Err(e) => {
                let _ = write!(ready, "cannot listen on {}: {e}", sock.display());
                return 1;
            }
        };
        let me = std::process::id() as i32;
        if let Some(p) = ProcRef::of(me) {
            let _ = std::fs::write(dir.join("pid"), format!("{} {}", p.pid, p.start));
        }
        let _ = writeln!(ready, "ok");
        drop(ready);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r);
            let mut line = String::new();
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            if lines.read_line(&mut line).await.is_err() {
                continue;
            }
            let reply = match line
                .trim_end()
                .split_once(' ')
                .unwrap_or((line.trim_end(), ""))
            {
                ("set", list) => {
                    let new: Vec<Backend> = list
                        .split_whitespace()
                        .filter_map(|h| h.parse().ok())
                        .collect();
                    let text: Vec<String> = new.iter().map(ToString::to_string).collect();
                    let _ = std::fs::write(dir.join("backends"), text.join(" "));
                    // At once: the replicas a switch names have just passed their checks.
                    let now = in_rotation(&containers_dir, &new);
                    proxy.set_hosts(&now);
                    *serving.lock().expect("serving") = now;
                    *backends.lock().expect("backends") = new;
                    "ok\n"
                }
                _ => "unknown command\n",
            };
            let _ = w.write_all(reply.as_bytes()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_ports_and_backends() {
        let d = tempfile::tempdir().unwrap();
        let r = Router::new(d.path().join("web"));
        assert!(r.process().is_none());
        assert!(r.ports().is_empty() && r.backends().is_empty());
        std::fs::create_dir_all(&r.dir).unwrap();
        std::fs::write(r.dir.join("backends"), "198.18.0.2 ab12@198.18.0.3").unwrap();
        assert_eq!(r.backends().len(), 2);
        assert_eq!(r.backends()[1].id.as_deref(), Some("ab12"));
        assert!("../x@198.18.0.3".parse::<Backend>().is_err());
        r.remove().unwrap();
        assert!(!r.dir.exists());
    }
}
