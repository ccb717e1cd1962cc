//! The registry client against Debian's real `docker-registry`: push only what is missing,
//! pull with verification, Basic auth through Docker's config file, and peers (skopeo,
//! podman) agreeing on what berth pushed.

mod util;

use std::process::Command;

use util::{Registry, TempProject, require, run_ok};

/// A project whose image is base:1 plus one file.
fn app(content: &str) -> TempProject {
    let p = TempProject::new();
    p.with_busybox_base();
    p.file(
        "berth.toml",
        "[app]\nname = \"app\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"msg.txt\", \"/msg.txt\"]\n[[image.steps]]\ncmd = [\"cat\", \"/msg.txt\"]\n",
    )
    .file("msg.txt", content);
    p.berth().args(["build"]).run().ok();
    p
}

fn push_json(p: &TempProject, dst: &str) -> serde_json::Value {
    let out = p.berth().args(["--json", "push", "app", dst]).run().ok();
    serde_json::from_str(&out.stdout).unwrap()
}

fn actions(report: &serde_json::Value) -> Vec<String> {
    report["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["action"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn push_sends_only_what_is_missing_and_pull_verifies() {
    let reg = Registry::start(&[]);
    let p = app("version one\n");
    let dst = format!("{}/team/app:1", reg.host());

    let first = push_json(&p, &dst);
    assert_eq!(actions(&first), ["upload", "upload", "upload"], "{first}");
    let digest = first["digest"].as_str().unwrap().to_string();
    let local = p.berth().args(["inspect", "app"]).run().ok();
    let local: serde_json::Value = serde_json::from_str(&local.stdout).unwrap();
    assert_eq!(
        local["digest"], digest,
        "the registry has berth's manifest bytes"
    );

    // skopeo sees the digest berth computed.
    require("skopeo", "skopeo");
    let inspected = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{dst}"),
    ]));
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(inspected["Digest"], digest);

    // Unchanged: nothing but HEADs and the manifest.
    let uploads_before = reg.requests("POST", "/blobs/uploads/");
    let again = push_json(&p, &dst);
    assert_eq!(actions(&again), ["present", "present", "present"]);
    assert_eq!(again["bytes_sent"], 0);
    assert_eq!(reg.requests("POST", "/blobs/uploads/"), uploads_before);

    // One file changed: its layer and the config, nothing else.
    p.file("msg.txt", "version two\n");
    p.berth().args(["build"]).run().ok();
    let dry = p
        .berth()
        .args(["push", "--dry-run", "app", &dst])
        .run()
        .ok();
    assert!(dry.stderr.contains("upload"), "{}", dry.stderr);
    assert_eq!(
        reg.requests("POST", "/blobs/uploads/"),
        uploads_before,
        "a dry run sends no upload"
    );
    let second = push_json(&p, &format!("{}/team/app:2", reg.host()));
    let mut acts = actions(&second);
    acts.sort();
    assert_eq!(acts, ["present", "upload", "upload"], "{second}");
    assert_eq!(reg.requests("POST", "/blobs/uploads/"), uploads_before + 2);

    // Another repository of the same registry: mounted, not uploaded.
    let mounted = push_json(&p, &format!("{}/other/app:2", reg.host()));
    let mut acts = actions(&mounted);
    acts.sort();
    assert_eq!(acts, ["mount", "mount", "mount"], "{mounted}");

    // Pull into an empty store: verified, tagged, runnable.
    let q = TempProject::new();
    let pulled = q.berth().args(["pull", &dst]).run().ok();
    assert_eq!(pulled.last_line(), digest);
    let run = q.berth().args(["run", "--rm", &dst]).run().ok();
    assert_eq!(run.stdout, "version one\n");
    // Pulling again fetches nothing.
    let again = q.berth().args(["--json", "pull", &dst]).run().ok();
    let again: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(again["blobs_fetched"], 0);
    // By digest: verified against the reference.
    let by_digest = format!("{}/team/app@{digest}", reg.host());
    q.berth().args(["pull", &by_digest]).run().ok();
    // Into a store that has nothing else: the digest reference keeps its name, so
    // `images` lists it, `run` finds it and `gc` keeps it.
    let d = TempProject::new();
    d.berth().args(["pull", &by_digest]).run().ok();
    d.berth().args(["gc"]).run().ok();
    let listed = d.berth().args(["images", "--digests"]).run().ok().stdout;
    assert!(
        listed.contains(&by_digest) && listed.contains(&format!(" {digest} ")),
        "{listed}"
    );
    let run = d.berth().args(["run", "--rm", &by_digest]).run().ok();
    assert_eq!(run.stdout, "version one\n");
    // A digest name is the image's own digest, never another.
    let zeros = format!("mine@sha256:{}", "0".repeat(64));
    let refused = d.berth().args(["tag", &by_digest, &zeros]).run().code(2);
    assert!(refused.stderr.contains("own digest"), "{}", refused.stderr);
    d.berth()
        .args(["tag", &by_digest, &format!("mine@{digest}")])
        .run()
        .ok();
    d.berth().args(["rmi", &by_digest]).run().ok();
    assert!(
        !d.berth()
            .args(["images"])
            .run()
            .ok()
            .stdout
            .contains("team/app"),
        "rmi takes the name away"
    );

    // A build whose base names a registry pulls it.
    let b = TempProject::new();
    b.file(
        "berth.toml",
        &format!("[app]\nname = \"child\"\n[image]\nfrom = \"{dst}\"\n[[image.steps]]\ncmd = [\"cat\", \"/msg.txt\"]\n"),
    );
    b.berth().args(["build"]).run().ok();
    let run = b.berth().args(["run", "--rm", "child"]).run().ok();
    assert_eq!(run.stdout, "version one\n");

    // Errors say what is wrong.
    let missing = q
        .berth()
        .args(["pull", &format!("{}/team/app:nope", reg.host())])
        .run()
        .code(1);
    assert!(missing.stderr.contains("not found"), "{}", missing.stderr);
    let down = q.berth().args(["pull", "127.0.0.1:1/x:1"]).run().code(1);
    assert!(down.stderr.contains("cannot reach"), "{}", down.stderr);
}

