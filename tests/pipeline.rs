//! The pipeline's promises under ordinary mishaps, on namespace hosts and a real registry:
//! a first release failing on one host, an agent down, Ctrl-C mid-rollout, a ledger that
//! refuses writes, `down` then `diff`, a deploy into a promotion-only environment, two
//! hosts with their own certificates, and the environment's tag. Each checks what every
//! host runs and what the ledger says, not only the exit code.

mod util;

use std::process::Command;

use util::fault::{FaultProxy, Faults};
use util::{Registry, TempProject, TestHosts};

fn json(run: &util::Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

/// The demo-like app: `web` answers `page` on 8080 (health-checked), published on
/// `publish`.
fn write_app(p: &TempProject, publish: &str, page: &str, web: Option<&str>) {
    let command = web.map(|c| format!("command = {c}\n")).unwrap_or_default();
    p.file("www/index.html", page).file(
        "berth.toml",
        &format!(
            "[app]\nname = \"shop\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"www/\", \"/www/\"]\n[[image.steps]]\ncmd = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             [services.web]\n{command}ports = [\"{publish}:8080\"]\nhealth = {{ http = \"/\", port = 8080, interval = \"100ms\", timeout = \"1s\", retries = 3 }}\n\
             [rollout]\ndrain = \"100ms\"\ntimeout = \"10s\"\n"
        ),
    );
}

/// What `status --env E --json` says every host runs: (host, release, digest).
fn hosts_run(p: &TempProject, token: &str, env: &str) -> (serde_json::Value, i32) {
    let st = p
        .berth()
        .env("BERTH_AGENT_TOKEN", token)
        .args(["--json", "status", "--env", env])
        .run();
    (json(&st), st.code)
}

fn releases(p: &TempProject, token: &str, env: &str) -> Vec<serde_json::Value> {
    let r = p
        .berth()
        .env("BERTH_AGENT_TOKEN", token)
        .args(["--json", "releases", "--env", env])
        .run()
        .ok();
    json(&r).as_array().unwrap().clone()
}

struct Agents {
    hosts: TestHosts,
    reg: Registry,
    p: TempProject,
    token: String,
}

/// `n` namespace hosts on 198.18.`net`.0/24 running agents (`env` for each), a registry
/// on the bridge, and a project whose `uat` runs on all of them.
fn agents(net: u8, n: usize, env: &[&[(&str, &str)]]) -> Agents {
    let mut hosts = TestHosts::new(net, n);
    let reg = Registry::start_at(&format!("198.18.{net}.1"), &[], "");
    let p = TempProject::new();
    p.with_busybox_base();
    let token = format!("pipeline-token-{net}-0123456789");
    p.file("token", &token);
    for i in 0..n {
        hosts.start_agent_with(
            i,
            &p.path().join("token"),
            &[],
            env.get(i).copied().unwrap_or(&[]),
        );
    }
    let urls: Vec<String> = (0..n)
        .map(|i| format!("\"http://{}:7443\"", hosts.addr(i)))
        .collect();
    p.file(
        "environments/uat.toml",
        &format!(
            "registry = \"http://{}/shop\"\nhosts = [{}]\n[rollout]\nbatch = 1\n",
            reg.host(),
            urls.join(", ")
        ),
    );
    Agents {
        hosts,
        reg,
        p,
        token,
    }
}

impl Agents {
    fn deploy(&self) -> util::Run {
        self.p
            .berth()
            .env("BERTH_AGENT_TOKEN", &self.token)
            .args(["deploy", "--env", "uat"])
            .run()
    }
}

#[test]
fn a_first_release_failing_on_host_2_of_2_leaves_both_running_nothing() {
    // Host 2 cannot unpack anything (its layer limit is tiny): its apply fails after
    // host 1 went live.
    let a = agents(141, 2, &[&[], &[("BERTH_LAYER_MAX_BYTES", "1K")]]);
    let _cleanup = a.p.cleanup();
    write_app(&a.p, "8080", "first\n", None);
    let r = a.deploy().code(1);
    assert!(r.stderr.contains(&a.hosts.addr(1)), "{}", r.stderr);
    // The table says what each host runs now: nothing.
    let line0 = r
        .stdout
        .lines()
        .find(|l| l.contains(&a.hosts.addr(0)))
        .unwrap();
    assert!(
        line0.contains("put-back") && line0.ends_with("nothing"),
        "{}",
        r.stdout
    );
    assert!(
        !r.stderr.contains("put back on their previous release"),
        "{}",
        r.stderr
    );
    assert!(
        util::get_once_at(&a.hosts.addr(0), 8080).is_none(),
        "host 1 serves nothing"
    );
    let (st, code) = hosts_run(&a.p, &a.token, "uat");
    for h in st["hosts"].as_array().unwrap() {
        assert!(h["release"].is_null(), "{st}");
    }
    assert_eq!(code, 0, "status agrees with the ledger: {st}");
    let list = releases(&a.p, &a.token, "uat");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["outcome"], "failed");
    assert_eq!(list[0]["host_states"][0]["end"], "put-back");
    // The environment's tag never moved: the image is there by digest only.
    let tag = util::http_get_at(&a.reg.host(), "/v2/shop/manifests/uat");
    assert!(tag.starts_with("HTTP/1.1 404"), "{tag}");
}

