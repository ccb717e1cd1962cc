//! Nothing a host needs is ever lost, and nothing a crash leaves behind stays: `gc` and
//! `rmi` against live replicas and rollback targets (here and on an agent host), pruning
//! after every release, the store's size after SIGKILLed commands, transfers that resume
//! across processes (the registry's access log shows where), one retry policy that waits
//! out throttling and stalls and says so, and containers whose supervisor was killed.

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::fault::{FaultProxy, Faults};
use util::{Registry, TempProject, TestHosts, free_port, http_get};

fn json(run: &util::Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

/// Bytes of every file under `p` (what `du --apparent-size` counts).
fn size(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| size(&e.path()))
        .sum()
}

/// Names of the entries of `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `berth` with `args` against `store`, not waited for.
fn spawn_berth(store: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .current_dir(dir)
        .env("BERTH_STORE", store)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn kill9(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The containers of `store` as `ps -a --json` lists them.
fn containers(store: &Path) -> Vec<serde_json::Value> {
    let run = util::Berth::new()
        .env("BERTH_STORE", store.to_str().unwrap())
        .args(["--json", "ps", "-a"])
        .run()
        .ok();
    json(&run).as_array().unwrap().clone()
}

/// Whether a process is a zombie whose parent is not the host's init (nobody will reap
/// it); a process that is gone, or one init will reap, is not.
fn unreaped_zombie(pid: i64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next().unwrap();
    let ppid: i64 = fields.next().unwrap().parse().unwrap();
    state == "Z" && ppid != 1
}

/// A local project (`dev` on this machine, `keep` releases kept) serving `page` on
/// 127.0.0.1:`port`.
fn web_project(port: u16, page: &str, keep: u32) -> TempProject {
    let p = TempProject::new();
    p.with_busybox_base();
    write_page(&p, page);
    p.file(
        "berth.toml",
        &format!(
            "[app]\nname = \"shop\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"www/\", \"/www/\"]\n\
             [[image.steps]]\ncmd = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             [services.web]\nports = [\"127.0.0.1:{port}:8080\"]\n\
             health = {{ http = \"/\", port = 8080, interval = \"100ms\", timeout = \"1s\", retries = 3 }}\n"
        ),
    )
    .file(
        "environments/dev.toml",
        &format!("hosts = [\"local\"]\n[rollout]\ndrain = \"0s\"\ntimeout = \"10s\"\nkeep = {keep}\n"),
    );
    p
}

/// The page, and a file of 256 KiB that differs with it (so each release has a layer of
/// its own worth measuring).
fn write_page(p: &TempProject, page: &str) {
    let filler: String = page.repeat(256 * 1024 / page.len().max(1) + 1);
    p.file("www/index.html", page)
        .file("www/filler.txt", &filler[..256 * 1024]);
}

fn web_replica(store: &Path) -> serde_json::Value {
    containers(store)
        .into_iter()
        .find(|c| c["status"] == "running" && c["name"].as_str().unwrap().contains("web"))
        .expect("a running web replica")
}

#[test]
fn gc_and_rmi_keep_what_live_replicas_and_rollbacks_need_here() {
    let port = free_port();
    let p = web_project(port, "release one\n", 2);
    let _c = p.cleanup();
    let store = p.store();
    p.berth().args(["deploy", "--env", "dev"]).run().ok();
    write_page(&p, "release two\n");
    p.berth().args(["deploy", "--env", "dev"]).run().ok();
    // A rebuild moves the tag away from the live image.
    write_page(&p, "release three, built only\n");
    p.berth().args(["build"]).run().ok();

    let dry = p.berth().args(["gc", "--dry-run"]).run().ok();
    assert!(
        dry.stdout.contains("release 2 of shop-dev (live)")
            && dry
                .stdout
                .contains("release 1 of shop-dev (kept for rollback)")
            && dry.stdout.contains("container "),
        "gc --dry-run says what it keeps and why:\n{}",
        dry.stdout
    );
    p.berth().args(["gc"]).run().ok();
    let images = p.berth().args(["images"]).run().ok();
    assert!(
        !images.stdout.contains("berth gc"),
        "nothing left for gc to remove, so no suggestion:\n{}",
        images.stdout
    );

    let web = web_replica(&store);
    let live = web["image_digest"].as_str().unwrap().to_string();
    let refused = p.berth().args(["rmi", &live]).run();
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("in use") && refused.stderr.contains(web["name"].as_str().unwrap()),
        "rmi names the container that uses the image: {}",
        refused.stderr
    );

    // The replica's process dies: its supervisor starts it again from the image gc kept.
    let pid = web["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the replica runs again", 20, || {
        let w = containers(&store)
            .into_iter()
            .find(|c| c["id"] == web["id"])
            .unwrap();
        w["status"] == "running" && w["pid"].as_i64() != Some(pid)
    });
    wait_until("it serves again", 10, || {
        http_get(port, "/", 1).is_some_and(|b| b.ends_with("release two\n"))
    });

    // Release 1 was kept for rollback, image and all.
    p.berth()
        .args(["rollback", "--env", "dev", "--to", "1"])
        .run()
        .ok();
    assert!(http_get(port, "/", 5).unwrap().ends_with("release one\n"));
}

#[test]
fn twenty_deploys_with_keep_two_leave_the_store_bounded() {
    let port = free_port();
    let p = web_project(port, "release 0\n", 2);
    let _c = p.cleanup();
    let store = p.store();
    let base = size(&store.join("blobs"));
    let mut per_release = Vec::new();
    for n in 1..=20 {
        write_page(&p, &format!("release {n}\n"));
        let before = size(&store.join("blobs"));
        p.berth().args(["deploy", "--env", "dev"]).run().ok();
        if n <= 3 {
            per_release.push(size(&store.join("blobs")) - before);
        }
    }
    assert!(http_get(port, "/", 5).unwrap().ends_with("release 20\n"));
    // What the live release and the two kept need, plus the base: a release adds about
    // the same each time (its layer, config, manifest).
    let one = *per_release.iter().max().unwrap();
    let blobs = size(&store.join("blobs"));
    assert!(
        blobs <= base + 3 * one + one / 2,
        "blobs: {blobs} bytes for a base of {base} and 3 releases of about {one} each"
    );
    let snapshots = names(&store.join("berth/snapshots"));
    assert!(
        snapshots.len() <= 1 + 3,
        "unpacked layers: the base's and the three releases' at most: {snapshots:?}"
    );
    let releases = containers(&store);
    assert!(
        releases.len() <= 3,
        "the live release's replica and two kept: {}",
        releases.len()
    );
}

/// A project whose RUN step writes `mb` MiB of incompressible data, then sleeps `sleep`
/// seconds.
fn heavy_build(p: &TempProject, mb: u32, sleep: u32) {
    p.file(
        "berth.toml",
        &format!(
            "[app]\nname = \"heavy\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\n\
             run = \"dd if=/dev/urandom of=/big bs=1048576 count={mb} 2>/dev/null; touch /done; sleep {sleep}\"\n"
        ),
    );
}

/// Every file of a store with its size.
fn files(store: &Path) -> BTreeMap<PathBuf, u64> {
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, u64>) {
        let Ok(md) = std::fs::symlink_metadata(p) else {
            return;
        };
        if md.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), out);
            }
        } else {
            out.insert(p.to_path_buf(), md.len());
        }
    }
    let mut out = BTreeMap::new();
    walk(store, &mut out);
    out
}

