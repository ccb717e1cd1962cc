//! Hostile input, as an attacker sends it: requests to an agent without its token or with
//! paths for names, containers and builds that open host devices, build contexts whose
//! symlinks point at the host, registries that send huge or endless documents or send
//! credentials elsewhere, layers that fill the disk, diffs made to take forever, and
//! names that are not names. Each test performs the attack and checks what the host
//! looks like afterwards.

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use util::{Berth, TempProject, free_port};

// ---------------------------------------------------------------------------------------
// The agent's API.

/// `berth agent` on 127.0.0.1 with its own state, killed when dropped.
struct Agent {
    port: u16,
    child: Child,
    state: tempfile::TempDir,
}

impl Agent {
    fn start(token: &str) -> Agent {
        Agent::start_with_files(token, None)
    }

    /// An agent allowed at most `nofile` open descriptors (soft and hard).
    fn start_with_files(token: &str, nofile: Option<u64>) -> Agent {
        use std::os::unix::process::CommandExt;
        let state = tempfile::tempdir().unwrap();
        let token_file = state.path().join("token");
        std::fs::write(&token_file, token).unwrap();
        let port = free_port();
        let log = std::fs::File::create(state.path().join("agent.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.args(["agent", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state")
            .arg(state.path().join("store"))
            .arg("--token-file")
            .arg(&token_file)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(n) = nofile {
            // SAFETY: setrlimit(2) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "the agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { port, child, state }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with raw bytes for the path and headers; the status and body.
fn request(port: u16, method: &str, path: &[u8], headers: &[&[u8]], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(path);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n");
    for h in headers {
        req.extend_from_slice(h);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    // A refused oversized body may close the connection before all of it is written.
    let _ = s.write_all(&req).and_then(|()| s.write_all(body));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// Regression (issue 15.1): `same_token` folded the length difference into 8 bits and
/// compared cyclically, so a 256-character token accepted requests with no header.
#[test]
fn the_agent_wants_its_exact_token_whatever_its_length() {
    for len in [16usize, 255, 256, 257, 512] {
        let token: String = (0..len)
            .map(|i| (b'A' + (i * 7 % 26) as u8) as char)
            .collect();
        let agent = Agent::start(&token);
        let path = b"/v1/status?deployment=app-dev";
        let mut repeated = token.clone();
        while repeated.len() < len + 256 {
            repeated.push_str(&token);
        }
        let bearer = |t: &str| format!("Authorization: Bearer {t}");
        let attempts: Vec<(&str, Option<String>)> = vec![
            ("no header", None),
            (
                "an empty bearer token",
                Some("Authorization: Bearer ".into()),
            ),
            (
                "another scheme",
                Some(format!("Authorization: Basic {token}")),
            ),
            ("the token repeated", Some(bearer(&repeated))),
            (
                "the token repeated to len+256",
                Some(bearer(&repeated[..len + 256])),
            ),
            ("a prefix", Some(bearer(&token[..len - 1]))),
        ];
        for (what, header) in attempts {
            let headers: Vec<&[u8]> = header.iter().map(|h| h.as_bytes()).collect();
            let (status, _) = request(agent.port, "GET", path, &headers, b"");
            assert_eq!(status, 401, "token of {len}: {what} was let in");
        }
        let good = bearer(&token);
        let (status, body) = request(agent.port, "GET", path, &[good.as_bytes()], b"");
        assert_eq!(status, 200, "token of {len}: the right token: {body}");
    }
}

/// Regression (issue 15.5): `{"deployment":"../../../../tmp/x"}` to `/v1/down` made files
/// outside the agent's state. Every route checks every name before it touches anything.
#[test]
fn agent_requests_cannot_name_paths() {
    let token = "0123456789abcdef0123456789abcdef";
    let agent = Agent::start(token);
    let auth = format!("Authorization: Bearer {token}");
    let outside = tempfile::tempdir().unwrap();
    let escape_rel = format!(
        "../../../../../../../../..{}/escaped",
        outside.path().display()
    );
    let escape_abs = format!("{}/escaped", outside.path().display());
    let long = format!("a-{}", "b".repeat(10_000));
    let names: Vec<(&str, String)> = vec![
        ("a relative escape", escape_rel),
        ("an absolute path", escape_abs),
        ("a NUL byte", "app-dev\u{0}x".to_string()),
        ("10 kB", long),
    ];
    let ct = b"Content-Type: application/json".as_slice();
    for (what, name) in &names {
        let q = |route: &str| {
            let enc: String = name.bytes().map(|b| format!("%{b:02X}")).collect();
            format!("/v1/{route}?deployment={enc}")
        };
        let json_name = serde_json::to_string(name).unwrap();
        let gets = [
            q("status"),
            q("releases"),
            q("logs"),
            format!("/v1/logs?deployment=app-dev&service={}", &q("x")[21..]),
        ];
        for path in &gets {
            let (status, body) =
                request(agent.port, "GET", path.as_bytes(), &[auth.as_bytes()], b"");
            assert_eq!(status, 400, "GET {path:.60} with {what}: {body}");
        }
        for route in ["down", "rollback"] {
            let body = format!("{{\"deployment\":{json_name}}}");
            let (status, answer) = request(
                agent.port,
                "POST",
                format!("/v1/{route}").as_bytes(),
                &[auth.as_bytes(), ct],
                body.as_bytes(),
            );
            assert_eq!(status, 400, "POST /v1/{route} with {what}: {answer}");
        }
        // An apply whose plan names the app (or a service, or a volume) so.
        for field in ["app", "environment", "service", "volume"] {
            let plan = serde_json::json!({
                "app": if field == "app" { name.as_str() } else { "app" },
                "environment": if field == "environment" { name.as_str() } else { "dev" },
                "digest": format!("sha256:{}", "a".repeat(64)),
                "revision": null,
                "services": [{
                    "name": if field == "service" { name.as_str() } else { "web" },
                    "replicas": 1, "entrypoint": null, "command": null, "env": [], "ports": [],
                    "mounts": [{"volume": {"name": if field == "volume" { name.as_str() } else { "data" }, "target": "/data"}}],
                    "health": null,
                    "resources": {"memory": null, "cpu_millis": null, "pids": null},
                    "restart": {"name": "no"}, "stop_signal": null,
                    "stop_timeout": {"secs": 1, "nanos": 0}
                }],
                "rollout": {"drain": {"secs": 0, "nanos": 0}, "timeout": {"secs": 5, "nanos": 0}, "keep": 1}
            });
            let body = serde_json::json!({
                "plan": plan,
                "image": format!("127.0.0.1:1/app@sha256:{}", "a".repeat(64)),
            })
            .to_string();
            let (status, answer) = request(
                agent.port,
                "POST",
                b"/v1/apply",
                &[auth.as_bytes(), ct],
                body.as_bytes(),
            );
            assert_eq!(status, 400, "apply with {what} as the {field}: {answer}");
        }
    }
    // A body beyond the limit is refused unread.
    let huge = vec![b' '; 2 << 20];
    let (status, _) = request(
        agent.port,
        "POST",
        b"/v1/down",
        &[auth.as_bytes(), ct],
        &huge,
    );
    assert_eq!(status, 413, "a 2 MiB body");
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing was created outside the agent's state"
    );
    let deploy_dir = agent.state.path().join("store/berth/deploy");
    let made: Vec<String> = std::fs::read_dir(&deploy_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(made.is_empty(), "no deployment state was made: {made:?}");
}

/// A TCP connection to 127.0.0.1:`port` from 127.0.0.2 (another peer address).
fn connect_from_other_address(port: u16) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns; the sockaddr structs
    // outlive the calls that read them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut local: libc::sockaddr_in = std::mem::zeroed();
        local.sin_family = libc::AF_INET as u16;
        local.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 2]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return None;
        }
        let mut remote: libc::sockaddr_in = std::mem::zeroed();
        remote.sin_family = libc::AF_INET as u16;
        remote.sin_port = port.to_be();
        remote.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return None;
        }
        libc::write(fd, b"GET /v1/sta".as_ptr().cast(), 11);
        Some(owned)
    }
}

/// Found by attacking the agent: connections that never finish their request headers
/// held descriptors for ever, until the agent could serve nobody. Now each peer holds at
/// most its share, and headers must arrive in time.
#[test]
fn slow_unfinished_requests_do_not_starve_the_agent() {
    let token = "0123456789abcdef0123456789abcdef";
    // 256 descriptors: the 300 stalled connections would take them all.
    let agent = Agent::start_with_files(token, Some(256));
    let held: Vec<_> = (0..300)
        .filter_map(|_| connect_from_other_address(agent.port))
        .collect();
    assert!(!held.is_empty(), "could not connect from 127.0.0.2");
    let auth = format!("Authorization: Bearer {token}");
    let (status, body) = request(
        agent.port,
        "GET",
        b"/v1/status?deployment=app-dev",
        &[auth.as_bytes()],
        b"",
    );
    assert_eq!(status, 200, "another client was not served: {body}");
    drop(held);
}

// ---------------------------------------------------------------------------------------
// Host devices.

/// The attack of issue 15.2, as a shell script: for each device, mknod then open for
/// writing; prints `DEV blocked` when the open failed with EPERM, `DEV OPEN` when it
/// worked; then checks that the harmless devices work.
const DEVICE_PROBE: &str = "for d in 'c 1 11 kmsg' 'b 7 0 loop0' 'c 10 237 loopctl' 'c 5 1 console'; do \
    set -- $d; mknod /dev/probe-$4 $1 $2 $3 2>/dev/null; \
    if out=$( (echo x > /dev/probe-$4) 2>&1 ); then echo \"$4 OPEN\"; \
    else case \"$out\" in *'not permitted'*) echo \"$4 blocked\";; *) echo \"$4 other: $out\";; esac; fi; \
    if out=$( (head -c 1 /dev/probe-$4 >/dev/null) 2>&1 ); then echo \"$4 READ\"; \
    else case \"$out\" in *'not permitted'*) echo \"$4 noread\";; *) echo \"$4 other: $out\";; esac; fi; \
    done; \
    head -c 4 /dev/zero > /dev/null && head -c 4 /dev/urandom > /dev/null && echo x > /dev/null && \
    test -c /dev/pts/ptmx && echo harmless-ok";

fn assert_devices_blocked(out: &str, context: &str) {
    for dev in ["kmsg", "loop0", "loopctl", "console"] {
        assert!(
            out.contains(&format!("{dev} blocked")) && out.contains(&format!("{dev} noread")),
            "{context}: {dev} is not blocked with EPERM:\n{out}"
        );
    }
    assert!(
        out.contains("harmless-ok"),
        "{context}: /dev/null, zero, urandom, pts:\n{out}"
    );
}

#[test]
fn containers_execs_and_builds_cannot_open_host_devices() {
    let p = TempProject::new();
    let _cleanup = p.cleanup();
    p.with_busybox_base();
    let run = p
        .berth()
        .args(["run", "--rm", "base:1", "sh", "-c", DEVICE_PROBE])
        .run()
        .ok();
    assert_devices_blocked(&run.stdout, "run");

    let name = format!("devices-{}", std::process::id());
    p.berth()
        .args(["run", "-d", "--name", &name, "base:1", "sleep", "60"])
        .run()
        .ok();
    let exec = p
        .berth()
        .args(["exec", &name, "sh", "-c", DEVICE_PROBE])
        .run()
        .ok();
    assert_devices_blocked(&exec.stdout, "exec");

    // A build's RUN step: it fails unless every probe was blocked.
    let script = format!(
        "out=$({DEVICE_PROBE}); echo \"$out\"; \
         test $(echo \"$out\" | grep -c -e ' blocked$' -e ' noread$') = 8 && echo \"$out\" | grep -q harmless-ok"
    );
    p.file(
        "berth.toml",
        &format!(
            "[app]\nname = \"dev-probe\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\nrun = {}\n",
            toml_string(&script)
        ),
    );
    let build = p.berth().args(["build"]).run();
    assert_eq!(
        build.code, 0,
        "the RUN step could open a device:\n{}",
        build.stderr
    );
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

// ---------------------------------------------------------------------------------------
// Build contexts.

/// Regression (issue 15.3): `ctx/etcdir -> /etc` and `COPY etcdir/shadow /leak` put the
/// host's /etc/shadow into the image. Every way to name a host file through the context
/// fails, and the error says the link was resolved inside the context.
#[test]
fn a_build_context_cannot_reach_host_files_through_symlinks() {
    let p = TempProject::new();
    p.with_busybox_base();
    let ctx = p.path().join("ctx");
    std::fs::create_dir_all(ctx.join("secret")).unwrap();
    std::fs::write(ctx.join("secret/key"), "excluded\n").unwrap();
    std::fs::write(ctx.join(".dockerignore"), "secret\n").unwrap();
    std::os::unix::fs::symlink("/etc", ctx.join("etcdir")).unwrap();
    std::os::unix::fs::symlink("/", ctx.join("root")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc/shadow", ctx.join("up")).unwrap();
    std::os::unix::fs::symlink("secret", ctx.join("notsecret")).unwrap();
    let host_archive = p.path().join("host.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&host_archive).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "hostfile", &b"host\n"[..]).unwrap();
    tar.finish().unwrap();
    drop(tar);
    std::os::unix::fs::symlink(&host_archive, ctx.join("bundle.tar")).unwrap();

    let build = |steps: &str| {
        p.file(
            "berth.toml",
            &format!(
                "[app]\nname = \"leak\"\n[image]\nfrom = \"base:1\"\ncontext = \"ctx\"\n{steps}"
            ),
        );
        p.berth().args(["build"]).run()
    };
    for (source, expect) in [
        ("etcdir/shadow", "resolves to `etc/shadow`"),
        ("root/etc/shadow", "resolves to `etc/shadow`"),
        ("up", "resolves to `etc/shadow`"),
        ("etcdir/", "resolves to `etc`"),
        ("notsecret/key", "excluded by"),
    ] {
        let r = build(&format!(
            "[[image.steps]]\ncopy = [\"{source}\", \"/leak\"]\n"
        ));
        assert_eq!(r.code, 2, "COPY {source} was built:\n{}", r.stderr);
        assert!(r.stderr.contains(expect), "COPY {source}: {}", r.stderr);
    }
    let r = build("[[image.steps]]\nadd = [\"bundle.tar\", \"/opt/\"]\n");
    assert_eq!(
        r.code, 2,
        "ADD through a link to a host archive:\n{}",
        r.stderr
    );

    // The same through a Dockerfile, which is itself no way to read a host file.
    p.file("ctx/Dockerfile", "FROM base:1\nCOPY etcdir/shadow /leak\n");
    p.file(
        "berth.toml",
        "[app]\nname = \"leak\"\n[image]\nfrom = \"base:1\"\ncontext = \"ctx\"\ndockerfile = \"Dockerfile\"\n",
    );
    let r = p.berth().args(["build"]).run();
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("resolves to `etc/shadow`"),
        "{}",
        r.stderr
    );
    std::fs::remove_file(ctx.join("Dockerfile")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", ctx.join("Dockerfile")).unwrap();
    let r = p.berth().args(["build"]).run();
    assert_eq!(r.code, 1, "{}", r.stderr);
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let first = shadow.lines().next().unwrap_or("root:");
    assert!(
        !r.stderr.contains(first),
        "the host's shadow in an error:\n{}",
        r.stderr
    );

    // A manifest cannot make the host's root (or anything outside the project) its context.
    for context in ["/", "..", "ctx/root"] {
        p.file(
            "berth.toml",
            &format!(
                "[app]\nname = \"leak\"\n[image]\nfrom = \"base:1\"\ncontext = \"{context}\"\n[[image.steps]]\ncopy = [\"etc/shadow\", \"/leak\"]\n"
            ),
        );
        let r = p.berth().args(["build"]).run();
        assert_eq!(r.code, 2, "context {context}:\n{}", r.stderr);
        assert!(
            r.stderr.contains("outside the project directory"),
            "{}",
            r.stderr
        );
    }

    // Links that stay inside the context keep working, named as the source names them.
    std::fs::write(ctx.join("real.txt"), "inside\n").unwrap();
    std::os::unix::fs::symlink("real.txt", ctx.join("alias.txt")).unwrap();
    let r = build("[[image.steps]]\ncopy = [\"alias.txt\", \"/out/\"]\n");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let run = p
        .berth()
        .args(["run", "--rm", "leak", "cat", "/out/alias.txt"])
        .run()
        .ok();
    assert_eq!(run.stdout, "inside\n");
}

// ---------------------------------------------------------------------------------------
// Hostile registries.

/// What a hostile registry does with a request: its raw answer, and whether to keep the
/// connection open to trickle or flood.
type Handler = dyn Fn(&str, &str) -> Answer + Send + Sync;

enum Answer {
    /// Status line, headers and body, sent at once.
    Whole(String, Vec<u8>),
    /// Headers, then `total` bytes of zeros, with no Content-Length, then close.
    Flood(String, usize),
    /// Headers, then one byte every `every`, until the client goes.
    Trickle(String, Duration),
}

/// A plain-HTTP registry on 127.0.0.1 that answers as `handler` says, recording each
/// request line with its Authorization header, if any.
struct Hostile {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

fn read_request(s: &mut impl Read) -> Option<(String, String, String)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut parts = text.lines().next()?.split(' ');
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let auth = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("authorization:")
                .then(|| l.to_string())
        })
        .unwrap_or_default();
    Some((method, path, auth))
}

fn answer(s: &mut impl Write, a: Answer) {
    match a {
        Answer::Whole(head, body) => {
            let _ = s.write_all(
                format!(
                    "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = s.write_all(&body);
        }
        Answer::Flood(head, total) => {
            let _ = s.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes());
            let chunk = vec![b' '; 1 << 16];
            let mut sent = 0;
            while sent < total && s.write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
        }
        Answer::Trickle(head, every) => {
            let _ = s.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes());
            while s.write_all(b"{").is_ok() && s.flush().is_ok() {
                std::thread::sleep(every);
            }
        }
    }
}

impl Hostile {
    fn start(handler: Arc<Handler>) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let (handler, log) = (handler.clone(), log.clone());
                std::thread::spawn(move || {
                    if let Some((method, path, auth)) = read_request(&mut s) {
                        log.lock().unwrap().push(format!("{method} {path} {auth}"));
                        answer(&mut s, handler(&method, &path));
                    }
                });
            }
        });
        Hostile { port, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

const OK_JSON: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json";

fn pull(reference: &str) -> util::Run {
    let store = tempfile::tempdir().unwrap();
    Berth::new()
        .env("BERTH_STORE", store.path().to_str().unwrap())
        .env("BERTH_LOW_SPEED_LIMIT", "100")
        .env("BERTH_LOW_SPEED_TIME", "2")
        .args(["pull", reference])
        .run()
}

/// Regression (issue 15.4): a 200 MB manifest took the CLI to 421 MB of memory. With or
/// without a Content-Length, berth stops reading at 4 MiB.
#[test]
fn a_huge_manifest_is_refused_at_the_cap() {
    let reg = Hostile::start(Arc::new(|_, path: &str| {
        if path == "/v2/" {
            Answer::Whole("HTTP/1.1 200 OK".into(), Vec::new())
        } else if path.ends_with("/with-length") {
            Answer::Whole(OK_JSON.into(), vec![b' '; 200 << 20])
        } else {
            Answer::Flood(OK_JSON.into(), 200 << 20)
        }
    }));
    for tag in ["with-length", "streamed"] {
        let started = Instant::now();
        let r = pull(&format!("127.0.0.1:{}/app:{tag}", reg.port));
        assert_eq!(r.code, 1, "{tag}: {}", r.stderr);
        assert!(
            r.stderr.contains("larger than 4194304 bytes"),
            "{tag}: {}",
            r.stderr
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{tag}: it read on"
        );
    }
}

/// Regression (issue 15.4): a registry sending a byte every few seconds kept `pull`
/// waiting forever. Below the low-speed limit a manifest fails, and a blob is retried
/// from where it broke, then fails, each with a message that says it stalled.
#[test]
fn a_trickling_registry_is_a_stall_not_a_hang() {
    let layer = b"not really a layer".to_vec();
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let (cd, ld) = (config_digest.clone(), layer_digest.clone());
    let reg = Hostile::start(Arc::new(move |_, path: &str| {
        if path == "/v2/" {
            Answer::Whole("HTTP/1.1 200 OK".into(), Vec::new())
        } else if path.ends_with("/manifests/slow") {
            Answer::Trickle(OK_JSON.into(), Duration::from_secs(3))
        } else if path.contains("/manifests/") {
            Answer::Whole(OK_JSON.into(), manifest.clone().into_bytes())
        } else if path.ends_with(&cd) {
            Answer::Whole("HTTP/1.1 200 OK".into(), config.clone())
        } else if path.ends_with(&ld) {
            Answer::Trickle("HTTP/1.1 200 OK".into(), Duration::from_secs(3))
        } else {
            Answer::Whole("HTTP/1.1 404 Not Found".into(), Vec::new())
        }
    }));
    let r = pull(&format!("127.0.0.1:{}/app:slow", reg.port));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("stalled"), "the manifest: {}", r.stderr);

    let r = pull(&format!("127.0.0.1:{}/app:blob", reg.port));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("stalled"), "the blob: {}", r.stderr);
    let blob_gets = reg
        .seen()
        .iter()
        .filter(|l| l.contains(&layer_digest))
        .count();
    assert!(blob_gets > 1, "a stalled blob is retried: {:?}", reg.seen());
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