#[test]
fn an_agent_down_stops_the_deploy_before_anything_changes() {
    let mut a = agents(142, 3, &[]);
    let _cleanup = a.p.cleanup();
    write_app(&a.p, "8080", "one\n", None);
    a.deploy().ok();
    a.hosts.kill_agent(2);
    write_app(&a.p, "8080", "two\n", None);
    let dry =
        a.p.berth()
            .env("BERTH_AGENT_TOKEN", &a.token)
            .args(["deploy", "--env", "uat", "--dry-run"])
            .run()
            .code(1);
    assert!(dry.stdout.contains(&a.hosts.addr(2)), "{}", dry.stdout);
    let pushes_before = a.reg.requests("PUT", "/v2/shop/manifests/");
    let r = a.deploy().code(1);
    assert!(r.stderr.contains("nothing changed"), "{}", r.stderr);
    assert!(r.stderr.contains(&a.hosts.addr(2)), "{}", r.stderr);
    for i in 0..2 {
        let page = util::get_once_at(&a.hosts.addr(i), 8080).unwrap();
        assert!(page.ends_with("one\n"), "host {i} was restarted: {page}");
    }
    assert_eq!(
        a.reg.requests("PUT", "/v2/shop/manifests/"),
        pushes_before,
        "nothing was pushed"
    );
    assert_eq!(
        releases(&a.p, &a.token, "uat").len(),
        1,
        "no release allocated"
    );
}

