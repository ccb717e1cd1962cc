//! The build engine and the image commands, end to end: real files, the built binary, and
//! real peers (skopeo, umoci, podman) reading what berth wrote.

mod util;

use std::process::Command;

use util::{Berth, TempProject, repo_root, require, run_ok};

const NODE_APP: &str = r#"[app]
name = "shop"
[image]
from = "base:1"
context = "app"
dockerfile = "Dockerfile"
"#;

const DOCKERFILE: &str = "FROM base:1\nWORKDIR /app\nCOPY package.json ./\nCOPY . .\nEXPOSE 3000\nCMD [\"/bin/sh\", \"server.sh\"]\n";

fn node_project() -> TempProject {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file("berth.toml", NODE_APP)
        .file("app/Dockerfile", DOCKERFILE)
        .file("app/package.json", "{\"name\": \"shop\"}\n")
        .file("app/server.sh", "echo serving\n")
        .file("app/lib/util.sh", "echo util\n")
        .file("app/.dockerignore", "*.log\n")
        .file("app/debug.log", "noise\n");
    p
}

fn layers(p: &TempProject, image: &str) -> Vec<String> {
    let run = p.berth().args(["inspect", image]).run().ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    v["manifest"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_demo_builds_caches_and_reproduces_from_a_fresh_clone() {
    require("git", "git");
    let mut digests = Vec::new();
    for _ in 0..2 {
        // Two clones in different directories, each with its own store.
        let p = TempProject::new();
        run_ok(
            Command::new("git")
                .args(["clone", "-q"])
                .arg(repo_root())
                .arg(p.path().join("repo")),
        );
        p.with_busybox_base();
        let repo = p.path().join("repo");
        let build = || {
            Berth::new()
                .args(["-C"])
                .args([&repo])
                .env("BERTH_STORE", p.store().to_str().unwrap())
                .args(["build", "--explain"])
                .run()
                .ok()
        };
        let first = build();
        assert!(first.stdout.contains("MISS"), "{}", first.stdout);
        let second = build();
        assert!(
            !second.stdout.contains("MISS") && second.stdout.contains("HIT"),
            "all cache hits: {}",
            second.stdout
        );
        assert_eq!(first.last_line(), second.last_line());
        assert!(first.last_line().starts_with("sha256:") && first.last_line().len() == 71);
        // A clean checkout's image is dated by its commit (reproducibly), not 1970.
        let committed = run_ok(
            Command::new("git")
                .arg("-C")
                .arg(&repo)
                .args([
                    "log",
                    "-1",
                    "--format=%cd",
                    "--date=format-local:%Y-%m-%dT%H:%M:%SZ",
                ])
                .env("TZ", "UTC"),
        );
        let config = |digest: &str| -> serde_json::Value {
            let inspected = Berth::new()
                .args(["inspect", digest])
                .env("BERTH_STORE", p.store().to_str().unwrap())
                .run()
                .ok();
            serde_json::from_str::<serde_json::Value>(&inspected.stdout).unwrap()["config"].clone()
        };
        let v = config(&first.last_line());
        assert_eq!(v["created"], committed.trim(), "{v}");
        digests.push(first.last_line());
        if digests.len() == 1 {
            // A file the commit lacks: the tree is dirty, the image says so and claims no
            // commit's date.
            std::fs::write(repo.join("untracked.txt"), "x\n").unwrap();
            let v = config(&build().last_line());
            assert_eq!(v["created"], "1970-01-01T00:00:00Z");
            assert_eq!(v["config"]["Labels"]["dev.berth.git.dirty"], "true", "{v}");
        }
    }
    assert_eq!(
        digests[0], digests[1],
        "same commit, different directories: same digest"
    );
}

#[test]
fn skopeo_umoci_and_podman_read_what_berth_builds() {
    require("skopeo", "skopeo");
    require("umoci", "umoci");
    require("podman", "podman");
    let p = node_project();
    let digest = p.berth().args(["build"]).run().ok().last_line();
    let store = p.store();
    let inspect = run_ok(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:shop:latest", store.display())),
    );
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(
        v["Digest"],
        digest.as_str(),
        "skopeo sees the digest berth printed"
    );

    let bundle = p.path().join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:shop:latest", store.display()))
            .arg(&bundle),
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/app/server.sh")).unwrap(),
        "echo serving\n"
    );
    assert!(
        !bundle.join("rootfs/app/debug.log").exists(),
        ".dockerignore is respected"
    );
    assert!(bundle.join("rootfs/bin/sh").is_symlink());

    let archive = p.path().join("shop.tar");
    p.berth()
        .args(["export", "shop", "-o"])
        .args([&archive])
        .args(["--format", "docker"])
        .run()
        .ok();
    let podman_root = p.path().join("podman");
    let out = run_ok(
        Command::new("podman")
            .arg("--root")
            .arg(&podman_root)
            .arg("--runroot")
            .arg(p.path().join("podman-run"))
            .args(["load", "-i"])
            .arg(&archive),
    );
    assert!(out.contains("shop:latest"), "{out}");
    let _ = Command::new("podman")
        .arg("--root")
        .arg(&podman_root)
        .arg("--runroot")
        .arg(p.path().join("podman-run"))
        .args(["system", "reset", "-f"])
        .output();

    let oci = p.path().join("shop-oci.tar");
    p.berth()
        .args(["export", "shop", "-o"])
        .args([&oci])
        .run()
        .ok();
    let inspect = run_ok(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", oci.display())),
    );
    assert!(inspect.contains(&digest));
}

#[test]
fn a_one_file_change_rebuilds_only_the_last_layer() {
    let p = node_project();
    p.berth().args(["build"]).run().ok();
    let before = layers(&p, "shop");
    p.file("app/server.sh", "echo serving v2\n");
    let run = p.berth().args(["build", "--explain"]).run().ok();
    let after = layers(&p, "shop");
    assert_eq!(
        before.len(),
        4,
        "base + WORKDIR's directory (as BuildKit makes it) + package.json + the rest"
    );
    assert_eq!(
        before[..3],
        after[..3],
        "base, /app and package.json layers are reused"
    );
    assert_ne!(before[3], after[3]);
    assert!(
        run.stdout.contains("server.sh changed"),
        "--explain names the file: {}",
        run.stdout
    );
    let verbose = p.berth().args(["-v", "build"]).run().ok();
    assert!(
        verbose.stdout.contains("(app/Dockerfile:3)"),
        "-v shows where each step was written: {}",
        verbose.stdout
    );
    let v: serde_json::Value =
        serde_json::from_str(&p.berth().args(["--json", "build"]).run().ok().stdout).unwrap();
    let statuses: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["hit", "hit", "hit", "config", "config"]);
}

