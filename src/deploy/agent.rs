//! `berth agent`: one per host, an HTTP API (JSON, hyper on tokio) through which a laptop
//! or CI applies releases to the host. Every request needs the bearer token (compared in
//! constant time; 401 otherwise); TLS is optional. A release names its image **by
//! digest**; the agent pulls what its store lacks from the registry (verified) and applies
//! it with the same engine as `hosts = ["local"]`. Requests and answers are the types of
//! [`super::api`], shared with [`super::client::AgentClient`].
//!
//! - `POST /v1/preflight` `ApplyRequest` → `PreflightAnswer`: what would stop it here
//! - `POST /v1/apply` `ApplyRequest` → `HostState`: the release live here
//! - `POST /v1/rollback` `RollbackRequest` → `HostState`: an earlier release's plan again
//! - `POST /v1/revert` `RevertRequest` → `HostState`: a release undone
//! - `GET /v1/status?deployment=D` → `HostState`
//! - `GET /v1/releases?deployment=D` → `[HostRelease]`, oldest first
//! - `GET /v1/logs?deployment=D[&service=S][&tail=N][&since=T]` → the live replicas' lines
//! - `POST /v1/down` `DeploymentRequest` → `DownAnswer`
//! - `POST /v1/exec` (`Upgrade: berth-exec`, `ExecRequest` in `x-berth-exec`) → 101, then
//!   the command's stdio framed on the connection (see [`super::exec`])
//!
//! Failures answer `ErrorAnswer`: 400 invalid, 401 token, 404 no route, 409 locked or
//! nothing to roll back to, 413 body too large, 422 unhealthy or a replica that would not
//! start, 502 the image could not be pulled, 500 anything else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::api::{
    ApplyRequest, DeploymentQuery, DeploymentRequest, DownAnswer, ErrorAnswer, ExecRequest,
    HostRelease, LogsQuery, MAX_BODY, PreflightAnswer, RevertRequest, RollbackRequest,
};
use super::{DeployError, Outcome, ReleasePlan, SecretValues, exec, local};
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
            retire.run(&store, &mut |line| crate::say!("{line}"));
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

fn reply<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("an answer serialises"),
        )))
        .expect("a valid response")
}

fn refuse(status: StatusCode, kind: &str, error: impl Into<String>) -> Response<Full<Bytes>> {
    reply(
        status,
        &ErrorAnswer {
            error: error.into(),
            kind: kind.to_string(),
            service: None,
            logs: String::new(),
        },
    )
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
        &ErrorAnswer {
            error: e.to_string(),
            kind: kind.to_string(),
            service,
            logs,
        },
    )
}

/// A request the agent understood: its route and its decoded, checked arguments.
enum Route {
    Preflight(Box<ApplyRequest>),
    Apply(Box<ApplyRequest>),
    Rollback(RollbackRequest),
    Revert(RevertRequest),
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
    let apply = |what: &'static str| -> Result<Box<ApplyRequest>, (StatusCode, String)> {
        let r: ApplyRequest = serde_json::from_slice(body).map_err(json(what))?;
        r.plan.validate().map_err(|e| bad(what, &e))?;
        if let Some(k) = r
            .secrets
            .0
            .keys()
            .find(|k| !crate::manifest::values::valid_env_name(k))
        {
            return Err(bad(
                what,
                &format!("`{}` is not a secret name", k.escape_debug()),
            ));
        }
        Ok(Box::new(r))
    };
    Ok(match (method, path) {
        (&Method::POST, "/v1/preflight") => Route::Preflight(apply("preflight request")?),
        (&Method::POST, "/v1/apply") => Route::Apply(apply("apply request")?),
        (&Method::POST, "/v1/rollback") => {
            Route::Rollback(serde_json::from_slice(body).map_err(json("rollback request"))?)
        }
        (&Method::POST, "/v1/revert") => {
            Route::Revert(serde_json::from_slice(body).map_err(json("revert request"))?)
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
        return Ok(refuse(
            StatusCode::UNAUTHORIZED,
            "token",
            "a valid bearer token is required",
        ));
    }
    if req.uri().path() == "/v1/exec" {
        return Ok(exec_upgrade(cfg, req));
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
            return Ok(refuse(status, "invalid", format!("the body: {e}")));
        }
    };
    let route = match route(
        &parts.method,
        parts.uri.path(),
        parts.uri.query().unwrap_or_default(),
        &body,
    ) {
        Ok(r) => r,
        Err((status, message)) => return Ok(refuse(status, "invalid", message)),
    };
    let store = match Store::open(&cfg.state) {
        Ok(s) => s,
        Err(e) => {
            return Ok(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "local",
                e.to_string(),
            ));
        }
    };
    Ok(serve_route(cfg, store, route).await)
}

