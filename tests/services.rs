//! Runtime services end to end: detached containers under a supervisor, published ports,
//! bridge networks, volumes, logs, exec, restart policies and crash recovery. Everything
//! runs for real (root, namespaces, veths on 198.18.0.0/15) and is removed afterwards.

mod util;

use std::time::{Duration, Instant};

use util::{TempProject, free_port, http_get};

fn ps_json(p: &TempProject) -> Vec<serde_json::Value> {
    let out = p.berth().args(["--json", "ps", "-a"]).run().ok();
    serde_json::from_str(&out.stdout).unwrap()
}

fn state(p: &TempProject, name: &str) -> serde_json::Value {
    ps_json(p)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_detached_web_server_serves_stops_starts_and_keeps_its_logs() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    p.file("www/index.html", "hello from a berth container\n");
    p.berth()
        .args(["network", "create", "--subnet", "198.18.101.0/24", "web"])
        .run()
        .ok();
    let port = free_port();
    let www = format!("{}:/www:ro", p.path().join("www").display());
    let run = p
        .berth()
        .args(["run", "-d", "--name", "site", "--network", "web"])
        .args(["-p", &format!("127.0.0.1:{port}:80"), "-v", &www])
        .args(["base:1", "httpd", "-f", "-v", "-p", "80", "-h", "/www"])
        .run()
        .ok();
    assert_eq!(run.last_line().len(), 64, "prints the id: {}", run.stdout);

    let response = http_get(port, "/index.html", 10).expect("an HTTP response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello from a berth container\n"));

    let st = state(&p, "site");
    assert_eq!(st["status"], "running");
    assert_eq!(st["ports"][0]["host_port"], port);
    let table = p.berth().args(["ps"]).run().ok().stdout;
    assert!(
        table.contains(&format!("127.0.0.1:{port}->80/tcp")) && table.contains("Up "),
        "{table}"
    );

    p.berth().args(["stop", "-t", "5", "site"]).run().ok();
    let st = state(&p, "site");
    assert_eq!(st["status"], "stopped");
    assert!(st["exit_code"].is_number(), "{st}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the proxy went with the supervisor"
    );

    p.berth().args(["start", "site"]).run().ok();
    let response = http_get(port, "/index.html", 10).expect("served again");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // httpd -v logs each request to stderr: one line per run.
    let logs = p.berth().args(["logs", "site"]).run().ok();
    let requests = logs.stderr.matches("response:200").count();
    assert_eq!(requests, 2, "both runs are in the log:\n{}", logs.stderr);
    let tail = p
        .berth()
        .args(["logs", "--tail", "1", "-t", "site"])
        .run()
        .ok();
    assert_eq!(tail.stderr.lines().count(), 1, "{}", tail.stderr);
    assert!(
        tail.stderr.starts_with("20"),
        "timestamped: {}",
        tail.stderr
    );

    // `logs -f` ends when the container stops.
    let follower = {
        let cmd = p.berth().args(["logs", "-f", "site"]);
        std::thread::spawn(move || cmd.run())
    };
    std::thread::sleep(Duration::from_millis(300));
    p.berth().args(["stop", "site"]).run().ok();
    let followed = follower.join().unwrap().ok();
    assert_eq!(followed.stderr.matches("response:200").count(), 2);

    p.berth().args(["rm", "site"]).run().ok();
    assert!(ps_json(&p).is_empty());
}