/// What a killed command added to a store beyond what it completed: any file that is not
/// a whole blob under its digest, an unpacked layer, or a small record.
fn leftovers(store: &Path, before: &BTreeMap<PathBuf, u64>) -> Vec<String> {
    use sha2::Digest;
    let mut bad = Vec::new();
    let mut records = 0;
    for (path, len) in files(store) {
        if before.get(&path) == Some(&len) {
            continue;
        }
        let rel = path.strip_prefix(store).unwrap();
        let name = rel.file_name().unwrap().to_string_lossy().into_owned();
        if rel.starts_with("blobs/sha256") {
            let hex = sha2::Sha256::digest(std::fs::read(&path).unwrap());
            if format!("{hex:x}") != name {
                bad.push(format!("{} (not its digest)", rel.display()));
            }
        } else if rel.starts_with("berth/snapshots") && !rel.to_string_lossy().contains("/.") {
            // An unpacked layer, complete (made under a temporary name, then renamed).
        } else if ["blob-", ".tmp-", "partial-", ".new-"]
            .iter()
            .any(|p| name.starts_with(p))
            || rel.starts_with("berth/tmp")
        {
            bad.push(rel.display().to_string());
        } else {
            records += len;
        }
    }
    if records > 64 << 10 {
        bad.push(format!("{records} bytes of records"));
    }
    bad
}