#[test]
fn build_args_and_the_base_are_explained() {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file("berth.toml", "[app]\nname = \"a\"\n[image]\nfrom = \"base:1\"\ncontext = \".\"\ndockerfile = \"Dockerfile\"\n")
        .file("Dockerfile", "FROM base:1\nARG VERSION=1\nCOPY v${VERSION}.txt /v.txt\n")
        .file("v1.txt", "one\n")
        .file("v2.txt", "two\n");
    p.berth().args(["build"]).run().ok();
    let run = p
        .berth()
        .args(["build", "--explain", "--build-arg", "VERSION=2"])
        .run()
        .ok();
    assert!(run.stdout.contains("COPY v2.txt /v.txt"), "{}", run.stdout);
    assert!(run.stdout.contains("VERSION=2 (was 1)"), "{}", run.stdout);
}

#[test]
fn multi_stage_builds_keep_only_the_target_stage() {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file("berth.toml", "[app]\nname = \"ms\"\n[image]\nfrom = \"base:1\"\ncontext = \".\"\ndockerfile = \"Dockerfile\"\n")
        .file("Dockerfile", "FROM base:1 AS build\nCOPY src/ /src/\nFROM scratch\nCOPY --from=build --chown=33:33 /src/app.sh /app/run.sh\nCMD [\"/app/run.sh\"]\n")
        .file("src/app.sh", "#!/bin/sh\necho hi\n")
        .file("src/other.txt", "x\n");
    p.berth().args(["build"]).run().ok();
    assert_eq!(layers(&p, "ms").len(), 1, "only the final stage's layer");
    let run = p.berth().args(["--json", "history", "ms"]).run().ok();
    assert!(
        run.stdout
            .contains("COPY --from=build --chown=33:33 /src/app.sh /app/run.sh"),
        "{}",
        run.stdout
    );
}