#[test]
fn ctrl_c_mid_rollout_puts_the_updated_host_back_and_records_it() {
    let a = agents(143, 2, &[]);
    let _cleanup = a.p.cleanup();
    write_app(&a.p, "8080", "before\n", None);
    a.deploy().ok();
    // Release 2 takes its time to become healthy on each host (2 s, within its start
    // period).
    write_app(
        &a.p,
        "8080",
        "after\n",
        Some("[\"/bin/sh\", \"-c\", \"sleep 2; exec httpd -f -p 8080 -h /www\"]"),
    );
    let toml =
        a.p.read("berth.toml")
            .replace("retries = 3 }", "retries = 3, start_period = \"10s\" }");
    a.p.file("berth.toml", &toml);
    let child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("-C")
        .arg(a.p.path())
        .env("BERTH_STORE", a.p.store())
        .env("BERTH_AGENT_TOKEN", &a.token)
        .env("NO_COLOR", "1")
        .args(["deploy", "--env", "uat"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once host 1 started release 2's replica, Ctrl-C.
    let containers = a.hosts.states[0].path().join("store/berth/containers");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let started = std::fs::read_dir(&containers)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("state.json")).ok())
            .any(|t| t.contains("shop-uat-web-2-0"));
        if started {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "release 2 never started on host 1"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        stdout.contains("not-started"),
        "host 2 was never started: {stdout}"
    );
    for i in 0..2 {
        let page = util::get_once_at(&a.hosts.addr(i), 8080).unwrap();
        assert!(page.ends_with("before\n"), "host {i}: {page}");
    }
    let list = releases(&a.p, &a.token, "uat");
    assert_eq!(list[0]["number"], 2);
    assert_eq!(list[0]["outcome"], "interrupted");
    let (st, code) = hosts_run(&a.p, &a.token, "uat");
    assert_eq!(code, 0, "status agrees with the ledger: {st}");
    assert!(
        st["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["release"] == 1),
        "{st}"
    );
}

#[test]
fn a_ledger_that_refuses_writes_moves_nothing_and_an_unrecorded_end_is_reconciled() {
    let reg = Registry::start(&[]);
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let port = util::free_port();
    write_app(&p, &format!("127.0.0.1:{port}"), "v1\n", None);
    let with_proxy = |proxy: &FaultProxy| {
        p.file(
            "environments/dev.toml",
            &format!(
                "hosts = [\"local\"]\nregistry = \"http://{}/shop\"\n",
                proxy.host()
            ),
        );
    };
    // Every record refused: the deploy stops before any replica starts.
    let refuse_all = FaultProxy::start(
        reg.port,
        Faults {
            refuse_containing: Some("PUT /v2/shop/manifests/berth-release-".into()),
            ..Faults::default()
        },
    );
    with_proxy(&refuse_all);
    let r = p.berth().args(["deploy", "--env", "dev"]).run().code(1);
    assert!(r.stderr.contains("nothing changed"), "{}", r.stderr);
    assert!(util::http_get(port, "/", 1).is_none(), "nothing serves");
    let ps = p.berth().args(["--json", "ps", "-a"]).run().ok();
    assert_eq!(ps.stdout.trim(), "[]", "no replica was started");

    // The start is recorded, the end refused: the release is live, the output says its
    // end is not in the ledger, status says so, and --reconcile records it.
    let refuse_end = FaultProxy::start(
        reg.port,
        Faults {
            refuse_containing: Some("PUT /v2/shop/manifests/berth-release-".into()),
            refuse_after: 1,
            ..Faults::default()
        },
    );
    with_proxy(&refuse_end);
    let r = p.berth().args(["deploy", "--env", "dev"]).run().ok();
    assert!(r.stderr.contains("could not be recorded"), "{}", r.stderr);
    assert!(util::http_get(port, "/", 5).unwrap().ends_with("v1\n"));
    refuse_end.heal();
    let st = p
        .berth()
        .args(["--json", "status", "--env", "dev"])
        .run()
        .code(1);
    assert!(st.stdout.contains("no recorded end"), "{}", st.stdout);
    let fixed = p
        .berth()
        .args(["--json", "status", "--env", "dev", "--reconcile"])
        .run()
        .ok();
    assert_eq!(json(&fixed)["state"], "live", "{}", fixed.stdout);
    let list = json(
        &p.berth()
            .args(["--json", "releases", "--env", "dev"])
            .run()
            .ok(),
    );
    assert_eq!(list[0]["outcome"], "live", "{list}");
    assert_eq!(list[0]["number"], 1);
}

#[test]
fn down_is_recorded_and_diff_and_the_gates_see_it() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let port = util::free_port();
    write_app(&p, &format!("127.0.0.1:{port}"), "v1\n", None);
    p.file("environments/dev.toml", "hosts = [\"local\"]\n");
    p.file(
        "environments/prod.toml",
        "hosts = [\"local\"]\npromote_from = \"dev\"\n",
    );
    p.berth().args(["deploy", "--env", "dev"]).run().ok();
    let down = json(
        &p.berth()
            .args(["--json", "down", "--env", "dev"])
            .run()
            .ok(),
    );
    assert_eq!(down["kind"], "down");
    assert_eq!(down["release"], 2);
    let st = json(
        &p.berth()
            .args(["--json", "status", "--env", "dev"])
            .run()
            .ok(),
    );
    assert_eq!(st["state"], "down", "{st}");
    let d = p.berth().args(["diff", "dev", "prod"]).run().code(1);
    assert!(
        d.stderr.contains("dev is down since release 2"),
        "{}",
        d.stderr
    );
    let promote = p.berth().args(["promote", "--to", "prod"]).run().code(1);
    assert!(
        promote.stderr.contains("no release to promote"),
        "{}",
        promote.stderr
    );
}

#[test]
fn a_promotion_only_environment_takes_a_deploy_only_when_forced_with_a_reason() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let port = util::free_port();
    write_app(&p, &format!("127.0.0.1:{port}"), "v1\n", None);
    p.file("environments/dev.toml", "hosts = [\"local\"]\n");
    p.file(
        "environments/prod.toml",
        "hosts = [\"local\"]\npromote_from = \"dev\"\n",
    );
    let r = p.berth().args(["deploy", "--env", "prod"]).run().code(2);
    assert!(r.stderr.contains("berth promote --to prod"), "{}", r.stderr);
    assert!(util::http_get(port, "/", 1).is_none());
    let forced = p
        .berth()
        .args([
            "--json",
            "deploy",
            "--env",
            "prod",
            "--force",
            "--reason",
            "INC-9 hotfix",
        ])
        .run()
        .ok();
    let v = json(&forced);
    assert_eq!(v["outcome"], "live");
    assert_eq!(v["forced"], serde_json::json!(["promotion"]));
    let list = json(
        &p.berth()
            .args(["--json", "releases", "--env", "prod"])
            .run()
            .ok(),
    );
    assert_eq!(list[0]["reason"], "INC-9 hotfix");
}