#[test]
fn the_store_returns_to_its_size_after_killed_commands() {
    let p = TempProject::new();
    p.with_busybox_base();
    let store = p.store();
    let dir = p.path().to_path_buf();
    let reopen = || {
        p.berth().args(["images"]).run().ok();
    };

    // A build killed while its RUN step writes, and once it has written (its layer being
    // packed into the ingest area).
    heavy_build(&p, 40, 30);
    let before = files(&store);
    let mut b = spawn_berth(&store, &dir, &["build"], &[]);
    wait_until("the RUN step has written", 30, || {
        size(&store.join("berth/tmp")) > 20 << 20
    });
    let run_pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("sleep\u{0}30"))
        });
    kill9(&mut b);
    if let Some(pid) = run_pid {
        wait_until("the RUN step died with its build", 5, || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z "))
        });
    }
    reopen();
    let left = leftovers(&store, &before);
    assert!(left.is_empty(), "after a build killed mid-RUN: {left:?}");

    heavy_build(&p, 60, 0);
    let before = files(&store);
    let mut b = spawn_berth(&store, &dir, &["build"], &[]);
    wait_until("the layer is being packed", 60, || {
        names(&store.join("berth/ingest"))
            .iter()
            .any(|n| n.starts_with("blob-"))
    });
    kill9(&mut b);
    reopen();
    let left = leftovers(&store, &before);
    assert!(
        left.is_empty(),
        "after a build killed while packing: {left:?}"
    );

    // rmi and gc killed at any point leave no temp file and a consistent index.
    heavy_build(&p, 2, 0);
    p.berth().args(["build"]).run().ok();
    for cmd in [["rmi", "heavy"], ["gc", "--dry-run"]] {
        for delay_ms in [0u64, 2, 5, 10, 20] {
            // (Cached: it only names the image `heavy` again.)
            p.berth().args(["build"]).run().ok();
            p.berth().args(["tag", "heavy", "again"]).run().ok();
            let before = files(&store);
            let mut c = spawn_berth(&store, &dir, &cmd, &[]);
            std::thread::sleep(Duration::from_millis(delay_ms));
            let _ = c.kill();
            c.wait().unwrap();
            reopen();
            let left = leftovers(&store, &before);
            assert!(
                left.is_empty(),
                "{cmd:?} killed after {delay_ms} ms: {left:?}"
            );
            p.berth().args(["images"]).run().ok();
        }
    }
    // And what is unused goes: the store is back to the base alone.
    let base = files(&store)
        .keys()
        .filter(|k| k.starts_with(store.join("blobs")))
        .count();
    p.berth().args(["rmi", "again"]).run();
    p.berth().args(["rmi", "heavy"]).run();
    p.berth().args(["gc"]).run().ok();
    let blobs = files(&store)
        .keys()
        .filter(|k| k.starts_with(store.join("blobs")))
        .count();
    assert!(
        blobs < base,
        "gc removed the heavy images: {base} -> {blobs} blobs"
    );
    let unpacked = names(&store.join("berth/snapshots"));
    assert!(
        unpacked.len() <= 1,
        "only the base's layer stays unpacked: {unpacked:?}"
    );
}

/// A project whose image has one 64 MiB layer of random bytes (incompressible).
fn big_image() -> TempProject {
    let p = TempProject::new();
    p.with_busybox_base();
    let mut data = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        // xorshift: fast, and gzip finds nothing to compress.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(p.path().join("big.bin"), data).unwrap();
    p.file(
        "berth.toml",
        "[app]\nname = \"big\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"big.bin\", \"/big.bin\"]\n",
    );
    p.berth().args(["build"]).run().ok();
    p
}

/// The offset a distribution upload URL's `_state` records (HMAC, then JSON).
fn state_offset(line: &str) -> Option<u64> {
    use base64::Engine;
    let state = line
        .split("_state=")
        .nth(1)?
        .split(['&', ' ', '"'])
        .next()?;
    let state = state.replace("%3D", "=");
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(state.as_bytes())
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw[32..]).ok()?;
    v["Offset"].as_u64()
}