#[test]
fn bad_input_names_the_step_or_line() {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file("berth.toml", "[app]\nname = \"bad\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"missing/\", \"/x/\"]\n");
    let run = p.berth().args(["build"]).run().code(2);
    assert!(
        run.stderr.contains("[[image.steps]] #1")
            && run.stderr.contains("`missing/` does not exist"),
        "{}",
        run.stderr
    );

    p.file("berth.toml", "[app]\nname = \"bad\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"../etc/passwd\", \"/x\"]\n");
    let run = p.berth().args(["build"]).run().code(2);
    assert!(
        run.stderr.contains("outside the build context"),
        "{}",
        run.stderr
    );

    p.file(
        "berth.toml",
        "[app]\nname = \"bad\"\n[image]\nfrom = \"base:1\"\ndockerfile = \"Dockerfile\"\n",
    )
    .file(
        "Dockerfile",
        "FROM base:1\nCOPY a\nFORM x\nADD ftp://example.com/x /x\n",
    );
    let run = p.berth().args(["build"]).run().code(2);
    for needle in [
        "Dockerfile:2:1",
        "Dockerfile:3:1",
        "unknown instruction `FORM`",
        "did you mean FROM?",
        "Dockerfile:4:1",
        "ADD from ftp://example.com/x is not supported",
    ] {
        assert!(
            run.stderr.contains(needle),
            "missing {needle:?} in {}",
            run.stderr
        );
    }

    // (--pull never: the test asks no network for docker.io/library/nope:1.)
    p.file("Dockerfile", "FROM nope:1\n");
    let run = p.berth().args(["build", "--pull", "never"]).run().code(2);
    assert!(
        run.stderr.contains("image `nope:1` is not in the store"),
        "{}",
        run.stderr
    );
}

#[test]
fn symlinks_are_copied_as_symlinks() {
    let p = TempProject::new();
    p.file("berth.toml", "[app]\nname = \"ln\"\n[image]\nfrom = \"scratch\"\n[[image.steps]]\ncopy = [\"ctx/\", \"/data/\"]\n");
    std::fs::create_dir_all(p.path().join("ctx")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", p.path().join("ctx/shadow")).unwrap();
    p.berth().args(["build"]).run().ok();
    let store = util::run_ok(Command::new("sh").arg("-c").arg(format!(
        "for b in {}/blobs/sha256/*; do gzip -dc $b 2>/dev/null | tar -tvf - 2>/dev/null; done; true",
        p.store().display()
    )));
    assert!(store.contains("data/shadow -> /etc/shadow"), "{store}");
}

#[test]
fn image_commands_tag_remove_and_collect() {
    let p = node_project();
    let digest = p.berth().args(["build"]).run().ok().last_line();
    p.berth().args(["tag", "shop", "shop:v1"]).run().ok();
    let run = p.berth().args(["--json", "images"]).run().ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base:1", "shop:latest", "shop:v1"]);
    assert!(
        v[1]["shared_size"].as_u64().unwrap() > 0,
        "the base layer is shared"
    );
    let run = p.berth().args(["inspect", &digest[..19]]).run().ok();
    assert!(
        run.stdout.contains("\"shop:v1\""),
        "a digest prefix resolves: {}",
        run.stdout
    );

    p.berth().args(["rmi", "shop:v1"]).run().ok();
    assert!(
        p.berth().args(["inspect", "shop:latest"]).run().code == 0,
        "the other tag keeps the image"
    );
    p.berth().args(["rmi", "shop"]).run().ok();
    p.berth().args(["inspect", "shop"]).run().code(2);
    let count = |p: &TempProject| {
        std::fs::read_dir(p.store().join("blobs/sha256"))
            .unwrap()
            .count()
    };
    let before = count(&p);
    p.berth().args(["gc"]).run().ok();
    assert!(count(&p) <= before);
    p.berth().args(["inspect", "base:1"]).run().ok();
    for blob in std::fs::read_dir(p.store().join("blobs/sha256")).unwrap() {
        let blob = blob.unwrap();
        let bytes = std::fs::read(blob.path()).unwrap();
        use sha2::Digest as _;
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            blob.file_name().to_str().unwrap(),
            "every blob matches its name"
        );
    }
    // A rebuild after an edit leaves the old layer behind: `images` says so, `gc` frees it.
    p.berth().args(["build"]).run().ok();
    p.file("app/server.sh", "echo serving v2\n");
    p.berth().args(["build"]).run().ok();
    let listed = p.berth().args(["images"]).run().ok();
    assert!(
        listed
            .stdout
            .contains("no tag, container or kept release needs: `berth gc` removes them"),
        "{}",
        listed.stdout
    );
    // Chunk indexes go with their layers, and where older versions kept them goes too.
    let old_indexes = p.store().join("berth/cache/chunks-b3");
    std::fs::create_dir_all(&old_indexes).unwrap();
    std::fs::write(old_indexes.join("x.json"), "{}").unwrap();
    let indexes = || -> Vec<String> {
        std::fs::read_dir(p.store().join("berth/cache/chunks-b3c"))
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .replace(".json", "")
            })
            .collect()
    };
    let indexed = indexes().len();
    p.berth().args(["gc"]).run().ok();
    let listed = p.berth().args(["images"]).run().ok();
    assert!(
        !listed.stdout.contains("no tag reaches"),
        "{}",
        listed.stdout
    );
    let kept = indexes();
    assert!(kept.len() < indexed, "{indexed} -> {kept:?}");
    for hex in kept {
        assert!(p.store().join("blobs/sha256").join(&hex).exists(), "{hex}");
    }
    assert!(!old_indexes.exists());
}

