//! Promotion through dev → uat → prod on network-namespace hosts, with uat and prod on
//! different registries; the gates; the ledger read from an empty store; and `diff`.

mod util;

use util::{Registry, TempProject, TestHosts, free_port};

fn json(run: &util::Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

fn write_app(p: &TempProject, port: u16, page: &str) {
    p.file("www/index.html", page).file(
        "berth.toml",
        &format!(
            "[app]\nname = \"shop\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"www/\", \"/www/\"]\n[[image.steps]]\ncmd = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             [services.web]\nports = [\"127.0.0.1:{port}:8080\"]\nhealth = {{ http = \"/\", port = 8080, interval = \"100ms\", timeout = \"1s\", retries = 3 }}\n\
             [rollout]\ndrain = \"100ms\"\ntimeout = \"10s\"\n"
        ),
    );
}

/// What a host's agent says it runs (the host's own state, not the ledger).
fn running_on(p: &TempProject, token: &str, env: &str) -> Vec<String> {
    let st = p
        .berth()
        .env("BERTH_AGENT_TOKEN", token)
        .args(["--json", "status", "--env", env])
        .run()
        .ok();
    json(&st)["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["digest"].as_str().unwrap_or("none").to_string())
        .collect()
}

fn page(addr: &str) -> Option<String> {
    util::get_once_at(addr, 8080)
}

#[test]
fn one_digest_goes_from_dev_to_uat_to_prod_through_the_gates() {
    let mut hosts = TestHosts::new(131, 2);
    let shared = Registry::start_at("198.18.131.1", &[], "");
    let other = Registry::start_at("198.18.131.1", &[], "");
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let token = "promotion-token-0123456789abcdef";
    p.file("token", token);
    for i in 0..2 {
        hosts.start_agent(i, &p.path().join("token"));
    }
    write_app(&p, free_port(), "version one\n");
    p.file(
        "environments/dev.toml",
        &format!(
            "hosts = [\"local\"]\nregistry = \"http://{}/shop-dev\"\n",
            shared.host()
        ),
    );
    p.file(
        "environments/uat.toml",
        &format!(
            "registry = \"http://{}/shop-uat\"\nhosts = [\"http://{}:7443\"]\npromote_from = \"dev\"\n[services.web]\nports = [\"8080:8080\"]\n",
            shared.host(),
            hosts.addr(0)
        ),
    );
    let prod = |soak: &str| {
        p.file(
            "environments/prod.toml",
            &format!(
                "registry = \"http://{}/shop\"\nhosts = [\"http://{}:7443\"]\npromote_from = \"uat\"\nrequire = [\"uat\"]\nsoak = \"{soak}\"\n[services.web]\nports = [\"8080:8080\"]\n",
                other.host(),
                hosts.addr(1)
            ),
        );
    };
    prod("1h");
    let berth = || p.berth().env("BERTH_AGENT_TOKEN", token);
    // Deploys dev; the digest dev's ledger records for it.
    let deploy_dev = || {
        berth().args(["deploy", "--env", "dev"]).run().ok();
        let dev = json(
            &berth()
                .args(["--json", "releases", "--env", "dev"])
                .run()
                .ok(),
        );
        let newest = dev.as_array().unwrap().first().unwrap();
        newest["digest"].as_str().unwrap().to_string()
    };

    let d1 = deploy_dev();

    // prod requires uat: an image uat never released is refused, whatever the source.
    let skipped = berth()
        .args(["promote", "--to", "prod", "--from", "dev"])
        .run()
        .code(1);
    assert!(
        skipped.stderr.contains("require") && skipped.stderr.contains("never released in uat"),
        "{}",
        skipped.stderr
    );
    assert!(running_on(&p, token, "prod") == ["none"]);

    // dev → uat within one registry: mounts, zero blob bytes uploaded.
    let dry = json(
        &berth()
            .args(["--json", "promote", "--to", "uat", "--dry-run"])
            .run()
            .ok(),
    );
    assert!(
        dry["transfer"]["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["action"] == "mount"),
        "{dry}"
    );
    let to_uat = json(
        &berth()
            .args(["--json", "promote", "--to", "uat"])
            .run()
            .ok(),
    );
    assert_eq!(
        to_uat["transfer"]["how"], "copied within one registry",
        "{to_uat}"
    );
    assert_eq!(to_uat["transfer"]["bytes"], 0, "{to_uat}");
    assert_eq!(running_on(&p, token, "uat"), [d1.as_str()]);
    assert!(page(&hosts.addr(0)).unwrap().ends_with("version one\n"));

    // uat → prod: soak time not yet passed is refused; --force records its reason.
    let early = berth().args(["promote", "--to", "prod"]).run().code(1);
    assert!(early.stderr.contains("soak"), "{}", early.stderr);
    let forced = json(
        &berth()
            .args([
                "--json",
                "promote",
                "--to",
                "prod",
                "--force",
                "--reason",
                "hotfix for INC-7",
            ])
            .run()
            .ok(),
    );
    assert_eq!(forced["transfer"]["how"], "copied between registries");
    assert_eq!(forced["forced"], serde_json::json!(["soak"]));
    let all_bytes: u64 = forced["transfer"]["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["size"].as_u64().unwrap())
        .sum();
    assert_eq!(
        forced["transfer"]["bytes"], all_bytes,
        "prod had none of it"
    );
    assert_eq!(running_on(&p, token, "prod"), [d1.as_str()]);

    // A one-file change: dev → uat → prod, only the new blobs cross registries.
    p.file("www/index.html", "version two\n");
    let d2 = deploy_dev();
    assert_ne!(d1, d2);
    berth().args(["promote", "--to", "uat"]).run().ok();
    prod("1s");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let to_prod = json(
        &berth()
            .args(["--json", "promote", "--to", "prod"])
            .run()
            .ok(),
    );
    let blobs = to_prod["transfer"]["blobs"].as_array().unwrap();
    let moved: u64 = blobs
        .iter()
        .filter(|b| b["action"] != "present")
        .map(|b| b["size"].as_u64().unwrap())
        .sum();
    assert!(
        blobs.iter().any(|b| b["action"] == "present"),
        "the base layer was there: {to_prod}"
    );
    assert_eq!(to_prod["transfer"]["bytes"], moved, "{to_prod}");
    assert!(to_prod["forced"].as_array().unwrap().is_empty());
    // The same bytes everywhere, as the hosts see them.
    assert_eq!(running_on(&p, token, "uat"), [d2.as_str()]);
    assert_eq!(running_on(&p, token, "prod"), [d2.as_str()]);
    assert!(page(&hosts.addr(1)).unwrap().ends_with("version two\n"));

    // A CI runner with an empty store reads prod's ledger from prod's registry.
    let runner = tempfile::tempdir().unwrap();
    let ledger = json(
        &berth()
            .env("BERTH_STORE", runner.path().to_str().unwrap())
            .args(["--json", "releases", "--env", "prod"])
            .run()
            .ok(),
    );
    let ledger = ledger.as_array().unwrap();
    assert_eq!(ledger.len(), 2, "{ledger:?}");
    // Newest first, as the text form lists them.
    assert_eq!(ledger[1]["kind"], "promote");
    assert_eq!(ledger[1]["source"], "uat");
    assert_eq!(ledger[1]["digest"], d1.as_str());
    assert_eq!(ledger[1]["reason"], "hotfix for INC-7");
    assert_eq!(ledger[0]["digest"], d2.as_str());
    assert!(ledger[0]["forced"].is_null());
    // The record is attached to the image (referrers tag scheme on this registry).
    assert!(
        other.requests("PUT", &format!("/v2/shop/manifests/sha256-{}", &d2[7..])) >= 1,
        "{}",
        other.log()
    );

    // diff of two environments: same digest, nothing differs but the environments.
    let same = json(&berth().args(["--json", "diff", "uat", "prod"]).run().ok());
    assert_eq!(same["identical"], true, "{same}");
    assert!(
        same["environment"]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["key"] == "registry"),
        "{same}"
    );
}

fn git(p: &TempProject, args: &[&str]) {
    let ok = std::process::Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(p.path())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn a_release_records_the_commit_its_image_was_built_from() {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file(
        "berth.toml",
        "[app]\nname = \"rev\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"a.txt\", \"/a.txt\"]\n",
    )
    .file("environments/dev.toml", "hosts = [\"local\"]\n")
    .file("a.txt", "one\n")
    .file(".gitignore", ".store\n");
    git(&p, &["init", "-q"]);
    git(&p, &["add", "."]);
    git(&p, &["commit", "-q", "-m", "built"]);
    let built = head(&p);
    p.berth().args(["build", "--tag", "rev:old"]).run().ok();
    git(&p, &["commit", "-q", "--allow-empty", "-m", "later"]);
    assert_ne!(head(&p), built);
    // Deploying the older image names its commit, not the work tree's.
    let plan = json(
        &p.berth()
            .args([
                "--json",
                "deploy",
                "--env",
                "dev",
                "--dry-run",
                "--image",
                "rev:old",
            ])
            .run()
            .ok(),
    );
    assert_eq!(plan["plan"]["revision"], built.as_str(), "{plan}");
}

fn head(p: &TempProject) -> String {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(p.path())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn diff_names_each_change_between_two_crafted_images() {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file(
        "berth.toml",
        "[app]\nname = \"crafted\"\n[image]\nfrom = \"base:1\"\ndockerfile = \"Dockerfile\"\n",
    )
    .file("keep.txt", "one\ntwo\nthree\n")
    .file("gone.txt", "soon gone\n")
    .file("mode.sh", "#!/bin/sh\necho hi\n")
    .file("new.txt", "brand new\n")
    .file("extra.txt", "in a layer of its own\n")
    .file(".gitignore", ".store\n")
    .file(
        "Dockerfile",
        "FROM base:1\nCOPY keep.txt gone.txt mode.sh /app/\nENV MODE=a KEPT=yes\nCMD [\"/bin/sh\"]\n",
    );
    git(&p, &["init", "-q"]);
    git(&p, &["add", "."]);
    git(&p, &["commit", "-q", "-m", "first version"]);
    p.berth().args(["build", "--tag", "crafted:a"]).run().ok();
    p.file("keep.txt", "one\n2\nthree\n").file(
        "Dockerfile",
        "FROM base:1\nCOPY keep.txt new.txt /app/\nCOPY --chmod=600 mode.sh /app/\nENV MODE=b KEPT=yes\nCMD [\"/bin/sh\"]\nCOPY extra.txt /extra/\n",
    );
    git(&p, &["commit", "-q", "-am", "second version"]);
    p.berth().args(["build", "--tag", "crafted:b"]).run().ok();

    let d = json(
        &p.berth()
            .args(["--json", "diff", "crafted:a", "crafted:b", "--files"])
            .run()
            .ok(),
    );
    assert_eq!(d["identical"], false);
    // config: the env var that changed, and only it among the env vars.
    let keys: Vec<&str> = d["config"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"env.MODE"), "{keys:?}");
    assert!(!keys.contains(&"env.KEPT"), "{keys:?}");
    // layers: the base is shared; A has one layer of its own, B three.
    assert_eq!(d["layers"]["shared"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["layers"]["only_a"].as_array().unwrap().len(), 1);
    assert_eq!(d["layers"]["only_b"].as_array().unwrap().len(), 3);
    // files: each change named.
    let files = d["files"].as_array().unwrap();
    let change = |path: &str| {
        files
            .iter()
            .find(|f| f["path"] == path)
            .unwrap_or_else(|| panic!("{path} in {files:?}"))
    };
    assert_eq!(change("app/new.txt")["change"], "added");
    assert_eq!(change("extra/extra.txt")["change"], "added");
    assert_eq!(change("app/gone.txt")["change"], "removed");
    let keep = change("app/keep.txt");
    assert_eq!(keep["change"], "modified");
    assert_eq!(keep["what"], serde_json::json!(["content"]));
    assert!(
        keep["diff"].as_str().unwrap().contains("-two\n+2\n"),
        "{keep}"
    );
    let mode = change("app/mode.sh");
    assert_eq!(mode["what"], serde_json::json!(["mode"]), "{mode}");
    assert_eq!(mode["b"]["mode"], "600");
    assert!(
        !files
            .iter()
            .any(|f| f["path"] == "bin/busybox" || f["path"] == "app"),
        "unchanged paths are not listed: {files:?}"
    );
    // commits: the one between the two builds' revisions.
    let only_b = d["commits"]["only_b"].as_array().unwrap();
    assert_eq!(only_b.len(), 1, "{}", d["commits"]);
    assert_eq!(only_b[0]["summary"], "second version");

    // --path keeps to a prefix; the human form says the same.
    let d = json(
        &p.berth()
            .args([
                "--json",
                "diff",
                "crafted:a",
                "crafted:b",
                "--path",
                "/extra",
            ])
            .run()
            .ok(),
    );
    let paths: Vec<&str> = d["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["extra", "extra/extra.txt"]);
    let human = p
        .berth()
        .args(["diff", "crafted:a", "crafted:b", "--files"])
        .run()
        .ok();
    for line in [
        "A /app/new.txt",
        "D /app/gone.txt",
        "M /app/keep.txt",
        "M /app/mode.sh (mode 644→600)",
        "+env.MODE = b",
        "second version",
    ] {
        assert!(human.stdout.contains(line), "{line} in:\n{}", human.stdout);
    }
}