#[test]
fn a_push_killed_at_60_percent_resumes_there() {
    let reg = Registry::start(&[]);
    // In front of the registry, a proxy that passes a request on only once its body has
    // arrived whole (nginx's default): a killed chunk never reaches the registry. (Alone,
    // distribution keeps the part of a cut chunk it got, and then refuses the session.)
    // Bodies go at 8 MiB/s, a second a chunk, so the kill lands mid-chunk even on a busy
    // machine. (Should the next chunk land before the kill, berth's saved upload location
    // is one chunk old; distribution then refuses it, and berth starts that blob again.)
    let proxy = FaultProxy::start(
        reg.port,
        Faults {
            buffer_requests: true,
            upload_bytes_per_sec: Some(8 << 20),
            ..Faults::default()
        },
    );
    let p = big_image();
    let dst = format!("{}/big:1", proxy.host());
    let patched = || {
        reg.log()
            .lines()
            .filter(|l| l.contains("\"PATCH ") && l.contains("\" 202 "))
            .count()
    };
    let mut push = spawn_berth(&p.store(), p.path(), &["push", "big", &dst], &[]);
    // 8 MiB chunks: five of eight are 62.5%.
    wait_until("five chunks are up", 60, || patched() >= 5);
    kill9(&mut push);
    let before = reg.log().lines().count();
    let again = p.berth().args(["--json", "push", "big", &dst]).run().ok();
    let report = json(&again);
    let sent = report["bytes_sent"].as_u64().unwrap();
    let log = reg.log();
    let after: Vec<&str> = log.lines().skip(before).collect();
    assert!(
        sent <= 3 * (8 << 20) + (1 << 20),
        "the push continued from the registry's offset: {sent} bytes sent again\n{}",
        after.join("\n")
    );
    let status_check = after
        .iter()
        .position(|l| l.contains("\"GET /v2/big/blobs/uploads/") && l.contains("\" 204 "))
        .unwrap_or_else(|| {
            panic!(
                "the session was asked where it stands:\n{}",
                after.join("\n")
            )
        });
    let first_patch = after[status_check..]
        .iter()
        .find(|l| l.contains("\"PATCH "))
        .expect("a PATCH after the status check");
    let offset = state_offset(first_patch).expect("an offset in the upload state");
    assert!(
        offset >= 5 * (8 << 20),
        "the first PATCH continues at {offset}: {first_patch}"
    );
    assert!(
        !after
            .iter()
            .any(|l| l.contains("\"POST /v2/big/blobs/uploads/")
                && l.contains("big")
                && !l.contains("mount=")),
        "no new session for the big layer:\n{}",
        after.join("\n")
    );
    assert!(
        names(&p.store().join("berth/ingest/uploads")).is_empty(),
        "the session record is gone once the blob is up"
    );
    // Whole and correct: berth pulls it back and verifies every digest.
    let q = TempProject::new();
    q.berth()
        .args(["pull", &format!("{}/big:1", reg.host())])
        .run()
        .ok();
}

#[test]
fn a_pull_killed_midway_continues_with_a_range_request() {
    let reg = Registry::start(&[]);
    let p = big_image();
    p.berth()
        .args(["push", "big", &format!("{}/big:1", reg.host())])
        .run()
        .ok();
    // Downloads paced at 16 MiB/s through a proxy, so the pull can be caught midway.
    let proxy = FaultProxy::start(
        reg.port,
        Faults {
            download_bytes_per_sec: Some(16 << 20),
            ..Faults::default()
        },
    );
    let q = TempProject::new();
    let store = q.store();
    let src = format!("{}/big:1", proxy.host());
    let mut pull = spawn_berth(&store, q.path(), &["pull", &src], &[]);
    let partial = || size(&store.join("berth/ingest"));
    wait_until("40% of the layer has arrived", 60, || partial() > 26 << 20);
    kill9(&mut pull);
    let kept = partial();
    let before = reg.log().lines().count();
    let again = q.berth().args(["--json", "pull", &src]).run().ok();
    let report = json(&again);
    let fetched = report["bytes"].as_u64().unwrap();
    assert!(
        fetched < (64 << 20) - kept + (2 << 20),
        "only the rest was fetched: {fetched} bytes after keeping {kept}"
    );
    let log = reg.log();
    let ranged: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| l.contains("\"GET /v2/big/blobs/sha256:") && l.contains("\" 206 "))
        .collect();
    assert_eq!(
        ranged.len(),
        1,
        "one ranged GET for the rest of the layer:\n{}",
        log.lines().skip(before).collect::<Vec<_>>().join("\n")
    );
    assert!(
        names(&store.join("berth/ingest"))
            .iter()
            .all(|n| !n.starts_with("partial-") && !n.starts_with("blob-")),
        "nothing partial is left once the blob is whole"
    );
    q.berth().args(["run", "--rm", &src, "true"]).run().ok();
}

