//! The release ledger: every deploy, promotion, rollback and scale of an environment, as a
//! chain of records that lives where the environment's image lives — so a laptop and a CI
//! runner read the same history.
//!
//! In a registry, a record is an OCI artifact (an image manifest with `artifactType`
//! [`RECORD_TYPE`], the empty config, and the record's JSON as its one layer) whose
//! `subject` is the released image, so `referrers` of an image list its releases (the
//! referrers API where the registry has it, else the referrers tag scheme). The moving tag
//! `berth-release-<env>` names the newest record (the record's manifest is stored by
//! putting it under that tag, after its blobs), and each record names the one before it
//! (`previous`), like commits. Records are immutable and content-addressed, so reads walk
//! back from the tag only as far as the local cache does not already reach.
//!
//! An environment without a registry (dev on `hosts = ["local"]`) keeps the same records
//! in the local store's state directory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::manifest::AppConfig;
use crate::registry_client::documents::{self, MANIFEST};
use crate::registry_client::{Client, ClientOptions, Reference, RegistryError};
use crate::store::{Digest, Store};

/// `artifactType` (and layer media type) of a release record.
pub const RECORD_TYPE: &str = "application/vnd.berth.release.v1+json";
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";
/// Records are small; anything bigger is not one.
const MAX_RECORD: u64 = 1 << 20;
/// How far back a history is read.
const MAX_HISTORY: usize = 100_000;

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `berth deploy`.
    Deploy,
    /// `berth promote`.
    Promote,
    /// `berth rollback`.
    Rollback,
    /// `berth scale`.
    Scale,
    /// `berth down`: the environment stopped.
    Down,
}

/// Where a release stands. A release is recorded twice: `started` before anything rolls
/// out (which allocates its number), then with how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Allocated; rolling out (or berth died before it could record the end: `status`
    /// says so and `status --reconcile` records what the hosts run).
    Started,
    /// Every host it reached runs it (for `down`: the environment is stopped).
    #[serde(alias = "succeeded")]
    Live,
    /// It did not go live (the hosts kept, or went back to, the release before).
    Failed,
    /// An interrupt stopped it; the hosts went back to the release before.
    Interrupted,
}

/// What one host ran when a release ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host.
    pub host: String,
    /// How it ended there (`live`, `failed`, `put-back`, `kept`, `not-started`).
    pub end: String,
    /// The release it runs now, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u32>,
    /// Its image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// What went wrong there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One release of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The app.
    pub app: String,
    /// The environment.
    pub environment: String,
    /// 1, 2, … within the environment.
    pub number: u32,
    /// The image's manifest digest.
    pub digest: Digest,
    /// What did it.
    pub kind: Kind,
    /// For a promotion: the environment it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The git revision the image was built from.
    #[serde(default)]
    pub revision: Option<String>,
    /// When it ended (RFC 3339).
    pub time: String,
    /// Who (`user@host`).
    pub actor: String,
    /// How it ended.
    pub outcome: Verdict,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Promotion gates overridden with `--force`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forced: Vec<String>,
    /// Why they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The hosts it went to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// What each host ran when it ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_states: Vec<HostRecord>,
    /// The plan every host was sent (what a rollback runs again). Never holds secret
    /// values: those travel to hosts apart from the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<crate::deploy::ReleasePlan>,
    /// The highest release number allocated up to this record (the next is one more).
    #[serde(default)]
    pub highest: u32,
    /// The secrets the release delivered: their names and a salted MAC of their values
    /// (never the values, never an unsalted hash), so a later release can tell whether
    /// they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretsRecord>,
    /// What changed from the release in effect before: `image`, `config`, `secrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// The record before this one (its id in the ledger).
    #[serde(default)]
    pub previous: Option<Digest>,
    /// The hooks that ran around it, and how they ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<HookRecord>,
}

/// A hook that ran around a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRecord {
    /// When it ran: `pre_deploy`, `post_deploy`, `pre_promote`, `post_promote`,
    /// `post_rollback`.
    pub hook: String,
    /// Its exit code (`None`: it could not start, or a signal ended it).
    pub exit_code: Option<i32>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HookRecord {
    /// Whether it succeeded.
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
    }
}

impl Release {
    /// A record to append: number and `previous` are filled in by [`Ledger::append`].
    pub fn new(config: &AppConfig, digest: Digest, kind: Kind) -> Release {
        Release {
            app: config.app.name.clone(),
            environment: config.environment.clone(),
            number: 0,
            digest,
            kind,
            source: None,
            revision: None,
            time: String::new(),
            actor: crate::deploy::local::actor(),
            outcome: Verdict::Started,
            error: None,
            forced: Vec::new(),
            reason: None,
            hosts: Vec::new(),
            host_states: Vec::new(),
            plan: None,
            highest: 0,
            secrets: None,
            changes: Vec::new(),
            previous: None,
            hooks: Vec::new(),
        }
    }
}

