//! Secrets and environment reach the containers exactly as declared, read from inside
//! the replicas: the precedence of every `env` and `env_file`, secrets as variables and as
//! `/run/secrets` files, on this machine and on agent hosts over TLS; a missing secret
//! stops the deploy before anything starts; no secret value anywhere it must not be; a
//! rotated secret rolls out with no failed request.

mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use util::{Berth, Registry, TempProject, TestHosts};

/// Distinctive values, so a grep finds them wherever they leak.
const DB: &str = "db-pw-Zq81xKcv0";
const KEY: &str = "api-key-Wv7rT2mq9";
const TOKEN: &str = "token-Lp4nB6ss3";
const CERT: &str = "cert-Gh2yU8aa1";

fn write_project(p: &TempProject, publish: &str) {
    p.file("www/index.html", "with secrets\n")
        .file("base.env", "FROM_BASE_FILE=yes\nLEVEL=base-file\n")
        .file("web.env", "LEVEL=web-file\nWEB_FILE=yes\n")
        .file("env.env", "LEVEL=env-file\nENV_FILE=yes\n")
        .file("keys/cert", &format!("{CERT}\n"))
        .file("keys/key", &format!("{KEY}\n"))
        .file(
            "berth.toml",
            &format!(
                "env_file = \"base.env\"\n[app]\nname = \"vault\"\n[image]\nfrom = \"base:1\"\n\
                 [[image.steps]]\ncopy = [\"www/\", \"/www/\"]\n[[image.steps]]\nenv = {{ FROM_IMAGE = \"image\", LEVEL = \"image\" }}\n\
                 [[image.steps]]\nuser = \"www\"\n[[image.steps]]\ncmd = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
                 [env]\nLEVEL = \"base-env\"\nBASE_ENV = \"yes\"\n\
                 [services.web]\nenv_file = \"web.env\"\nenv = {{ LEVEL = \"base-svc\", BASE_SVC = \"yes\" }}\nports = [\"{publish}:8080\"]\n\
                 health = {{ http = \"/\", port = 8080, interval = \"100ms\", timeout = \"1s\", retries = 3 }}\n\
                 [rollout]\ndrain = \"200ms\"\ntimeout = \"10s\"\n"
            ),
        );
}

/// An environment file with every level of the precedence and the four secrets.
fn env_file(head: &str) -> String {
    format!(
        "{head}env_file = [\"env.env\"]\n[env]\nLEVEL = \"env-env\"\nENV_ENV = \"yes\"\n\
         [secrets]\nDB = {{ env = \"TEST_DB_PASSWORD\" }}\nTOKEN = {{ env = \"TEST_TOKEN\", as = \"file\" }}\n\
         KEY = {{ file = \"keys/key\", as = \"file\" }}\nCERT = {{ file = \"keys/cert\" }}\n\
         [services.web]\nenv = {{ LEVEL = \"env-svc\", ENV_SVC = \"yes\" }}\n"
    )
}

fn with_secrets(b: Berth) -> Berth {
    b.env("TEST_DB_PASSWORD", DB).env("TEST_TOKEN", TOKEN)
}

/// Runs `sh -c script` in container `name` of the store at `store`.
fn exec(store: &std::path::Path, name: &str, script: &str) -> String {
    Berth::new()
        .env("BERTH_STORE", store.to_str().unwrap())
        .args(["exec", name, "sh", "-c", script])
        .run()
        .ok()
        .stdout
}

