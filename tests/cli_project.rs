//! The project commands (`init`, `check`, `config`), `--version`, completions and man
//! pages, run as a user would: the built binary on real files.

mod util;

use util::{Berth, TempProject, repo_root};

#[test]
fn version_and_bad_usage() {
    let run = Berth::new().args(["--version"]).run().ok();
    assert_eq!(
        run.stdout.trim(),
        format!("berth {}", env!("CARGO_PKG_VERSION"))
    );
    let run = Berth::new().args(["chekc"]).run().code(2);
    assert!(
        run.stderr.contains("check"),
        "clap suggests the command: {}",
        run.stderr
    );
    Berth::new().args(["check", "--no-such-flag"]).run().code(2);
}

#[test]
fn the_repository_demo_checks_and_resolves() {
    let run = Berth::new()
        .args(["-C"])
        .args([repo_root()])
        .args(["check"])
        .run()
        .ok();
    assert!(run.stdout.contains("dev, prod, uat"), "{}", run.stdout);

    let run = Berth::new()
        .args(["-C"])
        .args([repo_root()])
        .args(["config", "--env", "uat", "--json"])
        .run()
        .ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("valid JSON");
    assert_eq!(v["environment"], "uat");
    assert_eq!(v["services"]["web"]["replicas"], 2, "uat's override");
    assert_eq!(
        v["services"]["web"]["ports"][0], "8080:8080",
        "berth.toml's value, merged"
    );
    assert_eq!(v["env"]["LOG_LEVEL"], "debug");
    assert_eq!(v["registry"], "http://127.0.0.1:5000/hello");
}

#[test]
fn a_typo_in_an_environment_file_names_file_line_and_the_fix() {
    let p = TempProject::new();
    p.berth().args(["init", "shop"]).run().ok();
    p.file(
        "environments/uat.toml",
        &(p.read("environments/uat.toml") + "\n[services.web]\nreplica = 2\n"),
    );
    let line = p
        .read("environments/uat.toml")
        .lines()
        .position(|l| l.starts_with("replica"))
        .unwrap()
        + 1;
    let run = p.berth().args(["check"]).run().code(2);
    assert!(
        run.stderr
            .contains(&format!("environments/uat.toml:{line}:1")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("unknown key `replica`"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("did you mean `replicas`?"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains('\x1b'),
        "no colour codes when stderr is not a terminal"
    );

    let run = p.berth().args(["check", "--json"]).run().code(2);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let d = &v["diagnostics"][0];
    assert_eq!(
        (d["file"].as_str(), d["line"].as_u64()),
        (Some("environments/uat.toml"), Some(line as u64))
    );
    assert_eq!(d["help"], "did you mean `replicas`?");
}

#[test]
fn several_problems_in_several_files_are_all_reported() {
    let p = TempProject::new();
    p.berth().args(["init", "shop"]).run().ok();
    p.file(
        "berth.toml",
        &p.read("berth.toml")
            .replace("ports = [\"8080:8080\"]", "ports = [\"8080:80x\"]"),
    );
    p.file(
        "environments/prod.toml",
        "hosts = [\"local\"]\npromote_from = \"stagin\"\nsoak = \"10\"\n",
    );
    let run = p.berth().args(["check"]).run().code(2);
    assert!(
        run.stderr
            .contains("3 problems in berth.toml, environments/prod.toml"),
        "{}",
        run.stderr
    );
    for needle in ["`80x` is not a port number", "`stagin`", "needs a unit"] {
        assert!(
            run.stderr.contains(needle),
            "missing {needle:?} in {}",
            run.stderr
        );
    }
}

#[test]
fn config_diff_shows_the_differing_keys() {
    let run = Berth::new()
        .args(["-C"])
        .args([repo_root()])
        .args(["config", "--env", "uat", "--diff", "prod"])
        .run()
        .ok();
    assert!(
        run.stdout.starts_with("--- uat\n+++ prod\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("-replicas = 2\n+replicas = 3"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("-LOG_LEVEL = \"debug\"\n+LOG_LEVEL = \"info\""),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("\n-[app]"),
        "unchanged tables are context, not changes"
    );

    let run = Berth::new()
        .args(["-C"])
        .args([repo_root()])
        .args(["config", "--env", "uat", "--diff", "prod", "--json"])
        .run()
        .ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        v["changes"]["services.web.replicas"],
        serde_json::json!({"a": 2, "b": 3})
    );
    assert!(v["changes"].get("app.name").is_none());
}

#[test]
fn secrets_are_redacted_and_read_only_when_needed() {
    let p = TempProject::new();
    p.berth().args(["init", "shop"]).run().ok();
    p.file(
        "environments/prod.toml",
        "hosts = [\"local\"]\n[secrets]\nDB_PASSWORD = { env = \"SHOP_DB_PASSWORD\" }\n",
    );
    let run = p
        .berth()
        .args(["config", "--env", "prod"])
        .env("SHOP_DB_PASSWORD", "s3cr3t-value")
        .run()
        .ok();
    assert!(
        run.stdout.contains("<redacted>") && run.stdout.contains("SHOP_DB_PASSWORD"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("s3cr3t-value"));
    // The variable is unset here: config does not need the value, so this is not an error.
    p.berth().args(["config", "--env", "prod"]).run().ok();

    p.file(
        "environments/prod.toml",
        "hosts = [\"local\"]\n[secrets]\nDB_PASSWORD = \"s3cr3t-value\"\n",
    );
    let run = p.berth().args(["check"]).run().code(2);
    assert!(
        run.stderr.contains("written as a literal value"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("{ env = \"DB_PASSWORD\" }"),
        "{}",
        run.stderr
    );
}

#[test]
fn init_scaffolds_a_valid_project_and_never_overwrites() {
    let p = TempProject::new();
    p.berth().args(["init", "shop"]).run().ok();
    for f in [
        "berth.toml",
        "environments/dev.toml",
        "environments/uat.toml",
        "environments/prod.toml",
        ".berthignore",
    ] {
        assert!(p.path().join(f).is_file(), "{f} missing");
    }
    p.berth().args(["check"]).run().ok();
    p.file("berth.toml", "# mine\n");
    let run = p.berth().args(["init", "shop"]).run().code(1);
    assert!(
        run.stderr.contains("refusing to overwrite berth.toml"),
        "{}",
        run.stderr
    );
    assert_eq!(p.read("berth.toml"), "# mine\n");
    p.berth().args(["init", "Bad_Name"]).run().code(2);
}

#[test]
fn missing_project_or_environment_is_bad_input() {
    let p = TempProject::new();
    let run = p.berth().args(["check"]).run().code(2);
    assert!(
        run.stderr.contains("no berth.toml in") && run.stderr.contains("berth init"),
        "{}",
        run.stderr
    );
    p.berth().args(["init", "shop"]).run().ok();
    let run = p.berth().args(["config", "--env", "prd"]).run().code(2);
    assert!(
        run.stderr.contains("did you mean `prod`?"),
        "{}",
        run.stderr
    );
}

#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let run = Berth::new().args(["completions", shell]).run().ok();
        assert!(
            run.stdout.contains("berth") && run.stdout.contains("config"),
            "{shell}"
        );
    }
    let run = Berth::new().args(["man"]).run().ok();
    assert!(
        run.stdout.contains(".TH berth"),
        "{}",
        &run.stdout[..200.min(run.stdout.len())]
    );
    let dir = tempfile::tempdir().unwrap();
    Berth::new()
        .args(["man", "--out-dir"])
        .args([dir.path()])
        .run()
        .ok();
    assert!(dir.path().join("berth-check.1").is_file());
}