/// An HTTPS server on 127.0.0.1 with a self-signed certificate for it (written to
/// `ca`), answering every request as `handler` says.
fn https_server(ca: &Path, handler: Arc<Handler>) -> u16 {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pair =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(ca, pair.cert.pem()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(pair.cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.signing_key.serialize_der())),
            )
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(tcp) = stream else { continue };
            let (config, handler) = (config.clone(), handler.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                if let Some((method, path, _)) = read_request(&mut tls) {
                    answer(&mut tls, handler(&method, &path));
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            });
        }
    });
    port
}

/// Regression (issue 15.4): an HTTPS registry whose Bearer challenge named an http://
/// realm got Basic credentials sent in clear text. No credential crosses plain HTTP
/// unless the user named the registry http://, and no redirect downgrades to HTTP.
#[test]
fn credentials_never_cross_plain_http() {
    let sink = Hostile::start(Arc::new(|_, _: &str| {
        Answer::Whole(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json".into(),
            br#"{"token":"t"}"#.to_vec(),
        )
    }));
    let sink_port = sink.port;
    let config = tempfile::tempdir().unwrap();
    let certs = config.path().join("berth/certs.d");
    // The HTTPS registry: a Bearer realm over plain HTTP, and a redirect down to it.
    let ca = config.path().join("ca.pem");
    let port = https_server(
        &ca,
        Arc::new(move |_, path: &str| {
            if path.contains("/manifests/redirect") {
                Answer::Whole(
                    format!(
                        "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{sink_port}/v2/app/manifests/x"
                    ),
                    Vec::new(),
                )
            } else {
                Answer::Whole(
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{sink_port}/token\",service=\"reg\""
                    ),
                    Vec::new(),
                )
            }
        }),
    );
    let dir = certs.join(format!("127.0.0.1:{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&ca, dir.join("ca.crt")).unwrap();
    let store = tempfile::tempdir().unwrap();
    let berth = |reference: &str| {
        Berth::new()
            .env("BERTH_STORE", store.path().to_str().unwrap())
            .env("XDG_CONFIG_HOME", config.path().to_str().unwrap())
            .env("DOCKER_CONFIG", config.path().to_str().unwrap())
            .env("BERTH_REGISTRY_USER", "alice")
            .env("BERTH_REGISTRY_PASSWORD", "s3cret-password")
            .args(["pull", reference])
            .run()
    };
    let r = berth(&format!("https://127.0.0.1:{port}/app:1"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not send credentials in clear text"),
        "{}",
        r.stderr
    );
    assert!(
        sink.seen()
            .iter()
            .all(|l| !l.to_ascii_lowercase().contains("authorization")),
        "credentials reached the plain-HTTP realm: {:?}",
        sink.seen()
    );
    let before = sink.seen().len();
    let r = berth(&format!("https://127.0.0.1:{port}/app:redirect"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(
        sink.seen().len(),
        before,
        "a redirect went down to plain HTTP"
    );
}

// ---------------------------------------------------------------------------------------
// Bombs.

/// A tmpfs of `mib` MiB at a new temporary directory, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(mib: u32) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        util::run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(dir.path()),
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// A gzipped tar holding one file of `size` zero bytes: a few hundred kilobytes that
/// unpack to `size`.
fn gzip_bomb(size: u64) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "zeros", std::io::repeat(0).take(size))
        .unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

/// Puts a one-layer image into the store at `store` and tags it `name`.
fn put_image(store: &Path, name: &str, layers: &[(Vec<u8>, String)]) {
    let store = berth::store::Store::open(store).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (blob, diff_id) in layers {
        let (d, n) = store.put_blob(blob).unwrap();
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d.to_string(), "size": n
        }));
        diff_ids.push(diff_id.clone());
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/zeros"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    });
    let (cd, cn) = store.put_blob(config.to_string().as_bytes()).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": cn},
        "layers": descs
    });
    let (md, mn) = store.put_blob(manifest.to_string().as_bytes()).unwrap();
    let desc = oci_spec::image::Descriptor::new(
        oci_spec::image::MediaType::ImageManifest,
        mn,
        md.to_oci(),
    );
    store.set_tag(name, &desc).unwrap();
}

