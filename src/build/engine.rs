//! Runs a [`BuildPlan`] against the store: stages in dependency order, each step either a
//! config change or a cached-or-built layer, then the image's config and manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use oci_spec::image::{Arch, Descriptor, History, HistoryBuilder, ImageConfiguration, Os};

use super::BuildError;
use super::cache::{self, ExplainRecord, StatCache};
use super::context::Context;
use super::copy::{self, Inputs, Owner};
use super::imagefs::{ImageFs, lookup_group, lookup_user};
use super::layer::{EarlyCopy, Layer, LayerCompression};
use super::meta;
use super::plan::{Base, BuildPlan, Step, describe_step};
use super::shell_words::process_word;
use crate::manifest::steps::{CopySpec, StepSpec};
use crate::store::{Digest, ImageConfig, Store, StoredImage};

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Ignore cached layers.
    pub no_cache: bool,
    /// `--build-arg` values (over `[image] args`).
    pub build_args: BTreeMap<String, String>,
    /// The stage to build (default: the last).
    pub target: Option<String>,
    /// Layer compression.
    pub compression: LayerCompression,
    /// Modification time of every file in the layers (`SOURCE_DATE_EPOCH`, else 0): part
    /// of each step's cache key.
    pub epoch: u64,
    /// The image's creation time in its config and history (`SOURCE_DATE_EPOCH`, else
    /// the commit time of a clean checkout, else 0). Not in any layer, so a new commit
    /// costs no cached step.
    pub created: u64,
    /// Labels added to the final image (provenance).
    pub labels: Vec<(String, String)>,
    /// Identifies the project, so `--explain` compares with this project's last build.
    pub project_id: String,
    /// RUN steps get the host's network (`berth build --network host`); default none.
    pub network_host: bool,
    /// When to pull an image the build names (`FROM`, `COPY --from=IMAGE`).
    pub pull: PullPolicy,
    /// How to pull one: given a normalised reference (`docker.io/library/ubuntu:latest`),
    /// puts it in the store under that name. Without one, nothing is pulled.
    pub puller: Option<Puller>,
    /// An ignore file that replaces the context's own (`<Dockerfile>.dockerignore`).
    pub ignore_file: Option<std::path::PathBuf>,
    /// Secrets for `RUN --mount=type=secret`, by id.
    pub secrets: BTreeMap<String, crate::runtime::process::SecretBytes>,
}

/// When a build pulls the images it names, as `docker build --pull` / `buildah --pull`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Never: an image not in the store is an error.
    Never,
    /// When the store lacks it (under its name or its Docker-normalised name).
    #[default]
    Missing,
    /// Always, for a newer version of the tag.
    Always,
}

/// Pulls an image into the store under its normalised reference.
#[derive(Clone)]
pub struct Puller(pub std::sync::Arc<PullFn>);

/// What a [`Puller`] calls: the reference in, an error message out.
pub type PullFn = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Puller")
    }
}

/// How a step went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepStatus {
    /// The layer came from the cache.
    Hit,
    /// The layer was built; why the cache missed.
    Miss(String),
    /// A config-only step (no layer).
    Config,
}

/// One step's outcome, for progress output and `--explain`.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The stage's name or number.
    pub stage: String,
    /// The step's number in its stage (from 1).
    pub number: usize,
    /// Steps in the stage.
    pub of: usize,
    /// The instruction, expanded.
    pub text: String,
    /// Where it was written.
    pub origin: String,
    /// Hit, miss or config.
    pub status: StepStatus,
    /// The layer, for layer steps.
    pub layer: Option<Layer>,
}

/// Progress of a build, as it happens.
pub enum BuildEvent<'a> {
    /// A step is about to run.
    Started {
        /// The stage's name or number.
        stage: &'a str,
        /// The step's number in its stage (from 1).
        number: usize,
        /// Steps in the stage.
        of: usize,
        /// The instruction as written.
        text: String,
    },
    /// A step is done.
    Finished(&'a StepReport),
}

/// A finished build.
pub struct BuildOutput {
    /// The image.
    pub image: StoredImage,
    /// Every step of the stages built, in order.
    pub steps: Vec<StepReport>,
    /// Keeps the image from gc until the caller has named it (or let it go).
    pub pin: crate::store::Pin,
}

/// A layer (digest, media type) and the nodes it adds to an [`ImageFs`].
type PendingLayer = (Digest, String, Vec<(String, super::imagefs::FsNode)>);

struct StageState {
    config: ImageConfig,
    layers: Vec<Descriptor>,
    chain: Digest,
    base: Option<String>,
    fs: Option<ImageFs>,
    /// Layers this build wrote, with their nodes, not yet added to `fs`: added when a
    /// later step asks for it (most steps after the last COPY never do), dropped when
    /// `fs` is reloaded (its layers include them).
    fs_pending: Vec<PendingLayer>,
    /// `fs` being loaded ahead of need (see [`StageState::load_fs_ahead`]).
    fs_ahead: Option<FsAhead>,
    fs_layers: Vec<(Digest, String)>,
    args: BTreeMap<String, String>,
    /// A CMD was set in this stage (an ENTRYPOINT then keeps it; it resets only an
    /// inherited one, as in Docker).
    cmd_set: bool,
}

impl StageState {
    fn lookup(&self, name: &str) -> Option<String> {
        meta::env_pairs(&self.config)
            .into_iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .or_else(|| self.args.get(name).cloned())
    }

    fn fs(&mut self, store: &Store) -> Result<&mut ImageFs, BuildError> {
        if self.fs.is_none() {
            drop_later(std::mem::take(&mut self.fs_pending));
            let ahead = self.fs_ahead.take().and_then(|a| a.take(&self.fs_layers));
            self.fs = Some(match ahead {
                Some(loaded) => loaded?,
                None => ImageFs::load(store, &self.fs_layers, None)?,
            });
        }
        let fs = self.fs.as_mut().expect("loaded");
        for (digest, media_type, nodes) in self.fs_pending.drain(..) {
            fs.add_layer(digest, media_type, nodes);
        }
        Ok(fs)
    }

    /// Starts loading the image's tree on a thread of its own, for a step that will
    /// likely need it once it knows it missed the cache (a COPY, after walking its
    /// sources): the two overlap. Unused, the load stops at its next layer.
    fn load_fs_ahead(&mut self, store: &Store) {
        if self.fs.is_some() || self.fs_ahead.is_some() {
            return;
        }
        let (store, layers) = (store.clone(), self.fs_layers.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let (tx, loaded) = std::sync::mpsc::channel();
        crate::background::spawn(move || {
            let _ = tx.send(ImageFs::load(&store, &layers, Some(&stopped)));
        });
        self.fs_ahead = Some(FsAhead {
            layers: self.fs_layers.clone(),
            stop,
            loaded,
        });
    }
}

/// Drops `value` on a thread of its own: freeing a large tree (a context's listing, an
/// image's files) costs milliseconds the build need not wait for.
fn drop_later<T: Send + 'static>(value: T) {
    crate::background::spawn(move || drop(value));
}

