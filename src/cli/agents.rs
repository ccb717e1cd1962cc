//! `berth agent` (the per-host API), and berth's side of talking to agents: the token
//! (`[agent] token` or `BERTH_AGENT_TOKEN`), TLS (a pinned fingerprint, `BERTH_AGENT_CA`
//! or the system's roots), one request to every host at once, and a release applied or
//! scaled host by host.

use miette::miette;
use serde_json::json;

use super::deploy::{ScaleArgs, deployment_name, env_reference, scaled};
use super::{CliError, GlobalOpts, Output};
use crate::deploy::ReleasePlan;
use crate::manifest::schema::AppConfig;
use crate::manifest::values::HostUrl;

/// Arguments of `berth agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", required_unless_present = "init_tls")]
    pub listen: Option<std::net::SocketAddr>,
    /// The agent's store: images, containers, releases.
    #[arg(long, value_name = "DIR", required_unless_present = "init_tls")]
    pub state: Option<std::path::PathBuf>,
    /// A file holding the bearer token clients must send.
    #[arg(long, value_name = "FILE", required_unless_present = "init_tls")]
    pub token_file: Option<std::path::PathBuf>,
    /// TLS certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Write a self-signed certificate and key (agent.crt, agent.key) into DIR, print the
    /// certificate's SHA-256 fingerprint, and exit.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["listen", "state", "token_file"])]
    pub init_tls: Option<std::path::PathBuf>,
    /// Names and addresses the certificate is for (with --init-tls) [default: localhost,
    /// 127.0.0.1 and this host's name].
    #[arg(long, value_name = "NAME")]
    pub san: Vec<String>,
}