fn diff_id_of_gzip(gz: &[u8]) -> String {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar)
        .unwrap();
    format!("sha256:{}", sha256_hex(&tar))
}

/// Regression (issue 15.6): a 3 MB gzip layer unpacked to 3 GiB, the cap being 256 GiB.
/// Unpacking stops before the store's filesystem drops below its reserve, says so, and
/// leaves nothing behind.
#[test]
fn a_decompression_bomb_stops_at_the_disk_reserve() {
    let fs = Tmpfs::new(96);
    let store = fs.0.path().join("store");
    let bomb = gzip_bomb(256 << 20);
    put_image(&store, "bomb:1", &[(bomb.clone(), diff_id_of_gzip(&bomb))]);
    let free_before = free_bytes(fs.0.path());
    let r = Berth::new()
        .env("BERTH_STORE", store.to_str().unwrap())
        .env("BERTH_DISK_RESERVE", "32M")
        .args(["run", "--rm", "bomb:1"])
        .run();
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("below its reserve"), "{}", r.stderr);
    let left: Vec<String> = std::fs::read_dir(store.join("berth/snapshots"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "a partial snapshot was left: {left:?}");
    let free_after = free_bytes(fs.0.path());
    assert!(
        free_after + (1 << 20) >= free_before,
        "space was not given back: {free_before} then {free_after}"
    );
    // The reserve is configurable: `0` turns it off, and the layer cap still stops it.
    let r = Berth::new()
        .env("BERTH_STORE", store.to_str().unwrap())
        .env("BERTH_DISK_RESERVE", "0")
        .env("BERTH_LAYER_MAX_BYTES", "8M")
        .args(["run", "--rm", "bomb:1"])
        .run();
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("decompression bomb"), "{}", r.stderr);
}

