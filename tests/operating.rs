//! Running environments day to day, on namespace agent hosts: health checked after
//! cutover (a killed replica and a sick one seen by `status`, restarted and served around
//! with no failed request), `status` of every environment, `ps`, `exec` (with a pty) and
//! `logs` through the agents with `--host` and `--replica`, hooks around releases, and
//! `--env` never silently misread.

mod util;

use std::time::{Duration, Instant};

use util::{Registry, TempProject, TestHosts};

fn json(run: &util::Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", run.stdout, run.stderr))
}

/// Two agent hosts on 198.18.`net`.0/24, a registry on the bridge, and a project whose
/// `uat` and `prod` run on them (and `dev` here): `web` with two replicas per host,
/// health-checked on `/health.html`, published on 8080.
struct Fleet {
    hosts: TestHosts,
    _reg: Registry,
    p: TempProject,
    token: String,
}

fn fleet(net: u8) -> Fleet {
    let mut hosts = TestHosts::new(net, 2);
    let reg = Registry::start_at(&format!("198.18.{net}.1"), &[], "");
    let p = TempProject::new();
    p.with_busybox_base();
    let token = format!("operating-token-{net}-0123456789");
    p.file("token", &token);
    for i in 0..2 {
        hosts.start_agent(i, &p.path().join("token"));
    }
    p.file("www/index.html", "page\n")
        .file("www/health.html", "ok\n")
        .file(
            "berth.toml",
            "[app]\nname = \"shop\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"www/\", \"/www/\"]\n\
             [[image.steps]]\ncmd = [\"httpd\", \"-f\", \"-v\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             [services.web]\nreplicas = 2\nports = [\"8080:8080\"]\n\
             health = { http = \"/health.html\", port = 8080, interval = \"200ms\", timeout = \"1s\", retries = 2 }\n\
             [rollout]\ndrain = \"0s\"\n",
        );
    for env in ["uat", "prod"] {
        p.file(
            &format!("environments/{env}.toml"),
            &format!(
                "registry = \"http://{}/shop\"\nhosts = [\"http://{}:7443\", \"http://{}:7443\"]\n",
                reg.host(),
                hosts.addr(0),
                hosts.addr(1)
            ),
        );
    }
    p.file(
        "environments/dev.toml",
        &format!(
            "hosts = [\"local\"]\n[services.web]\nports = [\"127.0.0.1:{}:8080\"]\n",
            util::free_port()
        ),
    );
    Fleet {
        hosts,
        _reg: reg,
        p,
        token,
    }
}

impl Fleet {
    fn berth(&self) -> util::Berth {
        self.p.berth().env("BERTH_AGENT_TOKEN", &self.token)
    }

    /// Host i's store (the agent's state).
    fn store(&self, i: usize) -> std::path::PathBuf {
        self.hosts.states[i].path().join("store")
    }
}

/// One GET of `/` through host `addr`'s router, with a generous timeout.
fn get(addr: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("{addr}:8080").parse().unwrap(),
        Duration::from_secs(10),
    )
    .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if out.starts_with("HTTP/1.") && out.contains(" 200 ") && out.ends_with("page\n") {
        Ok(out)
    } else {
        Err(format!("answer: {out:?}"))
    }
}

/// Requests through host 0 until `done` holds (checked between requests); the failures.
fn serve_until(addr: &str, secs: u64, mut done: impl FnMut() -> bool) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut failures = Vec::new();
    loop {
        if let Err(e) = get(addr) {
            failures.push(e);
        }
        if done() {
            return failures;
        }
        assert!(
            Instant::now() < until,
            "timed out; failures so far: {failures:?}"
        );
    }
}