#[test]
fn concurrent_builds_and_a_killed_build_corrupt_nothing() {
    let p = node_project();
    let children: Vec<_> = (0..3)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_berth"))
                .arg("-C")
                .arg(p.path())
                .env("BERTH_STORE", p.store())
                .args(["build", "--tag", &format!("shop:c{i}")])
                .output()
        })
        .collect();
    for c in children {
        assert!(c.unwrap().status.success());
    }
    // A build of a larger context, killed midway.
    let big: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    p.file("app/big.bin", "");
    std::fs::write(p.path().join("app/big.bin"), &big).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("-C")
        .arg(p.path())
        .env("BERTH_STORE", p.store())
        .args(["build", "--no-cache"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let _ = child.kill();
    let _ = child.wait();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.store().join("index.json")).unwrap()).unwrap();
    assert!(
        index["manifests"].as_array().unwrap().len() >= 4,
        "no tag was lost: {index}"
    );
    for blob in std::fs::read_dir(p.store().join("blobs/sha256")).unwrap() {
        let blob = blob.unwrap();
        use sha2::Digest as _;
        let bytes = std::fs::read(blob.path()).unwrap();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            blob.file_name().to_str().unwrap(),
            "no half blob under a final name"
        );
    }
    p.berth().args(["build"]).run().ok();
}