fn free_bytes(p: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_available() as u64 * st.fragment_size()
}

/// Regression (issue 15.6): `diff --files` retained over every path for each entry: 80k
/// entries took 48.8 s and 300k never finished. It is linear now; this runs 300k entries
/// per side and would not end in the time allowed if it were not.
#[test]
fn diff_of_300k_entries_finishes() {
    let p = TempProject::new();
    let store = p.store();
    let layer = |variant: &str| {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for i in 0..300_000u32 {
            let mut h = tar::Header::new_gnu();
            let body = if i == 123_456 { variant } else { "" };
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, format!("d{}/f{i}", i % 300), body.as_bytes())
                .unwrap();
        }
        let gz = tar.into_inner().unwrap().finish().unwrap();
        let id = diff_id_of_gzip(&gz);
        (gz, id)
    };
    put_image(&store, "many:a", &[layer("one\n")]);
    put_image(&store, "many:b", &[layer("two\n")]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .env("BERTH_STORE", &store)
        .args(["--json", "diff", "many:a", "many:b", "--files"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            panic!("diff --files of 300k entries did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("d156/f123456"),
        "the one changed file: {stdout:.400}"
    );
}

// ---------------------------------------------------------------------------------------
// Small leaks.

/// Regression (issue 15.7): logs were 0644 and helpers inherited the deployer's
/// environment, so a secret variable showed in /proc/PID/environ of berth-supervisor.
/// (Supervisors and routers start through the same `runtime::daemon::spawn`.)
#[test]
fn helpers_get_no_secrets_and_logs_are_private() {
    let p = TempProject::new();
    let _cleanup = p.cleanup();
    p.with_busybox_base();
    let name = format!("leak-{}", std::process::id());
    let run = p
        .berth()
        .env("DEPLOYER_SECRET", "hunter2-do-not-leak")
        .args([
            "run",
            "-d",
            "--name",
            &name,
            "base:1",
            "sh",
            "-c",
            "echo out; sleep 60",
        ])
        .run()
        .ok();
    let id = run.last_line();
    let dir = p.store().join("berth/containers").join(&id);
    assert!(dir.is_dir(), "{}", dir.display());
    std::thread::sleep(Duration::from_millis(300));
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains("log") && entry.path().is_file() {
            use std::os::unix::fs::PermissionsExt;
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o007, 0, "{name} is readable by others: {mode:o}");
        }
    }
    let mut supervisors = 0;
    for proc_dir in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(proc_dir.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("berth-supervisor") && cmdline.contains(&id) {
            supervisors += 1;
            let environ = std::fs::read(proc_dir.path().join("environ")).unwrap_or_default();
            let environ = String::from_utf8_lossy(&environ);
            assert!(
                !environ.contains("hunter2"),
                "the supervisor's environment: {environ}"
            );
        }
    }
    assert_eq!(supervisors, 1, "the container's supervisor was found");
}