/// `POST /v1/exec`: checks the request (in the `x-berth-exec` header, base64 JSON) and
/// the replica, answers 101 and runs the command on the upgraded connection.
fn exec_upgrade(cfg: Arc<AgentConfig>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    use base64::Engine as _;
    let wants_upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"berth-exec"));
    if req.method() != Method::POST || !wants_upgrade {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid",
            "exec is a POST with `Upgrade: berth-exec`",
        );
    }
    let decoded = req
        .headers()
        .get("x-berth-exec")
        .ok_or_else(|| "no x-berth-exec header".to_string())
        .and_then(|h| {
            base64::engine::general_purpose::STANDARD
                .decode(h.as_bytes())
                .map_err(|e| e.to_string())
        })
        .and_then(|b| serde_json::from_slice::<ExecRequest>(&b).map_err(|e| e.to_string()))
        .and_then(|r| r.validate().map(|()| r).map_err(|e| e.to_string()));
    let r = match decoded {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("the exec request is not valid: {e}"),
            );
        }
    };
    let id = match Store::open(&cfg.state)
        .map_err(|e| e.to_string())
        .and_then(|store| exec::target(&store, &r.deployment, &r.service, r.replica))
    {
        Ok(id) => id,
        Err(e) => return refuse(StatusCode::CONFLICT, "conflict", e),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(io) = upgrade.await {
            let io = hyper_util::rt::TokioIo::new(io);
            exec::serve(&cfg.program, &cfg.state, &r, &id, io).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, "berth-exec")
        .body(Full::new(Bytes::new()))
        .expect("a valid response")
}

/// The registry client an apply or preflight request asks for, with its credentials.
fn registry_client(r: &ApplyRequest) -> Result<(Client, Reference), String> {
    let image: Reference = r.image.parse()?;
    if image.digest.as_ref() != Some(&r.plan.digest) {
        return Err(format!(
            "the image must be given by digest, and it must be the plan's ({})",
            r.plan.digest
        ));
    }
    let client = Client::new(&image, &ClientOptions::default()).map_err(|e| e.to_string())?;
    let client = match (&r.username, &r.password) {
        (Some(u), Some(p)) => client.with_credential(Credential::Basic {
            username: u.clone(),
            password: Secret(p.clone()),
        }),
        _ => client,
    };
    Ok((client, image))
}

/// Applies `plan` in a blocking task; the live release's state, the previous release
/// draining after the answer.
async fn apply_plan(
    cfg: &Arc<AgentConfig>,
    plan: ReleasePlan,
    secrets: SecretValues,
) -> Response<Full<Bytes>> {
    let cfg2 = cfg.clone();
    let done = tokio::task::spawn_blocking(move || {
        let store = Store::open(&cfg2.state).map_err(|e| DeployError::Local {
            what: "open the store".into(),
            message: e.to_string(),
        })?;
        let (record, retire) = local::apply(
            &store,
            &cfg2.program,
            &cfg2.state,
            &plan,
            Some(&secrets),
            &mut |l| crate::say!("{l}"),
        )?;
        Ok::<_, DeployError>((local::status(&store, &plan.deployment()), record, retire))
    })
    .await
    .expect("the apply task");
    match done {
        Ok((state, _, retire)) => {
            // Live: answer now; the previous release drains and stops after.
            finish_in_background(cfg, retire);
            reply(StatusCode::OK, &state)
        }
        Err(e) => error_reply(&e),
    }
}