/// An image's tree being loaded ahead of need.
struct FsAhead {
    /// The layers it is of.
    layers: Vec<(Digest, String)>,
    stop: Arc<AtomicBool>,
    loaded: std::sync::mpsc::Receiver<Result<ImageFs, BuildError>>,
}

impl FsAhead {
    /// The tree, when it is of `layers` (else it is let go).
    fn take(self, layers: &[(Digest, String)]) -> Option<Result<ImageFs, BuildError>> {
        if self.layers != layers {
            return None;
        }
        self.loaded.recv().ok()
    }
}

impl Drop for FsAhead {
    fn drop(&mut self) {
        // Not waited for: it stops at its next layer and its result is dropped.
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Engine<'a> {
    store: &'a Store,
    plan: &'a BuildPlan,
    ctx: Context,
    stat: StatCache,
    opts: &'a BuildOptions,
    built: BTreeMap<usize, StoredImage>,
    reports: Vec<StepReport>,
    spool: tempfile::TempDir,
    on_event: &'a mut dyn FnMut(BuildEvent<'_>),
    /// Names pulled during this build (`--pull always` pulls each once).
    pulled: BTreeSet<String>,
}

/// Builds the target stage of `plan` with `context_dir` as the build context.
pub fn build(
    store: &Store,
    plan: &BuildPlan,
    context_dir: &Path,
    opts: &BuildOptions,
    on_event: &mut dyn FnMut(BuildEvent<'_>),
) -> Result<BuildOutput, BuildError> {
    let _guard = store.use_guard()?;
    let target = plan
        .target_index(opts.target.as_deref())
        .ok_or_else(|| BuildError::UnknownStage(opts.target.clone().unwrap_or_default()))?;
    let tmp = store.state_dir().join("tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| BuildError::Context {
        path: tmp.clone(),
        source: e,
    })?;
    let spool = tempfile::Builder::new()
        .prefix(&crate::store::Store::temp_prefix("build-"))
        .tempdir_in(&tmp)
        .map_err(|e| BuildError::Context {
            path: tmp.clone(),
            source: e,
        })?;
    let mut engine = Engine {
        store,
        plan,
        ctx: Context::open_with(context_dir, opts.ignore_file.as_deref())?,
        stat: StatCache::load(store),
        pulled: BTreeSet::new(),
        opts,
        built: BTreeMap::new(),
        reports: Vec::new(),
        spool,
        on_event,
    };
    let result = engine.stage(target, true);
    engine.stat.save(store);
    let image = result?;
    // Pinned before the use guard drops: gc never sees the new image unreferenced.
    let pin = store.pin(&image.digest)?;
    Ok(BuildOutput {
        image,
        steps: engine.reports,
        pin,
    })
}

/// The image `name` names, as `docker build`/`docker run` find it: the name as the store
/// has it (`base:1`, imported), else its Docker-normalised form (`ubuntu` is
/// `docker.io/library/ubuntu:latest`) or, for Docker Hub's official images, the short one
/// (`docker.io/library/busybox:1.36` finds `busybox:1.36`), else pulled by `puller` under
/// the normalised name, as `policy` allows. Digests and ids are never pulled.
pub fn find_or_pull(
    store: &Store,
    name: &str,
    policy: PullPolicy,
    puller: Option<&Puller>,
) -> Result<StoredImage, BuildError> {
    let digest_like = name.starts_with("sha256:")
        || (name.len() >= 4 && name.bytes().all(|b| b.is_ascii_hexdigit()));
    let normalised = (!digest_like)
        .then(|| name.parse::<crate::registry_client::Reference>().ok())
        .flatten()
        .map(|r| r.to_string())
        .map(|full| {
            if full.contains('@') || full.rsplit('/').next().is_some_and(|l| l.contains(':')) {
                full
            } else {
                format!("{full}:latest")
            }
        });
    if policy != PullPolicy::Always || normalised.is_none() {
        match store.load_image(name) {
            Err(crate::store::StoreError::UnknownImage(_)) => {}
            other => return other.map_err(BuildError::from),
        }
        let short = normalised
            .as_deref()
            .and_then(|f| f.strip_prefix("docker.io/library/"))
            .map(str::to_string);
        for alias in normalised.iter().chain(short.iter()) {
            match store.load_image(alias) {
                Err(crate::store::StoreError::UnknownImage(_)) => {}
                other => return other.map_err(BuildError::from),
            }
        }
    }
    let (Some(full), Some(puller), false) = (&normalised, puller, policy == PullPolicy::Never)
    else {
        return Err(BuildError::UnknownBase(name.to_string()));
    };
    (puller.0)(full).map_err(|message| BuildError::PullFailed {
        name: name.to_string(),
        reference: full.clone(),
        message,
    })?;
    Ok(store.load_image(full)?)
}

/// A bind mount's source, before the step runs.
enum BindPlan {
    /// Context files.
    Context(copy::Selection),
    /// An image or stage, and the path in it.
    Image(Box<StoredImage>, String),
}

/// True when a command line looks like it downloads (package managers, fetchers).
fn fetches(command: &str) -> bool {
    const TOOLS: &[&str] = &[
        "apt-get", "apt", "apk", "dnf", "yum", "zypper", "pip", "pip3", "npm", "yarn", "pnpm",
        "curl", "wget", "git", "go", "cargo", "gem", "bundle", "composer", "mvn", "gradle",
        "dotnet", "poetry", "uv",
    ];
    command
        .split(|c: char| c.is_whitespace() || ";&|()".contains(c))
        .map(|w| w.rsplit('/').next().unwrap_or(w))
        .any(|w| TOOLS.contains(&w))
}

/// `$NAME` and `${NAME}` replaced by `lookup` (empty when unset), as BuildKit expands an
/// unquoted COPY heredoc; `\$` keeps a dollar.
fn expand_vars(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                out.push('$');
                chars.next();
            }
            '$' => {
                let braced = chars.peek() == Some(&'{');
                if braced {
                    chars.next();
                }
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' {
                        name.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if braced {
                    if chars.peek() == Some(&'}') {
                        chars.next();
                    } else {
                        out.push_str("${");
                        out.push_str(&name);
                        continue;
                    }
                }
                if name.is_empty() {
                    out.push('$');
                } else {
                    out.push_str(&lookup(&name).unwrap_or_default());
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// `TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`, `TARGETVARIANT` and their `BUILD*`
/// counterparts, for this machine (berth builds for the platform it runs on).
fn platform_args() -> Vec<(&'static str, String)> {
    let (arch, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", ""),
        "aarch64" => ("arm64", ""),
        "arm" => ("arm", "v7"),
        "x86" => ("386", ""),
        other => (other, ""),
    };
    let platform = if variant.is_empty() {
        format!("linux/{arch}")
    } else {
        format!("linux/{arch}/{variant}")
    };
    let mut out = Vec::new();
    for side in ["TARGET", "BUILD"] {
        let name = |k: &str| -> &'static str {
            match (side, k) {
                ("TARGET", "PLATFORM") => "TARGETPLATFORM",
                ("TARGET", "OS") => "TARGETOS",
                ("TARGET", "ARCH") => "TARGETARCH",
                ("TARGET", _) => "TARGETVARIANT",
                (_, "PLATFORM") => "BUILDPLATFORM",
                (_, "OS") => "BUILDOS",
                (_, "ARCH") => "BUILDARCH",
                _ => "BUILDVARIANT",
            }
        };
        out.push((name("PLATFORM"), platform.clone()));
        out.push((name("OS"), "linux".to_string()));
        out.push((name("ARCH"), arch.to_string()));
        out.push((name("VARIANT"), variant.to_string()));
    }
    out
}

fn host_arch() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        other => Arch::Other(other.to_string()),
    }
}