/// Regression (issue 15.7): `berth tag base:1 ..` was accepted, as were `.` and names of
/// 300 characters. Tags follow the distribution grammar.
#[test]
fn tags_follow_the_distribution_grammar() {
    let p = TempProject::new();
    p.with_busybox_base();
    let long = "n".repeat(300);
    for bad in [
        "..",
        ".",
        "../x",
        "a/../b",
        "UPPER",
        "a:b:c",
        long.as_str(),
        "x:.bad",
    ] {
        let r = p.berth().args(["tag", "base:1", bad]).run();
        assert_eq!(r.code, 2, "`{bad}` was accepted: {}", r.stderr);
    }
    for good in ["app", "team/app:1.0", "127.0.0.1:5000/x/y:latest"] {
        p.berth().args(["tag", "base:1", good]).run().ok();
    }
}

/// Found by attacking berth: `BERTH_REGISTRY_USER`/`_PASSWORD` went to any registry, so
/// a branch whose berth.toml names `FROM attacker:5000/x` received a CI runner's
/// credentials. They go only to the registries the environments (or the command line)
/// name, or `BERTH_REGISTRY_HOST`.
#[test]
fn ci_credentials_do_not_follow_a_base_image_elsewhere() {
    let reg = Hostile::start(Arc::new(|_, _: &str| {
        Answer::Whole(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"".into(),
            Vec::new(),
        )
    }));
    let p = TempProject::new();
    p.file(
        "berth.toml",
        &format!(
            "[app]\nname = \"ci\"\n[image]\nfrom = \"127.0.0.1:{}/base:1\"\n[[image.steps]]\ncmd = [\"true\"]\n",
            reg.port
        ),
    );
    p.file(
        "environments/dev.toml",
        "hosts = [\"local\"]\nregistry = \"http://127.0.0.1:1/ci\"\n",
    );
    let r = p
        .berth()
        .env("BERTH_REGISTRY_USER", "ci-user")
        .env("BERTH_REGISTRY_PASSWORD", "ci-password")
        .args(["build"])
        .run();
    assert_ne!(r.code, 0);
    let seen = reg.seen();
    assert!(!seen.is_empty(), "the base was asked for");
    assert!(
        seen.iter()
            .all(|l| !l.to_ascii_lowercase().contains("authorization")),
        "the CI credentials went to the base's registry: {seen:?}"
    );
}

