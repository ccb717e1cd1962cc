//! The OCI distribution protocol on reqwest and tokio: references ([`reference`]),
//! credentials and challenges ([`auth`]), a client that authenticates (anonymous, Basic,
//! Bearer tokens cached per scope until they expire) and retries what is worth retrying
//! (connection errors, 408, 429, 5xx, honouring `Retry-After`, with exponential backoff
//! and jitter, bounded), and on it [`push`] and [`pull`].

pub mod auth;
pub mod bounds;
pub mod copy;
pub mod documents;
pub mod pull;
pub mod push;
pub mod reference;
pub mod retry;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};

use self::auth::{Challenge, Credential, CredentialError, Secret};
pub use self::reference::Reference;
use crate::store::StoreError;

/// Media types a manifest request accepts.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// What went wrong talking to a registry. Messages never carry credentials or tokens.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached, or the connection broke and retries ran out.
    #[error("cannot reach {registry}: {message}")]
    Transport {
        /// The registry.
        registry: String,
        /// What failed.
        message: String,
        /// A hint (insecure registry? CA?).
        hint: Option<String>,
    },
    /// 401 after authenticating.
    #[error("{registry} refused the credentials{}", if *.anonymous { " (none were given)" } else { "" })]
    Unauthorized {
        /// The registry.
        registry: String,
        /// Whether berth had no credentials.
        anonymous: bool,
    },
    /// 403 or `DENIED`.
    #[error("{registry} denied access to {repository}: {message}")]
    Denied {
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
        /// The registry's message.
        message: String,
    },
    /// 404, `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`, `NAME_UNKNOWN`.
    #[error("{what} not found in {registry}")]
    NotFound {
        /// The registry.
        registry: String,
        /// What was asked for.
        what: String,
    },
    /// Any other unexpected answer.
    #[error("{registry} answered {status} to {what}{}", code.as_ref().map(|c| format!(": {c} {message}")).unwrap_or_default())]
    Status {
        /// The registry.
        registry: String,
        /// What was being done.
        what: String,
        /// HTTP status.
        status: StatusCode,
        /// The distribution error code, if any.
        code: Option<String>,
        /// Its message.
        message: String,
    },
    /// Bytes did not match their digest.
    #[error("{what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// The registry sent something berth cannot use.
    #[error("{0}")]
    Protocol(String),
    /// Credentials could not be read or written.
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    /// A hint for the user, when there is a likely cause.
    pub fn hint(&self) -> Option<String> {
        match self {
            RegistryError::Transport { hint, .. } => hint.clone(),
            RegistryError::Unauthorized { registry, .. } => Some(format!(
                "log in with `berth login {registry}`, or set BERTH_REGISTRY_USER and BERTH_REGISTRY_PASSWORD"
            )),
            RegistryError::Denied { .. } => {
                Some("check the repository name and that the account may push or pull it".into())
            }
            RegistryError::NotFound { .. } => {
                Some("check the repository and tag (`skopeo list-tags` shows what exists)".into())
            }
            _ => None,
        }
    }
}

/// Why one attempt at a request failed.
enum Failure {
    Transport(reqwest::Error),
    Stalled(String),
}

/// How a client connects.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// An extra CA certificate (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Attempts per request (at least 1) [default: 6].
    pub attempts: Option<u32>,
}

enum AuthState {
    /// No challenge seen yet: requests go without credentials.
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        tokens: HashMap<String, (Secret, Instant)>,
    },
}

/// A client for one registry.
pub struct Client {
    http: reqwest::Client,
    registry: String,
    base: String,
    credential: Option<Credential>,
    auth: tokio::sync::Mutex<AuthState>,
    attempts: u32,
    plain: PlainHttp,
    low_speed: bounds::LowSpeed,
}

/// Where credentials may travel over plain HTTP: never, unless the user named the
/// registry `http://` (then to that host), or it is a loopback registry reached over plain
/// HTTP by default (then to loopback hosts: the bytes never leave the machine).
#[derive(Debug, Clone, PartialEq, Eq)]
enum PlainHttp {
    Never,
    Host(String),
    Loopback,
}