/// What a replica sees: its variables, and each secret file's mode, owner, content, and
/// the mount it is on.
fn assert_delivered(store: &std::path::Path, replica: &str) {
    let env = exec(store, replica, "env");
    for want in [
        "LEVEL=env-svc",
        "FROM_IMAGE=image",
        "FROM_BASE_FILE=yes",
        "BASE_ENV=yes",
        "WEB_FILE=yes",
        "BASE_SVC=yes",
        "ENV_FILE=yes",
        "ENV_ENV=yes",
        "ENV_SVC=yes",
        &format!("DB={DB}"),
        &format!("CERT={CERT}"),
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{replica}: `{want}` is not in its environment:\n{env}"
        );
    }
    assert!(
        !env.contains(KEY) && !env.contains(TOKEN),
        "file secrets stay out of env: {env}"
    );
    let files = exec(
        store,
        replica,
        "for f in KEY TOKEN; do stat -c \"$f %a %u %g\" /run/secrets/$f; cat /run/secrets/$f; echo; done; grep ' /run/secrets ' /proc/mounts",
    );
    for want in [
        "KEY 400 33 33".to_string(),
        KEY.to_string(),
        "TOKEN 400 33 33".to_string(),
        TOKEN.to_string(),
    ] {
        assert!(files.contains(&want), "{replica}: {want} in:\n{files}");
    }
    let mount = files.lines().last().unwrap_or_default();
    assert!(
        mount.starts_with("secrets /run/secrets tmpfs ro,"),
        "{replica}: /run/secrets is a read-only tmpfs: {mount}"
    );
}

/// Every file under `dir` (but `except`) that holds one of the secret values.
fn leaks(dir: &std::path::Path, except: &dyn Fn(&std::path::Path) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if md.is_dir() {
                // Containers' root filesystems hold the image, not state.
                if !path.ends_with("rootfs") && !path.ends_with("upper") {
                    stack.push(path);
                }
            } else if md.is_file() && !except(&path) {
                let bytes = std::fs::read(&path).unwrap_or_default();
                for v in [DB, KEY, TOKEN, CERT] {
                    if bytes.windows(v.len()).any(|w| w == v.as_bytes()) {
                        found.push(format!("{} holds {v}", path.display()));
                    }
                }
            }
        }
    }
    found
}

/// The one file allowed to hold secret values: a release's 0600 secrets file.
fn is_secrets_file(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    p.parent().is_some_and(|d| d.ends_with("secrets")) && mode == 0o600
}

/// The processes' environments and command lines of everything berth started.
fn process_leaks(pids_of: &str) -> Vec<String> {
    let mut found = Vec::new();
    for d in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(d.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmdline).to_string();
        if !cmd.starts_with(pids_of) {
            continue;
        }
        let environ = std::fs::read(d.path().join("environ")).unwrap_or_default();
        for v in [DB, KEY, TOKEN, CERT] {
            if cmd.contains(v) || String::from_utf8_lossy(&environ).contains(v) {
                found.push(format!("{cmd} holds {v}"));
            }
        }
    }
    found
}

