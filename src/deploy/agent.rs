//! `berth agent`: one per host, an HTTP API (JSON, hyper on tokio) through which a laptop
//! or CI applies releases to the host. Every request needs the bearer token (compared in
//! constant time; 401 otherwise); TLS is optional. A release names its image **by
//! digest**; the agent pulls what its store lacks from the registry (verified) and applies
//! it with the same engine as `hosts = ["local"]`.
//!
//! - `POST /v1/apply` `{plan, image, username?, password?}` → the live release record
//! - `POST /v1/rollback` `{deployment, to?, digest?}` → back to the release before the live
//!   one, to release `to`, or to the newest release of `digest` that served
//! - `GET /v1/status?deployment=D` → the live release with `services` (running/total
//!   replicas), or `null`
//! - `GET /v1/releases?deployment=D` → the host's ledger
//! - `GET /v1/logs?deployment=D[&service=S][&tail=N][&since=T]` → the live replicas' log
//!   lines (since an RFC 3339 time)
//! - `POST /v1/down` `{deployment}`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{DeployError, Outcome, ReleasePlan, local};
use crate::registry_client::auth::{Credential, Secret};
use crate::registry_client::{Client, ClientOptions, Reference, pull};
use crate::store::{Digest, Store};

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Its store (images, containers, releases).
    pub state: PathBuf,
    /// The bearer token requests must carry.
    pub token: String,
    /// Certificate and key (PEM) for TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// berth's binary (for supervisors and routers).
    pub program: PathBuf,
}

/// `POST /v1/apply`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The release.
    pub plan: ReleasePlan,
    /// `registry/repository@sha256:…`: where to pull the image from.
    pub image: String,
    /// Registry user, if it wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Registry password (kept in memory only, never logged).
    #[serde(default)]
    pub password: Option<String>,
}

/// `POST /v1/rollback` and `/v1/down`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentRequest {
    /// `app-environment`.
    pub deployment: String,
    /// For a rollback: the release to go back to [default: the one before the live one].
    #[serde(default)]
    pub to: Option<u32>,
    /// For a rollback: the newest release of this image that served.
    #[serde(default)]
    pub digest: Option<Digest>,
}

/// Runs what is left of an applied release (the old one's drain and stop) off the
/// request's path; it holds the deployment's lock until done.
fn finish_in_background(cfg: &Arc<AgentConfig>, retire: local::Retire) {
    let state = cfg.state.clone();
    tokio::task::spawn_blocking(move || {
        if let Ok(store) = Store::open(&state) {
            retire.run(&store, &mut |line| eprintln!("{line}"));
        }
    });
}

/// Compares without leaking where the first difference is.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8;
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn error_reply(e: &DeployError) -> Response<Full<Bytes>> {
    let (status, kind, service, logs) = match e {
        DeployError::Unhealthy { service, logs, .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "unhealthy",
            Some(service.clone()),
            logs.clone(),
        ),
        DeployError::Locked { .. } => (StatusCode::CONFLICT, "locked", None, String::new()),
        DeployError::Start { service, .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "start",
            Some(service.clone()),
            String::new(),
        ),
        DeployError::Local { .. } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "local",
            None,
            String::new(),
        ),
    };
    reply(
        status,
        json!({ "error": e.to_string(), "kind": kind, "service": service, "logs": logs }),
    )
}

