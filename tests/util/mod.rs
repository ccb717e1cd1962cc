//! The integration-test harness: a temp project directory and a `berth` command builder,
//! so each test reads as a short scenario.

#![allow(dead_code)]

pub mod fault;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary project directory, removed when dropped.
pub struct TempProject {
    dir: tempfile::TempDir,
}

impl TempProject {
    /// An empty project directory.
    pub fn new() -> Self {
        TempProject {
            dir: tempfile::tempdir().expect("create temp dir"),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file (creating parent directories), returning `self` for chaining.
    pub fn file(&self, rel: &str, text: &str) -> &Self {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        self
    }

    /// Reads a file.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).unwrap()
    }

    /// A `berth` command run in this project (`-C DIR`) with its own store.
    pub fn berth(&self) -> Berth {
        let mut b = Berth::new();
        b.cmd.arg("-C").arg(self.path());
        b.cmd.env("BERTH_STORE", self.path().join(".store"));
        b
    }
}

/// A `berth` command under construction.
pub struct Berth {
    cmd: Command,
}

/// What a finished `berth` run produced.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Berth {
    /// The `berth` binary built for these tests, with a clean environment for colour.
    pub fn new() -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.env("NO_COLOR", "1");
        Berth { cmd }
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Adds one argument.
    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.arg(a);
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.cmd.env(k, v);
        self
    }

    /// Runs under coreutils' `timeout`: killed after `secs` (exit code 137), so a hang
    /// fails its test instead of stalling the suite.
    #[allow(dead_code)]
    pub fn within(self, secs: u64) -> Self {
        let mut cmd = Command::new("timeout");
        cmd.args(["-s", "KILL", &secs.to_string()])
            .arg(self.cmd.get_program())
            .args(self.cmd.get_args());
        for (k, v) in self.cmd.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(dir) = self.cmd.get_current_dir() {
            cmd.current_dir(dir);
        }
        Berth { cmd }
    }

    /// Runs to completion.
    pub fn run(mut self) -> Run {
        let Output {
            status,
            stdout,
            stderr,
        } = self.cmd.output().expect("run berth");
        Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

impl Run {
    /// Asserts the exit code, showing both streams on failure.
    #[track_caller]
    pub fn code(self, expected: i32) -> Self {
        assert_eq!(
            self.code, expected,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts success.
    #[track_caller]
    pub fn ok(self) -> Self {
        self.code(0)
    }
}

/// The repository root (holds the demo app).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test with an install hint when a peer tool is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is required for this test: apt-get install {package}"
    );
}

/// Makes a busybox root filesystem in `dir` with the repository's
/// `examples/base/make-rootfs` (the same script the README's first command uses).
pub fn busybox_rootfs(dir: &Path) {
    require("busybox", "busybox-static");
    run_ok(Command::new(repo_root().join("examples/base/make-rootfs")).arg(dir));
}

/// Runs a command and returns its stdout, failing the test with its output otherwise.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Run {
    /// The last line of stdout (where commands that make an image print its digest).
    pub fn last_line(&self) -> String {
        self.stdout.lines().last().unwrap_or_default().to_string()
    }
}

impl TempProject {
    /// Imports a busybox root filesystem as `base:1` into this project's store.
    pub fn with_busybox_base(&self) -> &Self {
        let root = self.path().join(".rootfs");
        busybox_rootfs(&root);
        self.berth()
            .args(["import"])
            .args([&root])
            .args(["--tag", "base:1"])
            .run()
            .ok();
        std::fs::remove_dir_all(root).unwrap();
        self
    }

    /// The store directory of this project.
    pub fn store(&self) -> PathBuf {
        self.path().join(".store")
    }
}

/// Removes every container and network of a store when dropped (also when a test fails):
/// processes, veths, bridges and cgroups must not outlive the test. Declare it after the
/// `TempProject` so it drops first.
pub struct Cleanup {
    store: PathBuf,
}