/// The replicas `status --env E --json` reports for host `i`.
fn replicas(f: &Fleet, env: &str, i: usize) -> (Vec<serde_json::Value>, serde_json::Value, i32) {
    let st = f.berth().args(["--json", "status", "--env", env]).run();
    let v = json(&st);
    let host = v["hosts"][i]["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    (host, v, st.code)
}

#[test]
fn a_killed_replica_and_a_sick_one_are_seen_restarted_and_served_around() {
    let f = fleet(171);
    f.berth().args(["deploy", "--env", "uat"]).run().ok();
    let addr = f.hosts.addr(0);
    get(&addr).unwrap();

    // Killed with SIGKILL (between two requests): restarted, served around.
    let (before, _, _) = replicas(&f, "uat", 0);
    let victim = before.iter().find(|r| r["replica"] == 1).unwrap().clone();
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            f.store(0)
                .join("berth/containers")
                .join(victim["id"].as_str().unwrap())
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(state["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failures = serve_until(&addr, 30, || {
        let (now, _, _) = replicas(&f, "uat", 0);
        now.iter().any(|r| {
            r["replica"] == 1
                && r["restarts"] == 1
                && r["last_exit"] == 137
                && r["status"] == "running"
        })
    });
    assert!(failures.is_empty(), "requests failed: {failures:?}");

    // Sick: its probe path removed through the agent; `status` says so and exits 1, the
    // router sends it nothing, and it is restarted (and stays sick: the file is gone).
    f.berth()
        .args([
            "exec",
            "--env",
            "uat",
            "--host",
            &addr,
            "--replica",
            "2",
            "web",
            "--",
            "rm",
            "/www/health.html",
        ])
        .run()
        .ok();
    let mut seen = None;
    let failures = serve_until(&addr, 30, || {
        let (now, v, code) = replicas(&f, "uat", 0);
        let sick = now
            .iter()
            .any(|r| r["replica"] == 2 && r["health"] == "unhealthy");
        if sick && code == 1 {
            seen = Some(v);
        }
        seen.is_some()
            && now
                .iter()
                .any(|r| r["replica"] == 2 && r["restarts"].as_u64() >= Some(1))
    });
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    let v = seen.unwrap();
    assert_eq!(v["state"], "degraded", "{v}");
    assert!(
        v["problems"].as_array().unwrap().iter().any(|p| p
            .as_str()
            .unwrap()
            .contains("web replica 2 is unhealthy")
            && p.as_str().unwrap().contains("/health.html")),
        "{v}"
    );
    let text = f.berth().args(["status", "--env", "uat"]).run();
    assert_eq!(text.code, 1);
    // Sick, or being restarted for it.
    assert!(
        (text.stdout.contains("unhealthy") || text.stdout.contains("restarting"))
            && text.stdout.contains("2 per host × 2 hosts"),
        "{}",
        text.stdout
    );
}

#[test]
fn status_ps_exec_and_logs_reach_every_host_and_replica() {
    let f = fleet(172);
    let _local = f.p.cleanup();
    f.berth().args(["deploy", "--env", "uat"]).run().ok();
    f.berth().args(["deploy", "--env", "dev"]).run().ok();

    // Every environment at a glance: prod was never released.
    let all = f.berth().args(["status"]).run().ok();
    for env in ["dev", "uat", "prod"] {
        assert!(
            all.stdout.lines().any(|l| l.starts_with(env)),
            "{}",
            all.stdout
        );
    }
    assert!(all.stdout.contains("web 4/4"), "{}", all.stdout);
    let v = json(&f.berth().args(["--json", "status"]).run().ok());
    assert_eq!(v.as_array().unwrap().len(), 3);

    // ps: every replica on every host, or one host's.
    let ps = json(&f.berth().args(["--json", "ps", "--env", "uat"]).run().ok());
    assert_eq!(ps.as_array().unwrap().len(), 4, "{ps}");
    let one = json(
        &f.berth()
            .args(["--json", "ps", "--env", "uat", "--host", &f.hosts.addr(1)])
            .run()
            .ok(),
    );
    let one = one.as_array().unwrap();
    assert_eq!(one.len(), 2);
    assert!(
        one.iter()
            .all(|r| r["host"].as_str().unwrap().contains(&f.hosts.addr(1)))
    );

    // exec: on the host and replica asked for, exit code and both streams kept.
    let run = f
        .berth()
        .args([
            "exec",
            "--env",
            "uat",
            "--host",
            &f.hosts.addr(1),
            "--replica",
            "2",
            "web",
            "--",
            "sh",
            "-c",
            "hostname; echo oops >&2; exit 3",
        ])
        .run();
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("oops"));
    // Replica N's host name is `SERVICE-(N-1)`.
    assert_eq!(run.stdout.trim(), "web-1", "exec ran in replica 2");

    // stdin through the agent, and a pty (under `script`, which gives berth a terminal).
    let echoed = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "echo through | {} exec -i --env uat web -- cat",
                env!("CARGO_BIN_EXE_berth")
            ),
        ])
        .current_dir(f.p.path())
        .env("BERTH_STORE", f.p.store())
        .env("BERTH_AGENT_TOKEN", &f.token)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&echoed.stdout), "through\n");
    util::require("script", "bsdutils");
    let pty = std::process::Command::new("script")
        .args([
            "-qec",
            &format!(
                "printf 'tty >/dev/null && echo has-a-pty; exit 7\\n' | {} exec -it --env uat web -- sh",
                env!("CARGO_BIN_EXE_berth")
            ),
            "/dev/null",
        ])
        .current_dir(f.p.path())
        .env("BERTH_STORE", f.p.store())
        .env("BERTH_AGENT_TOKEN", &f.token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&pty.stdout);
    assert_eq!(pty.status.code(), Some(7), "{text}");
    assert!(
        text.contains("exit 7"),
        "the shell echoed its input on a terminal: {text}"
    );

    // logs of one replica on one host.
    for _ in 0..3 {
        util::get_once_at(&f.hosts.addr(1), 8080);
    }
    let logs = f
        .berth()
        .args([
            "logs",
            "--env",
            "uat",
            "web",
            "--host",
            &f.hosts.addr(1),
            "--replica",
            "1",
        ])
        .run()
        .ok();
    let lines: Vec<&str> = logs.stdout.lines().collect();
    assert!(!lines.is_empty(), "httpd -v logged the requests");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(&f.hosts.addr(1)) && l.contains("web-1-0")),
        "{}",
        logs.stdout
    );

    // `--env` is never silently misread.
    let bad = f
        .berth()
        .args(["exec", "--env", "staging", "web", "--", "true"])
        .run();
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("neither an environment") && bad.stderr.contains("dev, prod, uat"),
        "{}",
        bad.stderr
    );
    let bad = f.berth().args(["exec", "-e", "DEBUG", "web", "true"]).run();
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("is not K=V"), "{}", bad.stderr);
    let bad = f
        .berth()
        .args(["run", "--env", "uat", "base:1", "true"])
        .run();
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("berth exec --env uat"),
        "{}",
        bad.stderr
    );
    let bad = f
        .berth()
        .args([
            "exec",
            "--env",
            "uat",
            "--replica",
            "5",
            "web",
            "--",
            "true",
        ])
        .run();
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("not 5"), "{}", bad.stderr);

    // logs: an unknown service or replica is an error, not silence.
    let bad = f
        .berth()
        .args(["logs", "--env", "uat", "wbe"])
        .run()
        .code(2);
    assert!(bad.stderr.contains("did you mean `web`"), "{}", bad.stderr);
    let bad = f
        .berth()
        .args(["logs", "--env", "uat", "web", "--replica", "3"])
        .run()
        .code(2);
    assert!(bad.stderr.contains("no replica 3"), "{}", bad.stderr);

    // A reader that goes away mid-release (`| head -1`) does not stop the release
    // halfway: it ends recorded, and status agrees.
    let scaled = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' -C '{}' scale --env dev web=3 2>&1 | head -c 1 >/dev/null",
            env!("CARGO_BIN_EXE_berth"),
            f.p.path().display()
        ))
        .env("BERTH_STORE", f.p.path().join(".store"))
        .env("BERTH_AGENT_TOKEN", &f.token)
        .status()
        .unwrap();
    assert!(scaled.success());
    let releases = f.berth().args(["releases", "--env", "dev"]).run().ok();
    let newest = releases
        .stdout
        .lines()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(
        newest.contains("scale") && newest.contains("live"),
        "{}",
        releases.stdout
    );
    f.berth().args(["status", "--env", "dev"]).run().ok();
}