async fn handle(
    cfg: Arc<AgentConfig>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    if !same_token(auth.as_bytes(), cfg.token.as_bytes()) {
        return Ok(reply(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "a valid bearer token is required" }),
        ));
    }
    let (method, path, query) = (
        req.method().clone(),
        req.uri().path().to_string(),
        req.uri().query().unwrap_or_default().to_string(),
    );
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                json!({ "error": e.to_string() }),
            ));
        }
    };
    let store = match Store::open(&cfg.state) {
        Ok(s) => s,
        Err(e) => {
            return Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "error": e.to_string() }),
            ));
        }
    };
    let bad = |m: String| Ok(reply(StatusCode::BAD_REQUEST, json!({ "error": m })));
    match (method, path.as_str()) {
        (Method::POST, "/v1/apply") => {
            let Ok(r) = serde_json::from_slice::<ApplyRequest>(&body) else {
                return bad("the body is not an apply request".into());
            };
            let image: Reference = match r.image.parse() {
                Ok(i) => i,
                Err(e) => return bad(e),
            };
            if image.digest.as_ref() != Some(&r.plan.digest) {
                return bad(format!(
                    "the image must be given by digest, and it must be the plan's ({})",
                    r.plan.digest
                ));
            }
            if !store.has_blob(&r.plan.digest) {
                let client = match Client::new(&image, &ClientOptions::default()) {
                    Ok(c) => c,
                    Err(e) => return bad(e.to_string()),
                };
                let client = match (r.username, r.password) {
                    (Some(u), Some(p)) => client.with_credential(Credential::Basic {
                        username: u,
                        password: Secret(p),
                    }),
                    _ => client,
                };
                if let Err(e) = pull::pull(&client, &store, &image, &|_, _, _| {}, None).await {
                    return Ok(reply(
                        StatusCode::BAD_GATEWAY,
                        json!({ "error": format!("cannot pull {image}: {e}"), "kind": "pull" }),
                    ));
                }
            }
            let cfg2 = cfg.clone();
            let plan = r.plan;
            let done = tokio::task::spawn_blocking(move || {
                let store = Store::open(&cfg2.state).map_err(|e| DeployError::Local {
                    what: "open the store".into(),
                    message: e.to_string(),
                })?;
                local::apply(&store, &cfg2.program, &cfg2.state, &plan, &mut |line| {
                    eprintln!("{line}");
                })
            })
            .await
            .expect("the apply task");
            Ok(match done {
                Ok((record, retire)) => {
                    // Live: answer now; the previous release drains and stops after.
                    finish_in_background(&cfg, retire);
                    reply(StatusCode::OK, serde_json::to_value(&record).expect("json"))
                }
                Err(e) => error_reply(&e),
            })
        }
        (Method::POST, "/v1/rollback") => {
            let Ok(r) = serde_json::from_slice::<DeploymentRequest>(&body) else {
                return bad("the body is not a rollback request".into());
            };
            let all = local::releases(&store, &r.deployment);
            let live = all
                .iter()
                .rev()
                .find(|x| x.outcome == Outcome::Live)
                .map(|x| x.number);
            let target = match (r.to, &r.digest) {
                (_, Some(d)) => all
                    .iter()
                    .rev()
                    .find(|x| x.digest == *d && x.outcome != Outcome::Failed)
                    .cloned(),
                (Some(n), None) => all
                    .iter()
                    .find(|x| x.number == n && x.outcome != Outcome::Failed)
                    .cloned(),
                (None, None) => all
                    .iter()
                    .rev()
                    .find(|x| x.outcome == Outcome::Retired && Some(x.number) != live)
                    .cloned(),
            };
            let Some(target) = target else {
                return Ok(reply(
                    StatusCode::CONFLICT,
                    json!({ "error": format!("{} has no earlier release", r.deployment) }),
                ));
            };
            let cfg2 = cfg.clone();
            let done = tokio::task::spawn_blocking(move || {
                let store = Store::open(&cfg2.state).map_err(|e| DeployError::Local {
                    what: "open the store".into(),
                    message: e.to_string(),
                })?;
                local::apply(
                    &store,
                    &cfg2.program,
                    &cfg2.state,
                    &target.plan,
                    &mut |_| {},
                )
            })
            .await
            .expect("the rollback task");
            Ok(match done {
                Ok((record, retire)) => {
                    // Live: answer now; the previous release drains and stops after.
                    finish_in_background(&cfg, retire);
                    reply(StatusCode::OK, serde_json::to_value(&record).expect("json"))
                }
                Err(e) => error_reply(&e),
            })
        }
        (Method::GET, "/v1/status") => {
            let deployment = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("deployment="))
                .unwrap_or_default()
                .to_string();
            let live = local::current(&store, &deployment);
            let mut v = serde_json::to_value(&live).expect("json");
            if let Some(live) = &live {
                v["services"] = json!(local::replica_health(&store, live));
            }
            Ok(reply(StatusCode::OK, v))
        }
        (Method::GET, "/v1/logs") => {
            let param = |k: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                    .map(str::to_string)
            };
            let deployment = param("deployment").unwrap_or_default();
            let tail = param("tail").and_then(|t| t.parse().ok());
            let since = param("since").and_then(|t| t.parse().ok());
            Ok(
                match local::replica_logs(
                    &store,
                    &deployment,
                    param("service").as_deref(),
                    tail,
                    since,
                ) {
                    Ok(lines) => reply(StatusCode::OK, serde_json::to_value(&lines).expect("json")),
                    Err(e) => error_reply(&e),
                },
            )
        }
        (Method::GET, "/v1/releases") => {
            let deployment = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("deployment="))
                .unwrap_or_default()
                .to_string();
            let list: Vec<serde_json::Value> = local::releases(&store, &deployment)
                .iter()
                .map(|r| {
                    json!({
                        "release": r.number, "digest": r.digest, "revision": r.revision,
                        "time": r.time, "actor": r.actor, "outcome": r.outcome, "error": r.error,
                    })
                })
                .collect();
            Ok(reply(StatusCode::OK, json!(list)))
        }
        (Method::POST, "/v1/down") => {
            let Ok(r) = serde_json::from_slice::<DeploymentRequest>(&body) else {
                return bad("the body is not a down request".into());
            };
            let done = tokio::task::spawn_blocking(move || local::down(&store, &r.deployment))
                .await
                .expect("the down task");
            Ok(match done {
                Ok(n) => reply(StatusCode::OK, json!({ "removed": n })),
                Err(e) => error_reply(&e),
            })
        }
        _ => Ok(reply(
            StatusCode::NOT_FOUND,
            json!({ "error": "no such endpoint" }),
        )),
    }
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect())
        .map_err(|e| std::io::Error::other(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the agent's API until killed. `ready` is called once it listens.
pub fn serve(cfg: AgentConfig, ready: &dyn Fn(SocketAddr)) -> std::io::Result<()> {
    // After a reboot or a crash, and every few seconds after: the live releases run
    // (running replicas are adopted as they are; dead ones start again).
    let (state, program) = (cfg.state.clone(), cfg.program.clone());
    std::thread::spawn(move || {
        loop {
            if let Ok(store) = Store::open(&state) {
                let n = local::recover(&store, &program, &state);
                if n > 0 {
                    eprintln!("started {n} replica(s) of the live releases again");
                }
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    });
    let rt = crate::registry_client::runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let acceptor = match &cfg.tls {
            Some((c, k)) => Some(tls_acceptor(c, k)?),
            None => None,
        };
        ready(listener.local_addr()?);
        let cfg = Arc::new(cfg);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let cfg = cfg.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(cfg.clone(), req));
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(a) => {
                        if let Ok(tls) = a.accept(stream).await {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"s3cret", b"s3cret"));
        assert!(!same_token(b"s3cre", b"s3cret"));
        assert!(!same_token(b"s3cret!", b"s3cret"));
        assert!(!same_token(b"S3cret", b"s3cret"));
        assert!(!same_token(b"", b"s3cret"));
    }
}
