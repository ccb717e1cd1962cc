//! Dockerfiles as users bring them: `berth build -f` without a berth.toml, ignore files,
//! BuildKit's `RUN --mount` (cache, secret, tmpfs, bind), ONBUILD, ADD of a URL, and bases
//! pulled from a real registry. Everything is checked from outside: what a container of
//! the image sees, what the layers hold, what the store holds.

mod util;

use std::process::Command;

use util::*;

/// A project directory with a busybox base (`base:1`) in its store and no berth.toml.
fn bare() -> TempProject {
    let p = TempProject::new();
    p.with_busybox_base();
    p
}

/// Every file path the image's layers hold (whiteouts included), layer by layer.
fn layer_paths(p: &TempProject, image: &str) -> Vec<Vec<String>> {
    let run = p.berth().args(["inspect", image]).run().ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    v["manifest"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let d = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
            let blob = p.store().join("blobs/sha256").join(d);
            let out = run_ok(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("zcat {} | tar t", blob.display())),
            );
            out.lines().map(str::to_string).collect()
        })
        .collect()
}

/// Every byte of every file under `dir`, searched for `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                // Layers are compressed: look inside gzip blobs too.
                let plain = if bytes.starts_with(&[0x1f, 0x8b]) {
                    let mut out = Vec::new();
                    let _ = std::io::Read::read_to_end(
                        &mut flate2::read::MultiGzDecoder::new(&bytes[..]),
                        &mut out,
                    );
                    out
                } else {
                    bytes
                };
                if plain.windows(needle.len()).any(|w| w == needle) {
                    hits.push(e.path().display().to_string());
                }
            }
        }
    }
    hits
}

#[test]
fn build_f_works_without_a_berth_toml() {
    let p = bare();
    p.file(
        "ctx/Dockerfile",
        "FROM base:1\nCOPY . /app/\nCMD [\"ls\", \"/app\"]\n",
    )
    .file("ctx/a.txt", "a\n")
    .file("ctx/b.log", "b\n")
    .file("ctx/.containerignore", "*.log\n")
    .file("other/Special.Dockerfile", "FROM base:1\nCOPY . /app/\n")
    .file("other/Special.Dockerfile.dockerignore", "*.txt\n");
    // docker build -t app:1 ctx
    p.berth().args(["build", "-t", "app:1", "ctx"]).run().ok();
    let ls = p.berth().args(["run", "--rm", "app:1"]).run().ok().stdout;
    assert!(ls.contains("a.txt") && !ls.contains("b.log"), "{ls}");
    // docker build -f other/Special.Dockerfile -t app:2 ctx: the Dockerfile's own ignore
    // file replaces the context's.
    p.berth()
        .args([
            "build",
            "-f",
            "other/Special.Dockerfile",
            "-t",
            "app:2",
            "ctx",
        ])
        .run()
        .ok();
    let ls = p
        .berth()
        .args(["run", "--rm", "app:2", "ls", "/app"])
        .run()
        .ok()
        .stdout;
    assert!(ls.contains("b.log") && !ls.contains("a.txt"), "{ls}");
    // Layers are indexed once (a rebuild places a COPY without reading them); a torn
    // index is rebuilt from the layer.
    let index = p.store().join("berth/layer-index");
    let indexes: Vec<_> = std::fs::read_dir(&index).unwrap().flatten().collect();
    assert!(!indexes.is_empty(), "no layer index in {}", index.display());
    for e in &indexes {
        std::fs::write(e.path(), "{torn").unwrap();
    }
    p.file("ctx/a.txt", "a2\n");
    p.berth().args(["build", "-t", "app:1", "ctx"]).run().ok();
    let ls = p
        .berth()
        .args(["run", "--rm", "app:1", "cat", "/app/a.txt"])
        .run()
        .ok()
        .stdout;
    assert_eq!(ls, "a2\n");
    // Without -t the image is still there, by digest.
    let digest = p.berth().args(["build", "ctx"]).run().ok().last_line();
    assert!(digest.starts_with("sha256:"), "{digest}");
    p.berth().args(["run", "--rm", &digest]).run().ok();
    // No Dockerfile: a clear error, not "no berth.toml".
    let err = p.berth().args(["build", "other"]).run().code(2);
    assert!(
        err.stderr.contains("no Dockerfile or Containerfile"),
        "{}",
        err.stderr
    );
    // Without -f or a context, a directory with no berth.toml says what to do.
    let err = p.berth().args(["build"]).run().code(2);
    assert!(err.stderr.contains("berth.toml"), "{}", err.stderr);
}