impl Engine<'_> {
    /// The layer this step made in the last build, whose compressed chunks (and unchanged
    /// first bytes) a new layer may take over; none with `--no-cache`, which takes
    /// nothing from earlier builds.
    fn last_layer(&self, last: &Option<cache::LastExplain>) -> Option<Digest> {
        last.as_ref()
            .filter(|_| !self.opts.no_cache)
            .and_then(|l| l.layer.clone())
    }

    fn timestamp(&self) -> String {
        jiff::Timestamp::from_second(self.opts.created as i64)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
    }

    /// The image a `FROM` or `COPY --from` names: an earlier stage or a stored image.
    fn image_named(&mut self, name: &str, before: usize) -> Result<StoredImage, BuildError> {
        if name.trim().is_empty() {
            return Err(BuildError::Word(
                "the image name is empty (a variable that expands to nothing?)".into(),
            ));
        }
        if self.plan.stages.get(before).and_then(|s| s.name.as_deref())
            == Some(name.to_ascii_lowercase().as_str())
        {
            return Err(BuildError::Word(format!(
                "stage `{name}` cannot use itself (a circular reference)"
            )));
        }
        if let Some(i) = self.plan.stages[..before]
            .iter()
            .position(|s| s.name.as_deref() == Some(&name.to_ascii_lowercase()))
        {
            return self.stage(i, false);
        }
        if let Ok(i) = name.parse::<usize>()
            && i < before
        {
            return self.stage(i, false);
        }
        let always = self.opts.pull == PullPolicy::Always && !self.pulled.contains(name);
        let policy = if always {
            PullPolicy::Always
        } else if self.opts.pull == PullPolicy::Never {
            PullPolicy::Never
        } else {
            PullPolicy::Missing
        };
        let image = find_or_pull(self.store, name, policy, self.opts.puller.as_ref())?;
        self.pulled.insert(name.to_string());
        Ok(image)
    }

    fn stage(&mut self, index: usize, is_target: bool) -> Result<StoredImage, BuildError> {
        if let Some(done) = self.built.get(&index) {
            return Ok(done.clone());
        }
        let stage = &self.plan.stages[index];
        // BuildKit's automatic platform arguments: usable in FROM, and in a stage once it
        // declares them with ARG (a --build-arg of the same name wins).
        let mut global: BTreeMap<String, String> = platform_args()
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    self.opts.build_args.get(k).cloned().unwrap_or(v),
                )
            })
            .collect();
        global.extend(self.plan.global_args.iter().filter_map(|(k, d)| {
            self.opts
                .build_args
                .get(k)
                .cloned()
                .or_else(|| d.clone())
                .map(|v| (k.clone(), v))
        }));
        let mut st = match &stage.base {
            Base::Scratch => {
                let mut oci = ImageConfiguration::default();
                oci.set_architecture(host_arch());
                oci.set_os(Os::Linux);
                StageState {
                    config: ImageConfig {
                        oci,
                        extra: Default::default(),
                    },
                    layers: Vec::new(),
                    chain: Digest::of(b"scratch"),
                    base: None,
                    fs: Some(ImageFs::default()),
                    fs_pending: Vec::new(),
                    fs_ahead: None,
                    fs_layers: Vec::new(),
                    args: BTreeMap::new(),
                    cmd_set: false,
                }
            }
            Base::Image(raw) => {
                let name = process_word(raw, '\\', &|k| global.get(k).cloned()).map_err(|e| {
                    BuildError::Step {
                        origin: stage.origin.describe(),
                        text: format!("FROM {raw}"),
                        source: Box::new(BuildError::Word(e.to_string())),
                    }
                })?;
                let base = self
                    .image_named(&name, index)
                    .map_err(|e| BuildError::Step {
                        origin: stage.origin.describe(),
                        text: format!("FROM {name}"),
                        source: Box::new(e),
                    })?;
                let fs_layers = base
                    .layers()
                    .into_iter()
                    .map(|(d, desc)| (d, desc.media_type().to_string()))
                    .collect();
                StageState {
                    config: base.config.clone(),
                    layers: base.manifest.layers().clone(),
                    chain: Digest::of(format!("base {}", base.digest).as_bytes()),
                    base: Some(base.digest.to_string()),
                    fs: None,
                    fs_pending: Vec::new(),
                    fs_ahead: None,
                    fs_layers,
                    args: BTreeMap::new(),
                    cmd_set: false,
                }
            }
        };
        // A stage whose base sets no PATH (scratch, an imported root filesystem) gets the
        // default one in its config, as BuildKit and buildah give it.
        if !meta::env_pairs(&st.config).iter().any(|(k, _)| k == "PATH") {
            let path = crate::runtime::bundle::DEFAULT_PATH.trim_start_matches("PATH=");
            meta::apply(
                &mut st.config,
                &StepSpec::Env(vec![("PATH".into(), path.to_string())]),
            );
        }
        let stage_name = stage.name.clone().unwrap_or_else(|| index.to_string());
        // The base's ONBUILD triggers run first, and the new image does not inherit them
        // (Docker's rule).
        let mut steps: Vec<Step> = Vec::new();
        if let Some(triggers) = st.config.extra.remove("OnBuild")
            && let Some(list) = triggers.as_array().filter(|l| !l.is_empty())
        {
            let text: Vec<&str> = list.iter().filter_map(|v| v.as_str()).collect();
            let base = st.base.clone().unwrap_or_default();
            let triggers = super::dockerfile::parse_instructions(
                &format!("ONBUILD of {base}"),
                &text.join("\n"),
            )
            .map_err(|d| BuildError::Step {
                origin: stage.origin.describe(),
                text: "ONBUILD".into(),
                source: Box::new(BuildError::Word(
                    d.0.first().map(|d| d.message.clone()).unwrap_or_default(),
                )),
            })?;
            steps.extend(triggers);
        }
        steps.extend(stage.steps.iter().cloned());
        let mut parent_missed = false;
        for (i, step) in steps.iter().enumerate() {
            (self.on_event)(BuildEvent::Started {
                stage: &stage_name,
                number: i + 1,
                of: steps.len(),
                text: describe_step(&step.spec),
            });
            let report = self
                .step(&mut st, index, i, step, &global, parent_missed)
                .map_err(|e| BuildError::Step {
                    origin: step.origin.describe(),
                    text: describe_step(&step.spec),
                    source: Box::new(e),
                })?;
            parent_missed = matches!(report.status, StepStatus::Miss(_));
            let report = StepReport {
                stage: stage_name.clone(),
                number: i + 1,
                of: steps.len(),
                ..report
            };
            (self.on_event)(BuildEvent::Finished(&report));
            self.reports.push(report);
        }
        if is_target {
            let mut cfg = st.config.oci.config().clone().unwrap_or_default();
            let mut labels = cfg.labels().clone().unwrap_or_default();
            labels.extend(self.opts.labels.iter().cloned());
            if !labels.is_empty() {
                cfg.set_labels(Some(labels));
            }
            st.config.oci.set_config(Some(cfg));
        }
        st.config.oci.set_created(Some(self.timestamp()));
        drop_later((st.fs.take(), st.fs_ahead.take(), st.fs_pending));
        let image = self.store.write_image(&st.config, st.layers)?;
        self.built.insert(index, image.clone());
        Ok(image)
    }

    fn expand(&self, st: &StageState, spec: &StepSpec) -> Result<StepSpec, BuildError> {
        expand_spec(spec, &|k| st.lookup(k))
    }
}

