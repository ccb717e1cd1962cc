//! The runtime's foundations against a real peer: a bundle berth writes runs under runc.

mod util;

use std::process::Command;

use util::{TempProject, require};

/// Removes a runc container when the test ends, also when it fails.
struct RuncContainer(String);

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.0])
            .output();
    }
}

#[test]
fn runc_runs_the_bundle_berth_writes() {
    require("runc", "runc");
    let p = TempProject::new();
    p.with_busybox_base();
    p.file(
        "berth.toml",
        "[app]\nname = \"rt\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"msg.txt\", \"/msg.txt\"]\n[[image.steps]]\nuser = \"www\"\n[[image.steps]]\nworkdir = \"/tmp\"\n[[image.steps]]\ncmd = [\"/bin/sh\", \"-c\", \"cat /msg.txt; id -u; id -g; pwd; hostname; test -e /etc/shadow || echo no-shadow\"]\n",
    )
    .file("msg.txt", "hello from a berth bundle\n");
    p.berth().args(["build"]).run().ok();
    let bundle = p.path().join("bundle");
    p.berth()
        .args(["bundle", "rt"])
        .args([&bundle])
        .args(["--hostname", "rt-host"])
        .run()
        .ok();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["process"]["user"]["uid"], 33,
        "USER www resolved in the image's /etc/passwd"
    );
    assert_eq!(config["process"]["noNewPrivileges"], true);

    let id = format!("berth-test-{}", std::process::id());
    let _cleanup = RuncContainer(id.clone());
    let out = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "runc failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "hello from a berth bundle\n33\n33\n/tmp\nrt-host\nno-shadow\n"
    );

    // A second bundle into the same directory is refused rather than mixed.
    let run = p
        .berth()
        .args(["bundle", "rt"])
        .args([&bundle])
        .run()
        .code(1);
    assert!(run.stderr.contains("is not empty"), "{}", run.stderr);

    // An image without a command needs one on the command line, and gets it in place of
    // a CMD: `bundle IMG DIR CMD…` (nothing is written when there is none).
    let bare = p.path().join("bare-bundle");
    let run = p
        .berth()
        .args(["bundle", "base:1"])
        .args([&bare])
        .run()
        .code(1);
    assert!(run.stderr.contains("give one"), "{}", run.stderr);
    assert!(!bare.exists(), "nothing written without a command");
    p.berth()
        .args(["bundle", "base:1"])
        .args([&bare])
        .args(["/bin/echo", "-n", "given"])
        .run()
        .ok();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bare.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["/bin/echo", "-n", "given"])
    );
}

/// A project with the busybox base imported, for `berth run`.
fn runner() -> TempProject {
    let p = TempProject::new();
    p.with_busybox_base();
    p
}

fn run_in(p: &TempProject, args: &[&str]) -> util::Run {
    p.berth().args(["run", "--rm"]).args(args).run()
}

#[test]
fn a_container_is_isolated() {
    let p = runner();
    let out = run_in(
        &p,
        &[
            "--hostname",
            "box",
            "base:1",
            "/bin/sh",
            "-c",
            "echo pid=$$; hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; ls -d /proc/[0-9]*",
        ],
    )
    .ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0], "pid=2",
        "the command runs under the container's init: {}",
        out.stdout
    );
    assert_eq!(lines[1], "box");
    assert!(lines[2].starts_with("berth-init __init"), "{}", out.stdout);
    let pids: Vec<u32> = lines[3..]
        .iter()
        .map(|l| l.trim_start_matches("/proc/").parse().unwrap())
        .collect();
    assert!(
        pids.len() <= 4 && pids.iter().all(|&p| p < 10),
        "only the container's own processes: {pids:?}"
    );

    let ro = run_in(&p, &["base:1", "touch", "/sys/x"]).code(1);
    assert!(ro.stderr.contains("Read-only file system"), "{}", ro.stderr);
    let mount = run_in(&p, &["base:1", "mount", "-t", "tmpfs", "none", "/tmp"]);
    assert_ne!(mount.code, 0, "no CAP_SYS_ADMIN: {}", mount.stdout);
    // Docker's masked files read as empty (whichever of them this kernel has).
    let masked = [
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/kcore",
    ]
    .into_iter()
    .find(|f| std::path::Path::new(f).exists())
    .expect("the host has at least one of Docker's masked /proc files");
    let out = run_in(
        &p,
        &["base:1", "/bin/sh", "-c", &format!("wc -c < {masked}")],
    )
    .ok();
    assert_eq!(out.stdout.trim(), "0", "{masked} is masked");
    run_in(&p, &["--read-only", "base:1", "touch", "/x"]).code(1);
}