#[test]
fn zstd_layers_are_reproducible_and_readable() {
    require("skopeo", "skopeo");
    let digests: Vec<String> = (0..2)
        .map(|_| {
            let p = TempProject::new();
            p.with_busybox_base();
            p.file("berth.toml", "[app]\nname = \"z\"\n[image]\nfrom = \"base:1\"\ncompression = \"zstd\"\n[[image.steps]]\ncopy = [\"www/\", \"/www/\"]\n")
                .file("www/index.html", &"zstd layer\n".repeat(10_000));
            let digest = p.berth().args(["build"]).run().ok().last_line();
            let inspect = run_ok(Command::new("skopeo").args(["inspect", "--raw"]).arg(format!("oci:{}:z:latest", p.store().display())));
            assert!(inspect.contains("application/vnd.oci.image.layer.v1.tar+zstd"), "{inspect}");
            // A Docker archive holds the layer decompressed: the zstd stream decodes.
            let archive = p.path().join("z.tar");
            p.berth().args(["export", "z", "--format", "docker", "-o"]).args([&archive]).run().ok();
            let listing = run_ok(Command::new("tar").arg("-tf").arg(&archive));
            assert!(listing.contains("layer.tar"), "{listing}");
            digest
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn a_cached_layer_is_used_only_for_the_compression_it_was_made_with() {
    require("skopeo", "skopeo");
    let p = TempProject::new();
    p.with_busybox_base();
    // A heredoc, a WORKDIR that creates its directory, a context COPY and a RUN: every
    // kind of step with a layer of its own.
    p.file(
        "app/Dockerfile",
        "FROM base:1\nCOPY <<EOF /note\nhi\nEOF\nWORKDIR /made/here\nCOPY . /app/\nRUN echo ran > /ran\n",
    )
    .file("app/index.html", "hello\n");
    let media_types = |compression: &str| {
        p.file(
            "berth.toml",
            &format!("{NODE_APP}compression = \"{compression}\"\n"),
        );
        p.berth().args(["build"]).run().ok();
        let raw = run_ok(
            Command::new("skopeo")
                .args(["inspect", "--raw"])
                .arg(format!("oci:{}:shop:latest", p.store().display())),
        );
        let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let gzip = media_types("gzip");
    assert_eq!(gzip.len(), 5, "{gzip:?}");
    // The same steps again in the same store, now zstd: no gzip layer comes from the cache
    // (the base's own layer stays as it was imported).
    let zstd = media_types("zstd");
    assert_eq!(zstd[0], gzip[0]);
    for t in &zstd[1..] {
        assert!(t.ends_with("tar+zstd"), "{zstd:?}");
    }
}

#[test]
fn run_steps_build_the_classic_dockerfile_pattern() {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file("berth.toml", NODE_APP)
        .file(
            "app/Dockerfile",
            "FROM base:1\nARG FLAVOUR=plain\nWORKDIR /app\nCOPY package.json ./\nRUN mkdir -p node_modules && echo \"$FLAVOUR deps\" > node_modules/dep.txt && rm /etc/group\nCOPY . .\nCMD [\"/bin/sh\", \"server.sh\"]\n",
        )
        .file("app/package.json", "{\"name\": \"shop\"}\n")
        .file("app/server.sh", "cat node_modules/dep.txt; test -e /etc/group || echo group-gone\n");
    let first = p.berth().args(["build"]).run().ok();
    assert!(
        first.stdout.contains("RUN mkdir -p node_modules"),
        "{}",
        first.stdout
    );
    let run = p.berth().args(["run", "--rm", "shop"]).run().ok();
    assert_eq!(
        run.stdout, "plain deps\ngroup-gone\n",
        "the RUN layer's file, and its whiteout"
    );

    let before = layers(&p, "shop");
    p.file("app/server.sh", "echo v2\n");
    let second = p.berth().args(["build", "--explain"]).run().ok();
    assert!(
        second
            .stdout
            .lines()
            .any(|l| l.contains("RUN mkdir") && l.contains("HIT")),
        "{}",
        second.stdout
    );
    let after = layers(&p, "shop");
    assert_eq!(
        before[..4],
        after[..4],
        "base, /app, package.json and RUN layers are reused"
    );
    assert_ne!(before[4], after[4]);

    let third = p
        .berth()
        .args(["build", "--explain", "--build-arg", "FLAVOUR=spicy"])
        .run()
        .ok();
    assert!(
        third
            .stdout
            .lines()
            .any(|l| l.contains("RUN mkdir") && l.contains("MISS")),
        "a build arg the command sees: {}",
        third.stdout
    );
    assert_eq!(
        p.berth()
            .args(["run", "--rm", "shop", "cat", "/app/node_modules/dep.txt"])
            .run()
            .ok()
            .stdout,
        "spicy deps\n"
    );

    p.file("app/Dockerfile", "FROM base:1\nRUN echo failing; exit 4\n");
    let failed = p.berth().args(["build"]).run().code(1);
    assert!(
        failed.stderr.contains("RUN failed") && failed.stderr.contains("exited with 4"),
        "{}",
        failed.stderr
    );
}

#[test]
fn run_layers_are_reproducible() {
    let digests: Vec<String> = (0..2)
        .map(|_| {
            let p = TempProject::new();
            p.with_busybox_base();
            p.file("berth.toml", "[app]\nname = \"r\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\nrun = \"mkdir -p /opt/x && echo same > /opt/x/f && ln -s f /opt/x/l\"\n");
            p.berth().args(["build"]).run().ok().last_line()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn add_extracts_local_archives_and_import_reads_tars() {
    let p = TempProject::new();
    p.with_busybox_base();
    std::fs::create_dir_all(p.path().join("tree/lib")).unwrap();
    std::fs::write(p.path().join("tree/lib/a.txt"), "from the archive\n").unwrap();
    std::os::unix::fs::symlink("a.txt", p.path().join("tree/lib/link")).unwrap();
    std::fs::create_dir_all(p.path().join("ctx")).unwrap();
    run_ok(
        Command::new("tar")
            .args(["--owner=0", "--group=0", "-C"])
            .arg(p.path().join("tree"))
            .arg("-czf")
            .arg(p.path().join("ctx/bundle.tgz"))
            .arg("."),
    );
    p.file("berth.toml", "[app]\nname = \"addr\"\n[image]\nfrom = \"base:1\"\ncontext = \"ctx\"\n[[image.steps]]\nadd = [\"bundle.tgz\", \"/opt/\"]\n");
    p.berth().args(["build"]).run().ok();
    let out = p
        .berth()
        .args([
            "run",
            "--rm",
            "addr",
            "/bin/sh",
            "-c",
            "cat /opt/lib/a.txt; readlink /opt/lib/link",
        ])
        .run()
        .ok();
    assert_eq!(
        out.stdout, "from the archive\na.txt\n",
        "ADD extracted the archive"
    );

    // A hostile archive: an entry that climbs out with `..` is refused, naming it.
    let mut hostile = tar::Header::new_gnu();
    hostile.as_gnu_mut().unwrap().name[..10].copy_from_slice(b"../escaped");
    hostile.set_size(0);
    hostile.set_entry_type(tar::EntryType::Regular);
    hostile.set_cksum();
    let mut bytes = hostile.as_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 1024]);
    std::fs::write(p.path().join("ctx/evil.tar"), &bytes).unwrap();
    p.file("berth.toml", "[app]\nname = \"addr\"\n[image]\nfrom = \"base:1\"\ncontext = \"ctx\"\n[[image.steps]]\nadd = [\"evil.tar\", \"/opt/\"]\n");
    let run = p.berth().args(["build"]).run();
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("climbs out with `..`"),
        "{}",
        run.stderr
    );

    // berth import reads a gzipped tar of a root filesystem as well as a directory.
    let root = p.path().join("rootfs");
    util::busybox_rootfs(&root);
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-czf"])
            .arg(p.path().join("rootfs.tgz"))
            .arg("."),
    );
    p.berth()
        .args(["import"])
        .args([p.path().join("rootfs.tgz")])
        .args(["--tag", "fromtar:1"])
        .run()
        .ok();
    let out = p
        .berth()
        .args(["run", "--rm", "fromtar:1", "/bin/echo", "imported"])
        .run()
        .ok();
    assert_eq!(out.stdout, "imported\n");
}

/// Unmounts a test's mount when dropped, also when the test fails.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_is_blamed_on_the_store_not_the_context() {
    let p = TempProject::new();
    p.file(
        "berth.toml",
        "[app]\nname = \"big\"\n[image]\nfrom = \"scratch\"\ncontext = \"app\"\n\
         [[image.steps]]\ncopy = [\".\", \"/app/\"]\n",
    );
    let store = p.path().join("small-store");
    std::fs::create_dir(&store).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &store,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )
    .expect("mount a 4 MiB tmpfs");
    let _mounted = Mounted(store.clone());
    // 12 MiB that do not compress: the layer cannot fit.
    let big: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    p.file("app/small.txt", "small\n");
    std::fs::write(p.path().join("app/big.bin"), &big).unwrap();
    let run = p
        .berth()
        .env("BERTH_STORE", store.join("s").to_str().unwrap())
        .args(["build"])
        .run()
        .code(1);
    assert!(
        run.stderr.contains("cannot write a layer into the store")
            && run.stderr.contains("No space left on device"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("build context"), "{}", run.stderr);
    // Nothing half-written is left behind.
    let ingest = std::fs::read_dir(store.join("s/berth/ingest"))
        .unwrap()
        .count();
    assert_eq!(ingest, 0);
}

/// Writes a tree of text files (about 6 MB, compressible) under `dir`, the same for the
/// same seed.
fn text_tree(p: &TempProject, dir: &str, files: usize, seed: u64) {
    let mut x = seed | 1;
    for i in 0..files {
        let len = 8_000 + (i * 7919) % 30_000;
        let body: String = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"abcdefgh ijklmnop\n"[(x % 18) as usize] as char
            })
            .collect();
        p.file(&format!("{dir}/m{:02}/f{i:03}.txt", i / 20), &body);
    }
}