async fn serve_route(cfg: Arc<AgentConfig>, store: Store, route: Route) -> Response<Full<Bytes>> {
    let bad = |m: String| refuse(StatusCode::BAD_REQUEST, "invalid", m);
    match route {
        Route::Preflight(r) => {
            let mut problems = local::preflight(&store, &r.plan, false);
            if !store.has_image(&r.plan.digest) {
                // The image must be pullable from here, with the credentials sent.
                match registry_client(&r) {
                    Err(e) => problems.push(e),
                    // The image may not be there yet (a deploy pushes it after the
                    // preflight): the registry must answer, with the credentials sent.
                    Ok((client, image)) => {
                        if let Err(e) = client.check().await {
                            problems.push(format!(
                                "cannot reach {} from this host: {e}",
                                image.registry
                            ));
                        }
                    }
                }
            }
            reply(StatusCode::OK, &PreflightAnswer { problems })
        }
        Route::Apply(r) => {
            let (client, image) = match registry_client(&r) {
                Ok(c) => c,
                Err(e) => return bad(e),
            };
            // Kept from gc from the pull until its replicas use it.
            let _pin = store.pin(&r.plan.digest).ok();
            // Pulled when any part of it is missing (gc'd by hand, a disk replaced): a host
            // gets back what a release needs before it reports failure.
            if !store.has_image(&r.plan.digest)
                && let Err(e) = pull::pull(&client, &store, &image, &|_, _, _| {}, None).await
            {
                return refuse(
                    StatusCode::BAD_GATEWAY,
                    "pull",
                    format!("cannot pull {image}: {e}"),
                );
            }
            apply_plan(&cfg, r.plan, r.secrets).await
        }
        Route::Rollback(r) => {
            let all = local::releases(&store, &r.deployment);
            let target = match (r.to, &r.digest) {
                (Some(n), _) => all
                    .iter()
                    .find(|x| x.number == n && x.outcome != Outcome::Failed)
                    .cloned(),
                (None, Some(d)) => all
                    .iter()
                    .rev()
                    .find(|x| x.digest == *d && x.outcome != Outcome::Failed)
                    .cloned(),
                (None, None) => None,
            };
            let Some(target) = target else {
                return refuse(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("this host never ran that release of {}", r.deployment),
                );
            };
            let mut plan = target.plan;
            plan.release = r.release;
            apply_plan(&cfg, plan, r.secrets).await
        }
        Route::Revert(r) => {
            let cfg2 = cfg.clone();
            let done = tokio::task::spawn_blocking(move || {
                local::revert(
                    &store,
                    &cfg2.program,
                    &cfg2.state,
                    &r.deployment,
                    r.release,
                    &r.why,
                    &mut |l| crate::say!("{l}"),
                )
            })
            .await
            .expect("the revert task");
            match done {
                Ok(state) => reply(StatusCode::OK, &state),
                Err(e) => error_reply(&e),
            }
        }
        Route::Status(q) => reply(StatusCode::OK, &local::status(&store, &q.deployment)),
        Route::Logs(q) => {
            let since = match q.since.as_deref().map(str::parse::<jiff::Timestamp>) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => return bad(format!("since: {e}")),
            };
            let lines = local::replica_logs(
                &store,
                &q.deployment,
                q.service.as_deref(),
                q.replica,
                q.tail,
                since,
            );
            match lines {
                Ok(lines) => reply(StatusCode::OK, &lines),
                Err(e) => error_reply(&e),
            }
        }
        Route::Releases(q) => {
            let list: Vec<HostRelease> = local::releases(&store, &q.deployment)
                .into_iter()
                .map(|r| HostRelease {
                    release: r.number,
                    digest: r.digest,
                    time: r.time,
                    outcome: r.outcome,
                    error: r.error,
                })
                .collect();
            reply(StatusCode::OK, &list)
        }
        Route::Down(r) => {
            let done = tokio::task::spawn_blocking(move || local::down(&store, &r.deployment))
                .await
                .expect("the down task");
            match done {
                Ok(removed) => reply(StatusCode::OK, &DownAnswer { removed }),
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
                let adopted = crate::runtime::supervisor::adopt_lost(&store, &program);
                if adopted > 0 {
                    crate::say!("resumed supervision of {adopted} container(s)");
                }
                let n = local::recover(&store, &program, &state);
                if n > 0 {
                    crate::say!("started {n} replica(s) of the live releases again");
                }
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    });
    // A server's share of descriptors: the hard limit, not the login shell's soft one.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let rt = crate::registry_client::runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let acceptor = match &cfg.tls {
            Some((c, k)) => Some(tls_acceptor(c, k)?),
            None => None,
        };
        ready(listener.local_addr()?);
        let cfg = Arc::new(cfg);
        let per_peer: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
            Default::default();
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors (or another passing error): wait instead of
                    // spinning, so the connections being served can finish.
                    crate::say!("berth agent: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            // No peer holds more than its share of connections: one client cannot starve
            // the others (or the descriptors) by opening and never finishing requests.
            let Some(slot) = PeerSlot::take(&per_peer, peer.ip()) else {
                drop(stream);
                continue;
            };
            let cfg = cfg.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| handle(cfg.clone(), req));
                let mut http = hyper::server::conn::http1::Builder::new();
                // A request's headers must arrive within HEADERS (slow clients cut off).
                http.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADERS);
                // `exec` upgrades its connection to a framed stream.
                match acceptor {
                    Some(a) => {
                        let handshake = tokio::time::timeout(HEADERS, a.accept(stream)).await;
                        if let Ok(Ok(tls)) = handshake {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .with_upgrades()
                                .await;
                        }
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    }
                }
            });
        }
    })
}

/// How long a client may take to finish a TLS handshake, and each request's headers.
const HEADERS: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections one peer address may hold at once.
const PER_PEER: usize = 64;

/// One of a peer's connection slots, given back when dropped.
struct PeerSlot {
    peers: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        peers: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<PeerSlot> {
        let mut map = peers.lock().expect("not poisoned");
        let n = map.entry(ip).or_default();
        if *n >= PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.lock().expect("not poisoned");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
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