impl TempProject {
    /// A guard that cleans this project's containers and networks up.
    pub fn cleanup(&self) -> Cleanup {
        Cleanup {
            store: self.store(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let berth = |args: &[&str]| {
            Berth::new()
                .env("BERTH_STORE", self.store.to_str().unwrap())
                .args(args)
                .run()
        };
        let listed = berth(&["--json", "ps", "-a"]);
        if let Ok(list) = serde_json::from_str::<Vec<serde_json::Value>>(&listed.stdout) {
            for c in list {
                if let Some(id) = c["id"].as_str() {
                    berth(&["rm", "-f", id]);
                }
            }
        }
        // Routers of deployments hold published ports: end them.
        if let Ok(deployments) = std::fs::read_dir(self.store.join("berth/deploy")) {
            for d in deployments.flatten() {
                let Ok(routers) = std::fs::read_dir(d.path().join("routers")) else {
                    continue;
                };
                for r in routers.flatten() {
                    if let Ok(text) = std::fs::read_to_string(r.path().join("pid"))
                        && let Some(pid) = text.split(' ').next().and_then(|p| p.parse().ok())
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        let nets = berth(&["--json", "network", "ls"]);
        if let Ok(list) = serde_json::from_str::<Vec<serde_json::Value>>(&nets.stdout) {
            for n in list {
                if let Some(name) = n["name"].as_str() {
                    berth(&["network", "rm", name]);
                }
            }
        }
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0, retried until a response arrives or `secs` pass; returns the
/// whole response (status line, headers, body).
pub fn http_get(port: u16, path: &str, secs: u64) -> Option<String> {
    use std::io::{Read, Write};
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut out = String::new();
            if s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .is_ok()
                && s.read_to_string(&mut out).is_ok()
                && !out.is_empty()
            {
                return Some(out);
            }
        }
        if std::time::Instant::now() >= until {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `GET path` of a registry at `host` (`IP:PORT`) asking for OCI and Docker manifests:
/// the whole response (status line, headers with `Docker-Content-Digest`, body).
pub fn http_get_at(host: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// One `GET /` to `addr:port` over HTTP/1.0, no retry: the whole response, or `None`.
pub fn get_once_at(addr: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((addr, port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Debian's `docker-registry` (distribution 2.8) on 127.0.0.1 with a free port and its own
/// storage, killed when dropped. Its access log goes to `log`.
pub struct Registry {
    pub ip: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Registry {
    /// A plain-HTTP registry; with `htpasswd`, one that wants Basic auth for those users.
    pub fn start(users: &[(&str, &str)]) -> Registry {
        Registry::start_with(users, "")
    }

    /// A registry with extra configuration (`auth:` or `http: tls:` YAML, indented for
    /// the top level / the `http:` section as given).
    pub fn start_with(users: &[(&str, &str)], extra: &str) -> Registry {
        Registry::start_at("127.0.0.1", users, extra)
    }

    /// A registry listening on `ip` (a test bridge's address, for hosts in namespaces).
    pub fn start_at(ip: &str, users: &[(&str, &str)], extra: &str) -> Registry {
        require("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {ip}:{port}\n",
            dir.path().join("data").display()
        );
        config += extra;
        if !users.is_empty() {
            let lines: Vec<String> = users
                .iter()
                .map(|(u, p)| format!("{u}:{}", bcrypt::hash(p, 5).unwrap()))
                .collect();
            std::fs::write(dir.path().join("htpasswd"), lines.join("\n") + "\n").unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let r = Registry {
            port,
            dir,
            child,
            ip: ip.to_string(),
        };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect((ip, port)).is_err() {
            assert!(
                std::time::Instant::now() < until,
                "the registry did not start: {}",
                r.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        r
    }

    /// `IP:PORT`.
    pub fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Access-log lines of requests with `method` whose path contains `path`.
    pub fn requests(&self, method: &str, path: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("\"{method} ")) && l.contains(path))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hosts for deploy tests: network namespaces with a veth each to a bridge on
/// 198.18.`net`.0/24 (the bridge is .1, host i is .(11+i)), each running `berth agent` with
/// its own state dir. Everything is removed when dropped.
pub struct TestHosts {
    pub net: u8,
    bridge: String,
    pub names: Vec<String>,
    agents: Vec<Option<std::process::Child>>,
    pub states: Vec<tempfile::TempDir>,
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

impl TestHosts {
    /// `n` hosts on 198.18.`net`.0/24.
    pub fn new(net: u8, n: usize) -> TestHosts {
        require("ip", "iproute2");
        let tag = format!("{}{}", std::process::id() % 100_000, net);
        let bridge = format!("bt{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        let mut hosts = TestHosts {
            net,
            bridge: bridge.clone(),
            names: Vec::new(),
            agents: Vec::new(),
            states: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..n {
            let ns = format!("bh{tag}-{i}");
            let (vh, vp) = (format!("vh{tag}{i}"), format!("vp{tag}{i}"));
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            ip(&["netns", "add", &ns]);
            hosts.names.push(ns.clone());
            ip(&["link", "add", &vh, "type", "veth", "peer", "name", &vp]);
            ip(&["link", "set", &vp, "netns", &ns]);
            ip(&["link", "set", &vh, "master", &bridge, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.18.{net}.{}/24", 11 + i),
                "dev",
                &vp,
            ]);
            ip(&["-n", &ns, "link", "set", &vp, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{net}.1"),
            ]);
            hosts.agents.push(None);
            hosts.states.push(tempfile::tempdir().unwrap());
        }
        hosts
    }

    /// Host i's address.
    pub fn addr(&self, i: usize) -> String {
        format!("198.18.{}.{}", self.net, 11 + i)
    }

    /// Starts `berth agent` in host i's network namespace on port 7443.
    pub fn start_agent(&mut self, i: usize, token_file: &Path) {
        self.start_agent_with(i, token_file, &[], &[]);
    }

    /// [`TestHosts::start_agent`] with extra arguments (`--tls-cert …`) and environment.
    pub fn start_agent_with(
        &mut self,
        i: usize,
        token_file: &Path,
        extra: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
    ) {
        use std::os::unix::process::CommandExt;
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.names[i])).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&ns);
        let log = std::fs::File::create(self.states[i].path().join("agent.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.args(["agent", "--listen", &format!("{}:7443", self.addr(i))])
            .arg("--state")
            .arg(self.states[i].path().join("store"))
            .arg("--token-file")
            .arg(token_file)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: setns(2) between fork and exec, on a descriptor kept open by the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        self.agents[i] = Some(child);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect((self.addr(i).as_str(), 7443)).is_err() {
            assert!(std::time::Instant::now() < until, "agent {i} did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(ns);
    }

    /// Kills host i's agent (SIGKILL).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        for i in 0..self.agents.len() {
            self.kill_agent(i);
            // What the agent ran: containers, supervisors, routers (all berth processes
            // whose store is this host's).
            let store = self.states[i].path().join("store");
            drop(Cleanup { store });
        }
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
