//! An environment's releases as one procedure, whatever made them — deploy, promote,
//! rollback, scale, down — so every one keeps the same promises:
//!
//! 1. **Nothing changes before everything is checked** ([`Environment::preflight`]):
//!    every host reachable, authorised, pinned and free to take the release (ports, its
//!    lock); the registries reachable; the image at hand; nobody else releasing this
//!    environment from this machine. Every problem is named at once.
//! 2. **The ledger comes first**: the release's number is allocated by a `started`
//!    record before anything moves; hosts use that number.
//! 3. The image is published by digest (pushed or copied), the release rolled out
//!    ([`crate::deploy::rollout`]), hosts put back if it fails or is interrupted.
//! 4. **The environment's tag moves only after go-live.**
//! 5. The end is recorded (`live`, `failed`, `interrupted`) with what each host runs,
//!    retried with backoff; if it still cannot be written, the caller hears so and
//!    `status --reconcile` records it later.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use serde_json::json;

use super::ledger::{HostRecord, Kind, Ledger, LedgerError, Release, Verdict, current};
use crate::deploy::ReleasePlan;
use crate::deploy::api::{DeploymentName, HostState, RollbackRequest};
use crate::deploy::client::{AgentClient, ImageSource, Trust};
use crate::deploy::host::{Host, HostError, LocalHost};
use crate::deploy::rollout::{
    HostEnd, Interrupt, Progress, Rollout, RolloutOutcome, RolloutReport,
};
use crate::manifest::schema::AppConfig;
use crate::manifest::values::HostUrl;
use crate::registry_client::push::BlobReport;
use crate::registry_client::{Client, ClientOptions, Reference, RegistryError, copy, pull, push};
use crate::store::{Digest, Store};

/// Why a release could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The configuration or the request cannot work (exit 2).
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
        /// What to do about it.
        help: Option<String>,
    },
    /// The preflight found problems; nothing changed.
    #[error("nothing changed: {} problem(s) found before the release\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Preflight {
        /// Every problem.
        problems: Vec<String>,
    },
    /// The ledger could not allocate the release; nothing changed.
    #[error("nothing changed: the release ledger cannot be read or written")]
    Ledger(#[source] LedgerError),
    /// Publishing the image failed after the release was allocated; no host changed.
    #[error("no host changed: the image could not be published where the hosts pull it")]
    Publish(#[source] RegistryError),
    /// The release rolled out and did not go live (or was interrupted).
    #[error("{}", failure_text(.0))]
    Rollout(Box<Released>),
    /// A `pre_*` hook failed; the release is recorded as failed and nothing moved.
    #[error(
        "nothing changed: the {hook} hook failed ({message}); release {number} is recorded as failed"
    )]
    Hook {
        /// Which hook.
        hook: String,
        /// How it failed.
        message: String,
        /// The release it stopped.
        number: u32,
    },
}

/// The hooks around a release of `kind`: what runs before (its failure stops the release)
/// and after it is live (its failure is reported and recorded, nothing is undone).
fn hook_names(kind: Kind) -> (Option<&'static str>, Option<&'static str>) {
    match kind {
        Kind::Deploy => (Some("pre_deploy"), Some("post_deploy")),
        Kind::Promote => (Some("pre_promote"), Some("post_promote")),
        Kind::Rollback => (None, Some("post_rollback")),
        Kind::Scale | Kind::Down => (None, None),
    }
}

fn failure_text(r: &Released) -> String {
    let what = match r.report.outcome {
        RolloutOutcome::Interrupted => "was interrupted",
        _ => "failed",
    };
    match r.report.first_error() {
        Some(e) => format!("release {} {what}: {e}", r.release.number),
        None => format!("release {} {what}", r.release.number),
    }
}

/// Where a release's image comes from.
#[derive(Debug, Clone)]
pub enum ImageOrigin {
    /// The local store (a build, `--image`): pushed by digest to the environment's
    /// registry, when it has one.
    Store,
    /// Another environment's home (a promotion): its registry repository, or the local
    /// store (`None`); copied by digest.
    Environment(Option<Reference>),
    /// The hosts and registry have it already (rollback, scale, down).
    InPlace,
}

/// What a release asks for.
#[derive(Debug, Clone)]
pub struct ReleaseRequest {
    /// What makes it.
    pub kind: Kind,
    /// The plan (its `release` is set from the ledger).
    pub plan: ReleasePlan,
    /// For a rollback to a release whose plan the ledger lacks: the hosts' own records of
    /// that release (or digest) are used.
    pub host_rollback: Option<(Option<u32>, Digest)>,
    /// Where the image comes from.
    pub origin: ImageOrigin,
    /// For a promotion: the source environment.
    pub source: Option<String>,
    /// Gates overridden.
    pub forced: Vec<String>,
    /// Why.
    pub reason: Option<String>,
    /// Put the hosts already updated back when the rollout stops (else keep them).
    pub put_back: bool,
}

/// Bytes and blobs that moved to publish the image.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Transfer {
    /// How (`pushed`, `copied within one registry`, …).
    pub how: String,
    /// Each blob.
    pub blobs: Vec<BlobReport>,
    /// Bytes moved.
    pub bytes: u64,
}

/// A release that rolled out (live or not).
#[derive(Debug, Clone, Serialize)]
pub struct Released {
    /// The release as recorded (or as berth would have recorded it).
    pub release: Release,
    /// The rollout.
    pub report: RolloutReport,
    /// What moved to publish the image.
    pub transfer: Option<Transfer>,
    /// Whether its end is in the ledger (else `status --reconcile` records it).
    pub recorded: bool,
    /// What went wrong after go-live, without undoing it (the ledger, the tag).
    pub warnings: Vec<String>,
}

/// An environment: its configuration, hosts and ledger.
pub struct Environment {
    /// The resolved configuration.
    pub config: AppConfig,
    /// Its hosts.
    pub hosts: Vec<Arc<dyn Host>>,
    /// Its ledger.
    pub ledger: Ledger,
    rt: tokio::runtime::Handle,
    store: Store,
    /// Checked between batches; raised by an interrupt.
    pub interrupt: Interrupt,
}

fn invalid(message: impl Into<String>, help: Option<String>) -> ReleaseError {
    ReleaseError::Invalid {
        message: message.into(),
        help,
    }
}