#[test]
fn copy_preserves_the_digest_and_sends_only_what_is_missing() {
    let a = Registry::start(&[]);
    let b = Registry::start(&[]);
    let p = app("copied\n");
    let src = format!("{}/dev/app:1", a.host());
    let pushed = push_json(&p, &src);
    let digest = pushed["digest"].as_str().unwrap().to_string();
    let copy = |from: &str, to: &str| {
        let out = p.berth().args(["--json", "copy", from, to]).run().ok();
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()
    };
    // Same registry: mounts.
    let same = copy(&src, &format!("{}/uat/app", a.host()));
    assert_eq!(same["digest"], digest);
    assert_eq!(actions(&same), ["mount", "mount", "mount"], "{same}");
    assert_eq!(same["destination"], format!("{}/uat/app:1", a.host()));
    // Another registry: streamed, then present.
    let other = format!("{}/prod/app:1", b.host());
    let dry = p
        .berth()
        .args(["--json", "copy", "--dry-run", &src, &other])
        .run()
        .ok();
    let dry: serde_json::Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(actions(&dry), ["upload", "upload", "upload"]);
    assert_eq!(
        b.requests("POST", "/blobs/uploads/"),
        0,
        "a dry run uploads nothing"
    );
    let across = copy(&src, &other);
    assert_eq!(across["digest"], digest);
    assert_eq!(actions(&across), ["upload", "upload", "upload"]);
    let again = copy(&src, &other);
    assert_eq!(actions(&again), ["present", "present", "present"]);
    require("skopeo", "skopeo");
    let inspected = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{other}"),
    ]));
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(inspected["Digest"], digest);
    // By digest, to a digest that does not match: refused.
    let wrong = format!("{}/prod/app@sha256:{}", b.host(), "0".repeat(64));
    let refused = p
        .berth()
        .args(["copy", &format!("{}/dev/app@{digest}", a.host()), &wrong])
        .run()
        .code(1);
    assert!(refused.stderr.contains("expected"), "{}", refused.stderr);
}