#[test]
fn two_hosts_with_their_own_certificates_are_pinned_each() {
    let mut hosts = TestHosts::new(144, 2);
    let reg = Registry::start_at("198.18.144.1", &[], "");
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let token = "per-host-pins-token-0123456789";
    p.file("token", token);
    let mut pins = Vec::new();
    for i in 0..2 {
        let dir = p.path().join(format!("tls{i}"));
        let made = p
            .berth()
            .args(["agent", "--init-tls"])
            .args([&dir])
            .args(["--san", &hosts.addr(i)])
            .run()
            .ok();
        pins.push(
            made.stdout
                .lines()
                .find_map(|l| l.strip_prefix("SHA-256 fingerprint: "))
                .unwrap()
                .to_string(),
        );
        let (cert, key) = (dir.join("agent.crt"), dir.join("agent.key"));
        let extra = [
            std::ffi::OsStr::new("--tls-cert"),
            cert.as_os_str(),
            std::ffi::OsStr::new("--tls-key"),
            key.as_os_str(),
        ];
        hosts.start_agent_with(i, &p.path().join("token"), &extra, &[]);
    }
    write_app(&p, "8080", "pinned\n", None);
    let env = |a: &str, b: &str| {
        p.file(
            "environments/uat.toml",
            &format!(
                "registry = \"http://{}/shop\"\nhosts = [{{ url = \"https://{}:7443\", fingerprint = \"{a}\" }}, {{ url = \"https://{}:7443\", fingerprint = \"{b}\" }}]\n[agent]\ntoken = {{ file = \"token\" }}\n",
                reg.host(),
                hosts.addr(0),
                hosts.addr(1)
            ),
        );
    };
    env(&pins[0], &pins[1]);
    p.berth().args(["deploy", "--env", "uat"]).run().ok();
    for i in 0..2 {
        assert!(
            util::get_once_at(&hosts.addr(i), 8080)
                .unwrap()
                .ends_with("pinned\n")
        );
    }
    // The pins swapped: both hosts fail their check, before anything changes.
    env(&pins[1], &pins[0]);
    let r = p.berth().args(["deploy", "--env", "uat"]).run().code(1);
    assert!(r.stderr.contains("fingerprint"), "{}", r.stderr);
    assert!(r.stderr.contains("nothing changed"), "{}", r.stderr);
}

#[test]
fn the_environments_tag_moves_only_after_go_live() {
    let a = agents(145, 1, &[]);
    let _cleanup = a.p.cleanup();
    write_app(&a.p, "8080", "good\n", None);
    let first = json(
        &a.p.berth()
            .env("BERTH_AGENT_TOKEN", &a.token)
            .args(["--json", "deploy", "--env", "uat"])
            .run()
            .ok(),
    );
    let tagged = util::http_get_at(&a.reg.host(), "/v2/shop/manifests/uat");
    assert!(
        tagged.contains(first["digest"].as_str().unwrap()),
        "uat names the live image: {tagged}"
    );
    // A release that never becomes healthy leaves the tag where it was.
    write_app(&a.p, "8080", "bad\n", Some("[\"sleep\", \"600\"]"));
    let bad = a.deploy().code(1);
    assert!(
        bad.stderr.contains("did not become healthy"),
        "{}",
        bad.stderr
    );
    let tagged = util::http_get_at(&a.reg.host(), "/v2/shop/manifests/uat");
    assert!(
        tagged.contains(first["digest"].as_str().unwrap()),
        "the tag did not move: {tagged}"
    );
    // And the host numbers its releases as the ledger does: the next is 3 everywhere.
    write_app(&a.p, "8080", "good again\n", None);
    a.deploy().ok();
    let (st, code) = hosts_run(&a.p, &a.token, "uat");
    assert_eq!(code, 0, "{st}");
    assert_eq!(st["ledger"]["release"], 3);
    assert_eq!(st["hosts"][0]["release"], 3, "{st}");
}

