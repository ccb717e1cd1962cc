//! Deploys on this machine (`hosts = ["local"]`): health-checked, switched without a failed
//! request, a broken release leaving the previous one serving, volumes kept.

mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use util::{TempProject, free_port, http_get};

fn project(port: u16, page: &str, web_command: Option<&str>) -> TempProject {
    let p = TempProject::new();
    p.with_busybox_base();
    write_app(&p, port, page, web_command);
    p.file(
        "environments/dev.toml",
        "hosts = [\"local\"]\n[rollout]\ndrain = \"300ms\"\ntimeout = \"10s\"\n",
    );
    p
}

fn write_app(p: &TempProject, port: u16, page: &str, web_command: Option<&str>) {
    write_app_on(p, &format!("127.0.0.1:{port}"), page, web_command);
}

/// The app with its web port published as `publish` (`[IP:]PORT`).
fn write_app_on(p: &TempProject, publish: &str, page: &str, web_command: Option<&str>) {
    let command = format!(
        "command = {}\n",
        web_command.unwrap_or(
            "[\"/bin/sh\", \"-c\", \"hostname > /www/host.txt; exec httpd -f -p 8080 -h /www\"]"
        )
    );
    p.file("www/index.html", page).file(
        "berth.toml",
        &format!(
            "[app]\nname = \"shop\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"www/\", \"/www/\"]\n[[image.steps]]\ncmd = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             [services.web]\n{command}ports = [\"{publish}:8080\"]\nhealth = {{ http = \"/\", port = 8080, interval = \"100ms\", timeout = \"1s\", retries = 3 }}\nvolumes = [\"data:/data\"]\n\
             [services.worker]\ncommand = [\"/bin/sh\", \"-c\", \"echo tick >> /data/ticks; echo ticked; exec sleep 600\"]\nvolumes = [\"data:/data\"]\n"
        ),
    );
}

/// One GET, every error kept.
fn get_once(port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    Ok(out)
}

/// `status --env dev` as JSON: the ledger's release, and what the one host runs.
fn status(p: &TempProject) -> serde_json::Value {
    let out = p
        .berth()
        .args(["--json", "status", "--env", "dev"])
        .run()
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["hosts"][0]["host"], "local", "{v}");
    assert_eq!(v["ledger"]["release"], v["hosts"][0]["release"], "{v}");
    v["hosts"][0].clone()
}

#[test]
fn deploys_switch_without_a_failed_request_and_a_broken_release_changes_nothing() {
    let port = free_port();
    let p = project(port, "release one\n", None);
    let _cleanup = p.cleanup();
    p.berth()
        .args([
            "network",
            "create",
            "--subnet",
            "198.18.110.0/24",
            "shop-dev",
        ])
        .run()
        .ok();

    let first = p.berth().args(["deploy", "--env", "dev"]).run().ok();
    assert!(
        first.stdout.contains("release 1 is live"),
        "{}",
        first.stdout
    );
    let page = http_get(port, "/", 5).expect("served");
    assert!(page.ends_with("release one\n"), "{page}");
    let st = status(&p);
    assert_eq!(st["release"], 1);
    assert_eq!(st["services"]["web"]["running"], 1);
    assert_eq!(st["services"]["worker"]["running"], 1);

    // `logs --env dev worker -f` follows the live release's replicas, across releases.
    let mut follower = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("-C")
        .arg(p.path())
        .env("BERTH_STORE", p.path().join(".store"))
        .args(["logs", "--env", "dev", "worker", "-f"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let followed = {
        let stdout = follower.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut seen = Vec::new();
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let done = line.contains("worker-2-0 | ticked");
                seen.push(line);
                if done {
                    break;
                }
            }
            seen
        })
    };

    // A client asks all the time while release two replaces release one.
    write_app(&p, port, "release two\n", None);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let failures = failures.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match get_once(port) {
                    Ok(r) if r.contains(" 200 ") => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        failures.lock().unwrap().push(format!("{other:?}"));
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let second = p.berth().args(["deploy", "--env", "dev"]).run().ok();
    std::thread::sleep(std::time::Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    assert!(
        second.stdout.contains("release 2 is live"),
        "{}",
        second.stdout
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed: {:?}",
        failures.lock().unwrap()
    );
    assert!(ok.load(Ordering::SeqCst) > 20);
    assert!(http_get(port, "/", 5).unwrap().ends_with("release two\n"));
    assert_eq!(status(&p)["release"], 2);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !followed.is_finished() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let seen = followed.join().unwrap();
    assert_eq!(
        seen,
        ["local worker-1-0 | ticked", "local worker-2-0 | ticked"],
        "logs -f shows release one's line, then release two's as it comes"
    );

    // The volume outlived release one: both workers ticked into it.
    let ticks = p
        .berth()
        .args(["exec", "shop-dev-worker-2-0", "cat", "/data/ticks"])
        .run()
        .ok();
    assert_eq!(ticks.stdout, "tick\ntick\n");

    // Release three never becomes healthy (its web serves nothing): it goes, two stays.
    write_app(&p, port, "release three\n", Some("[\"sleep\", \"600\"]"));
    let broken = p.berth().args(["deploy", "--env", "dev"]).run().code(1);
    assert!(
        broken.stderr.contains("service web did not become healthy"),
        "{}",
        broken.stderr
    );
    let host_line = broken
        .stdout
        .lines()
        .find(|l| l.starts_with("local"))
        .unwrap_or("");
    assert!(
        host_line.contains("failed") && host_line.contains("release 2 ("),
        "the table says this machine still runs release 2: {}",
        broken.stdout
    );
    assert!(http_get(port, "/", 5).unwrap().ends_with("release two\n"));
    assert_eq!(status(&p)["release"], 2);
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(
        &p.berth().args(["--json", "ps", "-a"]).run().ok().stdout,
    )
    .unwrap()
    .iter()
    .map(|c| c["name"].as_str().unwrap().to_string())
    .collect();
    assert!(
        !names.iter().any(|n| n.contains("-3-")),
        "release three's replicas are gone: {names:?}"
    );

    p.berth().args(["down", "--env", "dev"]).run().ok();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "router gone"
    );
    let left = p.berth().args(["--json", "ps", "-a"]).run().ok();
    assert_eq!(left.stdout.trim(), "[]");
}