#[test]
fn basic_auth_with_dockers_config_file() {
    let reg = Registry::start(&[("ci", "s3cret-pass")]);
    let p = app("secured\n");
    let docker_config = p.path().join("docker-config");
    let dst = format!("{}/app:1", reg.host());
    let berth = |args: &[&str]| {
        p.berth()
            .env("DOCKER_CONFIG", docker_config.to_str().unwrap())
            .args(args)
    };
    let refused = berth(&["push", "app", &dst]).run().code(1);
    assert!(
        refused.stderr.contains("berth login"),
        "a hint: {}",
        refused.stderr
    );

    let mut wrong = Command::new(env!("CARGO_BIN_EXE_berth"));
    wrong
        .args(["login", "-u", "ci", "--password-stdin", &reg.host()])
        .env("DOCKER_CONFIG", &docker_config)
        .env("BERTH_STORE", p.store());
    let login = |cmd: &mut Command, password: &str| {
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(password.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let bad = login(&mut wrong, "nope\n");
    assert_eq!(bad.status.code(), Some(1));
    assert!(!docker_config.join("config.json").exists(), "nothing saved");
    let good = login(&mut wrong, "s3cret-pass\n");
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let config = std::fs::read_to_string(docker_config.join("config.json")).unwrap();
    assert!(
        config.contains(&reg.host()) && config.contains("\"auth\""),
        "{config}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(docker_config.join("config.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let pushed = berth(&["push", "app", &dst]).run().ok();
    assert!(!pushed.stderr.contains("s3cret") && !pushed.stdout.contains("s3cret"));
    let q = TempProject::new();
    q.berth()
        .env("DOCKER_CONFIG", docker_config.to_str().unwrap())
        .args(["pull", &dst])
        .run()
        .ok();
    // CI: credentials from the environment, no config file.
    q.berth()
        .env("BERTH_REGISTRY_USER", "ci")
        .env("BERTH_REGISTRY_PASSWORD", "s3cret-pass")
        .env("DOCKER_CONFIG", q.path().join("none").to_str().unwrap())
        .args(["pull", &dst])
        .run()
        .ok();

    berth(&["logout", &reg.host()]).run().ok();
    let refused = berth(&["push", "app", &dst]).run().code(1);
    assert!(!refused.stderr.contains("s3cret"));
}

#[test]
fn podman_runs_what_berth_pushed() {
    require("podman", "podman");
    let reg = Registry::start(&[]);
    let p = app("hello podman\n");
    let dst = format!("{}/app:1", reg.host());
    p.berth().args(["push", "app", &dst]).run().ok();
    let conf = p.path().join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\n",
    )
    .unwrap();
    let root = p.path().join("podman-root");
    let runroot = p.path().join("podman-runroot");
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &conf)
            .arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .args(args);
        c
    };
    run_ok(&mut podman(&["pull", "-q", "--tls-verify=false", &dst]));
    let out = run_ok(&mut podman(&["run", "--rm", &dst]));
    assert_eq!(out, "hello podman\n");
    let _ = podman(&["system", "reset", "-f"]).output();
}