#[test]
fn gc_alongside_builds_and_pulls_never_takes_what_they_make() {
    let reg = Registry::start(&[]);
    let p = big_image();
    let src = format!("{}/big:1", reg.host());
    p.berth().args(["push", "big", &src]).run().ok();
    for delay_ms in [50u64, 200, 400, 700] {
        let q = TempProject::new();
        let mut pull = spawn_berth(&q.store(), q.path(), &["pull", &src], &[]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        q.berth().args(["gc"]).run().ok();
        assert!(pull.wait().unwrap().success());
        q.berth().args(["images"]).run().ok();
        q.berth().args(["run", "--rm", &src, "true"]).run().ok();

        let tag = format!("big:{delay_ms}");
        let mut build = spawn_berth(
            &p.store(),
            p.path(),
            &["build", "--no-cache", "--tag", &tag],
            &[],
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        p.berth().args(["gc"]).run().ok();
        assert!(build.wait().unwrap().success());
        p.berth().args(["images"]).run().ok();
        p.berth().args(["run", "--rm", &tag, "true"]).run().ok();
    }
}

#[test]
fn copy_waits_out_throttling_and_a_stall_is_retried_with_a_message() {
    let src = Registry::start(&[]);
    let dst = Registry::start(&[]);
    let p = TempProject::new();
    p.with_busybox_base();
    // 12 MiB of random bytes: one upload that outlasts the socket buffers.
    let mut data = vec![0u8; 12 << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(p.path().join("blob.bin"), data).unwrap();
    p.file(
        "berth.toml",
        "[app]\nname = \"mid\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"blob.bin\", \"/blob.bin\"]\n",
    );
    p.berth().args(["build"]).run().ok();
    p.berth()
        .args(["push", "mid", &format!("{}/mid:1", src.host())])
        .run()
        .ok();

    // Throttled: the first three requests get 429 with Retry-After: 1.
    let throttled = FaultProxy::start(
        dst.port,
        Faults {
            throttle_first: 3,
            ..Faults::default()
        },
    );
    let started = Instant::now();
    let copy = p
        .berth()
        .args([
            "--json",
            "copy",
            &format!("{}/mid:1", src.host()),
            &format!("{}/mid:1", throttled.host()),
        ])
        .run()
        .ok();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was waited for"
    );
    assert!(
        copy.stderr.contains("berth: retrying") && copy.stderr.contains("429"),
        "each retry is said: {}",
        copy.stderr
    );
    assert!(
        json(&copy)["retries"].as_u64().unwrap() >= 3,
        "{}",
        copy.stdout
    );

    // A stall: the big layer's upload is accepted and never read; with a 2 s low-speed
    // window it is given up and sent again (to a registry that has none of the blobs).
    let fresh = Registry::start(&[]);
    let stalling = FaultProxy::start(
        fresh.port,
        Faults {
            stall_uploads_after: Some(0),
            stall_uploads_count: Some(1),
            stall_min_body: 8 << 20,
            ..Faults::default()
        },
    );
    let push = p
        .berth()
        .env("BERTH_LOW_SPEED_TIME", "2")
        .args([
            "--json",
            "push",
            "mid",
            &format!("{}/mid:2", stalling.host()),
        ])
        .run()
        .ok();
    assert!(
        push.stderr.contains("stalled") && push.stderr.contains("berth: retrying"),
        "the stall and the retry are said: {}",
        push.stderr
    );
    assert!(json(&push)["retries"].as_u64().unwrap() >= 1);
    assert_eq!(
        stalling
            .counters
            .stalled
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn a_killed_supervisor_is_replaced_and_the_container_keeps_running() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _c = p.cleanup();
    let store = p.store();
    p.berth()
        .args([
            "run",
            "-d",
            "--name",
            "counter",
            "--restart",
            "on-failure",
            "base:1",
            "sh",
            "-c",
            "trap 'exit 7' TERM; i=0; while true; do i=$((i+1)); echo line $i; sleep 0.1; done",
        ])
        .run()
        .ok();
    let get = || {
        containers(&store)
            .into_iter()
            .find(|c| c["name"] == "counter")
            .unwrap()
    };
    let first = get();
    let (pid, supervisor) = (
        first["pid"].as_i64().unwrap(),
        first["supervisor"]["pid"].as_i64().unwrap(),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The next command adopts it: same process, a new supervisor, nothing "lost".
    let now = get();
    assert_eq!(now["pid"].as_i64(), Some(pid), "not restarted: {now}");
    assert_eq!(now["status"], "running");
    assert_ne!(now["supervisor"]["pid"].as_i64(), Some(supervisor));
    assert_eq!(now["supervisor_lost"], false);
    let table = p.berth().args(["ps"]).run().ok().stdout;
    assert!(!table.contains("supervisor lost"), "{table}");
    // The output kept flowing into the log through the change of supervisor.
    std::thread::sleep(Duration::from_millis(500));
    let logs = p.berth().args(["logs", "counter"]).run().ok().stdout;
    let numbers: Vec<u64> = logs
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1) && numbers.len() > 10,
        "no line lost or doubled: {numbers:?}"
    );
    // Its exit is known (the init left it) and the restart policy applies.
    p.berth().args(["stop", "counter"]).run().ok();
    let stopped = get();
    assert_eq!(stopped["exit_code"], 7, "{stopped}");
    assert!(!unreaped_zombie(pid), "the old init was reaped");

    // Killed again, then its process ends while nobody watches: the next command starts
    // it again under on-failure, counting the restart.
    p.berth().args(["start", "counter"]).run().ok();
    let c = get();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c["supervisor"]["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    wait_until("it runs again", 10, || {
        let c2 = get();
        c2["status"] == "running" && c2["pid"] != c["pid"]
    });
    assert_eq!(get()["restarts"], 1);
    assert!(!unreaped_zombie(c["pid"].as_i64().unwrap()));

    // `--rm`, ended while unsupervised: removed by the next command, with its exit known
    // until then to nobody but the init's file.
    p.berth()
        .args([
            "run", "-d", "--rm", "--name", "brief", "base:1", "sleep", "0.5",
        ])
        .run()
        .ok();
    let brief = containers(&store)
        .into_iter()
        .find(|c| c["name"] == "brief")
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(brief["supervisor"]["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !containers(&store).iter().any(|c| c["name"] == "brief"),
        "the --rm container is gone"
    );
}

#[test]
fn an_agent_host_keeps_its_releases_through_gc_and_adopts_its_replicas() {
    let net = 161;
    let mut hosts = TestHosts::new(net, 1);
    let reg = Registry::start_at(&format!("198.18.{net}.1"), &[], "");
    let p = TempProject::new();
    p.with_busybox_base();
    let token = "durability-token-0123456789";
    p.file("token", token);
    hosts.start_agent(0, &p.path().join("token"));
    let agent_store = hosts.states[0].path().join("store");
    p.file(
        "environments/uat.toml",
        &format!(
            "registry = \"http://{}/shop\"\nhosts = [\"http://{}:7443\"]\n[rollout]\ndrain = \"0s\"\nkeep = 2\n",
            reg.host(),
            hosts.addr(0)
        ),
    );
    let page = |text: &str| {
        p.file("www/index.html", text).file(
            "berth.toml",
            "[app]\nname = \"shop\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"www/\", \"/www/\"]\n\
             [[image.steps]]\ncmd = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             [services.web]\nports = [\"8080:8080\"]\n\
             health = { http = \"/\", port = 8080, interval = \"100ms\", timeout = \"1s\", retries = 3 }\n",
        );
    };
    let deploy = |args: &[&str]| {
        p.berth()
            .env("BERTH_AGENT_TOKEN", token)
            .args(args)
            .run()
            .ok()
    };
    let serving =
        |text: &str| util::http_get_at(&format!("{}:8080", hosts.addr(0)), "/").ends_with(text);
    page("one\n");
    deploy(&["deploy", "--env", "uat"]);
    page("two\n");
    deploy(&["deploy", "--env", "uat"]);
    assert!(serving("two\n"));

    // The agent's store has no tags: gc there must still keep both releases.
    util::Berth::new()
        .env("BERTH_STORE", agent_store.to_str().unwrap())
        .args(["gc"])
        .run()
        .ok();
    let web = web_replica(&agent_store);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(web["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the replica runs again", 20, || {
        let w = web_replica_opt(&agent_store);
        w.is_some_and(|w| w["pid"] != web["pid"]) && serving("two\n")
    });

    // Its supervisor killed: the agent's reconciler adopts the replica as it runs.
    let web = web_replica(&agent_store);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(web["supervisor"]["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the agent adopts the replica", 15, || {
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                agent_store
                    .join("berth/containers")
                    .join(web["id"].as_str().unwrap())
                    .join("state.json"),
            )
            .unwrap(),
        )
        .unwrap();
        state["supervisor"]["pid"].as_i64().is_some_and(|s| {
            s != web["supervisor"]["pid"].as_i64().unwrap()
                && Path::new(&format!("/proc/{s}")).exists()
        })
    });
    assert_eq!(
        web_replica(&agent_store)["pid"],
        web["pid"],
        "not restarted"
    );

    // Release 1's image lost from the agent's store: a rollback pulls it again by digest.
    let blobs = agent_store.join("blobs/sha256");
    let release1 = deploy(&["--json", "releases", "--env", "uat"]);
    let list = json(&release1);
    let digest = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["number"] == 1)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    std::fs::remove_file(blobs.join(&digest)).unwrap();
    deploy(&["rollback", "--env", "uat", "--to", "1"]);
    assert!(serving("one\n"));
    assert!(blobs.join(&digest).exists(), "pulled again");
}

fn web_replica_opt(store: &Path) -> Option<serde_json::Value> {
    containers(store)
        .into_iter()
        .find(|c| c["status"] == "running" && c["name"].as_str().unwrap().contains("web"))
}

/// A tmpfs of `mb` MiB mounted on `dir`, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(dir: &Path, mb: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        util::run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={mb}m"))
                .arg("tmpfs")
                .arg(dir),
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn processes_running(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.replace('\0', " ").trim_end() == needle)
        })
        .collect()
}