#[test]
fn a_failing_pre_deploy_hook_stops_the_release_and_post_hooks_are_recorded() {
    let f = fleet(173);
    f.berth().args(["deploy", "--env", "uat"]).run().ok();
    let marker = f.p.path().join("hook-ran");
    // A pre_deploy hook that fails (after seeing what it is given).
    let env_file = format!(
        "{}[hooks]\npre_deploy = \"echo $BERTH_ENV $BERTH_RELEASE $BERTH_PREVIOUS_DIGEST > {}; exit 4\"\n",
        f.p.read("environments/uat.toml"),
        marker.display()
    );
    f.p.file("environments/uat.toml", &env_file);
    f.p.file("www/index.html", "page\n<!-- two -->\n");
    let failed = f.berth().args(["deploy", "--env", "uat"]).run();
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    assert!(
        failed.stderr.contains("nothing changed") && failed.stderr.contains("pre_deploy"),
        "{}",
        failed.stderr
    );
    let seen = std::fs::read_to_string(&marker).unwrap();
    let (_, v, code) = replicas(&f, "uat", 0);
    assert_eq!(code, 0, "{v}");
    let digest = v["ledger"]["digest"].as_str().unwrap();
    assert_eq!(seen.trim(), format!("uat 2 {digest}"));
    for h in v["hosts"].as_array().unwrap() {
        assert_eq!(h["release"], 1, "nothing moved: {v}");
    }
    let releases = json(
        &f.berth()
            .args(["--json", "releases", "--env", "uat"])
            .run()
            .ok(),
    );
    let r2 = &releases.as_array().unwrap()[0];
    assert_eq!(r2["number"], 2);
    assert_eq!(r2["outcome"], "failed");
    assert_eq!(r2["hooks"][0]["exit_code"], 4);

    // A post_deploy hook that fails: reported and recorded, the release stays live.
    let env_file =
        f.p.read("environments/uat.toml")
            .replace("exit 4", "exit 0")
            + "post_deploy = [\"sh\", \"-c\", \"exit 9\"]\n";
    f.p.file("environments/uat.toml", &env_file);
    let live = f
        .berth()
        .args(["--json", "deploy", "--env", "uat"])
        .run()
        .ok();
    let v = json(&live);
    assert!(
        v["warnings"][0]
            .as_str()
            .unwrap()
            .contains("post_deploy hook failed"),
        "{v}"
    );
    let releases = json(
        &f.berth()
            .args(["--json", "releases", "--env", "uat"])
            .run()
            .ok(),
    );
    let r3 = &releases.as_array().unwrap()[0];
    assert_eq!(
        (r3["number"].as_u64(), r3["outcome"].as_str()),
        (Some(3), Some("live"))
    );
    assert_eq!(r3["hooks"][1]["hook"], "post_deploy");
    assert_eq!(r3["hooks"][1]["exit_code"], 9);
}