#[test]
fn containers_on_a_network_reach_each_other_by_name_and_alias() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    p.berth()
        .args(["network", "create", "--subnet", "198.18.102.0/24", "app"])
        .run()
        .ok();
    p.file("db/x", "from db\n");
    let data = format!("{}:/srv", p.path().join("db").display());
    p.berth()
        .args(["run", "-d", "--name", "db", "--network", "app"])
        .args(["--network-alias", "database", "-v", &data])
        .args(["base:1", "httpd", "-f", "-p", "80", "-h", "/srv"])
        .run()
        .ok();
    p.berth()
        .args(["run", "-d", "--name", "web", "--network", "app"])
        .args(["base:1", "sleep", "600"])
        .run()
        .ok();
    for host in ["db", "database"] {
        let url = format!("http://{host}/x");
        let mut last = String::new();
        wait_for(&format!("web to reach {host}"), 10, || {
            let r = p
                .berth()
                .args(["exec", "web", "wget", "-q", "-O", "-", &url])
                .run();
            last = format!("{} {}", r.stdout, r.stderr);
            r.code == 0 && r.stdout == "from db\n"
        });
    }
    // db started first, yet learns about web too: its /etc/hosts was rewritten.
    let hosts = p
        .berth()
        .args(["exec", "db", "cat", "/etc/hosts"])
        .run()
        .ok();
    assert!(
        hosts.stdout.contains(" web") || hosts.stdout.contains("\tweb"),
        "{}",
        hosts.stdout
    );
    let web_ip = state(&p, "web")["ip"].as_str().unwrap().to_string();
    assert!(web_ip.starts_with("198.18.102."), "{web_ip}");

    let refused = p.berth().args(["network", "rm", "app"]).run().code(1);
    assert!(
        refused.stderr.contains("used by container"),
        "{}",
        refused.stderr
    );
    let overlap = p
        .berth()
        .args([
            "network",
            "create",
            "--subnet",
            "198.18.102.128/25",
            "other",
        ])
        .run()
        .code(2);
    assert!(overlap.stderr.contains("overlaps"), "{}", overlap.stderr);

    // Removing a container releases its address and its veth.
    let web_id = state(&p, "web")["id"].as_str().unwrap().to_string();
    p.berth().args(["rm", "-f", "web"]).run().ok();
    let veth = format!("vb{}", &web_id[..10]);
    assert!(
        !std::path::Path::new("/sys/class/net").join(&veth).exists(),
        "veth {veth} is gone"
    );
    let net = p.berth().args(["network", "inspect", "app"]).run().ok();
    assert!(
        !net.stdout.contains(&web_ip),
        "lease released: {}",
        net.stdout
    );
    p.berth().args(["rm", "-f", "db"]).run().ok();
    p.berth().args(["network", "rm", "app"]).run().ok();
}

#[test]
fn a_named_volume_outlives_its_containers_and_is_seeded_from_the_image() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    p.berth()
        .args([
            "run",
            "--rm",
            "--name",
            "writer",
            "-v",
            "data:/var/lib/hello",
        ])
        .args(["base:1", "sh", "-c", "echo kept > /var/lib/hello/f"])
        .run()
        .ok();
    assert!(ps_json(&p).is_empty(), "--rm removed the writer");
    let read = p
        .berth()
        .args([
            "run",
            "--rm",
            "-v",
            "data:/data:ro",
            "base:1",
            "cat",
            "/data/f",
        ])
        .run()
        .ok();
    assert_eq!(read.stdout, "kept\n");
    let ro = p
        .berth()
        .args([
            "run",
            "--rm",
            "-v",
            "data:/data:ro",
            "base:1",
            "touch",
            "/data/g",
        ])
        .run();
    assert_ne!(ro.code, 0, "read-only volume");

    // A new volume starts with what the image has at the mount point.
    let seeded = p
        .berth()
        .args([
            "run",
            "--rm",
            "-v",
            "etc:/etc",
            "base:1",
            "cat",
            "/etc/group",
        ])
        .run()
        .ok();
    assert!(seeded.stdout.contains("www:x:33:"), "{}", seeded.stdout);
    let ls = p.berth().args(["volume", "ls"]).run().ok();
    assert!(
        ls.stdout.contains("data") && ls.stdout.contains("etc"),
        "{}",
        ls.stdout
    );

    // A tmpfs is private and empty.
    let tmp = p
        .berth()
        .args([
            "run",
            "--rm",
            "--read-only",
            "--tmpfs",
            "/scratch",
            "base:1",
        ])
        .args([
            "sh",
            "-c",
            "echo x > /scratch/a && cat /scratch/a && ! touch /b",
        ])
        .run()
        .ok();
    assert_eq!(tmp.stdout, "x\n");

    // volume rm refuses while a container refers to the volume, stopped or not.
    p.berth()
        .args(["run", "--name", "holder", "-v", "data:/d", "base:1", "true"])
        .run()
        .ok();
    let refused = p.berth().args(["volume", "rm", "data"]).run().code(1);
    assert!(refused.stderr.contains("holder"), "{}", refused.stderr);
    p.berth().args(["rm", "holder"]).run().ok();
    p.berth().args(["volume", "rm", "data"]).run().ok();
    assert!(!p.store().join("berth/volumes/data").exists());
}