#[test]
fn capabilities_no_new_privs_and_users() {
    let p = runner();
    let root = run_in(
        &p,
        &[
            "base:1",
            "grep",
            "-E",
            "^(CapEff|CapBnd|NoNewPrivs)",
            "/proc/self/status",
        ],
    )
    .ok();
    assert!(
        root.stdout.contains("CapEff:\t00000000a80425fb"),
        "Docker's default set: {}",
        root.stdout
    );
    assert!(
        root.stdout.contains("CapBnd:\t00000000a80425fb"),
        "{}",
        root.stdout
    );
    assert!(root.stdout.contains("NoNewPrivs:\t1"), "{}", root.stdout);
    let www = run_in(
        &p,
        &[
            "-u",
            "www",
            "base:1",
            "/bin/sh",
            "-c",
            "id -u; id -g; grep CapEff /proc/self/status",
        ],
    )
    .ok();
    assert_eq!(
        www.stdout, "33\n33\nCapEff:\t0000000000000000\n",
        "a user name resolved in the image, no capabilities"
    );
}

#[test]
fn exit_codes_follow_the_container() {
    let p = runner();
    run_in(&p, &["base:1", "/bin/sh", "-c", "exit 3"]).code(3);
    let verbose = p
        .berth()
        .args(["-v", "run", "--rm", "base:1", "true"])
        .run()
        .ok();
    assert!(
        verbose.stderr.contains("root filesystem: "),
        "-v shows the mount plan: {}",
        verbose.stderr
    );
    run_in(&p, &["base:1", "/bin/sh", "-c", "kill -9 $$"]).code(137);
    let missing = run_in(&p, &["base:1", "no-such-command"]).code(127);
    assert!(
        missing
            .stderr
            .contains("executable file not found in $PATH"),
        "{}",
        missing.stderr
    );
    let env = run_in(
        &p,
        &[
            "-e",
            "GREETING=hi there",
            "-w",
            "/work/dir",
            "base:1",
            "/bin/sh",
            "-c",
            "echo $GREETING; pwd",
        ],
    )
    .ok();
    assert_eq!(
        env.stdout, "hi there\n/work/dir\n",
        "env and a created working directory"
    );
}

#[test]
fn no_descriptor_leaks_and_the_host_binary_is_out_of_reach() {
    let p = runner();
    // A descriptor berth inherits without close-on-exec must not reach the container.
    let leak = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 7</etc/passwd; exec {} run --rm base:1 ls /proc/self/fd",
            env!("CARGO_BIN_EXE_berth")
        ))
        .env("BERTH_STORE", p.store())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&leak.stdout),
        "0\n1\n2\n3\n",
        "only stdio (and ls's own directory handle)"
    );

    let binary = std::fs::read(env!("CARGO_BIN_EXE_berth")).unwrap();
    let attempt = run_in(&p, &["base:1", "/bin/sh", "-c", "cat /proc/1/exe > /dev/null && echo read; echo x > /proc/1/exe && echo wrote; readlink /proc/1/exe || echo no-link"]).ok();
    assert!(
        !attempt.stdout.contains("read\n") && !attempt.stdout.contains("wrote"),
        "{}",
        attempt.stdout
    );
    assert_eq!(
        std::fs::read(env!("CARGO_BIN_EXE_berth")).unwrap(),
        binary,
        "the host's berth binary is unchanged"
    );
}