#[test]
fn a_change_deep_in_the_tree_resumes_the_layer_and_builds_what_a_fresh_store_builds() {
    let project = |p: &TempProject| {
        p.file("ctx/Dockerfile", "FROM scratch\nCOPY app/ /app/\n");
        text_tree(p, "ctx/app/deps", 300, 11);
        p.file("ctx/app/src/main.txt", "version 1\n");
    };
    // `--json build` of the context, with `extra` flags: the report and what berth said.
    let build_with = |p: &TempProject, extra: &[&str]| -> (serde_json::Value, String) {
        let run = p
            .berth()
            .args(["--json", "build", "-f", "ctx/Dockerfile", "-t", "deep:1"])
            .args(extra)
            .arg("ctx")
            .run()
            .ok();
        (serde_json::from_str(&run.stdout).unwrap(), run.stderr)
    };
    let build = |p: &TempProject| build_with(p, &[]).0;
    let copy_layer = |v: &serde_json::Value| v["steps"][0]["layer"].clone();
    let p = TempProject::new();
    project(&p);
    let first = build(&p);
    assert_eq!(copy_layer(&first)["unchanged_prefix"], 0, "{first}");
    // The last file of the tree changes: the layer is written from near its end on.
    for version in 2..4 {
        p.file(
            "ctx/app/src/main.txt",
            &format!("version {version}, longer\n"),
        );
        let again = build(&p);
        let layer = copy_layer(&again);
        assert_eq!(again["steps"][0]["status"], "miss");
        let prefix = layer["unchanged_prefix"].as_u64().unwrap();
        assert!(prefix > 4 << 20, "most of the tar is taken over: {layer}");
        // The same image as a store that never built it before makes.
        let fresh = TempProject::new();
        project(&fresh);
        fresh.file(
            "ctx/app/src/main.txt",
            &format!("version {version}, longer\n"),
        );
        let clean = build(&fresh);
        assert_eq!(copy_layer(&clean)["unchanged_prefix"], 0);
        assert_eq!(again["digest"], clean["digest"], "version {version}");
        // And the blob is what its name says, a valid gzip of the tar its diff_id names.
        let digest = layer["digest"].as_str().unwrap();
        let blob = p.store().join("blobs/sha256").join(&digest[7..]);
        let sum = run_ok(Command::new("sha256sum").arg(&blob));
        assert!(sum.starts_with(&digest[7..]), "{sum}");
        let tar_sum = run_ok(
            Command::new("sh")
                .arg("-c")
                .arg(format!("gzip -dc {} | sha256sum", blob.display())),
        );
        assert!(
            tar_sum.starts_with(&layer["diff_id"].as_str().unwrap()[7..]),
            "{tar_sum}"
        );
    }
    // Unchanged since a build that missed: the copy started ahead of the walk is dropped,
    // and leaves nothing behind.
    let again = build(&p);
    assert_eq!(again["steps"][0]["status"], "hit", "{again}");
    let ingest = std::fs::read_dir(p.store().join("berth/ingest")).unwrap();
    assert_eq!(ingest.count(), 0);
    // A damaged store is never copied into a new layer: the earlier blob with a flipped
    // byte, then cut short, then its saved states garbled. Each time the layer is written
    // in full and the image is the fresh store's; `--no-cache` takes nothing over.
    let blob_of = |v: &serde_json::Value| {
        let d = copy_layer(v)["digest"].as_str().unwrap().to_string();
        p.store().join("blobs/sha256").join(&d[7..])
    };
    let mut last = build(&p);
    for (round, damage) in ["flip", "truncate", "index", "no-cache"].iter().enumerate() {
        let blob = blob_of(&last);
        match *damage {
            "flip" => {
                let mut bytes = std::fs::read(&blob).unwrap();
                bytes[1000] ^= 0x40;
                std::fs::write(&blob, bytes).unwrap();
            }
            "truncate" => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&blob)
                    .unwrap()
                    .set_len(100_000)
                    .unwrap();
            }
            "index" => {
                let name = format!("{}.json", blob.file_name().unwrap().to_str().unwrap());
                let index = p.store().join("berth/cache/chunks-b3c").join(name);
                let text = std::fs::read_to_string(&index).unwrap();
                let garbled = text.replacen("\"crc\":", "\"crc\":1", 1);
                assert_ne!(text, garbled);
                std::fs::write(&index, garbled).unwrap();
            }
            _ => {}
        }
        let body = format!("version {round}, after damage\n");
        p.file("ctx/app/src/main.txt", &body);
        let no_cache: &[&str] = if *damage == "no-cache" {
            &["--no-cache"]
        } else {
            &[]
        };
        let (again, said) = build_with(&p, no_cache);
        let prefix = copy_layer(&again)["unchanged_prefix"].as_u64().unwrap();
        if matches!(*damage, "index" | "no-cache") {
            assert_eq!(prefix, 0, "{damage}: nothing resumed");
        } else {
            assert!(said.contains("writing it in full"), "{damage}: {said}");
        }
        let fresh = TempProject::new();
        project(&fresh);
        fresh.file("ctx/app/src/main.txt", &body);
        assert_eq!(again["digest"], build(&fresh)["digest"], "{damage}");
        let written = blob_of(&again);
        let sum = run_ok(Command::new("sha256sum").arg(&written));
        assert!(
            sum.starts_with(written.file_name().unwrap().to_str().unwrap()),
            "{damage}: {sum}"
        );
        last = again;
    }
}

