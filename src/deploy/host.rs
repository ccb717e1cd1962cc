//! What a rollout talks to: a [`Host`] — this machine ([`LocalHost`]) or a berth agent
//! ([`super::client::AgentClient`]) — through one typed interface, so the rollout's logic
//! (batches, failures, put-back, interrupts) is the same for both and is tested with fakes.

use std::path::PathBuf;
use std::sync::Arc;

use super::api::{DeploymentName, ExecRequest, HostState, LogsQuery, RollbackRequest};
use super::local::{self, ReplicaLine};
use super::{DeployError, Outcome, ReleasePlan, SecretValues};
use crate::store::Store;

/// What kind of failure a host reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostErrorKind {
    /// It could not be reached (connection, TLS, a certificate that is not the pinned one).
    Unreachable,
    /// It refused the token.
    Unauthorized,
    /// It refused the request as invalid.
    Refused,
    /// Another deploy holds its lock.
    Locked,
    /// A replica did not become healthy.
    Unhealthy,
    /// Anything else went wrong there.
    Failed,
}

/// A host's failure, with the host's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host}: {message}")]
pub struct HostError {
    /// The host.
    pub host: String,
    /// What kind of failure.
    pub kind: HostErrorKind,
    /// What it said.
    pub message: String,
}

impl HostError {
    /// A failure of `kind` on `host`.
    pub fn new(host: &str, kind: HostErrorKind, message: impl Into<String>) -> HostError {
        HostError {
            host: host.to_string(),
            kind,
            message: message.into(),
        }
    }
}

/// A replica's command, its stdio framed both ways ([`super::frames`]).
pub trait ExecIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ExecIo for T {}

/// A connection to a command running in a replica.
pub type ExecStream = Box<dyn ExecIo>;

/// One machine a release rolls out to.
pub trait Host: Send + Sync {
    /// Its name, as the ledger and the output give it (`local`, an agent's URL).
    fn name(&self) -> &str;
    /// What would stop `plan` there (reachable, authorised and pinned are checked by
    /// asking; an empty list: go).
    fn preflight(&self, plan: &ReleasePlan) -> Result<Vec<String>, HostError>;
    /// Applies `plan` with its secrets' values (new replicas, health checks, the switch);
    /// what runs afterwards.
    fn apply(&self, plan: &ReleasePlan, secrets: &SecretValues) -> Result<HostState, HostError>;
    /// Runs an earlier release's plan again as a new release.
    fn rollback(&self, request: &RollbackRequest) -> Result<HostState, HostError>;
    /// Undoes `release` (back to the release before it, or to nothing); what runs now.
    fn revert(
        &self,
        deployment: &DeploymentName,
        release: u32,
        why: &str,
    ) -> Result<HostState, HostError>;
    /// What it runs.
    fn status(&self, deployment: &DeploymentName) -> Result<HostState, HostError>;
    /// Stops and removes everything of the deployment; how many containers went.
    fn down(&self, deployment: &DeploymentName) -> Result<usize, HostError>;
    /// The live replicas' log lines.
    fn logs(&self, query: &LogsQuery) -> Result<Vec<ReplicaLine>, HostError>;
    /// Starts a command in one replica there (on `rt`); its stdio on the stream returned.
    fn exec(
        &self,
        request: &ExecRequest,
        rt: &tokio::runtime::Handle,
    ) -> Result<ExecStream, HostError> {
        let _ = (request, rt);
        Err(HostError::new(
            self.name(),
            HostErrorKind::Refused,
            "exec is not available on this host",
        ))
    }
}

/// This machine, driven in-process.
pub struct LocalHost {
    store_dir: PathBuf,
    program: PathBuf,
    say: Arc<dyn Fn(String) + Send + Sync>,
}

impl LocalHost {
    /// This machine with its store at `store_dir`; `program` is berth's binary (for
    /// supervisors and routers), `say` hears each step.
    pub fn new(
        store_dir: PathBuf,
        program: PathBuf,
        say: Arc<dyn Fn(String) + Send + Sync>,
    ) -> LocalHost {
        LocalHost {
            store_dir,
            program,
            say,
        }
    }