#[test]
fn the_supervisor_restarts_a_crashing_container_per_policy() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    p.berth()
        .args(["run", "-d", "--name", "crash", "--restart", "on-failure:2"])
        .args(["base:1", "sh", "-c", "echo attempt; exit 3"])
        .run()
        .ok();
    wait_for("the restarts to run out", 20, || {
        let st = state(&p, "crash");
        st["status"] == "stopped" && st["supervisor"].is_null()
    });
    let st = state(&p, "crash");
    assert_eq!(st["restarts"], 2, "{st}");
    assert_eq!(st["exit_code"], 3, "{st}");
    let table = p.berth().args(["ps", "-a"]).run().ok().stdout;
    assert!(
        table.contains("Exited (3)") && table.contains("2 restarts"),
        "{table}"
    );
    let logs = p.berth().args(["logs", "crash"]).run().ok();
    assert_eq!(logs.stdout.matches("attempt").count(), 3, "{}", logs.stdout);

    // A detached container with -t writes through its pty into the log.
    p.berth()
        .args(["run", "-d", "-t", "--name", "tty", "base:1"])
        .args(["sh", "-c", "test -t 1 && echo pty-ok"])
        .run()
        .ok();
    wait_for("the tty container to exit", 10, || {
        state(&p, "tty")["status"] == "stopped"
    });
    let logs = p.berth().args(["logs", "tty"]).run().ok();
    assert!(logs.stdout.contains("pty-ok"), "{}", logs.stdout);

    // `always` restarts until stopped; a stop is not undone by the policy.
    p.berth()
        .args(["run", "-d", "--name", "loop", "--restart", "always"])
        .args(["base:1", "sh", "-c", "sleep 0.2; exit 0"])
        .run()
        .ok();
    wait_for("a restart", 20, || {
        state(&p, "loop")["restarts"].as_u64().unwrap_or(0) >= 1
    });
    p.berth().args(["stop", "-t", "1", "loop"]).run().ok();
    let st = state(&p, "loop");
    assert_eq!(st["status"], "stopped", "{st}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(state(&p, "loop")["status"], "stopped", "stays stopped");
}