impl PlainHttp {
    fn of(reference: &Reference) -> PlainHttp {
        if !reference.plain_http {
            PlainHttp::Never
        } else if reference.named_http {
            PlainHttp::Host(host_name(&reference.registry).to_string())
        } else {
            PlainHttp::Loopback
        }
    }

    /// Whether `url` may carry credentials as far as its scheme goes.
    fn allows(&self, url: &reqwest::Url) -> bool {
        if url.scheme() == "https" {
            return true;
        }
        let host = url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match self {
            PlainHttp::Never => false,
            PlainHttp::Host(h) => host == h.trim_start_matches('[').trim_end_matches(']'),
            PlainHttp::Loopback => is_loopback_host(host),
        }
    }
}

/// `host` of `host[:port]` (brackets kept for IPv6).
fn host_name(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry
            .split(']')
            .next()
            .map_or(registry, |h| &registry[..=h.len()]);
    }
    registry.rsplit_once(':').map_or(registry, |(h, _)| h)
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The answer to a request, with the registry's error body decoded when it failed.
fn error_code(body: &str) -> (Option<String>, String) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let e = &v["errors"][0];
    (
        e["code"].as_str().map(str::to_string),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

/// The per-registry CA certificates of the user's and the system's configuration, as
/// Docker and podman keep them: `*.crt` in `certs.d/<host:port>/` under
/// `$XDG_CONFIG_HOME/berth` (else `~/.config/berth`), `/etc/containers` and `/etc/docker`.
pub fn registry_cas(registry: &str) -> Vec<PathBuf> {
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|c| c.join("berth"));
    let roots = user.into_iter().chain([
        PathBuf::from("/etc/containers"),
        PathBuf::from("/etc/docker"),
    ]);
    let mut out = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root.join("certs.d").join(registry)) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        found.sort();
        out.extend(found);
    }
    out
}

/// Whether a failed send is worth another attempt: not a certificate problem (it will not
/// change), and a refused connection only briefly (a registry restarting).
fn retryable_transport(e: &reqwest::Error, attempt: u32) -> bool {
    if e.is_builder() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if text.contains("certificate") || text.contains("InvalidContentType") {
            return false;
        }
        source = s.source();
    }
    !e.is_connect() || attempt < 3
}