    fn store(&self) -> Result<Store, HostError> {
        Store::open(&self.store_dir)
            .map_err(|e| HostError::new("local", HostErrorKind::Failed, e.to_string()))
    }
}

/// A deploy engine error as a host's failure.
pub fn deploy_error(host: &str, e: &DeployError) -> HostError {
    let kind = match e {
        DeployError::Locked { .. } => HostErrorKind::Locked,
        DeployError::Unhealthy { .. } => HostErrorKind::Unhealthy,
        DeployError::Start { .. } | DeployError::Local { .. } => HostErrorKind::Failed,
    };
    HostError::new(host, kind, e.to_string())
}

impl Host for LocalHost {
    fn name(&self) -> &str {
        "local"
    }

    fn preflight(&self, plan: &ReleasePlan) -> Result<Vec<String>, HostError> {
        Ok(local::preflight(&self.store()?, plan, true))
    }

    fn apply(&self, plan: &ReleasePlan, secrets: &SecretValues) -> Result<HostState, HostError> {
        let store = self.store()?;
        let say = self.say.clone();
        let (record, retire) = local::apply(
            &store,
            &self.program,
            &self.store_dir,
            plan,
            Some(secrets),
            &mut |l| say(l),
        )
        .map_err(|e| deploy_error("local", &e))?;
        // This process is all there is: the previous release drains and stops now.
        retire.run(&store, &mut |l| say(l));
        let _ = record;
        Ok(local::status(&store, &plan.deployment()))
    }

    fn rollback(&self, request: &RollbackRequest) -> Result<HostState, HostError> {
        let store = self.store()?;
        let all = local::releases(&store, &request.deployment);
        let target = match (request.to, &request.digest) {
            (Some(n), _) => all
                .iter()
                .find(|r| r.number == n && r.outcome != Outcome::Failed),
            (None, Some(d)) => all
                .iter()
                .rev()
                .find(|r| r.digest == *d && r.outcome != Outcome::Failed),
            (None, None) => None,
        };
        let Some(target) = target else {
            return Err(HostError::new(
                "local",
                HostErrorKind::Refused,
                format!(
                    "this machine never ran that release of {}",
                    request.deployment
                ),
            ));
        };
        let mut plan = target.plan.clone();
        plan.release = request.release;
        self.apply(&plan, &request.secrets)
    }

    fn revert(
        &self,
        deployment: &DeploymentName,
        release: u32,
        why: &str,
    ) -> Result<HostState, HostError> {
        let store = self.store()?;
        let say = self.say.clone();
        local::revert(
            &store,
            &self.program,
            &self.store_dir,
            deployment,
            release,
            why,
            &mut |l| say(l),
        )
        .map_err(|e| deploy_error("local", &e))
    }

    fn status(&self, deployment: &DeploymentName) -> Result<HostState, HostError> {
        Ok(local::status(&self.store()?, deployment))
    }

    fn down(&self, deployment: &DeploymentName) -> Result<usize, HostError> {
        local::down(&self.store()?, deployment).map_err(|e| deploy_error("local", &e))
    }

    fn logs(&self, q: &LogsQuery) -> Result<Vec<ReplicaLine>, HostError> {
        let since = match q.since.as_deref().map(str::parse::<jiff::Timestamp>) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                return Err(HostError::new(
                    "local",
                    HostErrorKind::Refused,
                    format!("since: {e}"),
                ));
            }
        };
        local::replica_logs(
            &self.store()?,
            &q.deployment,
            q.service.as_deref(),
            q.replica,
            q.tail,
            since,
        )
        .map_err(|e| deploy_error("local", &e))
    }

    fn exec(
        &self,
        request: &ExecRequest,
        rt: &tokio::runtime::Handle,
    ) -> Result<ExecStream, HostError> {
        let store = self.store()?;
        let id = super::exec::target(
            &store,
            &request.deployment,
            &request.service,
            request.replica,
        )
        .map_err(|e| HostError::new("local", HostErrorKind::Refused, e))?;
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (program, store_dir, request) = (
            self.program.clone(),
            self.store_dir.clone(),
            request.clone(),
        );
        rt.spawn(async move {
            super::exec::serve(&program, &store_dir, &request, &id, theirs).await;
        });
        Ok(Box::new(ours))
    }
}
