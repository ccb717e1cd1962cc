//! berth without root, as a laptop user runs it: a user the test makes (with `useradd`, and
//! subordinate ids as Debian gives every new user) builds images with RUN steps that are
//! bit-identical to root's, runs containers with published ports, and deploys the demo to
//! dev on a high port, all in its own store and user namespace.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::{free_port, http_get, run_ok};

/// A user made for one test, with its own directory; when dropped (also when the test
/// fails) every process of the user is killed (its containers, supervisors and berth's
/// pause process; their mounts go with the namespace) and the user is removed.
struct TestUser {
    name: String,
    home: tempfile::TempDir,
    berth: PathBuf,
}

impl TestUser {
    fn new(tag: &str) -> TestUser {
        let name = format!("bl{tag}{}", std::process::id() % 100_000);
        let made = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", &name])
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let home = tempfile::tempdir().unwrap();
        let berth = home.path().join("berth");
        let user = TestUser { name, home, berth };
        // Debian's useradd gives new users subordinate ids; make sure of them.
        let has = |file: &str| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with(&format!("{}:", user.name)))
        };
        if !has("/etc/subuid") || !has("/etc/subgid") {
            // usermod needs the files; a minimal image may have none.
            for file in ["/etc/subuid", "/etc/subgid"] {
                if !Path::new(file).exists() {
                    std::fs::write(file, "").unwrap();
                    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
                }
            }
            let base = if tag == "b" { 400_000 } else { 470_000 };
            let range = format!("{base}-{}", base + 65_535);
            run_ok(Command::new("usermod").args([
                "--add-subuids",
                &range,
                "--add-subgids",
                &range,
                &user.name,
            ]));
        }
        run_ok(Command::new("chown").arg(&user.name).arg(user.home.path()));
        // The binary, where the user can reach it whatever the checkout's permissions.
        std::fs::copy(env!("CARGO_BIN_EXE_berth"), &user.berth).unwrap();
        std::fs::set_permissions(&user.berth, std::fs::Permissions::from_mode(0o755)).unwrap();
        user
    }

    fn dir(&self) -> &Path {
        self.home.path()
    }

    /// `berth ARGS` as the user, in `dir`, with the user's own store (`$HOME`-based, as
    /// on a laptop): (exit code, stdout, stderr on one line).
    fn berth(&self, dir: &Path, args: &[&str]) -> (i32, String, String) {
        // runuser sets HOME to the user's (absent) home: `env` sets it back.
        let out = Command::new("runuser")
            .args(["-u", &self.name, "--", "env", "-u", "XDG_DATA_HOME"])
            .arg(format!("HOME={}", self.dir().display()))
            .arg(&self.berth)
            .args(args)
            .current_dir(dir)
            .env_remove("BERTH_STORE")
            .env("NO_COLOR", "1")
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        )
    }

    fn ok(&self, dir: &Path, args: &[&str]) -> (String, String) {
        let (code, out, err) = self.berth(dir, args);
        assert_eq!(code, 0, "berth {args:?} as {}:\n{out}\n{err}", self.name);
        (out, err)
    }

    /// Gives the user a file tree the test wrote as root.
    fn own(&self, path: &Path) {
        run_ok(Command::new("chown").arg("-R").arg(&self.name).arg(path));
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        for _ in 0..50 {
            let _ = Command::new("pkill")
                .args(["-KILL", "-u", &self.name])
                .output();
            let left = Command::new("pgrep").args(["-u", &self.name]).output();
            if left.is_ok_and(|o| o.stdout.is_empty()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// The busybox root filesystem as a tar with numeric owners: the same input for root and
/// the user (a directory of root's files would read as `nobody`'s to the user).
fn base_tar(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    util::busybox_rootfs(&rootfs);
    let tar = dir.join("base.tar");
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    std::fs::remove_dir_all(rootfs).unwrap();
    std::fs::set_permissions(&tar, std::fs::Permissions::from_mode(0o644)).unwrap();
    tar
}

/// RUN steps that make files of another owner, a setuid bit, a deletion (whiteout) and a
/// directory replaced (opaque): what a rootless build must record as root's would.
const DOCKERFILE: &str = r#"FROM base:1
RUN echo "app:x:1234:1234::/home/app:/bin/sh" >> /etc/passwd && echo "app:x:1234:" >> /etc/group \
 && mkdir -p /data /opt/x && echo hi > /data/f && chown 1234:1234 /data/f && chmod 4755 /data/f && touch /opt/x/old
RUN rm -f /etc/profile /etc/motd && rm -rf /opt/x && mkdir /opt/x && echo new > /opt/x/z
USER app
CMD ["id"]
"#;

#[test]
fn rootless_builds_match_root_and_containers_run_with_published_ports() {
    let user = TestUser::new("b");
    let work = user.dir().join("work");
    std::fs::create_dir(&work).unwrap();
    let tar = base_tar(&work);
    std::fs::create_dir(work.join("ctx")).unwrap();
    std::fs::write(work.join("ctx/Dockerfile"), DOCKERFILE).unwrap();
    user.own(&work);

    // As root, in a store of its own (made world-readable, as a umask would).
    let root_store_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        root_store_dir.path(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let root_store = root_store_dir.path().join("store");
    std::fs::create_dir(&root_store).unwrap();
    std::fs::set_permissions(&root_store, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_root = |args: &[&str]| {
        run_ok(
            Command::new(env!("CARGO_BIN_EXE_berth"))
                .args(args)
                .current_dir(&work)
                .env("BERTH_STORE", &root_store)
                .env("SOURCE_DATE_EPOCH", "1700000000"),
        )
    };
    let tar = tar.to_str().unwrap();
    let root_base = as_root(&["import", "-t", "base:1", tar]);
    let root_image = as_root(&["build", "-t", "t:1", "ctx"]);

    // As the user: the first command makes the namespace and says so, once.
    let (base, said) = user.ok(&work, &["import", "-t", "base:1", tar]);
    assert!(
        said.contains("running rootless") && said.contains("Limits:"),
        "{said}"
    );
    assert_eq!(
        base.trim(),
        root_base.trim(),
        "the same base from the same tar"
    );
    let (image, said) = user.ok(&work, &["build", "-t", "t:1", "ctx"]);
    assert!(!said.contains("running rootless"), "said once only: {said}");
    assert_eq!(
        image.lines().last(),
        root_image.lines().last(),
        "a rootless build gives root's digest"
    );
    // Stores are their owner's alone: unpacked images hold setuid files and
    // world-writable directories no other user may reach.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let store = user.dir().join(".local/share/berth");
    for dir in [
        &store,
        &store.join("berth"),
        &root_store,
        &root_store.join("berth"),
    ] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    // A store another user owns is refused, before anything in it is trusted.
    let (code, _, said) = user.berth(&work, &["--store", root_store.to_str().unwrap(), "images"]);
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("belongs to uid 0"), "{said}");

    // The container sees the image's owners and modes, its user, and its environment.
    let (out, _) = user.ok(&work, &["run", "--rm", "t:1"]);
    assert!(out.starts_with("uid=1234(app) gid=1234(app)"), "{out}");
    let (out, _) = user.ok(
        &work,
        &[
            "run", "--rm", "-e", "GREETING=hello", "--user", "0", "t:1", "sh", "-c",
            "stat -c '%u:%g %a' /data/f; ls /opt/x; test -e /etc/profile || echo gone; echo $GREETING; wc -l < /proc/self/uid_map",
        ],
    );
    // Two ranges mapped: the user as 0, and the subordinate ids.
    assert_eq!(out, "1234:1234 4755\nz\ngone\nhello\n2\n", "{out}");

    // A limit cannot be applied without a delegated cgroup: berth says so and runs.
    let (code, out, said) = user.berth(&work, &["run", "--rm", "--memory", "64m", "t:1", "true"]);
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert_eq!(code, 0, "{out} {said}");
        assert!(said.contains("are not applied"), "{said}");
    }

    // A published port on the host's loopback reaches the container on its bridge.
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:8080");
    user.ok(
        &work,
        &[
            "run", "-d", "--name", "web", "-p", &publish, "base:1", "sh", "-c",
            "mkdir -p /www && echo served-rootless > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    let page = http_get(port, "/", 10).expect("the published port answers");
    assert!(page.ends_with("served-rootless\n"), "{page}");
    let (ps, _) = user.ok(&work, &["ps"]);
    assert!(
        ps.contains("web") && ps.contains(&format!("{port}->8080/tcp")),
        "{ps}"
    );
    // A second container with the same host port fails there, plainly.
    let (code, _, said) = user.berth(
        &work,
        &["run", "-d", "-p", &publish, "base:1", "sleep", "60"],
    );
    assert_ne!(code, 0, "{said}");
    assert!(said.contains(&port.to_string()), "{said}");
    // exec joins the running container (its namespaces are the user's own).
    let (out, _) = user.ok(&work, &["exec", "web", "cat", "/www/index.html"]);
    assert_eq!(out, "served-rootless\n");
    user.ok(&work, &["rm", "-f", "web"]);
    assert!(
        http_get(port, "/", 0).is_none(),
        "the port is closed with the container"
    );

    // Every command joined the one namespace the first made.
    let pauses = Command::new("pgrep")
        .args(["-c", "-u", &user.name, "-x", "berth-pause"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&pauses.stdout).trim(), "1");

    // Ports below 1024 need root (unless the host lowered the bound), and berth says so.
    let unprivileged_from: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024);
    if unprivileged_from > 81 {
        let (code, _, said) = user.berth(
            &work,
            &["run", "--rm", "-p", "127.0.0.1:81:80", "base:1", "true"],
        );
        assert_ne!(code, 0, "{said}");
        assert!(said.contains("ports below 1024 need root"), "{said}");
    }
    // `--network host` is the host's own network: its interfaces are the host's.
    let host_ifaces: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let (out, _) = user.ok(
        &work,
        &[
            "run",
            "--rm",
            "--network",
            "host",
            "base:1",
            "cat",
            "/proc/net/dev",
        ],
    );
    for iface in &host_ifaces {
        assert!(out.contains(&format!("{iface}:")), "{iface} in {out}");
    }

    // Exporting what was built works as the user too.
    user.ok(&work, &["export", "t:1", "-o", "t.tar"]);
    assert!(work.join("t.tar").metadata().unwrap().len() > 0);
}

#[test]
fn without_subordinate_ids_berth_maps_one_id_and_says_what_that_limits() {
    let user = TestUser::new("s");
    run_ok(Command::new("usermod").args([
        "--del-subuids",
        "0-4294967294",
        "--del-subgids",
        "0-4294967294",
        &user.name,
    ]));
    let work = user.dir().join("work");
    std::fs::create_dir(&work).unwrap();
    let tar = base_tar(&work);
    user.own(&work);
    let (_, said) = user.ok(&work, &["import", "-t", "base:1", tar.to_str().unwrap()]);
    assert!(
        said.contains("only id 0 is mapped") && said.contains("/etc/subuid"),
        "{said}"
    );
    let (out, _) = user.ok(
        &work,
        &["run", "--rm", "base:1", "cat", "/proc/self/uid_map"],
    );
    assert_eq!(out.split_whitespace().nth(2), Some("1"), "one id: {out}");
    // A container cannot switch to a user the namespace does not map.
    let (code, _, said) = user.berth(&work, &["run", "--rm", "--user", "1234", "base:1", "id"]);
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("does not map that id"), "{said}");
}

#[test]
fn rootless_deploys_the_demo_to_dev_on_a_high_port() {
    let user = TestUser::new("d");
    let project = user.dir().join("project");
    std::fs::create_dir(&project).unwrap();
    let tar = base_tar(&project);
    let root = util::repo_root();
    let port = free_port();
    let manifest = std::fs::read_to_string(root.join("berth.toml"))
        .unwrap()
        .replace("\"8080:8080\"", &format!("\"127.0.0.1:{port}:8080\""));
    assert!(
        manifest.contains(&port.to_string()),
        "the demo publishes 8080"
    );
    std::fs::write(project.join("berth.toml"), manifest).unwrap();
    std::fs::create_dir_all(project.join("environments")).unwrap();
    std::fs::copy(
        root.join("environments/dev.toml"),
        project.join("environments/dev.toml"),
    )
    .unwrap();
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(root.join("examples"))
            .arg(&project),
    );
    user.own(&project);

    user.ok(&project, &["import", "-t", "base:1", tar.to_str().unwrap()]);
    let (out, said) = user.ok(&project, &["deploy", "--env", "dev"]);
    assert!(out.contains("release 1 is live"), "{out}\n{said}");
    let page = http_get(port, "/", 10).expect("the demo answers");
    assert!(
        page.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "{page}"
    );
    assert!(page.contains("hello from berth"), "{page}");

    // What the host runs, asked as the user, is what the ledger says; the worker writes
    // into its volume.
    let (status, _) = user.ok(&project, &["--json", "status", "--env", "dev"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["ledger"]["release"], 1, "{v}");
    assert_eq!(v["hosts"][0]["release"], 1, "{v}");
    assert_eq!(v["hosts"][0]["services"]["web"]["running"], 1, "{v}");
    assert_eq!(v["hosts"][0]["services"]["worker"]["running"], 1, "{v}");

    // A second release switches traffic, as root's does.
    let index = project.join("examples/hello/www/index.html");
    let mut text = std::fs::read_to_string(&index).unwrap();
    text.push_str("<p>second release</p>\n");
    std::fs::write(&index, text).unwrap();
    let (out, said) = user.ok(&project, &["deploy", "--env", "dev"]);
    assert!(out.contains("release 2 is live"), "{out}\n{said}");
    let page = http_get(port, "/", 10).expect("the demo answers");
    assert!(page.contains("second release"), "{page}");

    user.ok(&project, &["down", "--env", "dev"]);
    assert!(http_get(port, "/", 0).is_none(), "down closes the port");
}
