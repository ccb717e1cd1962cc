//! Resolution and validation, end to end over real files in a temp directory: merging, and
//! every kind of problem with the file and line it must point at.

use std::path::Path;

use super::*;

const BASE: &str = r#"[app]
name = "hello"

[image]
from = "base:1"

[services.web]
ports = ["8080:8080"]
health = { http = "/", port = 8080 }

[services.worker]
command = "sleep 1000"
"#;

fn project(files: &[(&str, &str)]) -> (tempfile::TempDir, Project) {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let project = Project::load(dir.path()).unwrap();
    (dir, project)
}

/// `(file:line, code, message)` of every problem `berth check` would report.
fn problems(files: &[(&str, &str)]) -> Vec<(String, &'static str, String)> {
    let (_dir, p) = project(files);
    match p.check(None) {
        Ok(_) => Vec::new(),
        Err(ProjectError::Invalid(e)) => e
            .diagnostics
            .0
            .iter()
            .map(|d| {
                let (line, _) = d.file.line_col(d.span.start);
                (format!("{}:{line}", d.file.name), d.code, d.message.clone())
            })
            .collect(),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

fn with_env(env: &str) -> Vec<(String, &'static str, String)> {
    problems(&[
        ("berth.toml", BASE),
        ("environments/dev.toml", "hosts = [\"local\"]\n"),
        ("environments/uat.toml", env),
    ])
}

fn assert_one(found: Vec<(String, &'static str, String)>, at: &str, code: &str, needle: &str) {
    assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
    let (loc, c, msg) = &found[0];
    assert_eq!((loc.as_str(), *c), (at, code), "{found:#?}");
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
}

#[test]
fn a_valid_project_resolves_with_overrides_merged() {
    let (_d, p) = project(&[
        ("berth.toml", BASE),
        (
            "environments/uat.toml",
            "registry = \"http://127.0.0.1:5000/hello\"\nhosts = [\"local\"]\n[env]\nA = \"1\"\n[services.web]\nreplicas = 2\nenv = { B = 2 }\n",
        ),
    ]);
    assert_eq!(p.check(None).unwrap(), vec!["uat"]);
    let c = p.resolve("uat").unwrap();
    let web = &c.services["web"];
    assert_eq!(web.replicas, 2);
    assert_eq!(
        web.ports[0].to_string(),
        "8080:8080",
        "berth.toml's ports survive the merge"
    );
    assert!(web.health.is_some());
    assert_eq!(c.services["worker"].replicas, 1);
    assert_eq!(
        web.effective_env(&c).into_iter().collect::<Vec<_>>(),
        [("A".into(), "1".into()), ("B".into(), "2".into())]
    );
    assert_eq!(c.registry.unwrap().repository, "hello");
}

#[test]
fn health_tables_merge_key_by_key() {
    let (_d, p) = project(&[
        ("berth.toml", BASE),
        (
            "environments/uat.toml",
            "hosts = [\"local\"]\n[services.web]\nhealth = { interval = \"9s\" }\n",
        ),
    ]);
    let c = p.resolve("uat").unwrap();
    let h = c.services["web"].health.as_ref().unwrap();
    assert_eq!(h.interval.to_string(), "9s");
    assert_eq!(
        h.probe,
        schema::Probe::Http {
            path: "/".into(),
            port: 8080
        }
    );
}

#[test]
fn lists_replace_rather_than_append() {
    let (_d, p) = project(&[
        ("berth.toml", BASE),
        (
            "environments/uat.toml",
            "hosts = [\"local\"]\n[services.web]\nports = [\"9090:8080\"]\n",
        ),
    ]);
    let ports = &p.resolve("uat").unwrap().services["web"].ports;
    assert_eq!(
        ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["9090:8080"]
    );
}

#[test]
fn unknown_key_suggests_the_nearest() {
    let found = with_env("hosts = [\"local\"]\n\n[services.web]\nreplica = 2\n");
    assert_one(
        found,
        "environments/uat.toml:4",
        "berth::unknown-key",
        "`replica`",
    );
    let (_d, p) = project(&[
        ("berth.toml", BASE),
        (
            "environments/uat.toml",
            "hosts = [\"local\"]\n[services.web]\nreplica = 2\n",
        ),
    ]);
    let Err(ProjectError::Invalid(e)) = p.check(None) else {
        panic!()
    };
    assert_eq!(
        e.diagnostics.0[0].help.as_deref(),
        Some("did you mean `replicas`?")
    );
}

#[test]
fn wrong_types_are_reported() {
    assert_one(
        with_env("hosts = \"local\"\n"),
        "environments/uat.toml:1",
        "berth::wrong-type",
        "`hosts` must be an array",
    );
    assert_one(
        with_env("hosts = [\"local\"]\n[services.web]\nreplicas = \"two\"\n"),
        "environments/uat.toml:3",
        "berth::wrong-type",
        "must be an integer",
    );
}

#[test]
fn bad_ports_sizes_durations_and_cpus_are_reported() {
    let found = with_env(
        "hosts = [\"local\"]\n[services.web]\nports = [\"8080:99999\"]\nresources = { memory = \"12X\", cpus = -1 }\nstop_timeout = \"10\"\n",
    );
    let lines: Vec<_> = found.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(
        lines,
        [
            "environments/uat.toml:3",
            "environments/uat.toml:4",
            "environments/uat.toml:4",
            "environments/uat.toml:5"
        ],
        "{found:#?}"
    );
    assert!(found.iter().all(|f| f.1 == "berth::invalid-value"));
}

#[test]
fn undefined_service_in_environment() {
    assert_one(
        with_env("hosts = [\"local\"]\n[services.wbe]\nreplicas = 2\n"),
        "environments/uat.toml:2",
        "berth::undefined-service",
        "`wbe`",
    );
}

#[test]
fn promote_from_must_name_an_environment() {
    assert_one(
        with_env("hosts = [\"local\"]\npromote_from = \"staging\"\n"),
        "environments/uat.toml:2",
        "berth::unknown-environment",
        "`staging`",
    );
}

#[test]
fn promotion_cycles_are_reported() {
    let found = problems(&[
        ("berth.toml", BASE),
        (
            "environments/dev.toml",
            "hosts = [\"local\"]\npromote_from = \"prod\"\n",
        ),
        (
            "environments/uat.toml",
            "hosts = [\"local\"]\npromote_from = \"dev\"\n",
        ),
        (
            "environments/prod.toml",
            "hosts = [\"local\"]\npromote_from = \"uat\"\n",
        ),
    ]);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found.iter().all(|f| f.1 == "berth::promotion-cycle"));
    assert!(
        found
            .iter()
            .any(|f| f.2.contains("prod ← uat ← dev ← prod")),
        "{found:#?}"
    );
    let self_loop = with_env("hosts = [\"local\"]\npromote_from = \"uat\"\n");
    assert_one(
        self_loop,
        "environments/uat.toml:2",
        "berth::promotion-cycle",
        "cycle",
    );
}

#[test]
fn duplicate_published_ports() {
    let base = BASE.replace(
        "command = \"sleep 1000\"",
        "command = \"sleep 1000\"\nports = [\"127.0.0.1:8080:9000\"]",
    );
    let found = problems(&[("berth.toml", &base)]);
    assert_one(found, "berth.toml:13", "berth::duplicate-port", "8080");
    let udp = BASE.replace(
        "command = \"sleep 1000\"",
        "command = \"sleep 1000\"\nports = [\"8080:8080/udp\"]",
    );
    assert_eq!(
        problems(&[("berth.toml", &udp)]),
        [],
        "tcp and udp on one port do not clash"
    );
}

#[test]
fn health_check_on_a_port_not_exposed() {
    let base = BASE.replace(
        "health = { http = \"/\", port = 8080 }",
        "health = { http = \"/\", port = 9000 }",
    );
    assert_one(
        problems(&[("berth.toml", &base)]),
        "berth.toml:9",
        "berth::health-port-not-exposed",
        "9000",
    );
    let exposed = base.replace(
        "ports = [\"8080:8080\"]",
        "ports = [\"8080:8080\"]\nexpose = [9000]",
    );
    assert_eq!(problems(&[("berth.toml", &exposed)]), []);
}

#[test]
fn secrets_must_not_be_literal() {
    let found =
        with_env("hosts = [\"local\"]\n[secrets]\nDB = \"hunter2\"\nOK = { env = \"X\" }\n");
    assert_one(
        found,
        "environments/uat.toml:3",
        "berth::literal-secret",
        "`DB`",
    );
}

#[test]
fn app_and_image_cannot_be_overridden_per_environment() {
    let found = with_env("hosts = [\"local\"]\n[image]\nfrom = \"other:1\"\n");
    assert_one(
        found,
        "environments/uat.toml:2",
        "berth::not-per-environment",
        "`image`",
    );
}

#[test]
fn environments_need_hosts_and_remote_hosts_need_a_registry() {
    assert_one(
        with_env("promote_from = \"dev\"\n"),
        "environments/uat.toml:1",
        "berth::missing-key",
        "no `hosts`",
    );
    assert_one(
        with_env("hosts = [\"https://198.18.0.12:7443\"]\n"),
        "environments/uat.toml:1",
        "berth::no-registry",
        "registry",
    );
}

#[test]
fn every_error_of_a_file_is_reported_at_once() {
    let found = with_env(
        "hosts = [\"local\"]\nsoak = \"forever\"\n[services.web]\nreplica = 2\nports = [\"x\"]\n[rollout]\nbatch = 0\n",
    );
    assert_eq!(found.len(), 4, "{found:#?}");
}

#[test]
fn berth_toml_errors_are_reported_once_not_per_environment() {
    let base = BASE.replace("[services.web]", "[services.web]\nreplicaz = 1");
    let found = problems(&[
        ("berth.toml", &base),
        ("environments/dev.toml", "hosts = [\"local\"]\n"),
        ("environments/uat.toml", "hosts = [\"local\"]\n"),
    ]);
    assert_one(found, "berth.toml:8", "berth::unknown-key", "replicaz");
}

#[test]
fn toml_syntax_errors_point_at_the_line() {
    let found = with_env("hosts = [\"local\"\n[services.web]\n");
    assert!(!found.is_empty());
    assert!(
        found
            .iter()
            .all(|f| f.1 == "berth::toml-syntax" && f.0.starts_with("environments/uat.toml:")),
        "{found:#?}"
    );
}

#[test]
fn steps_are_validated() {
    let base = BASE.replace(
        "from = \"base:1\"",
        "from = \"base:1\"\n[[image.steps]]\ncopy = [\"only-one\"]\n[[image.steps]]\nwrokdir = \"/x\"\n[[image.steps]]\ncmd = [\"a\"]\nuser = \"x\"\n",
    );
    let found = problems(&[("berth.toml", &base)]);
    let codes: Vec<_> = found.iter().map(|f| (f.0.as_str(), f.1)).collect();
    assert_eq!(
        codes,
        [
            ("berth.toml:7", "berth::invalid-value"),
            ("berth.toml:8", "berth::invalid-step"),
            ("berth.toml:12", "berth::invalid-step")
        ],
        "{found:#?}"
    );
}

#[test]
fn an_unknown_environment_is_named_with_a_suggestion() {
    let (_d, p) = project(&[
        ("berth.toml", BASE),
        ("environments/uat.toml", "hosts = [\"local\"]\n"),
    ]);
    let err = p.resolve("uta").err().unwrap();
    assert_eq!(
        err.to_string(),
        "no environment `uta` (there is no environments/uta.toml)"
    );
    assert_eq!(err.help().as_deref(), Some("did you mean `uat`?"));
}

#[test]
fn the_repository_demo_and_every_environment_file_stay_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::load(root).unwrap();
    let envs = p.check(None).unwrap_or_else(|e| panic!("{e}"));
    assert!(envs.len() >= 3, "{envs:?}");
    for env in envs {
        p.resolve(&env).unwrap();
    }
}

/// Regression (issue 17): a service's own `env` lost to the global `[env]`. The order,
/// later winning: berth.toml env_file < [env] < [services.S] env_file < env, then the
/// environment file's four the same way.
#[test]
fn environment_precedence_is_one_documented_order() {
    let (_dir, p) = project(&[
        (
            "berth.toml",
            "env_file = \"base.env\"\n[app]\nname = \"hello\"\n[image]\nfrom = \"base:1\"\n[env]\nA = \"base-env\"\nB = \"base-env\"\nC = \"base-env\"\nD = \"base-env\"\nE = \"base-env\"\n[services.web]\nenv_file = [\"web.env\"]\nenv = { C = \"base-svc\", D = \"base-svc\", E = \"base-svc\" }\n[services.worker]\ncommand = \"sleep 1\"\n",
        ),
        ("base.env", "A=base-file\nZ=base-file\n"),
        ("web.env", "B=web-file\nC=web-file\n"),
        ("uat.env", "Y=uat-file\n"),
        (
            "environments/uat.toml",
            "hosts = [\"local\"]\nenv_file = [\"uat.env\"]\n[env]\nD = \"env-env\"\nE = \"env-env\"\n[services.web]\nenv = { E = \"env-svc\" }\n",
        ),
    ]);
    let c = p.resolve("uat").unwrap();
    let web = &c.services["web"].env;
    let want = [
        ("A", "base-env"),
        ("B", "web-file"),
        ("C", "base-svc"),
        ("D", "env-env"),
        ("E", "env-svc"),
        ("Y", "uat-file"),
        ("Z", "base-file"),
    ];
    for (k, v) in want {
        assert_eq!(web.get(k).map(String::as_str), Some(v), "{k} in {web:?}");
    }
    let worker = &c.services["worker"].env;
    assert_eq!(worker["C"], "base-env", "web's own variables stay web's");
    assert_eq!(worker["E"], "env-env");
}

#[test]
fn a_missing_env_file_is_an_error_naming_it() {
    let found = with_env("hosts = [\"local\"]\nenv_file = [\"nope.env\"]\n");
    assert_one(
        found,
        "environments/uat.toml:2",
        "berth::invalid-value",
        "env_file",
    );
}

#[test]
fn secrets_say_how_they_are_delivered_and_where_they_are_declared() {
    let (_dir, p) = project(&[
        ("berth.toml", BASE),
        (
            "environments/uat.toml",
            "hosts = [\"local\"]\n[secrets]\nDB = { env = \"X\" }\nKEY = { file = \"k\", as = \"file\" }\n",
        ),
    ]);
    let c = p.resolve("uat").unwrap();
    assert_eq!(c.secrets["DB"].delivery, schema::Delivery::Env);
    assert_eq!(c.secrets["KEY"].delivery, schema::Delivery::File);
    assert_eq!(c.secrets["KEY"].origin, "environments/uat.toml:4");
    let found = with_env("hosts = [\"local\"]\n[secrets]\nDB = { env = \"X\", as = \"disk\" }\n");
    assert_eq!(found.len(), 1, "{found:?}");
}