#[test]
fn an_images_healthcheck_runs_for_a_detached_container_as_docker_shows_it() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _c = p.cleanup();
    p.file(
        "berth.toml",
        "[app]\nname = \"hc\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\n\
         healthcheck = { cmd = \"test -f /tmp/ok\", interval = \"200ms\", retries = 2 }\n\
         [[image.steps]]\ncmd = [\"sh\", \"-c\", \"touch /tmp/ok; exec sleep 600\"]\n",
    );
    p.berth().args(["build"]).run().ok();
    p.berth()
        .args(["run", "-d", "--name", "hc", "hc:latest"])
        .run()
        .ok();
    let status = || {
        let v = json(&p.berth().args(["--json", "ps"]).run().ok());
        v[0]["status_text"].as_str().unwrap_or_default().to_string()
    };
    let until = Instant::now() + Duration::from_secs(10);
    while !status().contains("(healthy)") {
        assert!(Instant::now() < until, "never healthy: {}", status());
        std::thread::sleep(Duration::from_millis(100));
    }
    p.berth().args(["exec", "hc", "rm", "/tmp/ok"]).run().ok();
    let until = Instant::now() + Duration::from_secs(10);
    while !status().contains("(unhealthy)") {
        assert!(Instant::now() < until, "never unhealthy: {}", status());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Restart policy `no`: it keeps running, unhealthy, as Docker leaves it.
    std::thread::sleep(Duration::from_millis(1500));
    let s = status();
    assert!(
        s.starts_with("Up") && s.contains("(unhealthy)") && !s.contains("restart"),
        "{s}"
    );
    // --no-healthcheck: none.
    p.berth()
        .args([
            "run",
            "-d",
            "--no-healthcheck",
            "--name",
            "plain",
            "hc:latest",
        ])
        .run()
        .ok();
    let v = json(&p.berth().args(["--json", "ps"]).run().ok());
    let plain = v
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "plain")
        .unwrap()
        .clone();
    assert!(plain.get("health").is_none(), "{plain}");
}