#[test]
fn a_full_disk_fails_run_with_exit_1_and_leaves_nothing_unseen() {
    let p = TempProject::new();
    p.with_busybox_base();
    let mount = Tmpfs::new(&p.path().join("small"), 16);
    let store = mount.0.join("store");
    let berth = |args: &[&str]| {
        util::Berth::new()
            .env("BERTH_STORE", store.to_str().unwrap())
            .args(args)
            .run()
    };
    let rootfs = p.path().join("rootfs");
    util::busybox_rootfs(&rootfs);
    berth(&["import", rootfs.to_str().unwrap(), "--tag", "base:1"]).ok();
    // Unpack the base once, so what is left to fill is the containers' own writes.
    berth(&["run", "--rm", "base:1", "true"]).ok();
    let fill = mount.0.join("fill");
    let mut seen = Vec::new();
    for free_kib in [4u64, 12, 24, 48, 96, 192] {
        let _ = std::fs::remove_file(&fill);
        let stat = nix::sys::statvfs::statvfs(&mount.0).unwrap();
        let avail = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        let size = avail.saturating_sub(free_kib << 10);
        std::fs::write(&fill, vec![0u8; size as usize]).ok();
        let marker = format!("sleep 4242{free_kib}");
        let run = berth(&["run", "-d", "base:1", "sleep", &format!("4242{free_kib}")]);
        seen.push((free_kib, run.code));
        assert!(
            run.code == 0 || run.code == 1,
            "{free_kib} KiB free: exit {} ({})",
            run.code,
            run.stderr
        );
        if run.code == 1 {
            assert!(!run.stderr.trim().is_empty(), "the cause is said");
        }
        let _ = std::fs::remove_file(&fill);
        // Whatever runs is listed as running, and so can be stopped.
        let listed = containers(&store);
        let running = processes_running(&marker);
        let listed_running = listed
            .iter()
            .filter(|c| c["status"] == "running" && c["command"][1] == format!("4242{free_kib}"))
            .count();
        assert_eq!(
            running.len(),
            listed_running,
            "{free_kib} KiB free: processes {running:?}, containers {listed:?}"
        );
        let dirs = names(&store.join("berth/containers"));
        assert_eq!(
            dirs.iter().filter(|d| !d.starts_with('.')).count(),
            listed.len(),
            "every container directory is listed: {dirs:?}"
        );
        for c in listed {
            berth(&["rm", "-f", c["id"].as_str().unwrap()]).ok();
        }
        assert!(processes_running(&marker).is_empty());
    }
    assert!(
        seen.iter().any(|(_, code)| *code == 1),
        "the disk was full enough to fail a run: {seen:?}"
    );
}
