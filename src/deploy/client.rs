//! berth's side of an agent: the [`AgentClient`], a [`Host`] spoken to over the agent's
//! HTTP API with the same request and answer types the server uses ([`super::api`]); the
//! token (`[agent] token`, else `BERTH_AGENT_TOKEN`); and how an agent's certificate is
//! trusted: a pinned SHA-256 fingerprint (per host or for every host), a CA (`[agent] ca`
//! or `BERTH_AGENT_CA`), or the system's roots.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::api::{
    ApplyRequest, DeploymentName, DeploymentQuery, DeploymentRequest, DownAnswer, ErrorAnswer,
    ExecRequest, HostState, LogsQuery, PreflightAnswer, RevertRequest, RollbackRequest,
};
use super::host::{ExecStream, Host, HostError, HostErrorKind};
use super::local::ReplicaLine;
use super::{ReleasePlan, SecretValues};
use crate::registry_client::Reference;

/// How an agent's TLS certificate is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly the certificate with this SHA-256 fingerprint (self-signed, no CA, no name
    /// check: the pin is the identity).
    Pinned([u8; 32]),
    /// Certificates signed by these CAs (PEM files), or by the system's roots.
    Roots(Vec<PathBuf>),
}

/// Where agents pull a release's image from, and with what credentials.
#[derive(Debug, Clone)]
pub struct ImageSource {
    /// The environment's registry repository.
    pub repository: Reference,
    /// Registry user, if it wants one.
    pub username: Option<String>,
    /// Registry password.
    pub password: Option<String>,
}

impl ImageSource {
    /// `[http://]registry/repository@digest`: how an agent is told where to pull.
    pub fn image(&self, digest: &crate::store::Digest) -> String {
        let r = &self.repository;
        format!(
            "{}{}/{}@{digest}",
            if r.plain_http { "http://" } else { "" },
            r.registry,
            r.repository
        )
    }
}

/// An agent, as a [`Host`].
pub struct AgentClient {
    url: String,
    http: reqwest::Client,
    token: String,
    rt: tokio::runtime::Handle,
    source: Option<ImageSource>,
}

/// How long a request that is not a rollout may take.
const SHORT: Duration = Duration::from_secs(30);

impl AgentClient {
    /// A client for the agent at `url` (`https://host:port`).
    pub fn new(
        url: String,
        token: String,
        trust: &Trust,
        rt: tokio::runtime::Handle,
        source: Option<ImageSource>,
    ) -> Result<AgentClient, String> {
        crate::registry_client::install_crypto();
        let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        match trust {
            Trust::Pinned(fp) => b = b.tls_backend_preconfigured(pinned::client_config(*fp)),
            Trust::Roots(cas) => match crate::registry_client::tls_config(cas)
                .map_err(|e| format!("the agents' CA: {e}"))?
            {
                Some(c) => b = b.tls_backend_preconfigured(c),
                None => {
                    for ca in cas {
                        let pem = std::fs::read(ca)
                            .map_err(|e| format!("cannot read the CA {}: {e}", ca.display()))?;
                        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                            format!("{} is not a PEM certificate: {e}", ca.display())
                        })?;
                        b = b.add_root_certificate(cert);
                    }
                }
            },
        }
        Ok(AgentClient {
            url,
            http: b.build().map_err(|e| e.to_string())?,
            token,
            rt,
            source,
        })
    }

    fn error(&self, kind: HostErrorKind, message: impl Into<String>) -> HostError {
        HostError::new(&self.url, kind, message)
    }

    /// One request: its decoded answer, or the host's error.
    fn call<A: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: Option<String>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<A, HostError> {
        let url = match query {
            Some(q) => format!("{}{path}?{q}", self.url),
            None => format!("{}{path}", self.url),
        };
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        self.rt.block_on(async {
            let resp = req.send().await.map_err(|e| {
                // reqwest's message stops at "error sending request"; the cause (a refused
                // connection, a certificate that is not the pinned one) is in the chain.
                let mut text = "cannot reach the agent".to_string();
                let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&e);
                if cause.is_none() {
                    text = format!("{text}: {e}");
                }
                while let Some(c) = cause {
                    text = format!("{text}: {c}");
                    cause = c.source();
                }
                self.error(HostErrorKind::Unreachable, text)
            })?;
            let status = resp.status();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| self.error(HostErrorKind::Unreachable, e.to_string()))?;
            if status.is_success() {
                return serde_json::from_slice(&bytes).map_err(|e| {
                    self.error(
                        HostErrorKind::Failed,
                        format!(
                            "an answer berth cannot read ({e}): is the agent the same version?"
                        ),
                    )
                });
            }
            Err(self.answer_error(&url, status, &bytes))
        })
    }

    /// The failure an agent's answer describes (`ErrorAnswer`, or just its status).
    fn answer_error(&self, url: &str, status: reqwest::StatusCode, bytes: &[u8]) -> HostError {
        {
            let answer: ErrorAnswer = serde_json::from_slice(bytes).unwrap_or(ErrorAnswer {
                error: format!("{url} answered {status}"),
                kind: String::new(),
                service: None,
                logs: String::new(),
            });
            let kind = match (status.as_u16(), answer.kind.as_str()) {
                (401, _) => HostErrorKind::Unauthorized,
                (_, "unhealthy") => HostErrorKind::Unhealthy,
                (_, "locked") => HostErrorKind::Locked,
                (400 | 404 | 413, _) => HostErrorKind::Refused,
                _ => HostErrorKind::Failed,
            };
            let mut message = match kind {
                HostErrorKind::Unauthorized => {
                    "the agent refused the token ([agent] token or BERTH_AGENT_TOKEN)".to_string()
                }
                _ => answer.error,
            };
            if !answer.logs.is_empty() && !message.contains(&answer.logs) {
                message = format!("{message}\n--- its last log lines:\n{}", answer.logs);
            }
            self.error(kind, message)
        }
    }

    fn post<R: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        body: &R,
        timeout: Duration,
    ) -> Result<A, HostError> {
        let bytes = serde_json::to_vec(body).expect("a request serialises");
        self.call(reqwest::Method::POST, path, None, Some(bytes), timeout)
    }

    fn apply_request(
        &self,
        plan: &ReleasePlan,
        secrets: &SecretValues,
    ) -> Result<ApplyRequest, HostError> {
        let source = self.source.as_ref().ok_or_else(|| {
            self.error(
                HostErrorKind::Refused,
                "the environment names no registry for its agents to pull from",
            )
        })?;
        Ok(ApplyRequest {
            plan: plan.clone(),
            image: source.image(&plan.digest),
            username: source.username.clone(),
            password: source.password.clone(),
            secrets: secrets.clone(),
        })
    }
}