#[test]
fn a_second_deploy_is_refused_while_one_runs_and_names_the_holder() {
    let port = free_port();
    let p = project(port, "locked\n", None);
    let _cleanup = p.cleanup();
    p.berth()
        .args([
            "network",
            "create",
            "--subnet",
            "198.18.111.0/24",
            "shop-dev",
        ])
        .run()
        .ok();
    // Hold the deployment's lock the way a running deploy does.
    let dir = p.store().join("berth/deploy/shop-dev");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .unwrap();
    lock.lock().unwrap();
    std::fs::write(dir.join("lock"), "ci@runner (pid 1) since then").unwrap();
    let refused = p.berth().args(["deploy", "--env", "dev"]).run().code(1);
    assert!(refused.stderr.contains("ci@runner"), "{}", refused.stderr);
    drop(lock);
    p.berth().args(["deploy", "--env", "dev"]).run().ok();
    assert!(http_get(port, "/", 5).unwrap().ends_with("locked\n"));
    p.berth().args(["down", "--env", "dev"]).run().ok();
}

#[test]
fn agents_on_two_hosts_take_a_release_and_a_failed_host_rolls_the_other_back() {
    let mut hosts = util::TestHosts::new(121, 2);
    let reg = util::Registry::start_at("198.18.121.1", &[], "");
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let token = "t0ken-for-the-agents-0123456789";
    p.file("token", token);
    for i in 0..2 {
        hosts.start_agent(i, &p.path().join("token"));
    }
    write_app_on(&p, "8080", "on two hosts\n", None);
    p.file(
        "environments/uat.toml",
        &format!(
            "registry = \"http://{}/shop\"\nhosts = [\"http://{}:7443\", \"http://{}:7443\"]\n[rollout]\ndrain = \"300ms\"\ntimeout = \"10s\"\n",
            reg.host(),
            hosts.addr(0),
            hosts.addr(1)
        ),
    );
    let deploy = |p: &TempProject| {
        p.berth()
            .env("BERTH_AGENT_TOKEN", token)
            .args(["deploy", "--env", "uat"])
            .run()
    };
    let first = deploy(&p).ok();
    assert!(
        first.stdout.contains("live on 2 host(s)"),
        "{}{}",
        first.stdout,
        first.stderr
    );
    let addrs = [hosts.addr(0), hosts.addr(1)];
    let get = |i: usize| util::get_once_at(&addrs[i], 8080);
    for i in 0..2 {
        let page = get(i).expect("served on each host");
        assert!(page.ends_with("on two hosts\n"), "host {i}: {page}");
    }

    let st = p
        .berth()
        .env("BERTH_AGENT_TOKEN", token)
        .args(["--json", "status", "--env", "uat"])
        .run()
        .ok();
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    let hosts_seen = st["hosts"].as_array().unwrap();
    assert_eq!(hosts_seen.len(), 2);
    assert!(hosts_seen.iter().all(|h| h["release"] == 1), "{st}");
    assert_eq!(st["state"], "live");

    // No token, a wrong token, an image not given by digest: refused.
    let agent = format!("http://{}:7443", hosts.addr(0));
    let status_of = |token: Option<&str>, body: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((addrs[0].as_str(), 7443)).unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "POST /v1/apply HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(status_of(None, "{}").starts_with("HTTP/1.1 401"), "{agent}");
    assert!(status_of(Some("wrong-token-wrong-token"), "{}").starts_with("HTTP/1.1 401"));
    let live = p.berth().args(["--json", "inspect", "shop"]).run().ok();
    let digest = serde_json::from_str::<serde_json::Value>(&live.stdout).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let plan = serde_json::json!({
        "plan": {"app": "shop", "environment": "uat", "digest": digest, "revision": null,
                 "services": [], "rollout": {"drain": {"secs": 0, "nanos": 0}, "timeout": {"secs": 5, "nanos": 0}, "keep": 1}},
        "image": format!("http://{}/shop:uat", reg.host()),
    });
    let by_tag = status_of(Some(token), &plan.to_string());
    assert!(
        by_tag.starts_with("HTTP/1.1 400") && by_tag.contains("by digest"),
        "{by_tag}"
    );

    // A new release through the agents while a client asks host 1 all the time.
    write_app_on(&p, "8080", "second on two hosts\n", None);
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU32::new(0));
    let client = {
        let (stop, failed, addr) = (stop.clone(), failed.clone(), addrs[0].clone());
        std::thread::spawn(move || {
            let mut ok = 0;
            while !stop.load(Ordering::SeqCst) {
                let answer = util::get_once_at(&addr, 8080)
                    .filter(|out| out.contains(" 200 "))
                    .map(|_| ());
                match answer {
                    Some(()) => ok += 1,
                    None => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            ok
        })
    };
    let second = deploy(&p).ok();
    stop.store(true, Ordering::SeqCst);
    let answered = client.join().unwrap();
    assert!(
        second.stdout.contains("live on 2 host(s)"),
        "{}",
        second.stderr
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed during the rollout"
    );
    assert!(answered > 10);
    for i in 0..2 {
        assert!(get(i).unwrap().ends_with("second on two hosts\n"));
    }

    // Scale and roll back through the agents.
    let with_token = |args: &[&str]| p.berth().env("BERTH_AGENT_TOKEN", token).args(args).run();
    with_token(&["scale", "--env", "uat", "web=2"]).ok();
    let back = with_token(&["rollback", "--env", "uat", "--to", "1"]).ok();
    for i in 0..2 {
        let page = get(i).unwrap();
        assert!(
            page.ends_with("\non two hosts\n") && !page.contains("second"),
            "host {i} after rollback --to 1 ({}): {page}\n{}",
            back.stdout,
            with_token(&["--json", "releases", "--env", "uat"]).stdout
        );
    }
    with_token(&["rollback", "--env", "uat", "--to", "2"]).ok();
    let listed = with_token(&["--json", "releases", "--env", "uat"]).ok();
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout).unwrap();
    let kinds: Vec<(&str, &str, u64)> = listed
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
                r["number"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("rollback", "live", 5),
            ("rollback", "live", 4),
            ("scale", "live", 3),
            ("deploy", "live", 2),
            ("deploy", "live", 1),
        ],
        "newest first: {listed:?}"
    );
    assert_eq!(listed[1]["digest"], listed[4]["digest"]);
    assert_eq!(listed[0]["digest"], listed[3]["digest"]);
    for i in 0..2 {
        assert!(get(i).unwrap().ends_with("second on two hosts\n"));
    }
    let logs = with_token(&["logs", "--env", "uat", "worker"]).ok();
    for addr in &addrs {
        let line = format!("{addr}:7443 worker-5-0 | ticked\n");
        assert!(logs.stdout.contains(&line), "{line} in {}", logs.stdout);
    }

    // Host 1 "reboots": its agent, supervisors, containers and routers all die at once.
    // Started again, the agent brings the live release back.
    hosts.kill_agent(0);
    let store = hosts.states[0].path().join("store/berth");
    let kill = |pid: i64| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    for e in std::fs::read_dir(store.join("containers"))
        .unwrap()
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(e.path().join("state.json")) {
            let st: serde_json::Value = serde_json::from_str(&text).unwrap();
            st["supervisor"]["pid"].as_i64().map(kill);
            st["pid"].as_i64().map(kill);
        }
    }
    for e in std::fs::read_dir(store.join("deploy/shop-uat/routers"))
        .unwrap()
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(e.path().join("pid")) {
            text.split(' ')
                .next()
                .and_then(|p| p.parse().ok())
                .map(kill);
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(get(0).is_none(), "host 1 is down");
    hosts.start_agent(0, &p.path().join("token"));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !get(0).is_some_and(|r| r.ends_with("second on two hosts\n")) {
        if std::time::Instant::now() >= until {
            let log = std::fs::read_to_string(hosts.states[0].path().join("agent.log"))
                .unwrap_or_default();
            let ps = std::process::Command::new("sh")
                .args(["-c", &format!("BERTH_STORE={}/store {} ps -a; cat {}/store/berth/containers/*/supervisor.log; cat {}/store/berth/deploy/*/routers/*/router.log", hosts.states[0].path().display(), env!("CARGO_BIN_EXE_berth"), hosts.states[0].path().display(), hosts.states[0].path().display())])
                .output()
                .unwrap();
            panic!(
                "host 1 does not serve again after its restart:\n{log}\n{}{}",
                String::from_utf8_lossy(&ps.stdout),
                String::from_utf8_lossy(&ps.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Host 2's agent is gone: the preflight finds it, and nothing changes anywhere.
    hosts.kill_agent(1);
    write_app_on(&p, "8080", "never everywhere\n", None);
    let failed = deploy(&p).code(1);
    assert!(failed.stderr.contains(&addrs[1]), "{}", failed.stderr);
    assert!(
        failed.stderr.contains("nothing changed"),
        "{}",
        failed.stderr
    );
    let page = get(0).unwrap();
    assert!(
        page.ends_with("second on two hosts\n"),
        "host 1 is untouched: {page}"
    );

    // The ledger lives in the registry: a CI runner with an empty store reads the same
    // history; the refused deploy allocated no release.
    let runner = tempfile::tempdir().unwrap();
    let seen = p
        .berth()
        .env("BERTH_STORE", runner.path().to_str().unwrap())
        .args(["--json", "releases", "--env", "uat"])
        .run()
        .ok();
    let seen: Vec<serde_json::Value> = serde_json::from_str(&seen.stdout).unwrap();
    assert_eq!(seen, listed, "{seen:?}");
}

#[test]
fn an_agent_serves_tls_with_a_certificate_it_made() {
    let p = TempProject::new();
    let _cleanup = p.cleanup();
    let tls = p.path().join("tls");
    let made = p
        .berth()
        .args(["agent", "--init-tls"])
        .args([&tls])
        .args(["--san", "127.0.0.1"])
        .run()
        .ok();
    assert!(
        made.stdout.contains("SHA-256 fingerprint: "),
        "{}",
        made.stdout
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tls.join("agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = "tls-agent-token-0123456789";
    p.file("token", token);
    let port = free_port();
    let state = p.path().join("agent-state");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state")
            .arg(&state)
            .arg("--token-file")
            .arg(p.path().join("token"))
            .arg("--tls-cert")
            .arg(tls.join("agent.crt"))
            .arg("--tls-key")
            .arg(tls.join("agent.key"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < until, "the agent did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    write_app(&p, free_port(), "tls\n", None);
    let reg = util::Registry::start(&[]);
    let registry = reg.host();
    p.file(
        "environments/prod.toml",
        &format!("registry = \"http://{registry}/shop\"\nhosts = [\"https://127.0.0.1:{port}\"]\n"),
    );
    let status = |ca: Option<&std::path::Path>| {
        let mut b = p.berth().env("BERTH_AGENT_TOKEN", token);
        if let Some(ca) = ca {
            b = b.env("BERTH_AGENT_CA", ca.to_str().unwrap());
        }
        b.args(["--json", "status", "--env", "prod"]).run()
    };
    let untrusted = status(None);
    assert_eq!(untrusted.code, 1, "{}", untrusted.stdout);
    let trusted = status(Some(&tls.join("agent.crt"))).ok();
    let v: serde_json::Value = serde_json::from_str(&trusted.stdout).unwrap();
    assert!(
        v["hosts"][0]["release"].is_null() && v["hosts"][0]["error"].is_null(),
        "{v}"
    );

    // The environment file pins the printed fingerprint and names the token's file: no
    // CA, no environment variables.
    let fingerprint = made
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("SHA-256 fingerprint: "))
        .unwrap()
        .to_string();
    let pinned = |fp: &str| {
        p.file(
            "environments/prod.toml",
            &format!(
                "registry = \"http://{registry}/shop\"\nhosts = [\"https://127.0.0.1:{port}\"]\n[agent]\ntoken = {{ file = \"token\" }}\nfingerprint = \"{fp}\"\n"
            ),
        );
        p.berth().args(["--json", "status", "--env", "prod"]).run()
    };
    let v: serde_json::Value = serde_json::from_str(&pinned(&fingerprint).ok().stdout).unwrap();
    assert!(v["hosts"][0]["error"].is_null(), "{v}");
    let other = format!("{}00", &fingerprint[..fingerprint.len() - 2]);
    let other = if other == fingerprint {
        fingerprint.replace('A', "B")
    } else {
        other
    };
    let wrong = pinned(&other);
    assert_eq!(wrong.code, 1, "{}", wrong.stdout);
    assert!(wrong.stdout.contains("fingerprint"), "{}", wrong.stdout);
    let bad = pinned("not-a-fingerprint").code(2);
    assert!(bad.stderr.contains("prod.toml"), "{}", bad.stderr);
}

#[test]
fn an_agent_killed_mid_rollout_leaves_its_host_consistent_and_the_next_deploy_works() {
    let mut hosts = util::TestHosts::new(122, 1);
    let reg = util::Registry::start_at("198.18.122.1", &[], "");
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let token = "mid-rollout-token-0123456789";
    p.file("token", token);
    hosts.start_agent(0, &p.path().join("token"));
    write_app_on(&p, "8080", "before the crash\n", None);
    p.file(
        "environments/uat.toml",
        &format!(
            "registry = \"http://{}/shop\"\nhosts = [\"http://{}:7443\"]\n[rollout]\ndrain = \"100ms\"\ntimeout = \"30s\"\n",
            reg.host(),
            hosts.addr(0)
        ),
    );
    let deploy = || {
        p.berth()
            .env("BERTH_AGENT_TOKEN", token)
            .args(["deploy", "--env", "uat"])
    };
    deploy().run().ok();
    let addr = hosts.addr(0);
    let page = || util::get_once_at(&addr, 8080);
    assert!(page().unwrap().ends_with("before the crash\n"));

    // A release whose web replica takes long to become healthy; the agent dies (SIGKILL)
    // while it waits.
    write_app_on(
        &p,
        "8080",
        "never live\n",
        Some("[\"/bin/sh\", \"-c\", \"sleep 60; exec httpd -f -p 8080 -h /www\"]"),
    );
    let pending = deploy();
    let client = std::thread::spawn(move || pending.run());
    let containers = hosts.states[0].path().join("store/berth/containers");
    let names = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("state.json")).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect()
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !names(&containers).iter().any(|n| n == "shop-uat-web-2-0") {
        assert!(std::time::Instant::now() < until, "release 2 never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    hosts.kill_agent(0);
    let failed = client.join().unwrap().code(1);
    assert!(failed.stderr.contains(&hosts.addr(0)), "{}", failed.stderr);
    assert!(
        page().unwrap().ends_with("before the crash\n"),
        "release 1 serves on"
    );

    // Restarted, the agent removes the half-applied release and keeps release 1 live.
    hosts.start_agent(0, &p.path().join("token"));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while names(&containers).iter().any(|n| n.contains("-2-")) {
        assert!(
            std::time::Instant::now() < until,
            "release 2's replicas are still there: {:?}",
            names(&containers)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let st = p
        .berth()
        .env("BERTH_AGENT_TOKEN", token)
        .args(["--json", "status", "--env", "uat"])
        .run()
        .ok();
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(st["hosts"][0]["release"], 1, "{st}");
    assert!(page().unwrap().ends_with("before the crash\n"));

    // And the next deploy goes through.
    write_app_on(&p, "8080", "after the crash\n", None);
    deploy().run().ok();
    assert!(page().unwrap().ends_with("after the crash\n"));
    let ledger = p
        .berth()
        .args(["--json", "releases", "--env", "uat"])
        .run()
        .ok();
    let outcomes: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&ledger.stdout)
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["live", "failed", "live"], "newest first");
}