/// The secrets of a release, as the ledger may keep them: names, a random salt, and
/// SHA-256 over the salt and every `name`/`value` pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsRecord {
    /// The secrets' names.
    pub names: Vec<String>,
    /// 16 random bytes, hex.
    pub salt: String,
    /// The MAC, hex.
    pub mac: String,
}

fn secrets_mac(salt: &[u8], values: &crate::deploy::SecretValues) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(salt);
    for (k, v) in &values.0 {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

impl SecretsRecord {
    /// The record of `values`, with a fresh salt.
    pub fn of(values: &crate::deploy::SecretValues) -> SecretsRecord {
        let mut salt = [0u8; 16];
        // SAFETY: getrandom into a buffer we own, of the length given.
        let n = unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) };
        assert_eq!(n, salt.len() as isize, "the kernel gives random bytes");
        SecretsRecord {
            names: values.0.keys().cloned().collect(),
            salt: hex::encode(salt),
            mac: secrets_mac(&salt, values),
        }
    }

    /// Whether `values` are the ones this record was made from.
    pub fn matches(&self, values: &crate::deploy::SecretValues) -> bool {
        hex::decode(&self.salt).is_ok_and(|salt| secrets_mac(&salt, values) == self.mac)
    }
}

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The registry failed.
    #[error("the release ledger in {location}: {source}")]
    Registry {
        /// The repository.
        location: String,
        /// What failed.
        #[source]
        source: Box<RegistryError>,
    },
    /// The local files failed.
    #[error("the release ledger in {path}: {message}")]
    Local {
        /// Where.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A record is not one.
    #[error("release record {id} in {location} is not readable: {message}")]
    Corrupt {
        /// The ledger.
        location: String,
        /// The record's id.
        id: Digest,
        /// Why.
        message: String,
    },
}

enum Backend {
    /// The environment's registry repository.
    Registry {
        client: Box<Client>,
        reference: Reference,
    },
    /// A directory of records in the local store's state.
    Local(PathBuf),
}

/// An environment's ledger.
pub struct Ledger {
    environment: String,
    backend: Backend,
    /// Records already read from registries, by id.
    cache: PathBuf,
}

/// The moving tag naming an environment's newest record.
pub fn head_tag(environment: &str) -> String {
    format!("berth-release-{environment}")
}

impl Ledger {
    /// A ledger of records in directory `dir` (what an environment without a registry
    /// uses; tests too).
    pub fn in_dir(dir: PathBuf, environment: &str) -> Ledger {
        Ledger {
            environment: environment.to_string(),
            cache: dir.join(".cache"),
            backend: Backend::Local(dir),
        }
    }

    /// The ledger of `config`'s environment: in its registry, or in the local store when
    /// it has none.
    pub fn open(store: &Store, config: &AppConfig) -> Result<Ledger, LedgerError> {
        let cache = store.state_dir().join("ledger-cache");
        let backend = match &config.registry {
            Some(registry) => {
                let reference: Reference =
                    registry
                        .to_string()
                        .parse()
                        .map_err(|e: String| LedgerError::Local {
                            path: PathBuf::from(registry.to_string()),
                            message: e,
                        })?;
                let client =
                    Client::new(&reference, &ClientOptions::default()).map_err(|source| {
                        LedgerError::Registry {
                            location: reference.to_string(),
                            source: Box::new(source),
                        }
                    })?;
                Backend::Registry {
                    client: Box::new(client),
                    reference,
                }
            }
            None => Backend::Local(
                store
                    .state_dir()
                    .join("ledger")
                    .join(format!("{}-{}", config.app.name, config.environment)),
            ),
        };
        Ok(Ledger {
            environment: config.environment.clone(),
            backend,
            cache,
        })
    }