/// Writes a self-signed pair for the agent; returns the certificate's fingerprint.
fn init_tls(dir: &std::path::Path, sans: &[String]) -> Result<String, CliError> {
    use sha2::Digest as _;
    let mut names = sans.to_vec();
    if names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into()];
        if let Ok(h) = nix::unistd::gethostname()
            && let Ok(h) = h.into_string()
        {
            names.push(h);
        }
    }
    let pair = rcgen::generate_simple_self_signed(names)
        .map_err(|e| CliError::failed(miette!("cannot make a certificate: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::failed(miette!("cannot create {}: {e}", dir.display())))?;
    let write = |name: &str, text: String, mode: u32| -> Result<(), CliError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| CliError::failed(miette!("cannot write {}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .map_err(|e| CliError::failed(miette!("cannot write {}: {e}", path.display())))
    };
    write("agent.key", pair.signing_key.serialize_pem(), 0o600)?;
    write("agent.crt", pair.cert.pem(), 0o644)?;
    let digest = sha2::Sha256::digest(pair.cert.der());
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// `berth agent --listen ADDR --state DIR --token-file FILE [--tls-cert C --tls-key K]`, or
/// `berth agent --init-tls DIR`.
pub fn agent(_g: &GlobalOpts, args: &AgentArgs, out: &mut Output) -> Result<(), CliError> {
    if let Some(dir) = &args.init_tls {
        let fingerprint = init_tls(dir, &args.san)?;
        out.note(format!(
            "wrote {} and {}; start the agent with --tls-cert and --tls-key, and trust the\n\
             certificate on clients with BERTH_AGENT_CA={}",
            dir.join("agent.crt").display(),
            dir.join("agent.key").display(),
            dir.join("agent.crt").display()
        ))?;
        out.line(format!("SHA-256 fingerprint: {fingerprint}"))?;
        return Ok(());
    }
    let (Some(listen), Some(state), Some(token_file)) =
        (&args.listen, &args.state, &args.token_file)
    else {
        return Err(CliError::invalid(miette!(
            "--listen, --state and --token-file are required"
        )));
    };
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| CliError::failed(miette!("cannot read {}: {e}", token_file.display())))?
        .trim()
        .to_string();
    if token.len() < 16 {
        return Err(CliError::invalid(miette!(
            help = "head -c 32 /dev/urandom | base64 > token",
            "the token in {} is shorter than 16 characters",
            token_file.display()
        )));
    }
    let program = std::env::current_exe()
        .map_err(|e| CliError::failed(miette!("cannot find berth's own binary: {e}")))?;
    let cfg = crate::deploy::agent::AgentConfig {
        listen: *listen,
        state: state.clone(),
        token,
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
        program,
    };
    crate::deploy::agent::serve(cfg, &|addr| eprintln!("berth agent listening on {addr}"))
        .map_err(|e| CliError::failed(miette!("the agent stopped: {e}")))
}

/// The agents' token: the environment's `[agent] token` reference, else
/// `BERTH_AGENT_TOKEN`.
fn agent_token(config: &AppConfig) -> Result<String, CliError> {
    if let Some(r) = &config.agent.token {
        return r
            .resolve("agent.token", &config.project_dir)
            .map(|s| s.expose().to_string())
            .map_err(|e| CliError::invalid(miette!("{e}")));
    }
    std::env::var("BERTH_AGENT_TOKEN").map_err(|_| {
        CliError::invalid(miette!(
            help = format!(
                "set [agent] token = {{ env = \"VAR\" }} in environments/{}.toml, or export BERTH_AGENT_TOKEN",
                config.environment
            ),
            "talking to the agents of {} needs their token",
            config.environment
        ))
    })
}

/// An HTTP client for agents. Their certificate is trusted by the environment's pinned
/// `[agent] fingerprint` alone when set (self-signed, no CA, no name check: the pin is
/// the identity), else by `BERTH_AGENT_CA` (a PEM file) or the system's roots.
fn agent_http(
    config: &AppConfig,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, CliError> {
    crate::registry_client::install_crypto();
    let mut b = reqwest::Client::builder().timeout(timeout);
    if let Some(pin) = &config.agent.fingerprint {
        b = b.tls_backend_preconfigured(pinned::client_config(pin.0));
    } else {
        let extra: Vec<std::path::PathBuf> = std::env::var_os("BERTH_AGENT_CA")
            .map(std::path::PathBuf::from)
            .into_iter()
            .collect();
        let config = crate::registry_client::tls_config(&extra)
            .map_err(|e| CliError::failed(miette!("BERTH_AGENT_CA: {e}")))?;
        match config {
            Some(c) => b = b.tls_backend_preconfigured(c),
            None => {
                for ca in &extra {
                    let pem = std::fs::read(ca).map_err(|e| {
                        CliError::failed(miette!(
                            "cannot read BERTH_AGENT_CA {}: {e}",
                            ca.display()
                        ))
                    })?;
                    let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                        CliError::failed(miette!("BERTH_AGENT_CA is not a PEM certificate: {e}"))
                    })?;
                    b = b.add_root_certificate(cert);
                }
            }
        }
    }
    b.build().map_err(|e| CliError::failed(miette!("{e}")))
}

/// TLS that trusts exactly one certificate, by its SHA-256 fingerprint.
mod pinned {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use sha2::Digest as _;

    #[derive(Debug)]
    struct Pinned {
        fingerprint: [u8; 32],
        provider: Arc<CryptoProvider>,
    }

    impl ServerCertVerifier for Pinned {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let seen: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
            if seen == self.fingerprint {
                Ok(ServerCertVerified::assertion())
            } else {
                let hex: Vec<String> = seen.iter().map(|b| format!("{b:02X}")).collect();
                Err(rustls::Error::General(format!(
                    "the agent's certificate has fingerprint {}, not the one pinned in [agent] fingerprint",
                    hex.join(":")
                )))
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// A client config that accepts only the certificate with this fingerprint.
    pub fn client_config(fingerprint: [u8; 32]) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                fingerprint,
                provider,
            }))
            .with_no_client_auth()
    }
}