/// The agents' token: the environment's `[agent] token` reference, else
/// `BERTH_AGENT_TOKEN`.
pub fn agent_token(config: &AppConfig) -> Result<String, ReleaseError> {
    if let Some(r) = &config.agent.token {
        return r
            .resolve("agent.token", &config.project_dir)
            .map(|s| s.expose().to_string())
            .map_err(|e| invalid(e.to_string(), None));
    }
    std::env::var("BERTH_AGENT_TOKEN").map_err(|_| {
        invalid(
            format!(
                "talking to the agents of {} needs their token",
                config.environment
            ),
            Some(format!(
                "set [agent] token = {{ env = \"VAR\" }} in environments/{}.toml, or export BERTH_AGENT_TOKEN",
                config.environment
            )),
        )
    })
}

/// How the agent at `host` is trusted: its own pin, else the environment's, else CAs.
pub fn agent_trust(config: &AppConfig, host: &HostUrl) -> Trust {
    if let Some(pin) = config.agent.pins.get(&host.to_string()) {
        return Trust::Pinned(pin.0);
    }
    if let Some(pin) = &config.agent.fingerprint {
        return Trust::Pinned(pin.0);
    }
    let mut cas: Vec<std::path::PathBuf> = Vec::new();
    if let Some(ca) = &config.agent.ca {
        cas.push(config.project_dir.join(ca));
    }
    cas.extend(std::env::var_os("BERTH_AGENT_CA").map(std::path::PathBuf::from));
    Trust::Roots(cas)
}

/// The environment's registry repository tagged with its name (`…/hello:uat`).
pub fn env_reference(config: &AppConfig) -> Result<Option<Reference>, ReleaseError> {
    config
        .registry
        .as_ref()
        .map(|r| {
            format!("{r}:{}", config.environment)
                .parse()
                .map_err(|e: String| invalid(format!("registry {r}: {e}"), None))
        })
        .transpose()
}

impl Environment {
    /// Opens `config`'s environment: its hosts (this machine, agents with their token and
    /// trust) and its ledger. Fails before anything is asked of a host when the token or
    /// a trust setting is missing.
    pub fn open(
        config: AppConfig,
        store: &Store,
        store_dir: &Path,
        rt: tokio::runtime::Handle,
        say: Arc<dyn Fn(String) + Send + Sync>,
    ) -> Result<Environment, ReleaseError> {
        let mut hosts: Vec<Arc<dyn Host>> = Vec::new();
        let agents = config
            .hosts
            .iter()
            .any(|h| matches!(h, HostUrl::Agent { .. }));
        // Without a token the agents cannot be asked anything; commands that only read the
        // ledger still work, and the rest fail their preflight naming the token.
        let token = if agents {
            Some(agent_token(&config))
        } else {
            None
        };
        let source = match env_reference(&config)? {
            Some(repository) => {
                let (username, password) =
                    match crate::registry_client::auth::credential_for(&repository.registry) {
                        Ok(Some(crate::registry_client::auth::Credential::Basic {
                            username,
                            password,
                        })) => (Some(username), Some(password.0)),
                        _ => (None, None),
                    };
                Some(ImageSource {
                    repository,
                    username,
                    password,
                })
            }
            None => None,
        };
        for h in &config.hosts {
            match h {
                HostUrl::Local => {
                    let program = std::env::current_exe().map_err(|e| {
                        invalid(format!("cannot find berth's own binary: {e}"), None)
                    })?;
                    hosts.push(Arc::new(LocalHost::new(
                        store_dir.to_path_buf(),
                        program,
                        say.clone(),
                    )));
                }
                HostUrl::Agent { .. } => match &token {
                    Some(Ok(token)) => {
                        let client = AgentClient::new(
                            h.to_string(),
                            token.clone(),
                            &agent_trust(&config, h),
                            rt.clone(),
                            source.clone(),
                        )
                        .map_err(|e| invalid(format!("{h}: {e}"), None))?;
                        hosts.push(Arc::new(client));
                    }
                    Some(Err(e)) => hosts.push(Arc::new(Unconfigured {
                        name: h.to_string(),
                        why: e.to_string(),
                    })),
                    None => unreachable!("agents have a token slot"),
                },
            }
        }
        let ledger = Ledger::open(store, &config).map_err(ReleaseError::Ledger)?;
        Ok(Environment {
            config,
            hosts,
            ledger,
            rt,
            store: Store::open(store.root()).map_err(|e| invalid(e.to_string(), None))?,
            interrupt: Interrupt::new(),
        })
    }

    /// An environment made of given parts (tests drive releases with fake hosts).
    pub fn from_parts(
        config: AppConfig,
        hosts: Vec<Arc<dyn Host>>,
        ledger: Ledger,
        store: Store,
        rt: tokio::runtime::Handle,
    ) -> Environment {
        Environment {
            config,
            hosts,
            ledger,
            rt,
            store,
            interrupt: Interrupt::new(),
        }
    }

    /// `app-environment`.
    pub fn deployment(&self) -> DeploymentName {
        format!("{}-{}", self.config.app.name, self.config.environment)
            .parse()
            .expect("app and environment names are DNS labels")
    }