#[test]
fn run_mount_cache_persists_and_never_reaches_a_layer() {
    let p = bare();
    p.file(
        "Dockerfile",
        "FROM base:1\nRUN --mount=type=cache,target=/var/cache/app,sharing=locked sh -c 'n=$(cat /var/cache/app/n 2>/dev/null || echo 0); echo $((n+1)) > /var/cache/app/n; echo run-$n > /result'\nCMD [\"cat\", \"/result\"]\n",
    );
    for want in ["run-0\n", "run-1\n", "run-2\n"] {
        // --no-cache reruns the step; the cache mount keeps what the last run left.
        p.berth()
            .args(["build", "--no-cache", "-t", "c:1", "."])
            .run()
            .ok();
        assert_eq!(
            p.berth().args(["run", "--rm", "c:1"]).run().ok().stdout,
            want
        );
    }
    for layer in layer_paths(&p, "c:1").iter().skip(1) {
        assert!(
            !layer.iter().any(|f| f.contains("var/cache")),
            "the cache mount is not layer content: {layer:?}"
        );
    }
    let gc = p.berth().args(["gc", "--cache"]).run().ok().stdout;
    assert!(gc.contains("removed cache mount /var/cache/app"), "{gc}");
    p.berth()
        .args(["build", "--no-cache", "-t", "c:1", "."])
        .run()
        .ok();
    assert_eq!(
        p.berth().args(["run", "--rm", "c:1"]).run().ok().stdout,
        "run-0\n",
        "gc --cache emptied it"
    );
}

#[test]
fn run_mount_secret_reaches_the_step_and_nothing_else() {
    let p = bare();
    let value = "tok-3f9a1c77e2-never-in-a-layer";
    p.file("secrets/npm", value).file(
        "Dockerfile",
        "FROM base:1\nRUN --mount=type=secret,id=npm sh -c 'sha256sum /run/secrets/npm | cut -c1-64 > /sum && stat -c %a /run/secrets/npm > /mode'\nRUN --mount=type=secret,id=npm,target=/root/.npmrc,mode=0440 --mount=type=secret,id=npm,env=NPM_TOKEN sh -c 'test -r /root/.npmrc && echo ${#NPM_TOKEN} > /len'\nRUN --mount=type=secret,id=absent echo optional secrets may be missing\n",
    );
    let build = p
        .berth()
        .args([
            "--json",
            "build",
            "--secret",
            "id=npm,src=secrets/npm",
            "-t",
            "s:1",
            ".",
        ])
        .run()
        .ok();
    assert!(!build.stdout.contains(value) && !build.stderr.contains(value));
    let sum = run_ok(Command::new("sha256sum").arg(p.path().join("secrets/npm")));
    assert_eq!(
        p.berth()
            .args(["run", "--rm", "s:1", "cat", "/sum", "/mode", "/len"])
            .run()
            .ok()
            .stdout,
        format!("{}\n400\n{}\n", &sum[..64], value.len())
    );
    // Not in a layer, a config, the history, the cache records or anywhere in the store.
    let hits = files_containing(&p.store(), value.as_bytes());
    assert!(hits.is_empty(), "the secret is in {hits:?}");
    let history = p.berth().args(["history", "s:1"]).run().ok().stdout;
    assert!(!history.contains(value), "{history}");
    for layer in layer_paths(&p, "s:1").iter().skip(1) {
        assert!(
            !layer
                .iter()
                .any(|f| f.contains("secrets") || f.contains(".npmrc")),
            "mount points are not layer content: {layer:?}"
        );
    }
    // A required secret that is not given stops the build with the reason.
    p.file(
        "Dockerfile",
        "FROM base:1\nRUN --mount=type=secret,id=npm,required echo x\n",
    );
    let err = p.berth().args(["build", "--no-cache", "."]).run().code(2);
    assert!(err.stderr.contains("`npm` is required"), "{}", err.stderr);
}