/// A Dockerfile step's words expanded (quotes removed, `$VAR`s replaced through `lookup`),
/// as a build does when the step runs (`import --change` too).
pub(crate) fn expand_spec(
    spec: &StepSpec,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<StepSpec, BuildError> {
    {
        let w =
            |s: &str| process_word(s, '\\', lookup).map_err(|e| BuildError::Word(e.to_string()));
        Ok(match spec {
            StepSpec::Copy(c) | StepSpec::Add(c) => {
                let c = CopySpec {
                    inline: c.inline.clone(),
                    sources: c.sources.iter().map(|s| w(s)).collect::<Result<_, _>>()?,
                    dest: w(&c.dest)?,
                    chown: c.chown.as_deref().map(w).transpose()?,
                    chmod: c.chmod,
                    from: c.from.as_deref().map(w).transpose()?,
                    exclude: c.exclude.iter().map(|s| w(s)).collect::<Result<_, _>>()?,
                    parents: c.parents,
                    checksum: c.checksum.clone(),
                };
                if matches!(spec, StepSpec::Copy(_)) {
                    StepSpec::Copy(c)
                } else {
                    StepSpec::Add(c)
                }
            }
            StepSpec::Env(v) => StepSpec::Env(
                v.iter()
                    .map(|(k, v)| Ok((k.clone(), w(v)?)))
                    .collect::<Result<_, BuildError>>()?,
            ),
            StepSpec::Label(v) => StepSpec::Label(
                v.iter()
                    .map(|(k, v)| Ok((w(k)?, w(v)?)))
                    .collect::<Result<_, BuildError>>()?,
            ),
            StepSpec::Arg(v) => StepSpec::Arg(
                v.iter()
                    .map(|(k, d)| Ok((k.clone(), d.as_deref().map(w).transpose()?)))
                    .collect::<Result<_, BuildError>>()?,
            ),
            StepSpec::Workdir(s) => StepSpec::Workdir(w(s)?),
            StepSpec::User(s) => StepSpec::User(w(s)?),
            StepSpec::Volume(v) => {
                StepSpec::Volume(v.iter().map(|s| w(s)).collect::<Result<_, _>>()?)
            }
            other => other.clone(),
        })
    }
}

impl Engine<'_> {
    fn step(
        &mut self,
        st: &mut StageState,
        stage: usize,
        index: usize,
        step: &Step,
        global: &BTreeMap<String, String>,
        parent_missed: bool,
    ) -> Result<StepReport, BuildError> {
        let spec = if step.expand {
            self.expand(st, &step.spec)?
        } else {
            step.spec.clone()
        };
        let text = describe_step(&spec);
        let origin = step.origin.describe();
        let config_step = |text: String| StepReport {
            stage: String::new(),
            number: 0,
            of: 0,
            text,
            origin: origin.clone(),
            status: StepStatus::Config,
            layer: None,
        };
        match &spec {
            StepSpec::Arg(args) => {
                for (name, default) in args {
                    let value = self
                        .opts
                        .build_args
                        .get(name)
                        .cloned()
                        .or_else(|| default.clone())
                        .or_else(|| global.get(name).cloned());
                    if let Some(v) = value {
                        st.args.insert(name.clone(), v);
                    }
                }
                st.chain = Digest::of(format!("{}\n{text}\n{:?}", st.chain, st.args).as_bytes());
                Ok(config_step(text))
            }
            StepSpec::Copy(c) | StepSpec::Add(c) => self.copy_step(
                st,
                stage,
                index,
                c,
                matches!(spec, StepSpec::Add(_)),
                text,
                origin,
                parent_missed,
            ),
            StepSpec::Run {
                command,
                network,
                mounts,
            } => {
                let host = match network {
                    Some(crate::manifest::steps::RunNetwork::Host) => true,
                    Some(crate::manifest::steps::RunNetwork::None) => false,
                    None => self.opts.network_host,
                };
                self.run_step(
                    st,
                    stage,
                    index,
                    (command, mounts),
                    host,
                    text,
                    origin,
                    parent_missed,
                )
            }
            StepSpec::Workdir(_) | StepSpec::Volume(_) => {
                meta::apply(&mut st.config, &spec);
                // As Docker: the directories exist afterwards (a COPY into them, a RUN
                // there, a volume seeded from them).
                let dirs = match &spec {
                    StepSpec::Volume(v) => v
                        .iter()
                        .map(|d| {
                            if d.starts_with('/') {
                                d.clone()
                            } else {
                                format!("{}/{d}", meta::workdir(&st.config))
                            }
                        })
                        .collect(),
                    _ => vec![meta::workdir(&st.config)],
                };
                let missing = self.missing_dirs(st, &dirs)?;
                if missing.is_empty() {
                    st.chain = Digest::of(format!("{}\n{text}", st.chain).as_bytes());
                    self.push_history(st, &text, true);
                    return Ok(config_step(text));
                }
                let key = Digest::of(
                    format!(
                        "{}\n{text}\nmkdir {missing:?}\n{}\nancestors",
                        st.chain, self.opts.epoch
                    )
                    .as_bytes(),
                );
                let dirs = self.parent_dirs(st, missing.iter().map(String::as_str), true)?;
                let (layer, status) = self.generated_layer(
                    &key,
                    &format!("/{}", missing.last().map_or("", String::as_str)),
                    &dirs,
                    "creates its directory",
                    |_| Ok(()),
                )?;
                st.fs = None;
                Ok(self.add_layer(st, key, layer, text, origin, status))
            }
            other => {
                let cmd = st
                    .config
                    .oci
                    .config()
                    .as_ref()
                    .and_then(|c| c.cmd().clone());
                meta::apply(&mut st.config, other);
                match other {
                    StepSpec::Cmd(_) => st.cmd_set = true,
                    StepSpec::Entrypoint(_) if st.cmd_set => {
                        let mut c = st.config.oci.config().clone().unwrap_or_default();
                        c.set_cmd(cmd);
                        st.config.oci.set_config(Some(c));
                    }
                    _ => {}
                }
                st.chain = Digest::of(format!("{}\n{text}", st.chain).as_bytes());
                self.push_history(st, &text, true);
                Ok(config_step(text))
            }
        }
    }

    /// The layer of a step berth writes itself (WORKDIR's directories, heredocs, fetched
    /// files): from the cache under `key`, else `dirs` then what `files` writes, recorded
    /// under `key`. `why` is the miss's reason; errors name `dest`.
    fn generated_layer(
        &self,
        key: &Digest,
        dest: &str,
        dirs: &[(String, super::layer::EntryMeta)],
        why: &str,
        files: impl FnOnce(&mut super::layer::LayerWriter) -> std::io::Result<()>,
    ) -> Result<(Layer, StepStatus), BuildError> {
        let stored = self.compressed_key(key);
        if let Some(l) = (!self.opts.no_cache)
            .then(|| cache::lookup_step(self.store, &stored))
            .flatten()
        {
            return Ok((l, StepStatus::Hit));
        }
        let io = |e: std::io::Error| BuildError::Destination(dest.to_string(), e.to_string());
        let mut w = super::layer::LayerWriter::new(self.store, self.opts.compression, &[])?;
        for (d, meta) in dirs {
            w.dir(d, meta).map_err(io)?;
        }
        files(&mut w).map_err(io)?;
        let l = w.finish()?;
        cache::record_step(self.store, &stored, &l);
        Ok((l, StepStatus::Miss(why.into())))
    }

    /// Where [`Engine::generated_layer`] keeps the layer of the step with `key`: its key
    /// with how the layer is compressed (see [`super::layer::compression_key`]).
    fn compressed_key(&self, key: &Digest) -> Digest {
        let how = super::layer::compression_key(self.opts.compression);
        Digest::of(format!("{key}\n{how}").as_bytes())
    }

    /// Each path with its parent directory resolved through the image's symlinks (the file
    /// lands where a `cp` in the container would put it, never above the root).
    fn resolve_parents<T>(
        &self,
        st: &mut StageState,
        files: Vec<(String, T)>,
    ) -> Result<Vec<(String, T)>, BuildError> {
        let fs = st.fs(self.store)?;
        files
            .into_iter()
            .map(|(path, v)| {
                let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
                let parent = fs.resolve(parent, true).ok_or_else(|| {
                    BuildError::Destination(format!("/{path}"), "too many symlinks".into())
                })?;
                let joined = if parent.is_empty() {
                    name.to_string()
                } else {
                    format!("{parent}/{name}")
                };
                Ok((joined, v))
            })
            .collect()
    }

    /// The directories to write with entries at `paths` (relative, no leading `/`): each
    /// ancestor, parents first, new ones as root's 0755 and existing ones with the metadata
    /// they have (see [`copy::add_parents`]); for `paths` that are directories, those too.
    fn parent_dirs<'p>(
        &self,
        st: &mut StageState,
        paths: impl Iterator<Item = &'p str>,
        leaves_are_dirs: bool,
    ) -> Result<Vec<(String, super::layer::EntryMeta)>, BuildError> {
        let fs = st.fs(self.store)?;
        let mut plan = copy::Plan::new();
        let mut leaves = Vec::new();
        for p in paths {
            let p = p.trim_matches('/').to_string();
            leaves.push(p.clone());
            plan.insert(
                p,
                copy::Planned {
                    content: copy::Content::Dir,
                    meta: super::layer::EntryMeta {
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: self.opts.epoch,
                    },
                },
            );
        }
        copy::add_parents(&mut plan, fs, self.opts.epoch)?;
        Ok(plan
            .into_iter()
            .filter(|(p, planned)| matches!(planned.content, copy::Content::Dir) && !p.is_empty())
            .filter(|(p, _)| leaves_are_dirs || !leaves.contains(p))
            .map(|(p, planned)| (p, planned.meta))
            .collect())
    }

    /// The directories (relative to the root, parents first) that must be made so every
    /// path in `dirs` exists, resolving symlinks inside the image as a mkdir -p there
    /// would; a path through a file is an error.
    fn missing_dirs(
        &self,
        st: &mut StageState,
        dirs: &[String],
    ) -> Result<Vec<String>, BuildError> {
        let fs = st.fs(self.store)?;
        let mut out: Vec<String> = Vec::new();
        for d in dirs {
            let Some(resolved) = fs.resolve(d, true) else {
                return Err(BuildError::Destination(
                    d.clone(),
                    "too many levels of symbolic links".into(),
                ));
            };
            let mut prefix = String::new();
            for c in resolved.split('/').filter(|c| !c.is_empty()) {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(c);
                match fs.get(&prefix).map(|n| &n.kind) {
                    Some(super::imagefs::FsKind::Dir) => {}
                    Some(_) => {
                        return Err(BuildError::Destination(
                            d.clone(),
                            format!("/{prefix} is not a directory"),
                        ));
                    }
                    None => {
                        if !out.contains(&prefix) {
                            out.push(prefix.clone());
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn push_history(&self, st: &mut StageState, created_by: &str, empty: bool) {
        let mut b = HistoryBuilder::default()
            .created(self.timestamp())
            .created_by(created_by.to_string())
            .comment("berth".to_string());
        if empty {
            b = b.empty_layer(true);
        }
        let entry: History = b.build().expect("history fields are set");
        let mut h = st.config.oci.history().clone().unwrap_or_default();
        h.push(entry);
        st.config.oci.set_history(Some(h));
    }

    /// A RUN step: cached by the parent chain, the instruction and everything the command
    /// sees (environment with build args, user, working directory, network); on a miss it
    /// runs in a container over the image so far and its changes become the layer.
    #[allow(clippy::too_many_arguments)]
    fn run_step(
        &mut self,
        st: &mut StageState,
        stage: usize,
        index: usize,
        (command, mounts): (
            &crate::manifest::schema::CommandLine,
            &[crate::manifest::steps::RunMount],
        ),
        host: bool,
        text: String,
        origin: String,
        parent_missed: bool,
    ) -> Result<StepReport, BuildError> {
        let argv = meta::argv(&st.config, command);
        let mut env: Vec<String> = meta::env_pairs(&st.config)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        // Build args are variables for RUN (an ENV of the same name wins), as in Docker.
        for (k, v) in &st.args {
            if !env
                .iter()
                .any(|e| e.split_once('=').map(|(n, _)| n) == Some(k.as_str()))
            {
                env.push(format!("{k}={v}"));
            }
        }
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, crate::runtime::bundle::DEFAULT_PATH.to_string());
        }
        let user = st
            .config
            .oci
            .config()
            .as_ref()
            .and_then(|c| c.user().clone())
            .unwrap_or_default();
        let cwd = meta::workdir(&st.config);
        let compression = super::layer::compression_key(self.opts.compression);
        // The mounts' descriptions are part of the key (a secret's id, never its value; a
        // cache's id, never its contents), as in BuildKit; a bind mount's files are too.
        let mut mount_key: Vec<String> = mounts.iter().map(|m| m.to_string()).collect();
        let mut binds: Vec<BindPlan> = Vec::new();
        // What --explain compares: the mounts as written, and the bound files.
        let mounts_text: Vec<String> = mount_key.clone();
        let mut bound: BTreeMap<String, (String, u32)> = BTreeMap::new();
        for m in mounts
            .iter()
            .filter(|m| m.kind == crate::manifest::steps::MountKind::Bind)
        {
            let source = m.source.clone().unwrap_or_else(|| ".".into());
            match &m.from {
                Some(from) => {
                    let img = self.image_named(from, stage)?;
                    mount_key.push(format!("bind from {}", img.digest));
                    bound.insert(format!("{from} (bind mount)"), (img.digest.to_string(), 0));
                    binds.push(BindPlan::Image(Box::new(img), source));
                }
                None => {
                    let none = super::ignore::IgnoreRules::default();
                    let (sel, mut inputs) =
                        copy::context_inputs(&self.ctx, &[source], &self.stat, &none)?;
                    copy::hash_missing(&self.ctx, &sel, &mut self.stat, &mut inputs)?;
                    mount_key.push(format!("bind {}", copy::inputs_digest(&inputs)));
                    bound.extend(inputs.files);
                    binds.push(BindPlan::Context(sel));
                }
            }
        }
        let key = Digest::of(
            format!(
                "{}\n{text}\n{argv:?}\n{env:?}\n{user}\n{cwd}\n{host}\n{compression}\n{mount_key:?}\nmtime {}",
                st.chain, self.opts.epoch
            )
            .as_bytes(),
        );
        let slot = Digest::of(format!("{}\n{stage}\n{index}", self.opts.project_id).as_bytes());
        let mut record = ExplainRecord {
            parent: st.chain.to_string(),
            base: if index == 0 { st.base.clone() } else { None },
            instruction: if mounts_text.is_empty() {
                format!("{text} (env {env:?}, user {user:?}, workdir {cwd})")
            } else {
                format!(
                    "{text} (env {env:?}, user {user:?}, workdir {cwd}, mounts {mounts_text:?})"
                )
            },
            inputs: bound,
            args: st.args.clone(),
            key: key.to_string(),
            layer: None,
            epoch: self.opts.epoch,
            missed: false,
        };
        let last = cache::last_explain(self.store, &slot);
        let hit = (!self.opts.no_cache)
            .then(|| cache::lookup_step(self.store, &key))
            .flatten();
        let (layer, status) = match hit {
            Some(layer) => (layer, StepStatus::Hit),
            None => {
                let diff_ids = st.config.diff_ids()?;
                let layers: Vec<crate::runtime::snapshot::LayerRef> = st
                    .fs_layers
                    .iter()
                    .cloned()
                    .zip(diff_ids)
                    .map(|((d, m), id)| (d, m, id))
                    .collect();
                let reuse_from: Vec<Digest> = self.last_layer(&last).into_iter().collect();
                let scratch = tempfile::Builder::new()
                    .prefix("bind-")
                    .tempdir_in(self.spool.path())
                    .map_err(|e| BuildError::Context {
                        path: self.spool.path().to_path_buf(),
                        source: e,
                    })?;
                let mut sources = Vec::new();
                for (i, b) in binds.into_iter().enumerate() {
                    let dir = scratch.path().join(i.to_string());
                    sources.push(match b {
                        BindPlan::Context(sel) => super::mounts::BindSource::Context(
                            super::mounts::materialize(&self.ctx, &sel, &dir)?,
                        ),
                        BindPlan::Image(img, path) => {
                            let refs: Vec<crate::runtime::snapshot::LayerRef> = img
                                .layers()
                                .into_iter()
                                .map(|(d, desc)| (d, desc.media_type().to_string()))
                                .zip(img.config.diff_ids()?)
                                .map(|((d, m), id)| (d, m, id))
                                .collect();
                            let lowers = crate::runtime::snapshot::snapshots_of(self.store, &refs)
                                .map_err(|e| BuildError::Runtime(e.to_string()))?;
                            super::mounts::BindSource::Image {
                                lowers,
                                path: path.trim_start_matches('/').to_string(),
                                scratch: dir,
                            }
                        }
                    });
                }
                let prepared =
                    super::mounts::prepare(self.store, mounts, &cwd, &self.opts.secrets, sources)?;
                let mut env = env;
                env.extend(prepared.env.iter().cloned());
                let cmd = super::run::RunCommand {
                    argv,
                    env,
                    user: &user,
                    cwd: &cwd,
                    host_network: host,
                    mounts: prepared.mounts.clone(),
                    mount_targets: prepared.targets.clone(),
                };
                let layer = super::run::run(
                    self.store,
                    &layers,
                    &cmd,
                    self.opts.compression,
                    &reuse_from,
                    self.opts.epoch,
                )
                .map_err(|e| match e {
                    // Unlike Docker, RUN has no network unless asked: say so when a
                    // command that fetches things fails.
                    BuildError::RunFailed { code, message }
                        if !host && fetches(&cmd.argv.join(" ")) =>
                    {
                        BuildError::RunFailed {
                            code,
                            message: format!(
                                "{message}\n  hint: RUN steps have no network unless asked; if this one downloads, build with `--network host`, or give the step its own (`RUN --network=host`, or network = \"host\" in [[image.steps]])"
                            ),
                        }
                    }
                    e => e,
                })?;
                drop(prepared);
                drop(scratch);
                cache::record_step(self.store, &key, &layer);
                let reason = if self.opts.no_cache {
                    "--no-cache".to_string()
                } else {
                    cache::miss_reason(
                        &record,
                        last.as_ref().and_then(|l| l.record()),
                        parent_missed,
                    )
                };
                record.missed = true;
                (layer, StepStatus::Miss(reason))
            }
        };
        record.layer = Some(layer.digest.clone());
        cache::save_explain(self.store, &slot, record, last);
        st.fs = None; // What the command changed is known only from its layer: reload lazily.
        Ok(self.add_layer(st, key, layer, text, origin, status))
    }

    /// Resolves `--chown=user[:group]` against the image's passwd and group files.
    fn owner(&self, st: &mut StageState, chown: &str) -> Result<Owner, BuildError> {
        let (user, group) = match chown.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (chown, None),
        };
        let numeric = |s: &str| s.parse::<u64>().ok();
        let read = |st: &mut StageState, path: &str| -> Result<String, BuildError> {
            let store = self.store;
            let fs = st.fs(store)?;
            Ok(fs
                .read_file(store, path, 1 << 20)?
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default())
        };
        let (uid, primary) = match numeric(user) {
            Some(u) => (u, u),
            None => lookup_user(&read(st, "etc/passwd")?, user)
                .ok_or_else(|| BuildError::UnknownUser(user.to_string()))?,
        };
        let gid = match group {
            None => primary,
            Some(g) => match numeric(g) {
                Some(g) => g,
                None => lookup_group(&read(st, "etc/group")?, g)
                    .ok_or_else(|| BuildError::UnknownUser(format!("group {g}")))?,
            },
        };
        Ok(Owner { uid, gid })
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_step(
        &mut self,
        st: &mut StageState,
        stage: usize,
        index: usize,
        c: &CopySpec,
        add: bool,
        text: String,
        origin: String,
        parent_missed: bool,
    ) -> Result<StepReport, BuildError> {
        let dest = if c.dest.starts_with('/') {
            c.dest.clone()
        } else {
            format!(
                "{}/{}",
                meta::workdir(&st.config).trim_end_matches('/'),
                c.dest
            )
        };
        let dest = format!(
            "{}{}",
            meta::clean_abs(&dest),
            if c.dest.ends_with('/') || c.dest.ends_with("/.") || c.dest == "." {
                "/"
            } else {
                ""
            }
        );
        if !c.inline.is_empty() {
            return self.inline_copy(st, c, &dest, text, origin);
        }
        if c.sources.iter().any(|s| s.contains("://")) {
            return self.url_add(st, c, &dest, text, origin);
        }
        let compression = super::layer::compression_key(self.opts.compression);
        let slot = Digest::of(format!("{}\n{stage}\n{index}", self.opts.project_id).as_bytes());
        let last = cache::last_explain(self.store, &slot);
        // A rebuild takes over the start of this step's last layer. When the step missed
        // last time (files are being edited between builds), its copy starts before the
        // sources are walked: it runs while they are, and is dropped if the step hits.
        let mut early = match (&c.from, &last) {
            (None, Some(l)) if l.missed => self
                .last_layer(&last)
                .and_then(|d| EarlyCopy::start(self.store, self.opts.compression, &d)),
            _ => None,
        };
        let (source_image, selected, mut inputs) = match &c.from {
            Some(from) => {
                let img = self.image_named(from, stage)?;
                (
                    Some(img),
                    Vec::new(),
                    Inputs {
                        files: BTreeMap::new(),
                        complete: true,
                    },
                )
            }
            None => {
                st.load_fs_ahead(self.store);
                let exclude = super::ignore::IgnoreRules::parse(&c.exclude.join("\n"));
                let (sel, inputs) =
                    copy::context_inputs(&self.ctx, &c.sources, &self.stat, &exclude)?;
                (None, sel, inputs)
            }
        };
        let source_id = source_image.as_ref().map(|i| i.digest.to_string());
        let chain = st.chain.clone();
        let key_of = |inputs: &Inputs| {
            Digest::of(
                format!(
                    // `ancestors`: layers carry their existing ancestor directories.
                    "{chain}\n{text}\n{}\n{source_id:?}\n{compression}\nancestors\nmtime {}",
                    copy::inputs_digest(inputs),
                    self.opts.epoch
                )
                .as_bytes(),
            )
        };
        let mut record = ExplainRecord {
            parent: st.chain.to_string(),
            base: if index == 0 { st.base.clone() } else { None },
            instruction: text.clone(),
            inputs: BTreeMap::new(),
            args: st.args.clone(),
            key: String::new(),
            layer: None,
            epoch: self.opts.epoch,
            missed: false,
        };
        if !inputs.complete && last.is_some() && !self.opts.no_cache {
            // This step was built before, so a hit is likely: hash what the stat cache does
            // not know (files changed in the last seconds) rather than rebuild blindly. A
            // first build skips this and hashes while writing, reading each file once.
            copy::hash_missing(&self.ctx, &selected, &mut self.stat, &mut inputs)?;
        }
        let known = (inputs.complete && !self.opts.no_cache).then(|| key_of(&inputs));
        let hit = known
            .as_ref()
            .and_then(|key| Some((cache::lookup_step(self.store, key)?, key.clone())));
        let (layer, status, key) = match hit {
            Some((layer, key)) => {
                st.fs = None; // Reload lazily if a later step needs it.
                st.fs_ahead = None;
                drop(early.take()); // Stops it and removes what it copied.
                record.inputs = std::mem::take(&mut inputs.files);
                (layer, StepStatus::Hit, key)
            }
            None => {
                // Else its copy starts now, while the plan that says how much of the last
                // layer is the same is made.
                record.missed = true;
                let early = early.take().or_else(|| {
                    self.last_layer(&last)
                        .and_then(|d| EarlyCopy::start(self.store, self.opts.compression, &d))
                });
                let chown = c.chown.as_deref().map(|o| self.owner(st, o)).transpose()?;
                let epoch = self.opts.epoch;
                let spool = self.spool.path().to_path_buf();
                let store = self.store;
                let plan = match &source_image {
                    Some(img) => {
                        let layers: Vec<(Digest, String)> = img
                            .layers()
                            .into_iter()
                            .map(|(d, desc)| (d, desc.media_type().to_string()))
                            .collect();
                        let src = ImageFs::load(store, &layers, None)?;
                        copy::plan_from_image(
                            store,
                            &src,
                            &c.sources,
                            &super::ignore::IgnoreRules::parse(&c.exclude.join("\n")),
                            &dest,
                            chown.unwrap_or_default(),
                            c.chmod,
                            st.fs(store)?,
                            epoch,
                            &spool,
                        )
                        .map_err(|e| match e {
                            BuildError::MissingSource(path) => BuildError::MissingInImage {
                                path,
                                from: c.from.clone().unwrap_or_default(),
                            },
                            e => e,
                        })?
                    }
                    // `--parents`: each source under the destination at its own path.
                    None if c.parents => {
                        let fs = st.fs(store)?;
                        let mut plan = copy::Plan::new();
                        for item in &selected {
                            let kept = if item.0.kind == super::context::EntryKind::Dir {
                                item.0.rel.as_str()
                            } else {
                                item.0.rel.rsplit_once('/').map_or("", |(p, _)| p)
                            };
                            let to = format!("{}/{kept}/", dest.trim_end_matches('/'));
                            plan.extend(copy::plan_from_context(
                                &self.ctx,
                                std::slice::from_ref(item),
                                &format!("{}/", meta::clean_abs(&to).trim_end_matches('/')),
                                chown,
                                c.chmod,
                                add,
                                fs,
                                epoch,
                                &spool,
                            )?);
                        }
                        plan
                    }
                    None => copy::plan_from_context(
                        &self.ctx,
                        &selected,
                        &dest,
                        chown,
                        c.chmod,
                        add,
                        st.fs(store)?,
                        epoch,
                        &spool,
                    )?,
                };
                let reuse_from: Vec<Digest> = self.last_layer(&last).into_iter().collect();
                let (layer, nodes) = copy::write_plan(
                    store,
                    &plan,
                    self.opts.compression,
                    &reuse_from,
                    early,
                    Some(&self.ctx),
                    &mut self.stat,
                    &mut inputs,
                )?;
                drop_later(plan);
                if st.fs.is_some() {
                    st.fs_pending
                        .push((layer.digest.clone(), layer.media_type.clone(), nodes));
                } else {
                    drop_later(nodes);
                }
                // Unknown until the files whose hashes were not known had been written
                // (and hashed); otherwise writing changed no input.
                let key = known.unwrap_or_else(|| key_of(&inputs));
                cache::record_step(store, &key, &layer);
                record.inputs = std::mem::take(&mut inputs.files);
                let reason = if self.opts.no_cache {
                    "--no-cache".to_string()
                } else {
                    cache::miss_reason(
                        &record,
                        last.as_ref().and_then(|l| l.record()),
                        parent_missed,
                    )
                };
                (layer, StepStatus::Miss(reason), key)
            }
        };
        record.key = key.to_string();
        record.layer = Some(layer.digest.clone());
        cache::save_explain(self.store, &slot, record, last);
        drop_later(selected);
        Ok(self.add_layer(st, key, layer, text, origin, status))
    }

    /// `COPY <<EOF /file`: heredoc sources written as files (named after their delimiter
    /// when the destination is a directory), variables expanded unless the delimiter was
    /// quoted, mode 0644 unless `--chmod`, owner from `--chown`.
    fn inline_copy(
        &mut self,
        st: &mut StageState,
        c: &CopySpec,
        dest: &str,
        text: String,
        origin: String,
    ) -> Result<StepReport, BuildError> {
        if c.inline.len() != c.sources.len() {
            return Err(BuildError::Destination(
                dest.to_string(),
                "heredoc sources and file sources cannot be mixed in one COPY".into(),
            ));
        }
        let into_dir = dest.ends_with('/') || c.inline.len() > 1;
        let files: Vec<(String, String)> = c
            .inline
            .iter()
            .map(|(name, body, expand)| {
                let path = if into_dir {
                    format!("{}/{name}", dest.trim_end_matches('/'))
                } else {
                    dest.to_string()
                };
                let body = if *expand {
                    expand_vars(body, &|k| st.lookup(k))
                } else {
                    body.clone()
                };
                (path.trim_start_matches('/').to_string(), body)
            })
            .collect();
        let files = self.resolve_parents(st, files)?;
        let owner = match &c.chown {
            Some(o) => self.owner(st, o)?,
            None => super::copy::Owner { uid: 0, gid: 0 },
        };
        let parents = self.parent_dirs(st, files.iter().map(|(p, _)| p.as_str()), false)?;
        let key = Digest::of(
            format!(
                "{}\n{text}\n{files:?}\n{}:{}\n{:?}\n{}\n{parents:?}",
                st.chain, owner.uid, owner.gid, c.chmod, self.opts.epoch
            )
            .as_bytes(),
        );
        let file = super::layer::EntryMeta {
            mode: c.chmod.unwrap_or(0o644),
            uid: owner.uid,
            gid: owner.gid,
            mtime: self.opts.epoch,
        };
        let (layer, status) = self.generated_layer(&key, dest, &parents, "a heredoc", |w| {
            for (path, body) in &files {
                w.file(path, &file, body.len() as u64, body.as_bytes())?;
            }
            Ok(())
        })?;
        st.fs = None;
        Ok(self.add_layer(st, key, layer, text, origin, status))
    }

    /// `ADD https://…`: each URL downloaded into the spool (streamed, hashed), checked
    /// against `--checksum`, and written as a file of mode 0600 (Docker's) named after the
    /// URL's last path segment when the destination is a directory. The cache key is the
    /// content's digest; with `--checksum` a cached layer is used without downloading.
    fn url_add(
        &mut self,
        st: &mut StageState,
        c: &CopySpec,
        dest: &str,
        text: String,
        origin: String,
    ) -> Result<StepReport, BuildError> {
        let into_dir = dest.ends_with('/') || c.sources.len() > 1;
        let owner = match &c.chown {
            Some(o) => self.owner(st, o)?,
            None => super::copy::Owner { uid: 0, gid: 0 },
        };
        let chain = st.chain.clone();
        let key_of = |sums: &[String]| {
            Digest::of(
                format!(
                    "{chain}\n{text}\n{sums:?}\n{}:{}\n{:?}\n{}",
                    owner.uid, owner.gid, c.chmod, self.opts.epoch
                )
                .as_bytes(),
            )
        };
        if let (Some(sum), false, 1) = (&c.checksum, self.opts.no_cache, c.sources.len())
            && let Some(l) = cache::lookup_step(
                self.store,
                &self.compressed_key(&key_of(std::slice::from_ref(sum))),
            )
        {
            let key = key_of(std::slice::from_ref(sum));
            st.fs = None;
            return Ok(self.add_layer(st, key, l, text, origin, StepStatus::Hit));
        }
        let mut files: Vec<(String, std::path::PathBuf, u64)> = Vec::new();
        let mut sums = Vec::new();
        for (i, url) in c.sources.iter().enumerate() {
            // The file's name: the URL path's last segment (a URL without one needs a
            // destination file name).
            let path = url
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .split_once("://")
                .map_or("", |(_, rest)| rest)
                .split_once('/')
                .map_or("", |(_, path)| path);
            let name = path
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .filter(|n| !n.is_empty() && *n != "." && *n != "..")
                .map(str::to_string);
            let name = match (name, into_dir) {
                (Some(n), _) => n,
                (None, false) => String::new(),
                (None, true) => {
                    return Err(BuildError::Fetch(format!(
                        "{url} names no file: give ADD a destination file name, not a directory"
                    )));
                }
            };
            let spooled = self.spool.path().join(format!("url-{i}"));
            let mut out = std::fs::File::create(&spooled).map_err(|e| BuildError::Context {
                path: spooled.clone(),
                source: e,
            })?;
            let (digest, size) = crate::registry_client::download(url, &mut out, 64 << 30)
                .map_err(|e| BuildError::Destination(dest.to_string(), e))?;
            if let Some(want) = &c.checksum
                && digest.to_string() != *want
            {
                return Err(BuildError::Destination(
                    dest.to_string(),
                    format!("{url} has the digest {digest}, not the --checksum {want}"),
                ));
            }
            let path = if into_dir {
                format!("{}/{name}", dest.trim_end_matches('/'))
            } else {
                dest.to_string()
            };
            let path = self
                .resolve_parents(st, vec![(path.trim_start_matches('/').to_string(), ())])?
                .remove(0)
                .0;
            files.push((path, spooled, size));
            sums.push(digest.to_string());
        }
        let key = key_of(&sums);
        let parents = self.parent_dirs(st, files.iter().map(|(p, _, _)| p.as_str()), false)?;
        let file = super::layer::EntryMeta {
            mode: c.chmod.unwrap_or(0o600),
            uid: owner.uid,
            gid: owner.gid,
            mtime: self.opts.epoch,
        };
        // With --checksum the key is also the one a later build looks up first.
        let (layer, status) = self.generated_layer(&key, dest, &parents, "downloaded", |w| {
            for (path, spooled, size) in &files {
                let f = std::fs::File::open(spooled)?;
                w.file(path, &file, *size, std::io::BufReader::new(f))?;
            }
            Ok(())
        })?;
        st.fs = None;
        Ok(self.add_layer(st, key, layer, text, origin, status))
    }

    /// Stacks a step's layer on the stage: chain key, manifest layer, diff_id, history.
    fn add_layer(
        &self,
        st: &mut StageState,
        key: Digest,
        layer: Layer,
        text: String,
        origin: String,
        status: StepStatus,
    ) -> StepReport {
        st.chain = key;
        st.layers.push(layer.descriptor());
        st.fs_layers
            .push((layer.digest.clone(), layer.media_type.clone()));
        st.config
            .oci
            .rootfs_mut()
            .diff_ids_mut()
            .push(layer.diff_id.to_string());
        self.push_history(st, &text, false);
        StepReport {
            stage: String::new(),
            number: 0,
            of: 0,
            text,
            origin,
            status,
            layer: Some(layer),
        }
    }
}