#[test]
fn pushes_and_pulls_survive_throttling_errors_and_broken_connections() {
    use std::sync::atomic::Ordering;
    use util::fault::{FaultProxy, Faults};
    let reg = Registry::start(&[]);
    let p = TempProject::new();
    p.with_busybox_base();
    // 40 MiB that do not compress: a layer big enough for chunked upload.
    let mut big = vec![0u8; 40 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for chunk in big.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(p.path().join("big.bin"), &big).unwrap();
    p.file(
        "berth.toml",
        "[app]\nname = \"app\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"big.bin\", \"/big.bin\"]\n[[image.steps]]\ncmd = [\"sha256sum\", \"/big.bin\"]\n",
    );
    p.berth().args(["build"]).run().ok();

    let proxy = FaultProxy::start(
        reg.port,
        Faults {
            throttle_first: 2,
            unavailable_every: Some(7),
            reset_upload_after: Some(5 << 20),
            cut_download_after: None,
            stall_uploads_after: None,
            ..Faults::default()
        },
    );
    let dst = format!("{}/app:big", proxy.host());
    let pushed = p.berth().args(["--json", "push", "app", &dst]).run().ok();
    let pushed: serde_json::Value = serde_json::from_str(&pushed.stdout).unwrap();
    let c = &proxy.counters;
    assert_eq!(c.throttled.load(Ordering::SeqCst), 2);
    assert!(c.unavailable.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        c.uploads_reset.load(Ordering::SeqCst),
        1,
        "one upload was broken"
    );
    // The registry (asked directly) has exactly berth's manifest.
    require("skopeo", "skopeo");
    let inspected = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/app:big", reg.host()),
    ]));
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(inspected["Digest"], pushed["digest"]);

    let proxy = FaultProxy::start(
        reg.port,
        Faults {
            throttle_first: 1,
            unavailable_every: Some(5),
            reset_upload_after: None,
            cut_download_after: Some(3 << 20),
            stall_uploads_after: None,
            ..Faults::default()
        },
    );
    let q = TempProject::new();
    let src = format!("{}/app:big", proxy.host());
    q.berth().args(["pull", &src]).run().ok();
    assert_eq!(proxy.counters.downloads_cut.load(Ordering::SeqCst), 1);
    let sum = q.berth().args(["run", "--rm", &src]).run().ok();
    use sha2::Digest as _;
    let want = hex::encode(sha2::Sha256::digest(&big));
    assert!(sum.stdout.starts_with(&want), "{} vs {want}", sum.stdout);
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    require("openssl", "openssl");
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

/// A self-signed certificate and key in `dir` (`name.pem`, `name.key`), valid for
/// 127.0.0.1.
fn certificate(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A token server for distribution's `auth: token`: Basic-authenticated `GET /token`
/// answered with an RS256 JWT (x5c header) granting the scopes asked for.
fn token_server(
    dir: std::path::PathBuf,
    user: &'static str,
    password: &'static str,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU32>) {
    use base64::Engine;
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = count.clone();
    openssl(
        &dir,
        &[
            "x509",
            "-in",
            "token.pem",
            "-outform",
            "DER",
            "-out",
            "token.der",
        ],
    );
    let der = std::fs::read(dir.join("token.der")).unwrap();
    std::thread::spawn(move || {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut lines = Vec::new();
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                    break;
                }
                lines.push(l.trim_end().to_string());
            }
            if lines.is_empty() {
                continue;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let authorized = lines.iter().any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.eq_ignore_ascii_case("authorization") && v.trim() == expected
                })
            });
            if !authorized {
                let _ = stream.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let path = lines[0].split(' ').nth(1).unwrap_or_default().to_string();
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
            let mut access = Vec::new();
            for pair in query.split('&') {
                if let Some(("scope", v)) = pair.split_once('=') {
                    let v = percent_decode(v);
                    let parts: Vec<&str> = v.splitn(3, ':').collect();
                    if parts.len() == 3 {
                        access.push(serde_json::json!({
                            "type": parts[0], "name": parts[1],
                            "actions": parts[2].split(',').collect::<Vec<_>>(),
                        }));
                    }
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let header = serde_json::json!({
                "typ": "JWT", "alg": "RS256",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(&der)],
            });
            let claims = serde_json::json!({
                "iss": "berth-test-issuer", "sub": user, "aud": "berth-test-registry",
                "exp": now + 300, "nbf": now - 10, "iat": now,
                "jti": format!("{now}-{}", counter.load(std::sync::atomic::Ordering::SeqCst)),
                "access": access,
            });
            let signing_input = format!(
                "{}.{}",
                b64.encode(header.to_string()),
                b64.encode(claims.to_string())
            );
            let input = dir.join(format!("in-{port}"));
            std::fs::write(&input, &signing_input).unwrap();
            let sig = Command::new("openssl")
                .current_dir(&dir)
                .args(["dgst", "-sha256", "-sign", "token.key"])
                .arg(&input)
                .output()
                .unwrap()
                .stdout;
            let jwt = format!("{signing_input}.{}", b64.encode(sig));
            let body = serde_json::json!({ "token": jwt, "expires_in": 300 }).to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, count)
}