/// Found by attacking berth: the disk reserve held for unpacking but not for pulls, so a
/// registry that claims (and sends) a 5 GB layer filled the store's disk.
#[test]
fn a_pull_keeps_the_disk_reserve() {
    let fs = Tmpfs::new(64);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let layer_digest = format!("sha256:{}", "7".repeat(64));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":5000000000}}]}}"#,
        config.len()
    );
    let cd = config_digest.clone();
    let reg = Hostile::start(Arc::new(move |_, path: &str| {
        if path == "/v2/" {
            Answer::Whole("HTTP/1.1 200 OK".into(), Vec::new())
        } else if path.contains("/manifests/") {
            Answer::Whole(OK_JSON.into(), manifest.clone().into_bytes())
        } else if path.ends_with(&cd) {
            Answer::Whole("HTTP/1.1 200 OK".into(), config.clone())
        } else {
            Answer::Flood("HTTP/1.1 200 OK".into(), 5_000_000_000)
        }
    }));
    let store = fs.0.path().join("store");
    let r = Berth::new()
        .env("BERTH_STORE", store.to_str().unwrap())
        .args(["pull", &format!("127.0.0.1:{}/big:1", reg.port)])
        .run();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("reserve"), "{}", r.stderr);
    assert!(
        free_bytes(fs.0.path()) > 32 << 20,
        "the store's filesystem was filled"
    );
}