    /// The host names, as the ledger gives them.
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name().to_string()).collect()
    }

    /// The ledger, oldest first, one entry per release.
    pub fn history(&self) -> Result<Vec<Release>, LedgerError> {
        self.rt.block_on(self.ledger.history())
    }

    /// What each host runs (or why it could not say), in order.
    pub fn host_states(&self) -> Vec<(String, Result<HostState, HostError>)> {
        let deployment = self.deployment();
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .hosts
                .iter()
                .map(|h| {
                    let d = &deployment;
                    s.spawn(move || (h.name().to_string(), h.status(d)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a host's thread"))
                .collect()
        })
    }

    fn registry_client(&self, r: &Reference) -> Result<Client, RegistryError> {
        Client::new(r, &ClientOptions::default())
    }

    /// Everything that would stop a release of `plan` from `origin`, at once: each host's
    /// own answer, the registries, the image, and `extra` (the caller's own checks). An
    /// empty list: go.
    pub fn preflight(
        &self,
        plan: &ReleasePlan,
        origin: &ImageOrigin,
        extra: Vec<String>,
    ) -> Vec<String> {
        let mut problems = extra;
        let answers: Vec<(String, Result<Vec<String>, HostError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .hosts
                .iter()
                .map(|h| s.spawn(move || (h.name().to_string(), h.preflight(plan))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a host's thread"))
                .collect()
        });
        for (host, answer) in answers {
            match answer {
                Ok(list) => problems.extend(list.into_iter().map(|p| format!("{host}: {p}"))),
                Err(e) => problems.push(e.to_string()),
            }
        }
        let home = env_reference(&self.config).ok().flatten();
        let mut registries: Vec<Reference> = home.iter().cloned().collect();
        if let ImageOrigin::Environment(Some(from)) = origin {
            registries.push(from.clone());
        }
        for r in registries {
            let checked = self
                .registry_client(&r)
                .and_then(|c| self.rt.block_on(c.check()));
            if let Err(e) = checked {
                problems.push(format!("registry {}: {e}", r.registry));
            }
        }
        if matches!(origin, ImageOrigin::Store) && !self.store.has_blob(&plan.digest) {
            problems.push(format!(
                "the image {} is not in the local store",
                plan.digest
            ));
        }
        problems
    }

    /// Publishes the image by digest where the hosts pull it from (never moving a tag).
    fn publish(
        &self,
        digest: &Digest,
        origin: &ImageOrigin,
        dry_run: bool,
    ) -> Result<Option<Transfer>, RegistryError> {
        let home = env_reference(&self.config).ok().flatten();
        let by_digest = home.as_ref().map(|h| h.with_digest(digest));
        Ok(match (origin, by_digest) {
            (ImageOrigin::InPlace, _) => None,
            (ImageOrigin::Store, None) => None,
            (ImageOrigin::Store, Some(to)) => {
                let client = self.registry_client(&to)?;
                let r = self.rt.block_on(push::push(
                    &client,
                    &self.store,
                    digest,
                    &to,
                    dry_run,
                    &|_| {},
                    None,
                ))?;
                Some(Transfer {
                    how: "pushed from the local store".into(),
                    blobs: r.blobs,
                    bytes: r.bytes_sent,
                })
            }
            (ImageOrigin::Environment(Some(from)), Some(to)) => {
                let from = from.with_digest(digest);
                let (s, d) = (self.registry_client(&from)?, self.registry_client(&to)?);
                let r = self.rt.block_on(copy::copy(&s, &d, &from, &to, dry_run))?;
                Some(Transfer {
                    how: if s.registry() == d.registry() {
                        "copied within one registry".into()
                    } else {
                        "copied between registries".into()
                    },
                    blobs: r.blobs,
                    bytes: r.bytes_copied,
                })
            }
            (ImageOrigin::Environment(None), Some(to)) => {
                let client = self.registry_client(&to)?;
                let r = self.rt.block_on(push::push(
                    &client,
                    &self.store,
                    digest,
                    &to,
                    dry_run,
                    &|_| {},
                    None,
                ))?;
                Some(Transfer {
                    how: "pushed from the local store".into(),
                    blobs: r.blobs,
                    bytes: r.bytes_sent,
                })
            }
            (ImageOrigin::Environment(Some(from)), None) => {
                if dry_run {
                    return Ok(Some(Transfer {
                        how: "pulled into the local store".into(),
                        ..Transfer::default()
                    }));
                }
                let from = from.with_digest(digest);
                let s = self.registry_client(&from)?;
                let r =
                    self.rt
                        .block_on(pull::pull(&s, &self.store, &from, &|_, _, _| {}, None))?;
                Some(Transfer {
                    how: "pulled into the local store".into(),
                    blobs: Vec::new(),
                    bytes: r.bytes,
                })
            }
            (ImageOrigin::Environment(None), None) => None,
        })
    }

    /// What publishing would move (`--dry-run`): HEADs only.
    pub fn publish_plan(
        &self,
        digest: &Digest,
        origin: &ImageOrigin,
    ) -> Result<Option<Transfer>, RegistryError> {
        self.publish(digest, origin, true)
    }

    /// Reads the manifest back from the environment's registry and checks its digest.
    fn read_back(&self, digest: &Digest) -> Result<(), RegistryError> {
        let Some(home) = env_reference(&self.config).ok().flatten() else {
            return Ok(());
        };
        let client = self.registry_client(&home)?;
        self.rt
            .block_on(pull::fetch_manifest(
                &client,
                &home.repository,
                digest.as_str(),
                Some(digest),
            ))
            .map(drop)
    }

    /// Points the environment's tag (`:uat`) at `digest`: after go-live only.
    fn move_tag(&self, digest: &Digest) -> Result<(), RegistryError> {
        let Some(home) = env_reference(&self.config).ok().flatten() else {
            return Ok(());
        };
        let client = self.registry_client(&home)?;
        self.rt
            .block_on(crate::registry_client::documents::tag_manifest(
                &client,
                &home.repository,
                digest,
                &self.config.environment,
            ))
    }

    /// Makes a release: preflight (with the caller's `extra` problems), a `started`
    /// record, the image published, the rollout, the tag, the end recorded.
    pub fn release(
        &self,
        request: ReleaseRequest,
        extra: Vec<String>,
        progress: &dyn ReleaseProgress,
    ) -> Result<Released, ReleaseError> {
        // Secrets first: one that cannot be read is bad input (exit 2), before anything.
        let secrets = self.secrets(&request.plan)?;
        for h in self.plain_http_agents() {
            if !secrets.is_empty() {
                progress.note(&format!(
                    "warning: secrets go to {h} over plain HTTP ([agent] insecure = true)"
                ));
            }
        }
        // The image stays in this store (gc, a concurrent build moving the tag) until the
        // release has replicas or is recorded: a local host runs it from here.
        let _pin = self.store.pin(&request.plan.digest).ok();
        let problems = self.preflight(&request.plan, &request.origin, extra);
        if !problems.is_empty() {
            return Err(ReleaseError::Preflight { problems });
        }
        let _lock = self.lock()?;
        let before = self.history().ok().and_then(|h| current(&h).cloned());
        let mut release = Release::new(&self.config, request.plan.digest.clone(), request.kind);
        if !secrets.is_empty() {
            release.secrets = Some(super::ledger::SecretsRecord::of(&secrets));
        }
        release.changes = changes(before.as_ref(), &request.plan, &secrets);
        release.revision = request.plan.revision.clone();
        release.source = request.source.clone();
        release.forced = request.forced.clone();
        release.reason = request.reason.clone();
        release.hosts = self.host_names();
        let started = self
            .rt
            .block_on(self.ledger.start(release))
            .map_err(ReleaseError::Ledger)?;
        progress.note(&format!(
            "release {} of {} allocated in the ledger",
            started.number,
            self.deployment()
        ));
        let mut plan = request.plan.clone();
        plan.release = started.number;
        let mut release = started.clone();
        release.plan = Some(plan.clone());
        let (pre_hook, post_hook) = hook_names(request.kind);
        let previous = before.as_ref().map(|r| r.digest.clone());
        if let Some(h) = pre_hook
            && let Some(record) = self.run_hook(h, &release, previous.as_ref(), progress)
        {
            let ok = record.ok();
            let message = record
                .error
                .clone()
                .unwrap_or_else(|| "it succeeded".into());
            release.hooks.push(record);
            if !ok {
                release.outcome = Verdict::Failed;
                release.error = Some(format!("the {h} hook failed: {message}"));
                let _ = self.rt.block_on(self.ledger.finish(release.clone()));
                return Err(ReleaseError::Hook {
                    hook: h.to_string(),
                    message,
                    number: release.number,
                });
            }
        }
        // The image, by digest, where the hosts pull it (no tag moves yet).
        let transfer = match self
            .publish(&plan.digest, &request.origin, false)
            .and_then(|t| {
                if matches!(request.origin, ImageOrigin::Environment(_)) {
                    self.read_back(&plan.digest)?;
                }
                Ok(t)
            }) {
            Ok(t) => t,
            Err(e) => {
                release.outcome = Verdict::Failed;
                release.error = Some(format!("cannot publish the image: {e}"));
                let _ = self.rt.block_on(self.ledger.finish(release));
                return Err(ReleaseError::Publish(e));
            }
        };
        if let Some(t) = &transfer {
            progress.note(&format!("{}: {} bytes moved", t.how, t.bytes));
        }
        // This machine among the hosts, without the image (pruned, or gc'd): pulled back
        // by digest from the environment's registry.
        if self.config.hosts.contains(&HostUrl::Local)
            && !self.store.has_image(&plan.digest)
            && let Some(home) = env_reference(&self.config).ok().flatten()
        {
            let from = home.with_digest(&plan.digest);
            let pulled = self.registry_client(&from).and_then(|c| {
                self.rt
                    .block_on(pull::pull(&c, &self.store, &from, &|_, _, _| {}, None))
            });
            if let Err(e) = pulled {
                release.outcome = Verdict::Failed;
                release.error = Some(format!("cannot pull the image back: {e}"));
                let _ = self.rt.block_on(self.ledger.finish(release));
                return Err(ReleaseError::Publish(e));
            }
        }
        let deployment = self.deployment();
        let rollout = Rollout {
            hosts: &self.hosts,
            batch: self.config.rollout.batch.max(1) as usize,
            max_failures: self.config.rollout.max_failures as usize,
            put_back: request.put_back,
            interrupt: self.interrupt.clone(),
        };
        let report = match &request.host_rollback {
            Some((to, digest)) => {
                let req = RollbackRequest {
                    deployment: deployment.clone(),
                    release: plan.release,
                    to: *to,
                    digest: Some(digest.clone()),
                    secrets: secrets.clone(),
                };
                rollout.run(
                    &deployment,
                    plan.release,
                    &|h| h.rollback(&req),
                    progress.rollout(),
                )
            }
            None => rollout.run(
                &deployment,
                plan.release,
                &|h| h.apply(&plan, &secrets),
                progress.rollout(),
            ),
        };
        release.outcome = match report.outcome {
            RolloutOutcome::Live => Verdict::Live,
            RolloutOutcome::Failed => Verdict::Failed,
            RolloutOutcome::Interrupted => Verdict::Interrupted,
        };
        release.error = match report.outcome {
            RolloutOutcome::Live => None,
            _ => Some(failure_text(&Released {
                release: release.clone(),
                report: report.clone(),
                transfer: None,
                recorded: false,
                warnings: Vec::new(),
            })),
        };
        release.host_states = host_records(&report);
        let mut warnings = Vec::new();
        if report.outcome == RolloutOutcome::Live
            && let Err(e) = self.move_tag(&plan.digest)
        {
            warnings.push(format!(
                "the release is live, but the tag {}:{} could not be moved: {e}",
                self.config
                    .registry
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                self.config.environment
            ));
        }
        if report.outcome == RolloutOutcome::Live
            && let Some(h) = post_hook
            && let Some(record) = self.run_hook(h, &release, previous.as_ref(), progress)
        {
            if !record.ok() {
                warnings.push(format!(
                    "the release is live, but the {h} hook failed: {} (nothing is undone)",
                    record.error.as_deref().unwrap_or("?")
                ));
            }
            release.hooks.push(record);
        }
        let recorded = match self.rt.block_on(self.ledger.finish(release.clone())) {
            Ok(r) => {
                release = r;
                true
            }
            Err(e) => {
                warnings.push(format!(
                    "the end of release {} could not be recorded ({e}); `berth status --env {} --reconcile` records what the hosts run",
                    release.number, self.config.environment
                ));
                false
            }
        };
        let released = Released {
            release,
            report,
            transfer,
            recorded,
            warnings,
        };
        if released.report.outcome == RolloutOutcome::Live {
            Ok(released)
        } else {
            Err(ReleaseError::Rollout(Box::new(released)))
        }
    }

    /// Runs hook `name` if the configuration has one, on this machine in the project
    /// directory, its output on stderr, with `BERTH_ENV`, `BERTH_APP`, `BERTH_RELEASE`,
    /// `BERTH_DIGEST`, `BERTH_REVISION`, `BERTH_PREVIOUS_DIGEST` and `BERTH_HOOK` set.
    fn run_hook(
        &self,
        name: &str,
        release: &Release,
        previous: Option<&Digest>,
        progress: &dyn ReleaseProgress,
    ) -> Option<crate::promote::ledger::HookRecord> {
        use crate::manifest::schema::CommandLine;
        let command = self.config.hooks.get(name)?;
        let argv: Vec<String> = match command {
            CommandLine::Exec(v) => v.clone(),
            CommandLine::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        };
        progress.note(&format!("running the {name} hook"));
        let dir = if self.config.project_dir.as_os_str().is_empty() {
            std::path::PathBuf::from(".")
        } else {
            self.config.project_dir.clone()
        };
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(dir)
            .env("BERTH_HOOK", name)
            .env("BERTH_APP", &self.config.app.name)
            .env("BERTH_ENV", &self.config.environment)
            .env("BERTH_RELEASE", release.number.to_string())
            .env("BERTH_DIGEST", release.digest.to_string())
            .env(
                "BERTH_REVISION",
                release.revision.clone().unwrap_or_default(),
            )
            .env(
                "BERTH_PREVIOUS_DIGEST",
                previous.map(ToString::to_string).unwrap_or_default(),
            )
            .stdin(std::process::Stdio::null());
        // Its output goes to stderr: stdout is berth's (one JSON document with --json).
        if let Ok(err) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
            cmd.stdout(std::process::Stdio::from(err));
        }
        let (exit_code, error) = match cmd.status() {
            Ok(s) if s.success() => (Some(0), None),
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                let how = match (s.code(), s.signal()) {
                    (Some(c), _) => format!("exited with {c}"),
                    (None, Some(sig)) => format!("was killed by signal {sig}"),
                    _ => "failed".to_string(),
                };
                // The command as written.
                let shown = match command {
                    CommandLine::Shell(s) => s.clone(),
                    CommandLine::Exec(v) => v.join(" "),
                };
                (s.code(), Some(format!("the {name} hook `{shown}` {how}")))
            }
            Err(e) => (None, Some(format!("cannot run {}: {e}", argv[0]))),
        };
        Some(crate::promote::ledger::HookRecord {
            hook: name.to_string(),
            exit_code,
            error,
        })
    }

    /// Agents reached over plain `http://`.
    fn plain_http_agents(&self) -> Vec<String> {
        self.config
            .hosts
            .iter()
            .filter(|h| matches!(h, HostUrl::Agent { tls: false, .. }))
            .map(ToString::to_string)
            .collect()
    }

    /// The values of the secrets `plan` uses, read now on this machine. Every secret that
    /// cannot be read is named, with its source and where it is declared; and secrets go
    /// to agents only over TLS unless `[agent] insecure = true`.
    pub fn secrets(&self, plan: &ReleasePlan) -> Result<crate::deploy::SecretValues, ReleaseError> {
        let names = plan.secret_names();
        let mut values = std::collections::BTreeMap::new();
        let mut problems = Vec::new();
        for name in &names {
            let Some(spec) = self.config.secrets.get(name) else {
                problems.push(format!(
                    "secret `{name}` (named by the release) is not declared in environments/{}.toml",
                    self.config.environment
                ));
                continue;
            };
            match spec.source.resolve(name, &self.config.project_dir) {
                Ok(v) => {
                    values.insert(name.clone(), v.expose().to_string());
                }
                Err(e) => problems.push(format!("{e} (declared at {})", spec.origin)),
            }
        }
        if !problems.is_empty() {
            return Err(invalid(
                format!(
                    "nothing changed: {} secret(s) cannot be read\n{}",
                    problems.len(),
                    problems
                        .iter()
                        .map(|p| format!("  - {p}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                Some("set the variables, or fix the files, the environment file names".into()),
            ));
        }
        let plain = self.plain_http_agents();
        if !values.is_empty() && !plain.is_empty() && !self.config.agent.insecure {
            return Err(invalid(
                format!(
                    "secrets go to agents only over TLS, and {} is plain http://",
                    plain.join(", ")
                ),
                Some(
                    "run the agents with --tls-cert/--tls-key and use https:// hosts; or, on a trusted network only, set [agent] insecure = true"
                        .into(),
                ),
            ));
        }
        Ok(crate::deploy::SecretValues(values))
    }

    /// Stops the environment on every host, recorded as a `down` release; `None` when it
    /// runs nothing anywhere and the ledger has nothing in effect (nothing to stop).
    pub fn down(&self, progress: &dyn ReleaseProgress) -> Result<Option<Released>, ReleaseError> {
        let deployment = self.deployment();
        // Reachable and authorised: a host that cannot be asked is a problem up front.
        let mut problems = Vec::new();
        let mut running = false;
        for (host, state) in self.host_states() {
            match state {
                Err(e) => problems.push(format!("{host}: {}", e.message)),
                Ok(s) => running |= s.release.is_some(),
            }
        }
        if !problems.is_empty() {
            return Err(ReleaseError::Preflight { problems });
        }
        let _lock = self.lock()?;
        let history = self.history().map_err(ReleaseError::Ledger)?;
        if !running && current(&history).is_none() {
            return Ok(None);
        }
        let digest = super::ledger::current(&history)
            .map(|r| r.digest.clone())
            .or_else(|| history.last().map(|r| r.digest.clone()))
            .unwrap_or_else(|| Digest::of(b""));
        let release = Release::new(&self.config, digest, Kind::Down);
        let mut release = self
            .rt
            .block_on(self.ledger.start(release))
            .map_err(ReleaseError::Ledger)?;
        progress.note(&format!("release {} (down) allocated", release.number));
        let results: Vec<(String, Result<usize, HostError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .hosts
                .iter()
                .map(|h| {
                    let d = &deployment;
                    s.spawn(move || (h.name().to_string(), h.down(d)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a host's thread"))
                .collect()
        });
        let hosts: Vec<crate::deploy::rollout::HostReport> = results
            .into_iter()
            .map(|(host, r)| match r {
                Ok(_) => crate::deploy::rollout::HostReport {
                    host,
                    end: HostEnd::Live,
                    now: Some(HostState::default()),
                    error: None,
                },
                Err(e) => crate::deploy::rollout::HostReport {
                    host,
                    end: HostEnd::Failed,
                    now: None,
                    error: Some(e.message),
                },
            })
            .collect();
        let failed = hosts.iter().any(|h| h.end == HostEnd::Failed);
        let report = RolloutReport {
            outcome: if failed {
                RolloutOutcome::Failed
            } else {
                RolloutOutcome::Live
            },
            hosts,
        };
        release.outcome = if failed {
            Verdict::Failed
        } else {
            Verdict::Live
        };
        release.error = report.first_error();
        release.host_states = host_records(&report);
        let mut warnings = Vec::new();
        let recorded = match self.rt.block_on(self.ledger.finish(release.clone())) {
            Ok(r) => {
                release = r;
                true
            }
            Err(e) => {
                warnings.push(format!("the down could not be recorded: {e}"));
                false
            }
        };
        let done = Released {
            release,
            report,
            transfer: None,
            recorded,
            warnings,
        };
        if failed {
            Err(ReleaseError::Rollout(Box::new(done)))
        } else {
            Ok(Some(done))
        }
    }

    /// This machine's lock on releasing the environment (held for the whole release).
    fn lock(&self) -> Result<std::fs::File, ReleaseError> {
        let dir = self.store.state_dir().join("releasing");
        let path = dir.join(format!("{}.lock", self.deployment()));
        let file = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(&path)
            })
            .map_err(|e| invalid(format!("cannot open {}: {e}", path.display()), None))?;
        match file.try_lock() {
            Ok(()) => {
                use std::io::Write;
                let _ = file.set_len(0);
                let _ = write!(
                    &file,
                    "{} (pid {})",
                    crate::deploy::local::actor(),
                    std::process::id()
                );
                Ok(file)
            }
            Err(_) => Err(ReleaseError::Preflight {
                problems: vec![format!(
                    "another berth command is releasing {} from this machine: {}",
                    self.deployment(),
                    std::fs::read_to_string(&path).unwrap_or_default().trim()
                )],
            }),
        }
    }
}

/// One host, as `status` shows it.
#[derive(Debug, Serialize)]
pub struct HostView {
    /// The host.
    pub host: String,
    /// The release it runs.
    pub release: Option<u32>,
    /// Its image.
    pub digest: Option<crate::store::Digest>,
    /// Since when.
    pub since: Option<String>,
    /// Each service's replicas.
    pub services: std::collections::BTreeMap<String, crate::deploy::local::ReplicaCount>,
    /// Each replica: status, health, restarts, last exit, OOM.
    pub replicas: Vec<crate::deploy::local::ReplicaView>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// An environment compared with its ledger.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// The environment.
    pub environment: String,
    /// `app-environment`.
    pub deployment: String,
    /// `live`, `down`, `nothing` (never released), `degraded` (problems below).
    pub state: &'static str,
    /// The ledger's release in effect.
    pub ledger: Option<serde_json::Value>,
    /// Each host.
    pub hosts: Vec<HostView>,
    /// Every way the hosts and the ledger disagree, or something is down.
    pub problems: Vec<String>,
}

fn ledger_view(r: &Release) -> serde_json::Value {
    json!({
        "release": r.number, "kind": r.kind, "outcome": r.outcome, "digest": r.digest,
        "revision": r.revision, "time": r.time,
    })
}

impl Environment {
    /// Compares what the hosts run with the ledger (`history`, oldest first).
    pub fn status(&self, history: &[Release]) -> StatusView {
        let env = self;
        let live = current(history);
        let down = history
            .iter()
            .rev()
            .find(|r| r.outcome == Verdict::Live)
            .is_some_and(|r| r.kind == Kind::Down);
        let mut problems = Vec::new();
        for r in history.iter().filter(|r| r.outcome == Verdict::Started) {
            problems.push(format!(
            "release {} was started at {} and has no recorded end (a deploy running, or one that died: `--reconcile` records it)",
            r.number,
            r.time.split_once('.').map_or(r.time.clone(), |(s, _)| format!("{s}Z"))
        ));
        }
        let mut hosts = Vec::new();
        for (host, state) in env.host_states() {
            match state {
                Ok(s) => {
                    match (live, s.release) {
                        (Some(l), Some(n))
                            if n != l.number || s.digest.as_ref() != Some(&l.digest) =>
                        {
                            problems.push(format!(
                                "{host} runs release {n} ({}), the ledger says release {} ({})",
                                s.digest.as_ref().map_or("?", |d| d.short()),
                                l.number,
                                l.digest.short()
                            ))
                        }
                        (Some(l), None) => problems.push(format!(
                            "{host} runs nothing, the ledger says release {} ({})",
                            l.number,
                            l.digest.short()
                        )),
                        (None, Some(n)) => problems.push(format!(
                            "{host} runs release {n}, the ledger says the environment {}",
                            if down { "is down" } else { "has no release" }
                        )),
                        _ => {}
                    }
                    for (svc, c) in &s.services {
                        if c.running < c.total {
                            problems.push(format!(
                                "{host}: {svc} has {}/{} replicas running",
                                c.running, c.total
                            ));
                        }
                    }
                    for r in &s.replicas {
                        if r.status == "running"
                            && r.health == Some(crate::runtime::health::Health::Unhealthy)
                        {
                            problems.push(format!(
                                "{host}: {} replica {} is unhealthy{}",
                                r.service,
                                r.replica,
                                r.health_error
                                    .as_deref()
                                    .map(|e| format!(" ({e})"))
                                    .unwrap_or_default()
                            ));
                        }
                    }
                    problems.extend(s.problems.iter().map(|p| format!("{host}: {p}")));
                    hosts.push(HostView {
                        host,
                        release: s.release,
                        digest: s.digest,
                        since: s.since,
                        services: s.services,
                        replicas: s.replicas,
                        error: None,
                    });
                }
                Err(e) => {
                    problems.push(format!("{host} did not answer: {}", e.message));
                    hosts.push(HostView {
                        host,
                        release: None,
                        digest: None,
                        since: None,
                        services: Default::default(),
                        replicas: Vec::new(),
                        error: Some(e.message),
                    });
                }
            }
        }
        let state = if !problems.is_empty() {
            "degraded"
        } else if live.is_some() {
            "live"
        } else if down {
            "down"
        } else {
            "nothing"
        };
        StatusView {
            environment: env.config.environment.clone(),
            deployment: env.deployment().to_string(),
            state,
            ledger: live.map(ledger_view),
            hosts,
            problems,
        }
    }

    /// Records how releases without an end ended, from what the hosts run now: live where
    /// every host runs them, failed otherwise. Returns a line per release recorded.
    pub fn reconcile(&self, history: &[Release]) -> Vec<String> {
        let (env, rt) = (self, &self.rt);
        let states = env.host_states();
        let mut done = Vec::new();
        for r in history.iter().filter(|r| r.outcome == Verdict::Started) {
            let runs_it = |s: &Result<HostState, _>| {
                s.as_ref().is_ok_and(|s| {
                    s.release == Some(r.number) && s.digest.as_ref() == Some(&r.digest)
                })
            };
            let mut end = r.clone();
            let everywhere = !states.is_empty() && states.iter().all(|(_, s)| runs_it(s));
            end.outcome = if everywhere {
                Verdict::Live
            } else {
                Verdict::Failed
            };
            end.error =
                (!everywhere).then(|| "not running on every host when reconciled".to_string());
            end.host_states = states
                .iter()
                .map(|(host, s)| HostRecord {
                    host: host.clone(),
                    end: if runs_it(s) { "live" } else { "failed" }.into(),
                    release: s.as_ref().ok().and_then(|s| s.release),
                    digest: s.as_ref().ok().and_then(|s| s.digest.clone()),
                    error: s.as_ref().err().map(|e| e.message.clone()),
                })
                .collect();
            match rt.block_on(env.ledger.finish(end.clone())) {
                Ok(_) => done.push(format!("release {} recorded as {}", r.number, end.outcome)),
                Err(e) => done.push(format!("release {} could not be recorded: {e}", r.number)),
            }
        }
        done
    }
}

/// An agent berth cannot talk to (no token): every request fails with why.
struct Unconfigured {
    name: String,
    why: String,
}

impl Unconfigured {
    fn fail<T>(&self) -> Result<T, HostError> {
        Err(HostError::new(
            &self.name,
            crate::deploy::host::HostErrorKind::Unauthorized,
            self.why.clone(),
        ))
    }
}

impl Host for Unconfigured {
    fn name(&self) -> &str {
        &self.name
    }
    fn preflight(&self, _: &ReleasePlan) -> Result<Vec<String>, HostError> {
        self.fail()
    }
    fn apply(
        &self,
        _: &ReleasePlan,
        _: &crate::deploy::SecretValues,
    ) -> Result<HostState, HostError> {
        self.fail()
    }
    fn rollback(&self, _: &RollbackRequest) -> Result<HostState, HostError> {
        self.fail()
    }
    fn revert(&self, _: &DeploymentName, _: u32, _: &str) -> Result<HostState, HostError> {
        self.fail()
    }
    fn status(&self, _: &DeploymentName) -> Result<HostState, HostError> {
        self.fail()
    }
    fn down(&self, _: &DeploymentName) -> Result<usize, HostError> {
        self.fail()
    }
    fn logs(
        &self,
        _: &crate::deploy::api::LogsQuery,
    ) -> Result<Vec<crate::deploy::local::ReplicaLine>, HostError> {
        self.fail()
    }
}

/// What a release changes from the one in effect: its image, its configuration (the plan
/// without its number), its secrets' values.
fn changes(
    before: Option<&Release>,
    plan: &ReleasePlan,
    secrets: &crate::deploy::SecretValues,
) -> Vec<String> {
    let Some(before) = before else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if before.digest != plan.digest {
        out.push("image".to_string());
    }
    let same_plan = before.plan.as_ref().is_some_and(|p| {
        let (mut a, mut b) = (p.clone(), plan.clone());
        (a.release, b.release) = (0, 0);
        (a.digest, b.digest) = (b.digest.clone(), b.digest.clone());
        a == b
    });
    if !same_plan {
        out.push("config".to_string());
    }
    let same_secrets = match &before.secrets {
        Some(r) => r.matches(secrets),
        None => secrets.is_empty(),
    };
    if !same_secrets {
        out.push("secrets".to_string());
    }
    out
}

/// The ledger's view of a rollout's hosts.
fn host_records(report: &RolloutReport) -> Vec<HostRecord> {
    report
        .hosts
        .iter()
        .map(|h| HostRecord {
            host: h.host.clone(),
            end: serde_json::to_value(h.end)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            release: h.now.as_ref().and_then(|n| n.release),
            digest: h.now.as_ref().and_then(|n| n.digest.clone()),
            error: h.error.clone(),
        })
        .collect()
}

/// What a release tells its caller as it goes.
pub trait ReleaseProgress: Sync {
    /// A step worth a line.
    fn note(&self, _text: &str) {}
    /// The rollout's progress.
    fn rollout(&self) -> &dyn Progress;
}

/// Progress nobody listens to.
pub struct Quiet;

impl ReleaseProgress for Quiet {
    fn rollout(&self) -> &dyn Progress {
        &crate::deploy::rollout::Silent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::rollout::tests::FakeHost;

    /// A project whose `uat` runs on the given hosts (fakes stand in for them).
    fn config(dir: &Path) -> AppConfig {
        std::fs::write(
            dir.join("berth.toml"),
            "[app]\nname = \"app\"\n[image]\nfrom = \"scratch\"\n[services.web]\ncommand = [\"x\"]\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("environments")).unwrap();
        std::fs::write(dir.join("environments/uat.toml"), "hosts = [\"local\"]\n").unwrap();
        crate::manifest::Project::load(dir)
            .unwrap()
            .resolve("uat")
            .unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        _rt: tokio::runtime::Runtime,
        hosts: Vec<Arc<FakeHost>>,
        env: Environment,
    }

    fn fixture(hosts: Vec<FakeHost>, ledger_dir: Option<std::path::PathBuf>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rt = crate::registry_client::runtime().unwrap();
        let hosts: Vec<Arc<FakeHost>> = hosts.into_iter().map(Arc::new).collect();
        let dyn_hosts = hosts.iter().map(|h| h.clone() as Arc<dyn Host>).collect();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let ledger = Ledger::in_dir(
            ledger_dir.unwrap_or_else(|| dir.path().join("ledger")),
            "uat",
        );
        let env = Environment::from_parts(
            config(dir.path()),
            dyn_hosts,
            ledger,
            store,
            rt.handle().clone(),
        );
        Fixture {
            _dir: dir,
            _rt: rt,
            hosts,
            env,
        }
    }

    fn request(digest: &Digest) -> ReleaseRequest {
        ReleaseRequest {
            kind: Kind::Deploy,
            plan: crate::deploy::rollout::tests::plan(0, digest),
            host_rollback: None,
            origin: ImageOrigin::InPlace,
            source: None,
            forced: Vec::new(),
            reason: None,
            put_back: true,
        }
    }

    fn applied(h: &FakeHost) -> Vec<String> {
        h.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.starts_with("preflight"))
            .cloned()
            .collect()
    }

    #[test]
    fn a_host_that_cannot_be_reached_stops_the_release_before_anything_moves() {
        let mut down = FakeHost::new("h2");
        down.unreachable = true;
        let f = fixture(vec![FakeHost::new("h1"), down], None);
        let e = f
            .env
            .release(request(&Digest::of(b"a")), Vec::new(), &Quiet)
            .unwrap_err();
        let ReleaseError::Preflight { problems } = e else {
            panic!("{e}")
        };
        assert_eq!(problems, ["h2: connection refused"]);
        assert!(applied(&f.hosts[0]).is_empty(), "h1 was touched");
        assert!(
            f.env.history().unwrap().is_empty(),
            "no release was allocated"
        );
    }

    #[test]
    fn a_ledger_that_cannot_be_written_first_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("not-a-dir");
        std::fs::write(&blocked, "a file where the ledger's directory should be").unwrap();
        let f = fixture(vec![FakeHost::new("h1")], Some(blocked));
        let e = f
            .env
            .release(request(&Digest::of(b"a")), Vec::new(), &Quiet)
            .unwrap_err();
        assert!(matches!(e, ReleaseError::Ledger(_)), "{e}");
        assert!(applied(&f.hosts[0]).is_empty(), "h1 was touched");
    }

    #[test]
    fn hosts_get_the_ledgers_numbers_and_a_failure_is_recorded_with_each_hosts_state() {
        let mut two = FakeHost::new("h2");
        two.fail_apply = true;
        let f = fixture(vec![FakeHost::new("h1"), two], None);
        // A first release that fails on host 2: host 1 ends running nothing.
        let e = f
            .env
            .release(request(&Digest::of(b"a")), Vec::new(), &Quiet)
            .unwrap_err();
        let ReleaseError::Rollout(r) = e else {
            panic!("{e}")
        };
        assert_eq!(r.release.outcome, Verdict::Failed);
        assert_eq!(f.hosts[0].state(), HostState::default());
        let h = f.env.history().unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].outcome, Verdict::Failed);
        assert_eq!(h[0].host_states[0].end, "put-back");
        assert_eq!(h[0].host_states[0].release, None);
        assert_eq!(h[0].host_states[1].end, "failed");
        assert!(h[0].plan.is_some(), "the plan is recorded");
        assert_eq!(applied(&f.hosts[0]), ["apply 1", "revert 1"]);
    }

    #[test]
    fn numbers_are_the_ledgers_on_every_host() {
        let f = fixture(vec![FakeHost::new("h1"), FakeHost::new("h2")], None);
        for d in [b"a", b"b"] {
            f.env
                .release(request(&Digest::of(d)), Vec::new(), &Quiet)
                .unwrap();
        }
        for h in &f.hosts {
            assert_eq!(h.state().release, Some(2));
            assert_eq!(applied(h), ["apply 1", "apply 2"]);
        }
        let h = f.env.history().unwrap();
        assert_eq!(
            h.iter().map(|r| (r.number, r.outcome)).collect::<Vec<_>>(),
            [(1, Verdict::Live), (2, Verdict::Live)]
        );
    }

    #[test]
    fn an_interrupt_is_recorded_and_the_updated_hosts_go_back() {
        let interrupt = Interrupt::new();
        let mut first = FakeHost::new("h1");
        first.on_apply = Some(interrupt.clone());
        let mut f = fixture(vec![first, FakeHost::new("h2")], None);
        f.env.config.rollout.batch = 1;
        f.env.interrupt = interrupt;
        let e = f
            .env
            .release(request(&Digest::of(b"a")), Vec::new(), &Quiet)
            .unwrap_err();
        let ReleaseError::Rollout(r) = e else {
            panic!("{e}")
        };
        assert_eq!(r.report.outcome, RolloutOutcome::Interrupted);
        assert!(applied(&f.hosts[1]).is_empty(), "h2 never started");
        assert_eq!(f.env.history().unwrap()[0].outcome, Verdict::Interrupted);
        assert_eq!(f.hosts[0].state(), HostState::default());
    }

    #[test]
    fn a_down_is_a_release_and_the_environment_then_runs_nothing() {
        let f = fixture(vec![FakeHost::new("h1")], None);
        f.env
            .release(request(&Digest::of(b"a")), Vec::new(), &Quiet)
            .unwrap();
        let down = f.env.down(&Quiet).unwrap().unwrap();
        assert_eq!(down.release.number, 2);
        let h = f.env.history().unwrap();
        assert_eq!(h[1].kind, Kind::Down);
        assert_eq!(current(&h), None);
        let st = f.env.status(&h);
        assert_eq!(st.state, "down", "{:?}", st.problems);
        // A host that runs something the ledger does not know of is a problem.
        *f.hosts[0].live.lock().unwrap() = Some(0);
        let st = f.env.status(&h);
        assert_eq!(st.state, "degraded");
        assert!(st.problems[0].contains("is down"), "{:?}", st.problems);
    }

    #[test]
    fn a_promotion_refused_by_a_gate_touches_nothing_unless_forced_with_a_reason() {
        use crate::promote::promotion::{self, PromoteError};
        let source = fixture(vec![FakeHost::new("s1")], None);
        source
            .env
            .release(request(&Digest::of(b"a")), Vec::new(), &Quiet)
            .unwrap();
        let target = fixture(vec![FakeHost::new("t1")], None);
        // The fakes report no replicas: the `healthy` gate refuses.
        let plan = promotion::plan(&source.env, &target.env, &[]).unwrap();
        assert_eq!(
            plan.refused().iter().map(|g| g.name).collect::<Vec<_>>(),
            ["healthy"]
        );
        let e = promotion::run(&target.env, &plan, None, true, Vec::new(), &Quiet).unwrap_err();
        assert!(matches!(e, PromoteError::Refused { .. }), "{e}");
        assert!(applied(&target.hosts[0]).is_empty());
        assert!(target.env.history().unwrap().is_empty());
        let done =
            promotion::run(&target.env, &plan, Some("INC-7"), true, Vec::new(), &Quiet).unwrap();
        assert_eq!(done.release.forced, ["healthy"]);
        assert_eq!(done.release.reason.as_deref(), Some("INC-7"));
        assert_eq!(done.release.source.as_deref(), Some("uat"));
        assert_eq!(target.hosts[0].state().digest, Some(Digest::of(b"a")));
    }
}