#[test]
fn containers_are_listed_and_removed() {
    let p = runner();
    p.berth()
        .args(["run", "--name", "once", "base:1", "true"])
        .run()
        .ok();
    let ps = p.berth().args(["--json", "ps", "-a"]).run().ok();
    let v: serde_json::Value = serde_json::from_str(&ps.stdout).unwrap();
    assert_eq!(v[0]["name"], "once");
    assert_eq!(v[0]["status"], "stopped");
    assert_eq!(v[0]["exit_code"], 0);
    let running = p.berth().args(["--json", "ps"]).run().ok();
    assert_eq!(running.stdout.trim(), "[]");
    p.berth()
        .args(["run", "--name", "once", "base:1", "true"])
        .run()
        .code(2);
    p.berth().args(["rm", "once"]).run().ok();
    p.berth().args(["rm", "once"]).run().code(2);
    run_in(&p, &["base:1", "true"]).ok();
    // Detached with --rm: gone once it has stopped, as with Docker; `stop` of one
    // succeeds though the record goes while it waits.
    p.berth()
        .args(["run", "-d", "--rm", "base:1", "true"])
        .run()
        .ok();
    p.berth()
        .args([
            "run", "-d", "--rm", "--name", "brief", "base:1", "sleep", "100",
        ])
        .run()
        .ok();
    p.berth().args(["stop", "-t", "1", "brief"]).run().ok();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(p.store().join("berth/containers"))
        .unwrap()
        .next()
        .is_some()
    {
        assert!(
            std::time::Instant::now() < until,
            "run -d --rm left its container"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left: Vec<_> = std::fs::read_dir(p.store().join("berth/containers"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "--rm and rm leave nothing behind");
}

#[test]
fn cgroup_limits_stop_allocators_and_fork_bombs() {
    let p = runner();
    // dd allocates its 64 MiB block size at once: beyond the 16 MiB limit.
    let oom = p
        .berth()
        .args([
            "run",
            "--name",
            "hog",
            "--memory",
            "16M",
            "base:1",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
        ])
        .run()
        .code(137);
    assert!(oom.stderr.contains("OOMKilled"), "{}", oom.stderr);
    let ps = p.berth().args(["--json", "ps", "-a"]).run().ok();
    let v: serde_json::Value = serde_json::from_str(&ps.stdout).unwrap();
    assert_eq!(
        (v[0]["exit_code"].as_i64(), v[0]["oom_killed"].as_bool()),
        (Some(137), Some(true))
    );
    let id = v[0]["id"].as_str().unwrap().to_string();
    for root in [
        "/sys/fs/cgroup/memory/berth",
        "/sys/fs/cgroup/pids/berth",
        "/sys/fs/cgroup/cpu/berth",
        "/sys/fs/cgroup/berth",
    ] {
        assert!(
            !std::path::Path::new(root).join(&id).exists(),
            "the cgroup is removed with the container ({root})"
        );
    }
    p.berth().args(["rm", "hog"]).run().ok();

    let bomb = run_in(
        &p,
        &[
            "--pids-limit",
            "8",
            "base:1",
            "/bin/sh",
            "-c",
            "for i in $(seq 30); do sleep 2 & done; wait",
        ],
    );
    assert!(
        bomb.stderr.contains("can't fork"),
        "the pids limit stops the loop: {}",
        bomb.stderr
    );
    let quota = run_in(&p, &["--cpus", "0.5", "base:1", "true"]);
    assert_eq!(quota.code, 0);

    // The container's cgroup is the root of its cgroup namespace: it sees itself at `/`.
    let seen = run_in(
        &p,
        &["--memory", "64M", "base:1", "cat", "/proc/self/cgroup"],
    );
    let memory = seen
        .stdout
        .lines()
        .find(|l| l.contains(":memory:") || l.starts_with("0::"))
        .unwrap_or_else(|| panic!("{}", seen.stdout));
    assert!(memory.ends_with(":/"), "{}", seen.stdout);

    // And its own cgroup is mounted at /sys/fs/cgroup, read-only: what the JVM, Go and
    // Node read their limits from. v2 has one hierarchy; v1 one per controller.
    let probe = "if [ -f /sys/fs/cgroup/cgroup.controllers ]; then \
                   cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; \
                 else \
                   cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us; \
                 fi; \
                 mkdir /sys/fs/cgroup/x 2>/dev/null || echo read-only; \
                 ls /sys/fs/cgroup/memory/berth /sys/fs/cgroup/berth 2>/dev/null | wc -l";
    for network in ["none", "host"] {
        let seen = run_in(
            &p,
            &[
                "--memory",
                "64M",
                "--cpus",
                "0.5",
                "--network",
                network,
                "base:1",
                "sh",
                "-c",
                probe,
            ],
        );
        assert_eq!(seen.code, 0, "{}", seen.stderr);
        let lines: Vec<&str> = seen.stdout.lines().collect();
        assert_eq!(lines[0], "67108864", "--network {network}: {}", seen.stdout);
        assert!(
            lines[1] == "50000 100000" || lines[1] == "50000",
            "--network {network}: {}",
            seen.stdout
        );
        assert_eq!(
            lines[2..],
            ["read-only", "0"],
            "the host's cgroups stay out of sight: {}",
            seen.stdout
        );
    }
}

#[test]
fn berth_and_runc_agree_on_the_same_image() {
    require("runc", "runc");
    let p = runner();
    let probe = "id; hostname; grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; grep NoNewPrivs /proc/self/status; \
                 for m in /proc /dev /dev/pts /dev/shm /dev/mqueue /sys; do grep -q \" $m \" /proc/mounts && echo mounted $m; done";
    p.file("berth.toml", &format!("[app]\nname = \"cmp\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncmd = [\"/bin/sh\", \"-c\", \"{}\"]\n", probe.replace('\\', "\\\\").replace('"', "\\\"")));
    p.berth().args(["build"]).run().ok();
    let ours = p
        .berth()
        .args(["run", "--rm", "--hostname", "same", "cmp"])
        .run()
        .ok()
        .stdout;
    let bundle = p.path().join("bundle");
    p.berth()
        .args(["bundle", "cmp"])
        .args([&bundle])
        .args(["--hostname", "same"])
        .run()
        .ok();
    let id = format!("berth-cmp-{}", std::process::id());
    let _cleanup = RuncContainer(id.clone());
    let theirs = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .output()
        .unwrap();
    assert!(
        theirs.status.success(),
        "{}",
        String::from_utf8_lossy(&theirs.stderr)
    );
    assert_eq!(
        ours,
        String::from_utf8_lossy(&theirs.stdout),
        "berth and runc see the same process"
    );
    assert!(
        ours.contains("mounted /dev/pts") && ours.contains("CapBnd:\t00000000a80425fb"),
        "{ours}"
    );
}

#[test]
fn containers_cannot_load_modules_or_see_host_mounts() {
    let p = runner();
    let out = run_in(
        &p,
        &[
            "base:1",
            "/bin/sh",
            "-c",
            "insmod /nonexistent.ko 2>&1; cat /proc/mounts",
        ],
    )
    .stdout;
    assert!(
        !out.contains(env!("CARGO_MANIFEST_DIR")),
        "the host's mounts are out of sight: {out}"
    );
    assert!(
        !out.contains("/var/lib/containers") && !out.contains(" /boot "),
        "{out}"
    );
    let modules = run_in(
        &p,
        &["base:1", "/bin/sh", "-c", "grep CapEff /proc/self/status"],
    )
    .ok()
    .stdout;
    // CAP_SYS_MODULE is bit 16: not in the effective set.
    let eff = u64::from_str_radix(modules.trim().trim_start_matches("CapEff:").trim(), 16).unwrap();
    assert_eq!(eff & (1 << 16), 0, "no CAP_SYS_MODULE");
}

#[test]
fn the_seccomp_filter_blocks_what_capabilities_allow() {
    let p = runner();
    // A user namespace needs no capability: only the seccomp filter stops it.
    let out = run_in(
        &p,
        &[
            "base:1",
            "/bin/sh",
            "-c",
            "grep -E '^Seccomp:' /proc/self/status; unshare -U true; echo unshare=$?",
        ],
    )
    .ok();
    assert!(
        out.stdout.contains("Seccomp:\t2"),
        "a filter is installed: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("unshare=1") && out.stderr.contains("Operation not permitted"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn stdin_is_attached_only_with_i_and_limits_are_set() {
    use std::io::Write;
    let p = runner();
    let run_with_input = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["run", "--rm"])
            .args(args)
            .env("BERTH_STORE", p.store())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"typed\n").unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    assert_eq!(run_with_input(&["-i", "base:1", "cat"]), "typed\n");
    assert_eq!(
        run_with_input(&["base:1", "cat"]),
        "",
        "without -i the container reads /dev/null"
    );
    let limits = run_in(&p, &["base:1", "/bin/sh", "-c", "ulimit -n; ulimit -Hn"])
        .ok()
        .stdout;
    let values: Vec<u64> = limits.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(
        values[0], values[1],
        "soft and hard open-file limits agree: {limits}"
    );
    assert!(values[0] >= 1024);
}

#[test]
fn capabilities_can_be_added_and_dropped_and_zombies_are_reaped() {
    let p = runner();
    let caps = run_in(
        &p,
        &[
            "--cap-add",
            "SYS_PTRACE",
            "--cap-drop",
            "NET_RAW",
            "base:1",
            "grep",
            "CapEff",
            "/proc/self/status",
        ],
    )
    .ok()
    .stdout;
    let eff = u64::from_str_radix(caps.trim().trim_start_matches("CapEff:").trim(), 16).unwrap();
    assert_eq!(
        (eff >> 19 & 1, eff >> 13 & 1),
        (1, 0),
        "SYS_PTRACE added, NET_RAW dropped: {caps}"
    );
    run_in(&p, &["--cap-add", "FLY", "base:1", "true"]).code(2);
    // An orphan that exits is reparented to PID 1 and must be reaped, not left a zombie.
    let ps = run_in(
        &p,
        &[
            "base:1",
            "/bin/sh",
            "-c",
            "(sleep 0.2 &); sleep 0.6; ps -o stat,comm",
        ],
    )
    .ok()
    .stdout;
    assert!(
        !ps.lines().any(|l| l.trim_start().starts_with('Z')),
        "no zombies: {ps}"
    );
}

#[test]
fn t_gives_the_container_a_terminal() {
    require("script", "bsdutils");
    let p = runner();
    let berth = env!("CARGO_BIN_EXE_berth");
    // `script` gives berth a terminal of its own, as a user's shell would.
    let run = |cmd: String, input: &str| {
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("BERTH_STORE", p.store())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).replace('\r', ""),
        )
    };
    let (code, out) = run(
        format!(
            "stty cols 91 rows 33; {berth} run --rm -t base:1 /bin/sh -c 'test -t 0 && echo terminal; stty size < /proc/self/fd/0'"
        ),
        "",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("terminal\n33 91\n"),
        "a terminal with the caller's window size: {out:?}"
    );
    let (code, out) = run(
        format!("{berth} run --rm -it base:1 /bin/sh"),
        "echo typed-$((40+2))\nexit 7\n",
    );
    assert_eq!(code, Some(7), "the shell's exit code: {out}");
    assert!(
        out.contains("typed-42"),
        "input reaches the shell through the terminal: {out:?}"
    );
}

/// Deletes a network namespace when the test ends, also when it fails.
struct NetNs(String);

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn a_host_whose_cgroups_are_out_of_sight_gets_the_cause_and_the_fix() {
    require("ip", "iproute2");
    let p = runner();
    // `ip netns exec` remounts /sys for the namespace, without the cgroup filesystems.
    let ns = NetNs(format!("berth-cg-{}", std::process::id()));
    let made = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap();
    assert!(made.success());
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_berth")])
        .args(["run", "--rm", "base:1", "true"])
        .env("BERTH_STORE", p.store())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("no cgroup hierarchy is mounted at /sys/fs/cgroup")
            && said.contains("nsenter --net="),
        "{said}"
    );
}