#[test]
fn run_mount_bind_and_tmpfs() {
    let p = bare();
    p.file("src/data.txt", "from-context\n")
        .file("src/private.key", "ignored\n")
        .file(".dockerignore", "src/private.key\n")
        .file(
            "Dockerfile",
            "FROM base:1 AS tools\nRUN mkdir /out && echo from-stage > /out/result\nFROM base:1\nRUN --mount=type=bind,source=src,target=/mnt/src sh -c 'cat /mnt/src/data.txt > /seen; ls /mnt/src >> /seen; touch /mnt/src/new 2>/dev/null || echo read-only >> /seen'\nRUN --mount=type=bind,from=tools,source=/out,target=/tools cat /tools/result >> /seen\nRUN --mount=type=tmpfs,target=/scratch sh -c 'echo x > /scratch/f && echo tmpfs-ok >> /seen'\nCMD [\"cat\", \"/seen\"]\n",
        );
    p.berth().args(["build", "-t", "b:1", "."]).run().ok();
    assert_eq!(
        p.berth().args(["run", "--rm", "b:1"]).run().ok().stdout,
        "from-context\ndata.txt\nread-only\nfrom-stage\ntmpfs-ok\n",
        "the ignore file applies to bind mounts; binds are read-only unless rw"
    );
    for layer in layer_paths(&p, "b:1").iter().skip(3) {
        assert!(
            layer.iter().all(|f| !f.starts_with("mnt")
                && !f.starts_with("tools")
                && !f.starts_with("scratch")),
            "{layer:?}"
        );
    }
    // The bound files are part of the step's cache key.
    p.file("src/data.txt", "changed\n");
    let again = p
        .berth()
        .args(["build", "--explain", "-t", "b:1", "."])
        .run()
        .ok();
    assert!(
        again
            .stdout
            .lines()
            .any(|l| l.contains("MISS") && l.contains("src/data.txt changed")),
        "{}",
        again.stdout
    );
}

#[test]
fn run_steps_get_what_docker_gives_them() {
    let p = bare();
    // /run and /etc/hostname exist in a RUN step even when the image lacks them.
    p.file(
        "Dockerfile",
        "FROM base:1\nRUN rm -rf /run /etc/hostname\nRUN test -d /run && test -s /etc/hostname && echo present > /seen\nRUN --mount=type=tmpfs,target=/t,size=1m sh -c 'dd if=/dev/zero of=/t/big bs=1k count=2048 2>/dev/null || echo tmpfs-full >> /seen'\nRUN --mount=type=cache,target=/c,sharing=private sh -c 'echo private >> /seen'\nCMD [\"cat\", \"/seen\"]\n",
    );
    p.berth().args(["build", "-t", "r:1", "."]).run().ok();
    assert_eq!(
        p.berth().args(["run", "--rm", "r:1"]).run().ok().stdout,
        "present\ntmpfs-full\nprivate\n",
        "/run and /etc/hostname are there; a tmpfs mount's size is its limit"
    );
    // No network unless asked, and a failing download says how to ask.
    p.file(
        "Dockerfile",
        "FROM base:1\nRUN wget -q -T 2 -O /x http://198.18.0.1/file\n",
    );
    let err = p.berth().args(["build", "."]).run().code(1);
    let said = err.stderr.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        said.contains("build with `--network host`") && said.contains("RUN --network=host"),
        "{said}"
    );
    // `-f -`: the Dockerfile from stdin, the context from the argument.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["build", "-f", "-", "-t", "stdin:1"])
        .arg(p.path())
        .env("BERTH_STORE", p.store())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"FROM base:1\nCMD [\"echo\", \"from stdin\"]\n",
    )
    .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        p.berth().args(["run", "--rm", "stdin:1"]).run().ok().stdout,
        "from stdin\n"
    );
}