    /// Where the ledger lives, for messages.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Registry { reference, .. } => reference.to_string(),
            Backend::Local(dir) => dir.display().to_string(),
        }
    }

    fn registry_error(&self) -> impl FnOnce(RegistryError) -> LedgerError + '_ {
        move |source| LedgerError::Registry {
            location: self.location(),
            source: Box::new(source),
        }
    }

    fn local_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
        move |e| LedgerError::Local {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// The newest record's id, if any.
    async fn head(&self) -> Result<Option<Digest>, LedgerError> {
        match &self.backend {
            Backend::Registry { client, reference } => Ok(documents::get_manifest(
                client,
                &reference.repository,
                &head_tag(&self.environment),
            )
            .await
            .map_err(self.registry_error())?
            .map(|(_, d)| d)),
            Backend::Local(dir) => {
                let path = dir.join("HEAD");
                match std::fs::read_to_string(&path) {
                    Ok(s) => Ok(s.trim().parse().ok()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Self::local_error(&path)(e)),
                }
            }
        }
    }

    fn corrupt(&self, id: &Digest, message: impl ToString) -> LedgerError {
        LedgerError::Corrupt {
            location: self.location(),
            id: id.clone(),
            message: message.to_string(),
        }
    }

    /// One record by id (from the cache when it was read before).
    async fn read(&self, id: &Digest) -> Result<Release, LedgerError> {
        let bytes = match &self.backend {
            Backend::Local(dir) => {
                let path = dir.join(id.hex());
                let bytes = std::fs::read(&path).map_err(Self::local_error(&path))?;
                if Digest::of(&bytes) != *id {
                    return Err(self.corrupt(id, "its contents do not match its digest"));
                }
                bytes
            }
            Backend::Registry { client, reference } => {
                let cached = self.cache.join(id.hex());
                if let Ok(bytes) = std::fs::read(&cached) {
                    bytes
                } else {
                    let repo = &reference.repository;
                    let (manifest, _, _) = crate::registry_client::pull::fetch_manifest(
                        client,
                        repo,
                        id.as_str(),
                        Some(id),
                    )
                    .await
                    .map_err(self.registry_error())?;
                    let m: Value =
                        serde_json::from_slice(&manifest).map_err(|e| self.corrupt(id, e))?;
                    let layer = m["layers"]
                        .as_array()
                        .and_then(|l| l.first())
                        .filter(|l| l["mediaType"] == RECORD_TYPE)
                        .and_then(|l| l["digest"].as_str())
                        .and_then(|d| d.parse::<Digest>().ok())
                        .ok_or_else(|| self.corrupt(id, "it is not a berth release record"))?;
                    let bytes = documents::get_blob(client, repo, &layer, MAX_RECORD)
                        .await
                        .map_err(self.registry_error())?;
                    // Records never change, so a cached copy is good for ever.
                    let _ = std::fs::create_dir_all(&self.cache);
                    let tmp = self.cache.join(format!(".{}.tmp", id.hex()));
                    if std::fs::write(&tmp, &bytes).is_ok() {
                        let _ = std::fs::rename(&tmp, &cached);
                    }
                    bytes
                }
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| self.corrupt(id, e))
    }

    /// Every record as written, oldest first (a release appears once started and again
    /// with its end).
    pub async fn records(&self) -> Result<Vec<Release>, LedgerError> {
        let mut out = Vec::new();
        let mut next = self.head().await?;
        while let Some(id) = next {
            let r = self.read(&id).await?;
            next = r.previous.clone();
            out.push(r);
            if out.len() >= MAX_HISTORY {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Every release, oldest first by number, each as its newest record says.
    pub async fn history(&self) -> Result<Vec<Release>, LedgerError> {
        Ok(fold(self.records().await?))
    }

    /// Records the start of `release`: allocates its number (one above every number
    /// allocated so far) before anything rolls out. Returns it as recorded.
    pub async fn start(&self, mut release: Release) -> Result<Release, LedgerError> {
        release.outcome = Verdict::Started;
        self.append(release, true).await
    }

    /// Records how release `release.number` ended (a second record with the same
    /// number), retrying with backoff a few times before giving up.
    pub async fn finish(&self, release: Release) -> Result<Release, LedgerError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.append(release.clone(), false).await {
                Ok(r) => return Ok(r),
                Err(e) if attempt >= 5 => return Err(e),
                Err(_) => {
                    let wait = std::time::Duration::from_millis(250 << attempt);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Appends `release` (linked to the newest record and stamped now; with `number`, also
    /// numbered one above the highest number allocated); returns it as recorded.
    async fn append(&self, mut release: Release, number: bool) -> Result<Release, LedgerError> {
        // Local appends are serialised by a lock; a registry has no compare-and-swap, so
        // two appends to one environment at the same instant could both build on the same
        // head (the hosts' deploy locks make that rare, not impossible).
        let _lock = match &self.backend {
            Backend::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(Self::local_error(dir))?;
                let path = dir.join("lock");
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(Self::local_error(&path))?;
                file.lock().map_err(Self::local_error(&path))?;
                Some(file)
            }
            Backend::Registry { .. } => None,
        };
        let head = self.head().await?;
        let highest = match &head {
            Some(id) => {
                let h = self.read(id).await?;
                h.highest.max(h.number)
            }
            None => 0,
        };
        if number {
            release.number = highest + 1;
        }
        release.highest = highest.max(release.number);
        release.previous = head;
        release.environment = self.environment.clone();
        release.time = jiff::Timestamp::now().to_string();
        let bytes = serde_json::to_vec_pretty(&release).expect("a record serialises");
        match &self.backend {
            Backend::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(Self::local_error(dir))?;
                let id = Digest::of(&bytes);
                write_atomic(&dir.join(id.hex()), &bytes)?;
                write_atomic(&dir.join("HEAD"), id.as_str().as_bytes())?;
            }
            Backend::Registry { client, reference } => {
                let repo = &reference.repository;
                let err = self.registry_error();
                // The blobs, and the released image as the record's subject (when the
                // registry has it: a failed deploy may not have pushed it), at once.
                let (empty, layer, subject) = tokio::join!(
                    documents::put_blob(client, repo, EMPTY),
                    documents::put_blob(client, repo, &bytes),
                    documents::get_manifest(client, repo, release.digest.as_str()),
                );
                let (empty, layer) = match (empty, layer) {
                    (Ok(e), Ok(l)) => (e, l),
                    (Err(e), _) | (_, Err(e)) => return Err(err(e)),
                };
                let subject = subject.ok().flatten().map(|(m, d)| {
                    json!({
                        "mediaType": crate::registry_client::push::manifest_media_type(&m),
                        "digest": d,
                        "size": m.len(),
                    })
                });
                let annotations = json!({
                    "org.opencontainers.image.created": release.time,
                    "dev.berth.release.environment": release.environment,
                    "dev.berth.release.number": release.number.to_string(),
                    "dev.berth.release.outcome": release.outcome.as_str(),
                });
                let mut manifest = json!({
                    "schemaVersion": 2,
                    "mediaType": MANIFEST,
                    "artifactType": RECORD_TYPE,
                    "config": { "mediaType": EMPTY_TYPE, "digest": empty, "size": EMPTY.len(), "data": "e30=" },
                    "layers": [{ "mediaType": RECORD_TYPE, "digest": layer, "size": bytes.len() }],
                    "annotations": annotations,
                });
                if let Some(s) = &subject {
                    manifest["subject"] = s.clone();
                }
                let manifest = serde_json::to_vec(&manifest).expect("a manifest serialises");
                let id = Digest::of(&manifest);
                // Stored once, under the moving head tag: its blobs are already there, so
                // the record is complete the moment the head names it. (Putting it by
                // digest first and then again under the tag made distribution rewrite the
                // bytes in place while the referrers index naming it was verified:
                // DIGEST_INVALID.)
                documents::put_manifest(
                    client,
                    repo,
                    &head_tag(&self.environment),
                    MANIFEST,
                    &manifest,
                )
                .await
                .map_err(self.registry_error())?;
                if let Some(s) = subject
                    && let Ok(subject_digest) = s["digest"].as_str().unwrap_or_default().parse()
                {
                    let descriptor = json!({
                        "mediaType": MANIFEST,
                        "digest": id,
                        "size": manifest.len(),
                        "artifactType": RECORD_TYPE,
                        "annotations": annotations,
                    });
                    documents::add_referrer(client, repo, &subject_digest, descriptor)
                        .await
                        .map_err(self.registry_error())?;
                }
                let _ = std::fs::create_dir_all(&self.cache);
                let _ = std::fs::write(self.cache.join(id.hex()), &bytes);
            }
        }
        Ok(release)
    }
}

fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), LedgerError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(Ledger::local_error(path))
}

impl Verdict {
    /// Its name, as the ledger writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Started => "started",
            Verdict::Live => "live",
            Verdict::Failed => "failed",
            Verdict::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Deploy => "deploy",
            Kind::Promote => "promote",
            Kind::Rollback => "rollback",
            Kind::Scale => "scale",
            Kind::Down => "down",
        })
    }
}