#[test]
fn a_taken_port_stops_a_local_deploy_before_anything_starts() {
    let reg = Registry::start(&[]);
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    write_app(&p, &format!("127.0.0.1:{port}"), "v1\n", None);
    p.file(
        "environments/dev.toml",
        &format!(
            "hosts = [\"local\"]\nregistry = \"http://{}/shop\"\n",
            reg.host()
        ),
    );
    let r = p.berth().args(["deploy", "--env", "dev"]).run().code(1);
    assert!(
        r.stderr.contains(&format!("port 127.0.0.1:{port}")),
        "{}",
        r.stderr
    );
    assert_eq!(reg.requests("PUT", "/manifests/"), 0, "nothing was pushed");
    let ps = p.berth().args(["--json", "ps", "-a"]).run().ok();
    assert_eq!(ps.stdout.trim(), "[]");
}

/// With `--json`, every command writes exactly one JSON document to stdout — whether it
/// succeeds or fails — and commands whose output is not berth's own refuse `--json`.
#[test]
fn every_command_writes_one_json_document() {
    let reg = Registry::start(&[]);
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let port = util::free_port();
    write_app(&p, &format!("127.0.0.1:{port}"), "json\n", None);
    p.file("environments/dev.toml", "hosts = [\"local\"]\n");
    p.file(
        "environments/uat.toml",
        &format!(
            "hosts = [\"local\"]\nregistry = \"http://{}/shop\"\npromote_from = \"dev\"\n",
            reg.host()
        ),
    );
    let export = p.path().join("x.tar");
    let bundle = p.path().join("bundle");
    let remote = format!("{}/shop:json", reg.host());
    let copied = format!("{}/copy:json", reg.host());
    let commands: Vec<Vec<String>> = [
        "check",
        "config --env dev",
        "config --env dev --diff uat",
        "build",
        "images",
        "history shop",
        "inspect shop",
        "tag shop shop:2",
        "rmi shop:2",
        "gc",
        "deploy --env dev --dry-run",
        "deploy --env dev",
        "status --env dev",
        "releases --env dev",
        "logs --env dev",
        "logs --env dev web",
        "scale --env dev web=2",
        "rollback --env dev",
        "promote --to uat --dry-run",
        "diff shop shop",
        "ps -a",
        "network ls",
        "volume ls",
        "volume create jv",
        "volume inspect jv",
        "volume rm jv",
        "run -d --name jc base:1 sleep 30",
        "logs jc",
        "stop -t 1 jc",
        "start jc",
        "kill jc",
        "rm -f jc",
        "down --env dev",
        "down --env dev",
        "releases --env nope",
        "inspect no-such-image",
    ]
    .iter()
    .map(|c| c.split(' ').map(str::to_string).collect())
    .chain([
        vec![
            "export".into(),
            "shop".into(),
            "-o".into(),
            export.display().to_string(),
        ],
        vec!["bundle".into(), "shop".into(), bundle.display().to_string()],
        vec!["push".into(), "shop".into(), remote.clone()],
        vec!["pull".into(), remote.clone()],
        vec!["copy".into(), remote.clone(), copied],
    ])
    .collect();
    for c in &commands {
        let r = p.berth().arg("--json").args(c).run();
        let doc: Result<serde_json::Value, _> = serde_json::from_str(&r.stdout);
        assert!(
            doc.is_ok(),
            "`berth --json {}` (exit {}) wrote not one JSON document:\n{}\n{}",
            c.join(" "),
            r.code,
            r.stdout,
            r.stderr
        );
        if r.code != 0 {
            let doc = doc.unwrap();
            assert!(
                doc["error"].is_string()
                    || doc["outcome"].is_string()
                    || doc["problems"].is_array(),
                "`{}` failed without saying why in its document: {doc}",
                c.join(" ")
            );
        }
    }
    for c in [
        "run --rm base:1 true",
        "exec jc true",
        "completions bash",
        "man",
    ] {
        let r = p.berth().arg("--json").args(c.split(' ')).run();
        assert_eq!(r.code, 2, "`{c}` took --json: {}", r.stdout);
        let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert!(
            doc["error"]
                .as_str()
                .unwrap()
                .contains("--json does not apply"),
            "{doc}"
        );
    }
}