#[test]
fn onbuild_triggers_run_in_the_child() {
    let p = bare();
    p.file(
        "parent/Dockerfile",
        "FROM base:1\nONBUILD COPY greeting.txt /greeting.txt\nONBUILD RUN echo child-ran > /child\n",
    )
    .file("child/Dockerfile", "FROM parent:1\nCMD [\"cat\", \"/greeting.txt\", \"/child\"]\n")
    .file("child/greeting.txt", "hello\n");
    p.berth()
        .args(["build", "-t", "parent:1", "parent"])
        .run()
        .ok();
    let parent: serde_json::Value =
        serde_json::from_str(&p.berth().args(["inspect", "parent:1"]).run().ok().stdout).unwrap();
    assert_eq!(
        parent["config"]["config"]["OnBuild"],
        serde_json::json!([
            "COPY greeting.txt /greeting.txt",
            "RUN echo child-ran > /child"
        ])
    );
    p.berth()
        .args(["build", "-t", "child:1", "child"])
        .run()
        .ok();
    assert_eq!(
        p.berth().args(["run", "--rm", "child:1"]).run().ok().stdout,
        "hello\nchild-ran\n"
    );
    let child: serde_json::Value =
        serde_json::from_str(&p.berth().args(["inspect", "child:1"]).run().ok().stdout).unwrap();
    assert!(
        child["config"]["config"]["OnBuild"].is_null(),
        "triggers are not inherited: {}",
        child["config"]["config"]
    );
}

#[test]
fn add_fetches_a_url_and_checks_its_digest() {
    let p = bare();
    // A one-file web server on loopback, for as long as the test runs.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = "echo fetched\n";
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for conn in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut conn = conn;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let www = p.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("tool.sh"), body).unwrap();
    let sum = "sha256:6b1cab5f1a5d0c2e8a3a8e77a8a7b7d4be0ad4a35fd0b2a3e8e59d2f6c1f0a1b";
    let real = run_ok(Command::new("sha256sum").arg(www.join("tool.sh")));
    let real = format!("sha256:{}", real.split_whitespace().next().unwrap());
    p.file(
        "Dockerfile",
        &format!(
            "FROM base:1\nADD http://127.0.0.1:{port}/tool.sh /opt/\nADD --checksum={real} http://127.0.0.1:{port}/tool.sh /opt/checked.sh\nCMD [\"sh\", \"-c\", \"stat -c %a /opt/tool.sh; sh /opt/checked.sh\"]\n"
        ),
    );
    p.berth().args(["build", "-t", "u:1", "."]).run().ok();
    assert_eq!(
        p.berth().args(["run", "--rm", "u:1"]).run().ok().stdout,
        "600\nfetched\n",
        "a fetched file is 0600, as Docker makes it"
    );
    p.file(
        "Dockerfile",
        &format!("FROM base:1\nADD --checksum={sum} http://127.0.0.1:{port}/tool.sh /opt/\n"),
    );
    let err = p.berth().args(["build", "."]).run().code(2);
    assert!(err.stderr.contains("not the --checksum"), "{}", err.stderr);
}