/// A query struct as a query string.
fn query(q: &impl Serialize) -> String {
    serde_urlencoded::to_string(q).expect("a query serialises")
}

impl Host for AgentClient {
    fn name(&self) -> &str {
        &self.url
    }

    fn preflight(&self, plan: &ReleasePlan) -> Result<Vec<String>, HostError> {
        let req = self.apply_request(plan, &SecretValues::default())?;
        let a: PreflightAnswer = self.post("/v1/preflight", &req, SHORT)?;
        Ok(a.problems)
    }

    fn apply(&self, plan: &ReleasePlan, secrets: &SecretValues) -> Result<HostState, HostError> {
        let req = self.apply_request(plan, secrets)?;
        // Pulling and health checks take their time on the host.
        self.post(
            "/v1/apply",
            &req,
            plan.rollout.timeout + Duration::from_secs(600),
        )
    }

    fn rollback(&self, request: &RollbackRequest) -> Result<HostState, HostError> {
        self.post("/v1/rollback", request, Duration::from_secs(900))
    }

    fn revert(
        &self,
        deployment: &DeploymentName,
        release: u32,
        why: &str,
    ) -> Result<HostState, HostError> {
        let req = RevertRequest {
            deployment: deployment.clone(),
            release,
            why: why.to_string(),
        };
        self.post("/v1/revert", &req, Duration::from_secs(900))
    }

    fn status(&self, deployment: &DeploymentName) -> Result<HostState, HostError> {
        let q = DeploymentQuery {
            deployment: deployment.clone(),
        };
        self.call(
            reqwest::Method::GET,
            "/v1/status",
            Some(query(&q)),
            None,
            SHORT,
        )
    }

    fn down(&self, deployment: &DeploymentName) -> Result<usize, HostError> {
        let req = DeploymentRequest {
            deployment: deployment.clone(),
        };
        let a: DownAnswer = self.post("/v1/down", &req, Duration::from_secs(300))?;
        Ok(a.removed)
    }

    fn logs(&self, q: &LogsQuery) -> Result<Vec<ReplicaLine>, HostError> {
        self.call(
            reqwest::Method::GET,
            "/v1/logs",
            Some(query(q)),
            None,
            SHORT,
        )
    }

    fn exec(
        &self,
        request: &ExecRequest,
        rt: &tokio::runtime::Handle,
    ) -> Result<ExecStream, HostError> {
        use base64::Engine as _;
        let url = format!("{}/v1/exec", self.url);
        let header = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(request).expect("a request serialises"));
        let req = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, "berth-exec")
            .header("x-berth-exec", header);
        rt.block_on(async {
            let resp = req.send().await.map_err(|e| {
                self.error(
                    HostErrorKind::Unreachable,
                    format!("cannot reach the agent: {e}"),
                )
            })?;
            let status = resp.status();
            if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
                let bytes = resp.bytes().await.unwrap_or_default();
                return Err(self.answer_error(&url, status, &bytes));
            }
            let io = resp
                .upgrade()
                .await
                .map_err(|e| self.error(HostErrorKind::Failed, format!("the exec stream: {e}")))?;
            Ok(Box::new(io) as ExecStream)
        })
    }
}

/// TLS that trusts exactly one certificate, by its SHA-256 fingerprint.
pub mod pinned {
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
                    "the agent's certificate has fingerprint {}, not the one pinned for it",
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