#[test]
fn a_container_whose_supervisor_was_killed_is_adopted_and_rm_cleans_up() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    p.berth()
        .args(["network", "create", "--subnet", "198.18.103.0/24", "n"])
        .run()
        .ok();
    p.berth()
        .args([
            "run",
            "-d",
            "--name",
            "orphan",
            "--network",
            "n",
            "--memory",
            "64M",
        ])
        .args(["base:1", "sleep", "600"])
        .run()
        .ok();
    let st = state(&p, "orphan");
    let id = st["id"].as_str().unwrap().to_string();
    let sup = st["supervisor"]["pid"].as_i64().unwrap() as i32;
    let init = st["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the supervisor to die", 5, || {
        !std::path::Path::new(&format!("/proc/{sup}")).exists()
            || std::fs::read_to_string(format!("/proc/{sup}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    let st = state(&p, "orphan");
    assert_eq!(
        st["status"], "running",
        "the container itself still runs: {st}"
    );
    // The command that looked adopted it: the same process, a new supervisor, its
    // address and cgroup kept.
    assert_eq!(st["pid"].as_i64(), Some(init as i64), "{st}");
    assert_eq!(st["supervisor_lost"], false, "{st}");
    assert_ne!(st["supervisor"]["pid"].as_i64(), Some(sup as i64), "{st}");
    assert_eq!(st["ip"], "198.18.103.2", "{st}");
    let table = p.berth().args(["ps"]).run().ok().stdout;
    assert!(!table.contains("supervisor lost"), "{table}");

    p.berth().args(["rm", "-f", "orphan"]).run().ok();
    wait_for("the container's process to end", 5, || {
        !std::path::Path::new(&format!("/proc/{init}/ns")).exists()
    });
    assert!(ps_json(&p).is_empty());
    for root in ["/sys/fs/cgroup/memory/berth", "/sys/fs/cgroup/berth"] {
        assert!(
            !std::path::Path::new(root).join(&id).exists(),
            "cgroup {root}/{id} removed"
        );
    }
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(format!("vb{}", &id[..10]))
            .exists()
    );
    let net = p.berth().args(["network", "inspect", "n"]).run().ok();
    assert!(!net.stdout.contains(&id), "{}", net.stdout);
}

#[test]
fn exec_sees_the_containers_processes_and_files() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    p.berth()
        .args(["run", "-d", "--name", "box", "-e", "GREETING=hi"])
        .args([
            "base:1",
            "sh",
            "-c",
            "echo inside > /tmp/marker; exec sleep 600",
        ])
        .run()
        .ok();
    wait_for("the marker", 5, || {
        p.berth()
            .args(["exec", "box", "test", "-e", "/tmp/marker"])
            .run()
            .code
            == 0
    });
    let ps = p.berth().args(["exec", "box", "ps"]).run().ok();
    assert!(ps.stdout.contains("sleep 600"), "{}", ps.stdout);
    assert!(
        ps.stdout.lines().count() <= 5,
        "only the container's processes: {}",
        ps.stdout
    );
    let cat = p
        .berth()
        .args(["exec", "box", "cat", "/tmp/marker"])
        .run()
        .ok();
    assert_eq!(cat.stdout, "inside\n");
    let env = p
        .berth()
        .args([
            "exec",
            "-e",
            "EXTRA=1",
            "box",
            "sh",
            "-c",
            "echo $GREETING$EXTRA",
        ])
        .run()
        .ok();
    assert_eq!(env.stdout, "hi1\n");
    let id = p
        .berth()
        .args(["exec", "-u", "www", "box", "id", "-u"])
        .run()
        .ok();
    assert_eq!(id.stdout, "33\n");
    let caps = p
        .berth()
        .args(["exec", "box", "grep", "NoNewPrivs", "/proc/self/status"])
        .run()
        .ok();
    assert!(caps.stdout.contains('1'), "{}", caps.stdout);
    p.berth()
        .args(["exec", "box", "sh", "-c", "exit 7"])
        .run()
        .code(7);
    p.berth().args(["exec", "box", "nope"]).run().code(127);
    let fs = p.berth().args(["inspect", "box"]).run().ok();
    let v: serde_json::Value = serde_json::from_str(&fs.stdout).unwrap();
    assert_eq!(v["Name"], "box");
    assert_eq!(v["Config"]["args"][0], "sh");

    // -t: a terminal for the process (`script` gives berth one, as a shell would).
    util::require("script", "bsdutils");
    let berth = env!("CARGO_BIN_EXE_berth");
    let out = std::process::Command::new("script")
        .args([
            "-qec",
            &format!("{berth} exec -t box sh -c 'test -t 1 && echo on-a-tty'"),
            "/dev/null",
        ])
        .env("BERTH_STORE", p.store())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("on-a-tty"), "{text}");

    p.berth().args(["kill", "box"]).run().ok();
    wait_for("the kill", 5, || state(&p, "box")["status"] == "stopped");
    assert_eq!(state(&p, "box")["exit_code"], 137);
    p.berth().args(["exec", "box", "true"]).run().code(1);
}