/// One release per number, as its newest record says, ordered by number.
pub fn fold(records: Vec<Release>) -> Vec<Release> {
    let mut by_number: std::collections::BTreeMap<u32, Release> = Default::default();
    for r in records {
        by_number.insert(r.number, r);
    }
    by_number.into_values().collect()
}

/// The release in effect: the newest that went live. `None` when there is none or the
/// newest is a `down` (the environment is stopped).
pub fn current(history: &[Release]) -> Option<&Release> {
    history
        .iter()
        .rev()
        .find(|r| r.outcome == Verdict::Live)
        .filter(|r| r.kind != Kind::Down)
}

/// Since when `digest` has served without interruption at the end of `history`: the time
/// of the first of the newest run of live records with that digest (a `down` ends a run).
pub fn serving_since<'a>(history: &'a [Release], digest: &Digest) -> Option<&'a str> {
    let mut since = None;
    for r in history.iter().rev() {
        match r.outcome {
            Verdict::Live if r.kind == Kind::Down => break,
            Verdict::Live if r.digest == *digest => since = Some(r.time.as_str()),
            Verdict::Live => break,
            _ => continue,
        }
    }
    since
}

/// A deploy record for tests.
#[cfg(test)]
pub(crate) fn sample(number: u32, digest: &Digest, time: &str, outcome: Verdict) -> Release {
    Release {
        app: "a".into(),
        environment: "e".into(),
        number,
        digest: digest.clone(),
        kind: Kind::Deploy,
        source: None,
        revision: None,
        time: time.into(),
        actor: "x".into(),
        outcome,
        error: None,
        forced: vec![],
        reason: None,
        hosts: vec![],
        host_states: vec![],
        plan: None,
        highest: number,
        secrets: None,
        changes: vec![],
        previous: None,
        hooks: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u32, d: &str, outcome: Verdict, t: &str) -> Release {
        sample(n, &Digest::of(d.as_bytes()), t, outcome)
    }

    #[test]
    fn the_current_release_is_the_newest_that_succeeded() {
        let h = vec![
            rec(1, "a", Verdict::Live, "t1"),
            rec(2, "b", Verdict::Failed, "t2"),
        ];
        assert_eq!(current(&h).map(|r| r.number), Some(1));
        assert_eq!(current(&[]), None);
    }

    #[test]
    fn serving_since_counts_from_the_start_of_the_newest_run() {
        let a = Digest::of(b"a");
        let h = vec![
            rec(1, "a", Verdict::Live, "t1"),
            rec(2, "b", Verdict::Live, "t2"),
            rec(3, "a", Verdict::Live, "t3"),
            rec(4, "c", Verdict::Failed, "t4"),
            rec(5, "a", Verdict::Live, "t5"),
        ];
        assert_eq!(serving_since(&h, &a), Some("t3"));
        assert_eq!(serving_since(&h, &Digest::of(b"b")), None);
        // A `down` ends the run: the soak starts again with the next release.
        let mut down = rec(6, "a", Verdict::Live, "t6");
        down.kind = Kind::Down;
        let mut h2 = h.clone();
        h2.push(down);
        assert_eq!(current(&h2), None, "a stopped environment runs nothing");
        assert_eq!(serving_since(&h2, &a), None);
        h2.push(rec(7, "a", Verdict::Live, "t7"));
        assert_eq!(serving_since(&h2, &a), Some("t7"));
    }

    #[test]
    fn a_release_is_its_newest_record_and_numbers_never_repeat() {
        let d = Digest::of(b"a");
        let started = sample(5, &d, "t1", Verdict::Started);
        let other = sample(6, &d, "t2", Verdict::Started);
        let ended = sample(5, &d, "t3", Verdict::Live);
        let h = fold(vec![started, other, ended]);
        assert_eq!(
            h.iter().map(|r| (r.number, r.outcome)).collect::<Vec<_>>(),
            [(5, Verdict::Live), (6, Verdict::Started)]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_local_ledger_allocates_first_and_records_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger {
            environment: "uat".into(),
            backend: Backend::Local(dir.path().join("l")),
            cache: dir.path().join("c"),
        };
        let d = Digest::of(b"a");
        let a = ledger
            .start(sample(0, &d, "", Verdict::Live))
            .await
            .unwrap();
        let b = ledger
            .start(sample(0, &d, "", Verdict::Live))
            .await
            .unwrap();
        assert_eq!((a.number, b.number), (1, 2));
        let mut end = a.clone();
        end.outcome = Verdict::Failed;
        ledger.finish(end).await.unwrap();
        // The next number is above every allocated one, though the head is release 1.
        let c = ledger
            .start(sample(0, &d, "", Verdict::Live))
            .await
            .unwrap();
        assert_eq!(c.number, 3);
        let h = ledger.history().await.unwrap();
        assert_eq!(
            h.iter().map(|r| (r.number, r.outcome)).collect::<Vec<_>>(),
            [
                (1, Verdict::Failed),
                (2, Verdict::Started),
                (3, Verdict::Started)
            ]
        );
        assert_eq!(ledger.records().await.unwrap().len(), 4);
    }
}