#[test]
fn source_date_epoch_dates_the_files_and_a_new_one_rebuilds_them() {
    let p = node_project();
    for epoch in ["1000", "2000"] {
        p.berth()
            .args(["build"])
            .env("SOURCE_DATE_EPOCH", epoch)
            .run()
            .ok();
        let seen = p
            .berth()
            .args(["run", "--rm", "shop", "stat", "-c", "%Y", "/app/server.sh"])
            .run()
            .ok();
        assert_eq!(
            seen.stdout.trim(),
            epoch,
            "a cached layer of another epoch is not reused"
        );
    }
    let explained = p
        .berth()
        .args(["build", "--explain"])
        .env("SOURCE_DATE_EPOCH", "3000")
        .run()
        .ok();
    assert!(
        explained
            .stdout
            .contains("SOURCE_DATE_EPOCH changed (2000 → 3000)"),
        "{}",
        explained.stdout
    );
}

/// berth loads caches and frees large trees on threads of their own; the runtime creates
/// a RUN step's container with a raw clone, which must not happen while one of them holds
/// a lock (a child stuck forever on the allocator's). A RUN as the first step (the stat
/// cache of a large context still loading) and a RUN right after a COPY of it (its trees
/// being freed) build, every time.
#[test]
fn run_steps_start_while_caches_load_and_trees_are_freed() {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file(
        "ctx/Dockerfile",
        "FROM base:1\nRUN echo one > /one\nCOPY app/ /app/\nRUN ls /app/deps | wc -l > /count\nRUN echo three\n",
    );
    text_tree(&p, "ctx/app/deps", 1500, 5);
    for round in 0..4 {
        p.file("ctx/app/src/main.txt", &format!("round {round}\n"));
        let run = p
            .berth()
            .args([
                "--json",
                "build",
                "--no-cache",
                "-f",
                "ctx/Dockerfile",
                "-t",
                "threads:1",
            ])
            .arg("ctx")
            .within(120)
            .run()
            .ok();
        let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(report["steps"].as_array().unwrap().len(), 4, "{report}");
    }
}