#[test]
fn declared_configuration_is_what_runs_on_this_machine() {
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let port = util::free_port();
    write_project(&p, &format!("127.0.0.1:{port}"));
    p.file("environments/dev.toml", &env_file("hosts = [\"local\"]\n"));

    // `config` shows the effective environment, and secrets only redacted.
    let config = with_secrets(p.berth())
        .args(["--json", "config", "--env", "dev"])
        .run()
        .ok();
    let c: serde_json::Value = serde_json::from_str(&config.stdout).unwrap();
    assert_eq!(c["services"]["web"]["env"]["LEVEL"], "env-svc", "{c}");
    assert_eq!(c["secrets"]["DB"]["value"], "<redacted>");
    assert!(leaks_in(&config.stdout).is_empty(), "{}", config.stdout);

    // A secret whose variable is unset stops the deploy: exit 2, nothing started.
    let missing = p
        .berth()
        .env("TEST_TOKEN", TOKEN)
        .args(["deploy", "--env", "dev"])
        .run();
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("TEST_DB_PASSWORD")
            && missing.stderr.contains("`DB`")
            && missing.stderr.contains("dev.toml:7"),
        "{}",
        missing.stderr
    );
    let ps = p.berth().args(["--json", "ps", "-a"]).run().ok();
    assert_eq!(ps.stdout.trim(), "[]", "no container was started");

    with_secrets(p.berth())
        .args(["deploy", "--env", "dev"])
        .run()
        .ok();
    assert_delivered(&p.store(), "vault-dev-web-1-0");

    // Rotation: a new value rolls out new replicas, with no failed request.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU32::new(0));
    let client = {
        let (stop, failed) = (stop.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if !util::http_get(port, "/", 1).is_some_and(|r| r.contains(" 200 ")) {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let rotated = "db-pw-ROTATED-77a";
    p.berth()
        .env("TEST_DB_PASSWORD", rotated)
        .env("TEST_TOKEN", TOKEN)
        .args(["deploy", "--env", "dev"])
        .run()
        .ok();
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during the rotation"
    );
    let env = exec(&p.store(), "vault-dev-web-2-0", "env");
    assert!(env.lines().any(|l| l == format!("DB={rotated}")), "{env}");
    let list = p
        .berth()
        .args(["--json", "releases", "--env", "dev"])
        .run()
        .ok();
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(
        list[0]["changes"],
        serde_json::json!(["secrets"]),
        "{}",
        list[0]
    );

    // No value anywhere but the 0600 secrets files and the containers themselves.
    let mut found = leaks(&p.store(), &is_secrets_file);
    found.extend(process_leaks("berth-"));
    for args in [
        vec!["--json", "inspect", "vault-dev-web-2-0"],
        vec!["--json", "releases", "--env", "dev"],
        vec!["--json", "ps", "-a"],
        vec!["logs", "vault-dev-web-2-0"],
    ] {
        let r = p.berth().args(args.clone()).run();
        for v in [DB, KEY, TOKEN, CERT, rotated] {
            if r.stdout.contains(v) || r.stderr.contains(v) {
                found.push(format!("`berth {}` shows {v}", args.join(" ")));
            }
        }
    }
    assert!(
        found.is_empty(),
        "secret values leaked:\n{}",
        found.join("\n")
    );
}

fn leaks_in(text: &str) -> Vec<&'static str> {
    [DB, KEY, TOKEN, CERT]
        .into_iter()
        .filter(|v| text.contains(v))
        .collect()
}

#[test]
fn agents_get_secrets_only_over_tls_and_run_them_as_declared() {
    let mut hosts = TestHosts::new(151, 2);
    let reg = Registry::start_at("198.18.151.1", &[], "");
    let p = TempProject::new();
    p.with_busybox_base();
    let _cleanup = p.cleanup();
    let token = "secrets-agents-token-0123456789";
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
    write_project(&p, "8080");
    // Over plain http the deploy refuses, before anything moves.
    p.file(
        "environments/uat.toml",
        &env_file(&format!(
            "registry = \"http://{}/vault\"\nhosts = [\"http://{}:7443\"]\n",
            reg.host(),
            hosts.addr(0)
        )),
    );
    let plain = with_secrets(p.berth())
        .env("BERTH_AGENT_TOKEN", token)
        .args(["deploy", "--env", "uat"])
        .run();
    assert_eq!(plain.code, 2, "{}", plain.stderr);
    assert!(plain.stderr.contains("only over TLS"), "{}", plain.stderr);

    let hosts_toml: Vec<String> = (0..2)
        .map(|i| {
            format!(
                "{{ url = \"https://{}:7443\", fingerprint = \"{}\" }}",
                hosts.addr(i),
                pins[i]
            )
        })
        .collect();
    p.file(
        "environments/uat.toml",
        &(env_file(&format!(
            "registry = \"http://{}/vault\"\nhosts = [{}]\n",
            reg.host(),
            hosts_toml.join(", ")
        )) + "[agent]\ntoken = { file = \"token\" }\n"),
    );
    with_secrets(p.berth())
        .args(["deploy", "--env", "uat"])
        .run()
        .ok();
    for i in 0..2 {
        let store = hosts.states[i].path().join("store");
        assert_delivered(&store, "vault-uat-web-1-0");
        // The agent keeps the values in the one 0600 file of its state, nowhere else.
        let found = leaks(hosts.states[i].path(), &is_secrets_file);
        assert!(found.is_empty(), "host {i}:\n{}", found.join("\n"));
    }
    // The registry (ledger records included) holds no value.
    let found = leaks(reg.dir.path(), &|_| false);
    assert!(found.is_empty(), "the registry:\n{}", found.join("\n"));
    let found = process_leaks("berth");
    assert!(found.is_empty(), "{}", found.join("\n"));
}