/// One request to an agent: its JSON answer, or its error message.
async fn agent_call(
    http: reqwest::Client,
    token: String,
    method: reqwest::Method,
    url: String,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let mut req = http.request(method, &url).bearer_auth(&token);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.map_err(|e| {
        // reqwest's message stops at "error sending request"; the cause (a refused
        // connection, a certificate that is not the pinned one) is in the chain.
        let mut text = format!("cannot reach {url}");
        let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    })?;
    let status = resp.status();
    let v: serde_json::Value =
        serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or_default();
    if status.is_success() {
        Ok(v)
    } else {
        Err(v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{url} answered {status}")))
    }
}

/// A host and its agent's answer (or what went wrong).
pub(super) type HostAnswer = (String, Result<serde_json::Value, String>);

/// Calls every agent of `config` with `method path [body]`; each host's answer or error.
pub(super) fn each_agent(
    config: &AppConfig,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Vec<HostAnswer>, CliError> {
    let token = agent_token(config)?;
    let rt = crate::registry_client::runtime()
        .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))?;
    let http = agent_http(config, std::time::Duration::from_secs(120))?;
    let hosts = agent_urls(config);
    let answers = rt.block_on(futures_util::future::join_all(hosts.iter().map(|base| {
        let (http, token, method, body) =
            (http.clone(), token.clone(), method.clone(), body.clone());
        agent_call(http, token, method, format!("{base}{path}"), body)
    })));
    Ok(hosts.into_iter().zip(answers).collect())
}

pub(super) fn is_remote(config: &AppConfig) -> bool {
    !config.hosts.is_empty()
        && config
            .hosts
            .iter()
            .all(|h| matches!(h, HostUrl::Agent { .. }))
}

/// The agents of an environment: base URLs.
pub(super) fn agent_urls(config: &AppConfig) -> Vec<String> {
    config.hosts.iter().filter_map(agent_urls_of).collect()
}

/// Applies a release through the agents, which pull it from the environment's registry;
/// host by host in batches, and a host that fails puts the hosts already updated back on
/// their previous release.
pub(super) fn apply_remote(
    config: &AppConfig,
    plan: &ReleasePlan,
    no_rollback: bool,
    out: &mut Output,
) -> Result<Vec<serde_json::Value>, CliError> {
    let dst = env_reference(config)?;
    let token = agent_token(config)?;
    let rt = crate::registry_client::runtime()
        .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))?;
    let quiet = out.quiet || out.json;
    let image = agent_image(&dst, &plan.digest);
    let (username, password) = match crate::registry_client::auth::credential_for(&dst.registry) {
        Ok(Some(crate::registry_client::auth::Credential::Basic { username, password })) => {
            (Some(username), Some(password.0))
        }
        _ => (None, None),
    };
    let request = crate::deploy::api::ApplyRequest {
        plan: plan.clone(),
        image,
        username,
        password,
    };
    let http = agent_http(
        config,
        plan.rollout.timeout + std::time::Duration::from_secs(120),
    )?;
    let call = |url: String, body: serde_json::Value| {
        agent_call(
            http.clone(),
            token.clone(),
            reqwest::Method::POST,
            url,
            Some(body),
        )
    };
    // Batches of `rollout.batch` hosts at once, each batch done before the next; up to
    // `rollout.max_failures` hosts may fail before the rollout stops.
    let batch = config.rollout.batch.max(1) as usize;
    let mut updated: Vec<String> = Vec::new();
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut results = Vec::new();
    let hosts = agent_urls(config);
    let spinner = super::progress::Spinner::new(!quiet);
    for group in hosts.chunks(batch) {
        spinner.show(format!("applying on {}", group.join(", ")));
        let outcomes = rt.block_on(futures_util::future::join_all(group.iter().map(|base| {
            let body = serde_json::to_value(&request).expect("a request serialises");
            call(format!("{base}/v1/apply"), body)
        })));
        for (base, outcome) in group.iter().zip(outcomes) {
            match outcome {
                Ok(record) => {
                    if !quiet {
                        spinner
                            .suspend(|| eprintln!("{base}: release {} is live", record["number"]));
                    }
                    results.push(json!({ "host": base, "release": record["number"] }));
                    updated.push(base.clone());
                }
                Err(message) => {
                    if !quiet {
                        spinner.suspend(|| eprintln!("{base}: failed: {message}"));
                    }
                    failures.push((base.clone(), message));
                }
            }
        }
        if failures.len() > config.rollout.max_failures as usize {
            spinner.finish();
            if !no_rollback {
                for done in &updated {
                    let body = json!({ "deployment": plan.deployment() });
                    let back = rt.block_on(call(format!("{done}/v1/rollback"), body));
                    if !quiet {
                        match back {
                            Ok(_) => eprintln!("{done}: rolled back"),
                            Err(e) => eprintln!("{done}: rollback failed: {e}"),
                        }
                    }
                }
            }
            let (host, message) = &failures[0];
            return Err(CliError::failed(miette!(
                help = if no_rollback {
                    "--no-rollback: the hosts already updated keep the new release"
                } else {
                    "the hosts already updated were put back on their previous release"
                },
                "host {host} failed: {message}"
            )));
        }
    }
    spinner.finish();
    Ok(results)
}