#[test]
fn bearer_tokens_from_a_token_server_are_fetched_and_cached() {
    let certs = tempfile::tempdir().unwrap();
    certificate(certs.path(), "token");
    let (token_port, token_requests) = token_server(certs.path().to_path_buf(), "ci", "tok-pass");
    let extra = format!(
        "auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: berth-test-registry\n    issuer: berth-test-issuer\n    rootcertbundle: {}\n",
        certs.path().join("token.pem").display()
    );
    let reg = Registry::start_with(&[], &extra);
    let p = app("behind tokens\n");
    let dst = format!("{}/team/app:1", reg.host());
    let refused = p
        .berth()
        .env("DOCKER_CONFIG", p.path().join("none").to_str().unwrap())
        .args(["push", "app", &dst])
        .run()
        .code(1);
    assert!(refused.stderr.contains("refused"), "{}", refused.stderr);
    let with = |args: &[&str]| {
        p.berth()
            .env("BERTH_REGISTRY_USER", "ci")
            .env("BERTH_REGISTRY_PASSWORD", "tok-pass")
            .args(args)
            .run()
    };
    let before = token_requests.load(std::sync::atomic::Ordering::SeqCst);
    let pushed = with(&["--json", "push", "app", &dst]).ok();
    let pushed: serde_json::Value = serde_json::from_str(&pushed.stdout).unwrap();
    assert_eq!(actions(&pushed), ["upload", "upload", "upload"]);
    let used = token_requests.load(std::sync::atomic::Ordering::SeqCst) - before;
    // Three blobs (HEAD, POST, PUT each) and a manifest: one token for the push scope.
    assert!(
        used <= 2,
        "tokens are cached per scope: {used} token requests"
    );
    let q = TempProject::new();
    let pulled = q
        .berth()
        .env("BERTH_REGISTRY_USER", "ci")
        .env("BERTH_REGISTRY_PASSWORD", "tok-pass")
        .args(["pull", &dst])
        .run()
        .ok();
    assert_eq!(pulled.last_line(), pushed["digest"].as_str().unwrap());
}

#[test]
fn tls_registries_are_trusted_with_a_ca_file() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    // A CA, and the registry's certificate signed by it (webpki refuses a CA as a server).
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=berth-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "registry.key",
            "-out",
            "registry.csr",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "registry.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            "registry.pem",
            "-extfile",
            "ext.cnf",
        ],
    );
    let extra = format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        certs.path().join("registry.pem").display(),
        certs.path().join("registry.key").display()
    );
    let reg = Registry::start_with(&[], &extra);
    let p = app("over tls\n");
    let dst = format!("https://{}/app:1", reg.host());
    let untrusted = p.berth().args(["push", "app", &dst]).run().code(1);
    assert!(
        untrusted.stderr.contains("--ca-file"),
        "{}",
        untrusted.stderr
    );
    let ca = certs.path().join("ca.pem");
    p.berth()
        .args(["push", "--ca-file", ca.to_str().unwrap(), "app", &dst])
        .run()
        .ok();
    // Or the CA in certs.d/<host:port>/, as Docker and podman keep them.
    let q = TempProject::new();
    let certs_d = q.path().join("config/berth/certs.d").join(reg.host());
    std::fs::create_dir_all(&certs_d).unwrap();
    std::fs::copy(&ca, certs_d.join("ca.crt")).unwrap();
    q.berth()
        .env("XDG_CONFIG_HOME", q.path().join("config").to_str().unwrap())
        .args(["pull", &dst])
        .run()
        .ok();
    let run = q
        .berth()
        .args(["run", "--rm", &format!("{}/app:1", reg.host())])
        .run()
        .ok();
    assert_eq!(run.stdout, "over tls\n");
}