/// Found by attacking berth: the reserve counted bytes only; a small layer of many empty
/// files used up every inode of the store's filesystem.
#[test]
fn a_layer_of_many_empty_files_keeps_the_inode_reserve() {
    let dir = tempfile::tempdir().unwrap();
    util::run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m,nr_inodes=20000", "tmpfs"])
            .arg(dir.path()),
    );
    let fs = Tmpfs(dir);
    let store = fs.0.path().join("store");
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for i in 0..30_000u32 {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("f{i}"), &b""[..]).unwrap();
    }
    let gz = tar.into_inner().unwrap().finish().unwrap();
    put_image(&store, "inodes:1", &[(gz.clone(), diff_id_of_gzip(&gz))]);
    let r = Berth::new()
        .env("BERTH_STORE", store.to_str().unwrap())
        .args(["run", "--rm", "inodes:1"])
        .run();
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("below its reserve"), "{}", r.stderr);
    let st = nix::sys::statvfs::statvfs(fs.0.path()).unwrap();
    assert!(st.files_available() > 1000, "the inodes were used up");
}

/// Found by attacking berth: under `umask 000` the store's directories, the routers'
/// files and sockets were world-writable.
#[test]
fn nothing_is_world_writable_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let p = TempProject::new();
    let _cleanup = p.cleanup();
    p.with_busybox_base();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.env("BERTH_STORE", p.store())
        .args(["run", "-d", "--name", "umask", "base:1", "sleep", "30"]);
    // SAFETY: umask(2) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    assert!(cmd.status().unwrap().success());
    let mut stack = vec![p.store()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.file_type().is_symlink() || e.path().to_string_lossy().contains("/snapshots/") {
                continue;
            }
            let mode = md.permissions().mode();
            let sticky_tmp = mode & 0o1000 != 0;
            assert!(
                mode & 0o002 == 0 || sticky_tmp,
                "{} is world-writable ({:o})",
                e.path().display(),
                mode & 0o7777
            );
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
}
