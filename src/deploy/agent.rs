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
use serde_json::json;

use super::api::{ApplyRequest, DeploymentQuery, DeploymentRequest, LogsQuery, MAX_BODY};
use super::{DeployError, Outcome, local};
use crate::registry_client::auth::{Credential, Secret};
use crate::registry_client::{Client, ClientOptions, Reference, pull};
use crate::store::Store;

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

/// True when `presented` is the agent's token. Both sides are hashed to SHA-256 first and
/// the two fixed-length digests compared in constant time, so neither the position of the
/// first difference nor the token's length shows in the timing, and no length (none, one
/// byte, the token repeated) can match by wrapping around.
pub fn same_token(presented: &[u8], token: &[u8]) -> bool {
    use sha2::Digest as _;
    let (a, b) = (sha2::Sha256::digest(presented), sha2::Sha256::digest(token));
    let diff = a.iter().zip(b.iter()).fold(0u8, |d, (x, y)| d | (x ^ y));
    // `black_box` keeps the compiler from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
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

/// A request the agent understood: its route and its decoded, checked arguments.
enum Route {
    Apply(Box<ApplyRequest>),
    Rollback(DeploymentRequest),
    Status(DeploymentQuery),
    Releases(DeploymentQuery),
    Logs(LogsQuery),
    Down(DeploymentRequest),
}

/// Decodes a request into its route; a refusal is a status and a message.
fn route(
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
) -> Result<Route, (StatusCode, String)> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        (
            StatusCode::BAD_REQUEST,
            format!("the {what} is not valid: {e}"),
        )
    };
    let json = |what: &'static str| move |e: serde_json::Error| bad(what, &e);
    let form = |e: serde_urlencoded::de::Error| bad("query", &e);
    Ok(match (method, path) {
        (&Method::POST, "/v1/apply") => {
            let r: ApplyRequest = serde_json::from_slice(body).map_err(json("apply request"))?;
            r.plan.validate().map_err(|e| bad("apply request", &e))?;
            Route::Apply(Box::new(r))
        }
        (&Method::POST, "/v1/rollback") => {
            Route::Rollback(serde_json::from_slice(body).map_err(json("rollback request"))?)
        }
        (&Method::POST, "/v1/down") => {
            Route::Down(serde_json::from_slice(body).map_err(json("down request"))?)
        }
        (&Method::GET, "/v1/status") => {
            Route::Status(serde_urlencoded::from_str(query).map_err(form)?)
        }
        (&Method::GET, "/v1/releases") => {
            Route::Releases(serde_urlencoded::from_str(query).map_err(form)?)
        }
        (&Method::GET, "/v1/logs") => Route::Logs(serde_urlencoded::from_str(query).map_err(form)?),
        _ => return Err((StatusCode::NOT_FOUND, "no such endpoint".into())),
    })
}

async fn handle(
    cfg: Arc<AgentConfig>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // No header, another scheme or an empty token is refused before any comparison.
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|h| h.as_bytes().strip_prefix(b"Bearer "))
        .filter(|t| !t.is_empty());
    if !presented.is_some_and(|t| same_token(t, cfg.token.as_bytes())) {
        return Ok(reply(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "a valid bearer token is required" }),
        ));
    }
    let (parts, body) = req.into_parts();
    // Bounded: a body above MAX_BODY is refused without being read to its end.
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return Ok(reply(status, json!({ "error": format!("the body: {e}") })));
        }
    };
    let route = match route(
        &parts.method,
        parts.uri.path(),
        parts.uri.query().unwrap_or_default(),
        &body,
    ) {
        Ok(r) => r,
        Err((status, message)) => return Ok(reply(status, json!({ "error": message }))),
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
    Ok(serve_route(cfg, store, route).await)
}

async fn serve_route(cfg: Arc<AgentConfig>, store: Store, route: Route) -> Response<Full<Bytes>> {
    let bad = |m: String| reply(StatusCode::BAD_REQUEST, json!({ "error": m }));
    match route {
        Route::Apply(r) => {
            let r = *r;
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
                    return reply(
                        StatusCode::BAD_GATEWAY,
                        json!({ "error": format!("cannot pull {image}: {e}"), "kind": "pull" }),
                    );
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
            match done {
                Ok((record, retire)) => {
                    // Live: answer now; the previous release drains and stops after.
                    finish_in_background(&cfg, retire);
                    reply(StatusCode::OK, serde_json::to_value(&record).expect("json"))
                }
                Err(e) => error_reply(&e),
            }
        }
        Route::Rollback(r) => {
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
                return reply(
                    StatusCode::CONFLICT,
                    json!({ "error": format!("{} has no earlier release", r.deployment) }),
                );
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
            match done {
                Ok((record, retire)) => {
                    // Live: answer now; the previous release drains and stops after.
                    finish_in_background(&cfg, retire);
                    reply(StatusCode::OK, serde_json::to_value(&record).expect("json"))
                }
                Err(e) => error_reply(&e),
            }
        }
        Route::Status(q) => {
            let live = local::current(&store, &q.deployment);
            let mut v = serde_json::to_value(&live).expect("json");
            if let Some(live) = &live {
                v["services"] = json!(local::replica_health(&store, live));
            }
            reply(StatusCode::OK, v)
        }
        Route::Logs(q) => {
            let since = match q.since.as_deref().map(str::parse::<jiff::Timestamp>) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => return bad(format!("since: {e}")),
            };
            match local::replica_logs(&store, &q.deployment, q.service.as_deref(), q.tail, since) {
                Ok(lines) => reply(StatusCode::OK, serde_json::to_value(&lines).expect("json")),
                Err(e) => error_reply(&e),
            }
        }
        Route::Releases(q) => {
            let list: Vec<serde_json::Value> = local::releases(&store, &q.deployment)
                .iter()
                .map(|r| {
                    json!({
                        "release": r.number, "digest": r.digest, "revision": r.revision,
                        "time": r.time, "actor": r.actor, "outcome": r.outcome, "error": r.error,
                    })
                })
                .collect();
            reply(StatusCode::OK, json!(list))
        }
        Route::Down(r) => {
            let done = tokio::task::spawn_blocking(move || local::down(&store, &r.deployment))
                .await
                .expect("the down task");
            match done {
                Ok(n) => reply(StatusCode::OK, json!({ "removed": n })),
                Err(e) => error_reply(&e),
            }
        }
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

    /// Regression: the first check folded the length difference into 8 bits and compared
    /// cyclically, so against a 256-character token an empty one (no header at all) and
    /// the token repeated to a longer length were accepted.
    #[test]
    fn tokens_compare_whole_at_every_length() {
        for len in [16usize, 255, 256, 257, 512] {
            let token: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(same_token(&token, &token), "{len}: the token itself");
            assert!(!same_token(b"", &token), "{len}: empty");
            let mut repeated = token.clone();
            while repeated.len() < len + 256 {
                repeated.extend_from_slice(&token);
            }
            for n in [len + 1, len + 256, repeated.len()] {
                assert!(
                    !same_token(&repeated[..n], &token),
                    "{len}: repeated to {n}"
                );
            }
            assert!(!same_token(&token[..len - 1], &token), "{len}: a prefix");
            let mut flipped = token.clone();
            flipped[len - 1] ^= 1;
            assert!(!same_token(&flipped, &token), "{len}: last byte differs");
        }
    }
}