impl Client {
    /// A client for `reference`'s registry, with the user's credentials for it.
    pub fn new(reference: &Reference, options: &ClientOptions) -> Result<Client, RegistryError> {
        install_crypto();
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(8)
            .redirect(redirect_policy(PlainHttp::of(reference)));
        let mut cas: Vec<PathBuf> = options.ca_file.iter().cloned().collect();
        cas.extend(registry_cas(&reference.registry));
        match tls_config(&cas)? {
            Some(config) => builder = builder.tls_backend_preconfigured(config),
            // No system bundle file found: reqwest's platform verifier finds the roots.
            None => {
                for ca in &cas {
                    let pem = std::fs::read(ca).map_err(|source| RegistryError::Io {
                        what: format!("read the CA file {}", ca.display()),
                        source,
                    })?;
                    let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                        RegistryError::Protocol(format!(
                            "{} is not a PEM certificate: {e}",
                            ca.display()
                        ))
                    })?;
                    builder = builder.add_root_certificate(cert);
                }
            }
        }
        let http = builder.build().map_err(|e| RegistryError::Transport {
            registry: reference.registry.clone(),
            message: e.to_string(),
            hint: None,
        })?;
        Ok(Client {
            http,
            registry: reference.registry.clone(),
            base: reference.api_base(),
            credential: auth::credential_for(&reference.registry)?,
            auth: tokio::sync::Mutex::new(AuthState::Unknown),
            attempts: options.attempts.unwrap_or(6).max(1),
            plain: PlainHttp::of(reference),
            low_speed: bounds::LowSpeed::configured(),
        })
    }

    /// The minimum speed of this client's transfers.
    pub fn low_speed(&self) -> bounds::LowSpeed {
        self.low_speed
    }

    /// Sends one request: its answer, or why not. A body that is streamed (an upload) is
    /// watched: when it stops moving for the low-speed window, or its answer does not come
    /// within the document deadline after it went, the request is a stall.
    async fn execute(
        &self,
        http: &reqwest::Client,
        mut req: reqwest::Request,
    ) -> Result<reqwest::Response, Failure> {
        let streamed = req.body().is_some_and(|b| b.as_bytes().is_none());
        if !streamed {
            let deadline = self
                .answer_deadline(&req)
                .unwrap_or(bounds::DOCUMENT_DEADLINE);
            return match tokio::time::timeout(deadline, http.execute(req)).await {
                Ok(r) => r.map_err(Failure::Transport),
                Err(_) => Err(Failure::Stalled(format!(
                    "no answer within {} s",
                    deadline.as_secs()
                ))),
            };
        }
        let movement = retry::Movement::new();
        let body = req.body_mut().take().expect("a streamed body");
        *req.body_mut() = Some(reqwest::Body::wrap(retry::Watched::new(
            body,
            movement.clone(),
        )));
        let sent = http.execute(req);
        tokio::pin!(sent);
        loop {
            tokio::select! {
                r = &mut sent => return r.map_err(Failure::Transport),
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    let idle = movement.idle();
                    if movement.done() && idle > bounds::DOCUMENT_DEADLINE {
                        return Err(Failure::Stalled(format!(
                            "no answer within {} s of the upload", idle.as_secs()
                        )));
                    }
                    if !movement.done() && idle > self.low_speed.window {
                        return Err(Failure::Stalled(format!(
                            "the upload stalled: nothing sent for {} s", idle.as_secs()
                        )));
                    }
                }
            }
        }
    }

    /// How long `req` may take until its answer's headers arrive: a fixed time, plus the
    /// time its body takes at the low-speed limit. A streamed body (an upload of unknown
    /// pace) has none; its stream is watched instead.
    fn answer_deadline(&self, req: &reqwest::Request) -> Option<Duration> {
        let base = bounds::DOCUMENT_DEADLINE;
        match req.body() {
            None => Some(base),
            Some(body) => body.as_bytes().map(|b| {
                let rate = (self.low_speed.bytes / self.low_speed.window.as_secs().max(1)).max(1);
                base + Duration::from_secs(b.len() as u64 / rate)
            }),
        }
    }

    /// Whether a request to `url` may carry this registry's credentials: only to the
    /// registry's own host and port (an upload location or a redirect elsewhere gets
    /// none), and over plain HTTP only as [`PlainHttp`] allows.
    fn may_authenticate(&self, url: &reqwest::Url) -> bool {
        let same_host = reqwest::Url::parse(&self.base).is_ok_and(|base| {
            base.host_str() == url.host_str()
                && base.port_or_known_default() == url.port_or_known_default()
        });
        same_host && self.plain.allows(url)
    }

    /// The same client with other credentials (to check them before saving, at login).
    pub fn with_credential(mut self, credential: Credential) -> Client {
        self.credential = Some(credential);
        self
    }

    /// Checks that the registry speaks the protocol and accepts the credentials: `GET /v2/`.
    pub async fn check(&self) -> Result<(), RegistryError> {
        let url = self.url("");
        let resp = self.send("", &|| Ok(self.http.get(&url))).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.fail(resp, "", "the API root").await)
        }
    }

    /// The registry's name.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// `http(s)://host/v2/` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The HTTP client (for requests to absolute upload locations).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn transport(&self, e: &reqwest::Error) -> RegistryError {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        let hint = if message.contains("certificate") || message.contains("InvalidContentType") {
            Some(format!(
                "is {} a plain-HTTP registry? Write http://{}/… in the reference; or trust its CA with --ca-file",
                self.registry, self.registry
            ))
        } else if e.is_connect() {
            Some("is the registry running and the address right?".into())
        } else {
            None
        };
        RegistryError::Transport {
            registry: self.registry.clone(),
            message,
            hint,
        }
    }

    /// The `Authorization` header for `scope`, for a request to `url` sent outside
    /// [`Client::send`] (a one-shot streamed body); none where credentials may not go.
    pub async fn authorization_for(
        &self,
        scope: &str,
        url: &reqwest::Url,
    ) -> Result<Option<String>, RegistryError> {
        if !self.may_authenticate(url) {
            return Ok(None);
        }
        self.authorization(scope).await
    }

    /// A transport error as a [`RegistryError`] about this registry.
    pub fn transport_error(&self, e: &reqwest::Error) -> RegistryError {
        self.transport(e)
    }

    async fn authorization(&self, scope: &str) -> Result<Option<String>, RegistryError> {
        let mut state = self.auth.lock().await;
        match &mut *state {
            AuthState::Unknown => Ok(None),
            AuthState::Basic => Ok(match &self.credential {
                Some(Credential::Basic { username, password }) => Some(format!(
                    "Basic {}",
                    base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        format!("{username}:{}", password.0)
                    )
                )),
                _ => None,
            }),
            AuthState::Bearer {
                realm,
                service,
                tokens,
            } => {
                if let Some((t, until)) = tokens.get(scope)
                    && Instant::now() < *until
                {
                    return Ok(Some(format!("Bearer {}", t.0)));
                }
                let (token, ttl) = self.fetch_token(realm, service.as_deref(), scope).await?;
                let header = format!("Bearer {}", token.0);
                tokens.insert(scope.to_string(), (token, Instant::now() + ttl));
                Ok(Some(header))
            }
        }
    }

    /// A token for `scope` (space-separated scopes) from the realm.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(Secret, Duration), RegistryError> {
        let realm_url = reqwest::Url::parse(realm)
            .map_err(|e| RegistryError::Protocol(format!("bad token realm {realm:?}: {e}")))?;
        if self.credential.is_some() && !self.plain.allows(&realm_url) {
            return Err(RegistryError::Protocol(format!(
                "{} sends berth to a token server over plain HTTP ({realm}); berth does not send credentials in clear text (name the registry http://{} to allow plain HTTP for it)",
                self.registry, self.registry
            )));
        }
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            query.push(("service", s));
        }
        for s in scope.split(' ').filter(|s| !s.is_empty()) {
            query.push(("scope", s));
        }
        let req = match &self.credential {
            Some(Credential::IdentityToken(t)) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", t.0.as_str()),
                    ("client_id", "berth"),
                ];
                form.extend(query.iter().copied());
                let body = form
                    .iter()
                    .map(|(k, v)| format!("{k}={}", urlencode(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                self.http
                    .post(realm)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
            }
            Some(Credential::Basic { username, password }) => self
                .http
                .get(with_query(realm, &query)?)
                .basic_auth(username, Some(&password.0)),
            None => self.http.get(with_query(realm, &query)?),
        };
        let resp = req
            .timeout(bounds::DOCUMENT_DEADLINE)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(RegistryError::Unauthorized {
                    registry: self.registry.clone(),
                    anonymous: self.credential.is_none(),
                });
            }
            status => {
                return Err(RegistryError::Status {
                    registry: self.registry.clone(),
                    what: "a token request".into(),
                    status,
                    code: None,
                    message: String::new(),
                });
            }
        }
        let body =
            bounds::read_bounded(resp, bounds::MAX_TOKEN, "the token server's answer").await?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Protocol(format!("the token server's answer: {e}")))?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .ok_or_else(|| RegistryError::Protocol("the token server sent no token".into()))?;
        // Docker's default lifetime is 60 s; renew a little early.
        let ttl = v["expires_in"].as_u64().unwrap_or(60).max(10);
        Ok((
            Secret(token.to_string()),
            Duration::from_secs(ttl) - Duration::from_secs(5),
        ))
    }

    /// Sends a request made by `make` (called again for each attempt, so bodies are fresh),
    /// authenticating for `scope` and retrying what is worth retrying.
    pub async fn send(
        &self,
        scope: &str,
        make: &(dyn Fn() -> Result<reqwest::RequestBuilder, RegistryError> + Sync),
    ) -> Result<reqwest::Response, RegistryError> {
        let mut attempt = 0;
        let mut challenged = false;
        loop {
            attempt += 1;
            let (http, req) = make()?.build_split();
            let mut req = req.map_err(|e| RegistryError::Protocol(format!("a request: {e}")))?;
            if self.may_authenticate(req.url())
                && let Some(h) = self.authorization(scope).await?
            {
                let value = reqwest::header::HeaderValue::from_str(&h).map_err(|_| {
                    RegistryError::Protocol("a credential that is not a valid header".into())
                })?;
                req.headers_mut().insert(AUTHORIZATION, value);
            }
            let what = format!("{} {}", req.method(), req.url().path());
            let again = |why: String, wait: Duration| retry::Retry {
                registry: self.registry.clone(),
                what: what.clone(),
                attempt,
                of: self.attempts,
                wait,
                why,
            };
            let outcome = self.execute(&http, req).await;
            let resp = match outcome {
                Ok(r) => r,
                Err(Failure::Transport(e))
                    if attempt < self.attempts && retryable_transport(&e, attempt) =>
                {
                    let why = self.transport(&e).to_string();
                    retry::retry(again(why, retry::backoff(attempt))).await;
                    continue;
                }
                Err(Failure::Transport(e)) => return Err(self.transport(&e)),
                Err(Failure::Stalled(why)) if attempt < self.attempts => {
                    retry::retry(again(why, retry::backoff(attempt))).await;
                    continue;
                }
                Err(Failure::Stalled(why)) => {
                    return Err(RegistryError::Transport {
                        registry: self.registry.clone(),
                        message: why,
                        hint: Some("the registry accepts connections but does not answer".into()),
                    });
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(auth::parse_challenge);
                let mut state = self.auth.lock().await;
                match challenge {
                    Some(Challenge::Basic) if !challenged && self.credential.is_some() => {
                        *state = AuthState::Basic;
                    }
                    Some(Challenge::Bearer { realm, service }) if !challenged => {
                        // A token we had for this scope expired early or was revoked: drop
                        // it; otherwise start with the realm the registry names.
                        if let AuthState::Bearer { tokens, .. } = &mut *state {
                            tokens.remove(scope);
                        } else {
                            *state = AuthState::Bearer {
                                realm,
                                service,
                                tokens: HashMap::new(),
                            };
                        }
                    }
                    _ => {
                        return Err(RegistryError::Unauthorized {
                            registry: self.registry.clone(),
                            anonymous: self.credential.is_none(),
                        });
                    }
                }
                challenged = true;
                attempt -= 1;
                continue;
            }
            let retryable = status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error();
            if retryable && attempt < self.attempts {
                let wait = retry::wait_for(Some(&resp), attempt);
                retry::retry(again(status.to_string(), wait)).await;
                continue;
            }
            return Ok(resp);
        }
    }

    /// Turns an unsuccessful answer into an error about `what` in `repository`.
    pub async fn fail(
        &self,
        resp: reqwest::Response,
        repository: &str,
        what: &str,
    ) -> RegistryError {
        let status = resp.status();
        let body = bounds::error_body(resp).await;
        let (code, message) = error_code(&body);
        match (status, code.as_deref()) {
            (StatusCode::FORBIDDEN, _) | (_, Some("DENIED")) => RegistryError::Denied {
                registry: self.registry.clone(),
                repository: repository.to_string(),
                message,
            },
            (StatusCode::NOT_FOUND, _)
            | (_, Some("MANIFEST_UNKNOWN" | "BLOB_UNKNOWN" | "NAME_UNKNOWN")) => {
                RegistryError::NotFound {
                    registry: self.registry.clone(),
                    what: format!("{what} in {repository}"),
                }
            }
            (StatusCode::UNAUTHORIZED, _) => RegistryError::Unauthorized {
                registry: self.registry.clone(),
                anonymous: self.credential.is_none(),
            },
            _ => RegistryError::Status {
                registry: self.registry.clone(),
                what: format!("{what} in {repository}"),
                status,
                code,
                message,
            },
        }
    }
}