/// `scale` through agents: each host's live plan with the new counts, applied there.
/// Returns the image they run and each host's answer.
pub(super) fn scale_remote(
    config: &AppConfig,
    args: &ScaleArgs,
) -> Result<(crate::store::Digest, Vec<HostAnswer>), CliError> {
    let deployment = deployment_name(config);
    let dst = env_reference(config)?;
    let live = each_agent(
        config,
        reqwest::Method::GET,
        &format!("/v1/status?deployment={deployment}"),
        None,
    )?;
    let mut answers = Vec::new();
    let mut digest = None;
    for (host, answer) in live {
        let record = match answer {
            Ok(v) if !v.is_null() => v,
            Ok(_) => {
                answers.push((host, Err("nothing deployed".to_string())));
                continue;
            }
            Err(e) => {
                answers.push((host, Err(e)));
                continue;
            }
        };
        let plan: ReleasePlan = serde_json::from_value(record["plan"].clone())
            .map_err(|e| CliError::failed(miette!("{host} sent a plan berth cannot read: {e}")))?;
        let plan = scaled(&plan, args)?;
        digest.get_or_insert_with(|| plan.digest.clone());
        let request = crate::deploy::api::ApplyRequest {
            image: agent_image(&dst, &plan.digest),
            plan,
            username: None,
            password: None,
        };
        let one = AppConfig {
            hosts: config
                .hosts
                .iter()
                .filter(|h| agent_urls_of(h).as_deref() == Some(host.as_str()))
                .cloned()
                .collect(),
            ..config.clone()
        };
        let mut r = each_agent(
            &one,
            reqwest::Method::POST,
            "/v1/apply",
            Some(serde_json::to_value(&request).expect("a request serialises")),
        )?;
        answers.push(r.remove(0));
    }
    let Some(digest) = digest else {
        return Err(CliError::failed(miette!(
            help = "deploy it first",
            "{deployment} runs on no host"
        )));
    };
    Ok((digest, answers))
}

/// `[http://]registry/repository@digest`: how an agent is told where to pull an image.
fn agent_image(dst: &crate::registry_client::Reference, digest: &crate::store::Digest) -> String {
    format!(
        "{}{}/{}@{digest}",
        if dst.plain_http { "http://" } else { "" },
        dst.registry,
        dst.repository
    )
}

/// An agent host's base URL.
fn agent_urls_of(h: &HostUrl) -> Option<String> {
    match h {
        HostUrl::Agent { tls, host, port } => Some(format!(
            "{}://{host}:{port}",
            if *tls { "https" } else { "http" }
        )),
        HostUrl::Local => None,
    }
}