#[test]
fn a_missing_base_is_pulled_from_its_registry() {
    let reg = Registry::start(&[]);
    let p = bare();
    let remote = format!("{}/team/base:1", reg.host());
    p.berth().args(["push", "base:1", &remote]).run().ok();
    p.file(
        "Dockerfile",
        &format!("FROM {remote}\nRUN echo built-on-pulled > /x\nCMD [\"cat\", \"/x\"]\n"),
    );
    // --pull never: the store lacks it, and the error says how to get it.
    let err = p
        .berth()
        .args(["build", "--pull", "never", "."])
        .run()
        .code(2);
    assert!(err.stderr.contains("berth pull"), "{}", err.stderr);
    p.berth().args(["build", "-t", "p:1", "."]).run().ok();
    assert_eq!(
        p.berth().args(["run", "--rm", "p:1"]).run().ok().stdout,
        "built-on-pulled\n"
    );
    let images = p.berth().args(["images"]).run().ok().stdout;
    assert!(images.contains(&remote), "{images}");
    // `run` pulls what the store lacks too, as `docker run` does (`--pull never` refuses).
    let app = format!("{}/team/app:1", reg.host());
    p.berth().args(["push", "p:1", &app]).run().ok();
    let err = p
        .berth()
        .args(["run", "--rm", "--pull", "never", &app])
        .run()
        .code(2);
    assert!(err.stderr.contains("not in the store"), "{}", err.stderr);
    assert_eq!(
        p.berth().args(["run", "--rm", &app]).run().ok().stdout,
        "built-on-pulled\n"
    );
    // `--pull always` fetches the tag again; the default keeps what the store has.
    p.berth().args(["push", "p:1", &remote]).run().ok();
    p.file("Dockerfile", &format!("FROM {remote}\nRUN cat /x\n"));
    let stale = p.berth().args(["build", "."]).run().code(1);
    assert!(stale.stderr.contains("/x"), "{}", stale.stderr);
    p.berth()
        .args(["build", "--pull", "always", "."])
        .run()
        .ok();
    // Docker Hub names are normalised before the store and the network are asked.
    p.file("Dockerfile", "FROM docker.io/nosuchimage-berth-test\n");
    let err = p
        .berth()
        .args(["build", "--pull", "never", "."])
        .run()
        .code(2);
    assert!(
        err.stderr.contains("nosuchimage-berth-test"),
        "{}",
        err.stderr
    );
}

#[test]
fn entrypoint_keeps_a_cmd_of_its_own_stage_and_resets_an_inherited_one() {
    let p = bare();
    p.file(
        "parent/Dockerfile",
        "FROM base:1\nCMD [\"inherited\"]\n",
    )
    .file(
        "child/Dockerfile",
        "FROM parent:1\nSHELL [\"/bin/sh\", \"-ec\"]\nENTRYPOINT [\"echo\"]\n",
    )
    .file(
        "own/Dockerfile",
        "FROM parent:1\nSHELL [\"/bin/sh\", \"-ec\"]\nCMD echo own\nENTRYPOINT [\"/bin/sh\", \"-c\", \"exec \\\"$@\\\"\", \"--\"]\n",
    );
    p.berth()
        .args(["build", "-t", "parent:1", "parent"])
        .run()
        .ok();
    let config = |p: &TempProject, image: &str| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&p.berth().args(["inspect", image]).run().ok().stdout).unwrap();
        v["config"]["config"].clone()
    };
    p.berth()
        .args(["build", "-t", "child:1", "child"])
        .run()
        .ok();
    assert!(
        config(&p, "child:1")["Cmd"].is_null(),
        "{}",
        config(&p, "child:1")
    );
    p.berth().args(["build", "-t", "own:1", "own"]).run().ok();
    assert_eq!(
        config(&p, "own:1")["Cmd"],
        serde_json::json!(["/bin/sh", "-ec", "echo own"]),
        "a CMD of the same stage survives ENTRYPOINT, in the SHELL's form"
    );
    assert_eq!(
        p.berth().args(["run", "--rm", "own:1"]).run().ok().stdout,
        "own\n"
    );
}