/// Follows up to 10 redirects, never from HTTPS down to plain HTTP unless plain HTTP is
/// allowed for the target (reqwest itself drops `Authorization` when a redirect changes
/// host, port or scheme).
fn redirect_policy(plain: PlainHttp) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let downgrade = attempt.url().scheme() == "http"
            && attempt.previous().iter().any(|u| u.scheme() == "https");
        if attempt.previous().len() >= 10 {
            attempt.error("more than 10 redirects")
        } else if downgrade && !plain.allows(attempt.url()) {
            attempt.error("a redirect from HTTPS to plain HTTP")
        } else {
            attempt.follow()
        }
    })
}

fn with_query(url: &str, pairs: &[(&str, &str)]) -> Result<reqwest::Url, RegistryError> {
    let mut u = reqwest::Url::parse(url)
        .map_err(|e| RegistryError::Protocol(format!("bad token realm {url:?}: {e}")))?;
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    Ok(u)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The pull scope of a repository.
pub fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// The push scope of a repository (pull too: pushes HEAD first).
pub fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

/// The system's CA bundle, as distributions install it (`SSL_CERT_FILE` first).
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/ssl/cert.pem",                  // Alpine
];

/// TLS trusting the system's CA bundle plus `extra` PEM files. Reading the one bundle
/// file costs about a millisecond; the platform verifier's default (every file of
/// `/etc/ssl/certs` as well) cost most of a short command's time. `None` when no bundle
/// file exists.
pub fn tls_config(extra: &[PathBuf]) -> Result<Option<rustls::ClientConfig>, RegistryError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bundle = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(CA_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    let Some(bundle) = bundle else {
        return Ok(None);
    };
    // Parsed once per process: a promote or a deploy makes several clients.
    static SYSTEM: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    let mut roots = SYSTEM
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            if let Ok(certs) = CertificateDer::pem_file_iter(&bundle) {
                roots.add_parsable_certificates(certs.flatten());
            }
            roots
        })
        .clone();
    for ca in extra {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| {
                RegistryError::Protocol(format!("{} is not a PEM certificate: {e}", ca.display()))
            })?;
        if certs.is_empty() {
            return Err(RegistryError::Protocol(format!(
                "{} holds no PEM certificate",
                ca.display()
            )));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| RegistryError::Protocol(format!("{}: {e}", ca.display())))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| RegistryError::Protocol(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(config))
}

/// Makes ring rustls's crypto provider (once per process; before any reqwest client).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A runtime for the synchronous command line.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Downloads `url` (http or https, redirects followed) into `out`, streaming, and returns
/// the content's digest and size: what `ADD https://…` fetches. At most `limit` bytes.
pub fn download(
    url: &str,
    out: &mut std::fs::File,
    limit: u64,
) -> Result<(crate::store::Digest, u64), String> {
    use futures_util::StreamExt;
    use sha2::Digest as _;
    use std::io::Write;
    install_crypto();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60));
    if let Some(config) = tls_config(&[]).map_err(|e| e.to_string())? {
        builder = builder.tls_backend_preconfigured(config);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let rt = runtime().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("cannot fetch {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("fetching {url} answered {}", resp.status()));
        }
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("reading {url}: {e}"))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(format!("{url} is larger than {limit} bytes"));
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .map_err(|e| format!("saving {url}: {e}"))?;
        }
        Ok((crate::store::Digest::from_hasher(hasher), size))
    })
}