#[test]
fn berth_pulls_and_runs_what_buildah_built_and_skopeo_pushed() {
    require("buildah", "buildah");
    require("skopeo", "skopeo");
    let reg = Registry::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    util::busybox_rootfs(&ctx.join("rootfs"));
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nCMD [\"/bin/sh\", \"-c\", \"echo built by buildah\"]\n",
    )
    .unwrap();
    let root = work.path().join("root");
    let runroot = work.path().join("runroot");
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .args(args);
        c
    };
    run_ok(buildah(&["bud", "--runtime", "runc", "-q", "-t", "peer:1"]).arg(&ctx));
    let archive = work.path().join("peer.tar");
    run_ok(buildah(&["push", "-q", "peer:1"]).arg(format!("oci-archive:{}", archive.display())));
    // Docker schema 2 on the wire: berth must read Docker media types too.
    let dst = format!("{}/peer:1", reg.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "-q",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}", archive.display()),
        &format!("docker://{dst}"),
    ]));
    let p = TempProject::new();
    let pulled = p.berth().args(["pull", &dst]).run().ok();
    let inspected = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{dst}"),
    ]));
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(pulled.last_line(), inspected["Digest"].as_str().unwrap());
    let run = p.berth().args(["run", "--rm", &dst]).run().ok();
    assert_eq!(run.stdout, "built by buildah\n");
    let _ = buildah(&["rmi", "-a", "-f"]).output();
}

#[test]
fn a_push_killed_midway_resumes_without_uploading_a_finished_blob_twice() {
    use util::fault::{FaultProxy, Faults};
    let reg = Registry::start(&[]);
    let p = app("killed midway\n");
    // The first blob upload goes through; the others hang until berth is killed.
    let proxy = FaultProxy::start(
        reg.port,
        Faults {
            stall_uploads_after: Some(1),
            ..Faults::default()
        },
    );
    let dst = format!("{}/app:1", proxy.host());
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["push", "app", &dst])
        .env("BERTH_STORE", p.store())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // A finished blob: its PUT ?digest= answered 201.
    let finished = || {
        reg.log()
            .lines()
            .filter(|l| l.contains("\"PUT ") && l.contains("digest=") && l.contains("\" 201 "))
            .count()
    };
    while finished() < 1 {
        assert!(
            std::time::Instant::now() < until,
            "no blob finished: {}",
            reg.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        reg.requests("PUT", "/manifests/"),
        0,
        "no manifest without its blobs"
    );
    // Again, straight to the registry: the finished blob is present, not sent again.
    let again = push_json(&p, &format!("{}/app:1", reg.host()));
    let mut acts = actions(&again);
    acts.sort();
    assert_eq!(acts, ["present", "upload", "upload"], "{again}");
    assert_eq!(finished(), 3, "each blob finished exactly once");
}

#[test]
fn credential_helpers_supply_credentials_as_for_docker() {
    let reg = Registry::start(&[("ci", "helper-pass")]);
    let p = app("from a helper\n");
    let bin = p.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-fake");
    // Answers `get` for the registry it is asked about; logs what it was asked.
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\necho \"$1 $server\" >> {log}\n[ \"$1\" = get ] || exit 1\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"ci\",\"Secret\":\"helper-pass\"}}' \"$server\"\n",
            log = p.path().join("helper.log").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let dst = format!("{}/app:1", reg.host());
    for config in [
        format!("{{\"credHelpers\": {{\"{}\": \"fake\"}}}}", reg.host()),
        "{\"credsStore\": \"fake\"}".to_string(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        let out = p
            .berth()
            .env("PATH", &path)
            .env("DOCKER_CONFIG", dir.path().to_str().unwrap())
            .args(["push", "app", &dst])
            .run()
            .ok();
        assert!(!out.stderr.contains("helper-pass"));
    }
    let log = std::fs::read_to_string(p.path().join("helper.log")).unwrap();
    assert!(log.contains(&format!("get {}", reg.host())), "{log}");
}