#[test]
fn what_an_outside_probe_found() {
    let p = bare();
    p.file("sec.txt", "s3\n");
    // Mount targets reached through the image's symlinks leave nothing in the layer; one
    // cache mounted twice with sharing=locked does not wait for itself; HOME is the user's.
    p.file(
        "Dockerfile",
        "FROM base:1\nRUN ln -s /tmp/esc /x && mkdir -p /tmp/esc\nRUN --mount=type=secret,id=s,target=/x/secret --mount=type=cache,id=dl,target=/a,sharing=locked --mount=type=cache,id=dl,target=/b,sharing=locked sh -c 'cat /x/secret > /seen; touch /a/x; ls /b >> /seen; echo $HOME >> /seen'\nCMD [\"cat\", \"/seen\"]\n",
    );
    p.berth()
        .args([
            "build",
            "--secret",
            "id=s,src=sec.txt",
            "-t",
            "probe:1",
            ".",
        ])
        .run()
        .ok();
    assert_eq!(
        p.berth().args(["run", "--rm", "probe:1"]).run().ok().stdout,
        "s3\nx\n/root\n"
    );
    let layers = layer_paths(&p, "probe:1");
    assert_eq!(
        layers.last().unwrap(),
        &["seen"],
        "only what the command wrote"
    );
    // An archive that writes through a link it made is refused at build time.
    let tar_dir = p.path().join("tarsrc");
    std::fs::create_dir_all(&tar_dir).unwrap();
    std::os::unix::fs::symlink("/etc", tar_dir.join("evil")).unwrap();
    let tar = p.path().join("evil.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tar).unwrap());
        b.follow_symlinks(false);
        b.append_path_with_name(tar_dir.join("evil"), "evil")
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "evil/slip", &b"x\n"[..]).unwrap();
        b.finish().unwrap();
    }
    p.file("Dockerfile", "FROM base:1\nADD evil.tar /t/\n");
    let err = p.berth().args(["build", "."]).run().code(2);
    assert!(
        err.stderr.contains("does not write through links"),
        "{}",
        err.stderr
    );
    // Clear errors, exit 2, for bad mounts and stage names; Dockerfiles on stdin work.
    for (dockerfile, needle) in [
        (
            "FROM base:1\nRUN --mount=type=tmpfs,target=/ true\n",
            "cannot replace the root",
        ),
        ("FROM base:1 AS a\nFROM base:1 AS A\n", "already defined"),
        ("FROM base:1 AS a\nCOPY --from=a /x /y\n", "circular"),
        (
            "FROM base:1 AS a\nFROM base:1\nCOPY --from=a /nonexist /y\n",
            "`/nonexist` does not exist in a",
        ),
        (
            "FROM --platform=linux/s390x base:1\n",
            "this machine's platform",
        ),
        (
            "FROM base:1\nRUN --mount=type=secret,id=s,mode=999 true\n",
            "not an octal mode",
        ),
    ] {
        p.file("Dockerfile", dockerfile);
        let err = p
            .berth()
            .args(["build", "--pull", "never", "."])
            .run()
            .code(2);
        assert!(err.stderr.contains(needle), "{dockerfile}: {}", err.stderr);
    }
    // `--target` is case-insensitive like stage names; `docker.io/library/X` finds `X`.
    p.file(
        "Dockerfile",
        "FROM docker.io/library/base:1 AS Build\nRUN echo b > /b\nFROM base:1\n",
    );
    p.berth()
        .args([
            "build", "--pull", "never", "--target", "build", "-t", "t:1", ".",
        ])
        .run()
        .ok();
    assert_eq!(
        p.berth()
            .args(["run", "--rm", "t:1", "cat", "/b"])
            .run()
            .ok()
            .stdout,
        "b\n"
    );
}

#[test]
fn import_change_sets_the_config_as_docker_import_does() {
    let p = TempProject::new();
    let rootfs = p.path().join("rootfs");
    busybox_rootfs(&rootfs);
    p.berth()
        .args(["import", "--tag", "imp:1"])
        .args(["-c", "ENV GREETING=\"hello world\""])
        .args(["-c", "CMD echo $GREETING from $PWD"])
        .args(["-c", "WORKDIR /tmp"])
        .arg(&rootfs)
        .run()
        .ok();
    assert_eq!(
        p.berth().args(["run", "--rm", "imp:1"]).run().ok().stdout,
        "hello world from /tmp\n"
    );
    let err = p
        .berth()
        .args(["import", "--tag", "imp:2", "-c", "RUN true"])
        .arg(&rootfs)
        .run()
        .code(2);
    assert!(err.stderr.contains("not the config"), "{}", err.stderr);
}
