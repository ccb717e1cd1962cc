//! `[[image.steps]]`: build instructions written as TOML. Each step is a table with exactly
//! one instruction key (`copy`, `run`, `env`, …) plus that instruction's options. The build
//! engine compiles these and Dockerfiles into one step list.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::decode::Decoder;
use super::node::{Node, Value};
use super::schema::CommandLine;
use super::values::{Duration, ExposedPort, Signal};

/// Instruction keys a step may have (exactly one per step).
pub const INSTRUCTIONS: &[&str] = &[
    "copy",
    "add",
    "run",
    "env",
    "arg",
    "workdir",
    "user",
    "expose",
    "label",
    "volume",
    "stopsignal",
    "cmd",
    "entrypoint",
    "healthcheck",
    "shell",
];
const COPY_OPTIONS: &[&str] = &["chown", "chmod", "from"];
const ADD_OPTIONS: &[&str] = &["chown", "chmod"];
const RUN_OPTIONS: &[&str] = &["network", "mounts"];
const HEALTHCHECK_KEYS: &[&str] = &[
    "cmd",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "start_interval",
];

/// A COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Sources, relative to the context (or to the `from` image's root).
    pub sources: Vec<String>,
    /// Destination in the image; a trailing `/` means a directory.
    pub dest: String,
    /// `user[:group]` owning the copied files.
    pub chown: Option<String>,
    /// Mode for the copied files, e.g. `0o644`.
    pub chmod: Option<u32>,
    /// Copy from a build stage or another image instead of the context (COPY only).
    pub from: Option<String>,
    /// Sources that are heredocs (`COPY <<EOF /file`): name, content, and whether the
    /// content's variables are expanded (an unquoted delimiter).
    pub inline: Vec<(String, String, bool)>,
    /// `--exclude` patterns (ignore-file syntax), relative to each source.
    pub exclude: Vec<String>,
    /// `--parents`: keep each source's parent directories under the destination.
    pub parents: bool,
    /// `ADD --checksum=sha256:…`: what a downloaded source must hash to.
    pub checksum: Option<String>,
}

/// The image's health check, as Docker's HEALTHCHECK sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHealthcheck {
    /// The test command; `None` disables a health check inherited from the base.
    pub command: Option<CommandLine>,
    /// Time between checks.
    pub interval: Option<Duration>,
    /// Time a check may take.
    pub timeout: Option<Duration>,
    /// Failures before unhealthy.
    pub retries: Option<u32>,
    /// Grace time after start.
    pub start_period: Option<Duration>,
    /// Time between checks during the start period.
    pub start_interval: Option<Duration>,
}

/// Network access for a RUN step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunNetwork {
    /// No network (the default).
    None,
    /// The host's network.
    Host,
}

/// What a `RUN --mount` mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    /// Files from the context, a stage or an image (read-only unless `rw`, and then
    /// writes are discarded).
    Bind,
    /// A directory kept in the store between builds (package caches).
    Cache,
    /// An empty tmpfs.
    Tmpfs,
    /// A secret given to the build, as a file (or a variable with `env=`).
    Secret,
}

/// How concurrent builds share a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// Every build uses the same directory at once.
    #[default]
    Shared,
    /// A build that finds it in use gets a directory of its own.
    Private,
    /// A build waits until no other uses it.
    Locked,
}

/// One `RUN --mount=…` (BuildKit's syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    /// The kind (`type=`, default bind).
    pub kind: MountKind,
    /// Where it appears (`target=`; for a secret, default `/run/secrets/ID`).
    pub target: Option<String>,
    /// A cache's or secret's id (default: the target).
    pub id: Option<String>,
    /// The path inside `from` (or the context) to bind or to seed a cache from.
    pub source: Option<String>,
    /// A stage or image to bind from (default: the context).
    pub from: Option<String>,
    /// Writable (bind: writes discarded; cache: the default).
    pub read_write: bool,
    /// Cache sharing.
    pub sharing: Sharing,
    /// Mode of a new cache directory or of a secret file.
    pub mode: Option<u32>,
    /// Owner of a new cache directory or of a secret file.
    pub uid: Option<u32>,
    /// Group of a new cache directory or of a secret file.
    pub gid: Option<u32>,
    /// A secret that must be given (else the build fails).
    pub required: bool,
    /// A secret delivered as this variable instead of a file.
    pub env: Option<String>,
    /// A tmpfs's size limit in bytes (`size=64m`).
    pub size: Option<u64>,
}

impl RunMount {
    /// Parses BuildKit's `type=cache,target=/root/.cache,sharing=locked` form.
    pub fn parse(spec: &str) -> Result<RunMount, String> {
        let mut m = RunMount {
            kind: MountKind::Bind,
            target: None,
            id: None,
            source: None,
            from: None,
            read_write: false,
            sharing: Sharing::Shared,
            mode: None,
            uid: None,
            gid: None,
            required: false,
            env: None,
            size: None,
        };
        let mut rw: Option<bool> = None;
        let fields: Vec<(String, Option<String>)> = spec
            .split(',')
            .filter(|f| !f.is_empty())
            .map(|f| match f.split_once('=') {
                Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_string())),
                None => (f.trim().to_ascii_lowercase(), None),
            })
            .collect();
        if let Some((_, Some(t))) = fields.iter().find(|(k, _)| k == "type") {
            m.kind = match t.as_str() {
                "bind" => MountKind::Bind,
                "cache" => MountKind::Cache,
                "tmpfs" => MountKind::Tmpfs,
                "secret" => MountKind::Secret,
                "ssh" => {
                    return Err(
                        "type=ssh is not supported: berth forwards no SSH agent into builds; give the key as a secret (type=secret)".into(),
                    );
                }
                other => {
                    return Err(format!(
                        "unknown mount type `{other}` (bind, cache, tmpfs or secret)"
                    ));
                }
            };
        }
        let flag = |v: &Option<String>, k: &str| -> Result<bool, String> {
            match v.as_deref() {
                None | Some("true") | Some("1") => Ok(true),
                Some("false") | Some("0") => Ok(false),
                Some(o) => Err(format!("`{k}={o}` is not true or false")),
            }
        };
        let number = |v: &Option<String>, k: &str, radix: u32| -> Result<u32, String> {
            v.as_deref()
                .and_then(|s| u32::from_str_radix(s, radix).ok())
                .filter(|n| radix != 8 || *n <= 0o7777)
                .ok_or_else(|| {
                    if radix == 8 {
                        format!("`{k}={}` is not an octal mode", v.as_deref().unwrap_or(""))
                    } else {
                        format!("`{k}` needs a number")
                    }
                })
        };
        for (k, v) in &fields {
            let value = || v.clone().ok_or_else(|| format!("`{k}` needs a value"));
            match k.as_str() {
                "type" => {}
                "target" | "dst" | "destination" => m.target = Some(value()?),
                "id" => m.id = Some(value()?),
                "source" | "src" => m.source = Some(value()?),
                "from" => m.from = Some(value()?),
                "ro" | "readonly" => rw = Some(!flag(v, k)?),
                "rw" | "readwrite" => rw = Some(flag(v, k)?),
                "sharing" => {
                    m.sharing = match value()?.as_str() {
                        "shared" => Sharing::Shared,
                        "private" => Sharing::Private,
                        "locked" => Sharing::Locked,
                        o => return Err(format!("`sharing={o}` is not shared, private or locked")),
                    }
                }
                "mode" => m.mode = Some(number(v, k, 8)?),
                "uid" => m.uid = Some(number(v, k, 10)?),
                "gid" => m.gid = Some(number(v, k, 10)?),
                "required" => m.required = flag(v, k)?,
                "env" if m.kind == MountKind::Secret => m.env = Some(value()?),
                "size" if m.kind == MountKind::Tmpfs => {
                    let v = value()?;
                    let lower = v.to_ascii_lowercase();
                    let digits = lower.trim_end_matches('b');
                    let (num, mult) = match digits.chars().last() {
                        Some('k') => (&digits[..digits.len() - 1], 1u64 << 10),
                        Some('m') => (&digits[..digits.len() - 1], 1 << 20),
                        Some('g') => (&digits[..digits.len() - 1], 1 << 30),
                        _ => (digits, 1),
                    };
                    m.size = Some(
                        num.parse::<u64>()
                            .ok()
                            .and_then(|n| n.checked_mul(mult))
                            .ok_or_else(|| {
                                format!("`size={v}` is not a size (bytes, or 64k, 64m, 1g)")
                            })?,
                    );
                }
                other => {
                    return Err(
                        format!("`{other}` is not an option of a {:?} mount", m.kind)
                            .to_ascii_lowercase(),
                    );
                }
            }
        }
        m.read_write = rw.unwrap_or(m.kind == MountKind::Cache);
        if m.target
            .as_deref()
            .is_some_and(|t| t.trim_matches('/').is_empty() && t.starts_with('/'))
        {
            return Err("a mount cannot replace the root directory (target=/)".into());
        }
        if m.kind == MountKind::Cache && (m.from.is_some() || m.source.is_some()) {
            return Err(
                "a cache mount seeded from= a stage or image is not supported; COPY the seed in a RUN before, or start the cache empty".into(),
            );
        }
        if let Some(t) = &m.target
            && !t.starts_with('/')
        {
            // Relative targets are relative to the working directory; the engine joins them.
        }
        match m.kind {
            MountKind::Secret => {
                if m.id.is_none() {
                    m.id = m
                        .target
                        .as_deref()
                        .and_then(|t| t.rsplit('/').next())
                        .filter(|n| !n.is_empty())
                        .map(str::to_string);
                }
                let Some(id) = &m.id else {
                    return Err("a secret mount needs id= (or a target=)".into());
                };
                if m.target.is_none() && m.env.is_none() {
                    m.target = Some(format!("/run/secrets/{id}"));
                }
            }
            _ if m.target.is_none() => return Err("the mount needs target=".into()),
            MountKind::Cache if m.id.is_none() => m.id = m.target.clone(),
            _ => {}
        }
        Ok(m)
    }
}

impl std::fmt::Display for RunMount {
    /// The canonical `type=…,target=…` form (what the cache key and history record).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            MountKind::Bind => "bind",
            MountKind::Cache => "cache",
            MountKind::Tmpfs => "tmpfs",
            MountKind::Secret => "secret",
        };
        write!(f, "type={kind}")?;
        if let Some(id) = &self.id {
            write!(f, ",id={id}")?;
        }
        if let Some(t) = &self.target {
            write!(f, ",target={t}")?;
        }
        if let Some(e) = &self.env {
            write!(f, ",env={e}")?;
        }
        if let Some(fr) = &self.from {
            write!(f, ",from={fr}")?;
        }
        if let Some(s) = &self.source {
            write!(f, ",source={s}")?;
        }
        if self.read_write != (self.kind == MountKind::Cache) {
            write!(f, ",{}", if self.read_write { "rw" } else { "ro" })?;
        }
        match self.sharing {
            Sharing::Shared => {}
            Sharing::Private => write!(f, ",sharing=private")?,
            Sharing::Locked => write!(f, ",sharing=locked")?,
        }
        if let Some(m) = self.mode {
            write!(f, ",mode={m:o}")?;
        }
        if let Some(u) = self.uid {
            write!(f, ",uid={u}")?;
        }
        if let Some(g) = self.gid {
            write!(f, ",gid={g}")?;
        }
        if self.required {
            write!(f, ",required")?;
        }
        if let Some(s) = self.size {
            write!(f, ",size={s}")?;
        }
        Ok(())
    }
}

/// One build instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepSpec {
    /// Copy files from the context, a stage or an image.
    Copy(CopySpec),
    /// Copy files, extracting local tar archives.
    Add(CopySpec),
    /// Run a command in the image being built.
    Run {
        /// The command.
        command: CommandLine,
        /// Network access.
        network: Option<RunNetwork>,
        /// `--mount`s, for this step only.
        mounts: Vec<RunMount>,
    },
    /// Set environment variables.
    Env(Vec<(String, String)>),
    /// Declare build arguments with optional defaults.
    Arg(Vec<(String, Option<String>)>),
    /// Set the working directory.
    Workdir(String),
    /// Set the user.
    User(String),
    /// Declare container ports.
    Expose(Vec<ExposedPort>),
    /// Set labels.
    Label(Vec<(String, String)>),
    /// Declare volumes.
    Volume(Vec<String>),
    /// Set the stop signal.
    StopSignal(Signal),
    /// Set the default command.
    Cmd(CommandLine),
    /// Set the entrypoint.
    Entrypoint(CommandLine),
    /// Set the image's health check.
    Healthcheck(ImageHealthcheck),
    /// `MAINTAINER`: the image's author.
    Maintainer(String),
    /// `ONBUILD`: an instruction (as written) for images built FROM this one.
    OnBuild(String),
    /// Set the shell used by shell-form commands.
    Shell(Vec<String>),
}

impl Serialize for StepSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match self {
            StepSpec::Copy(c) | StepSpec::Add(c) => {
                let key = if matches!(self, StepSpec::Copy(_)) {
                    "copy"
                } else {
                    "add"
                };
                let mut all = c.sources.clone();
                all.push(c.dest.clone());
                m.serialize_entry(key, &all)?;
                if let Some(o) = &c.chown {
                    m.serialize_entry("chown", o)?;
                }
                if let Some(mode) = c.chmod {
                    m.serialize_entry("chmod", &format!("{mode:04o}"))?;
                }
                if let Some(f) = &c.from {
                    m.serialize_entry("from", f)?;
                }
            }
            StepSpec::Run {
                command,
                network,
                mounts,
            } => {
                m.serialize_entry("run", command)?;
                if !mounts.is_empty() {
                    let mounts: Vec<String> = mounts.iter().map(|m| m.to_string()).collect();
                    m.serialize_entry("mounts", &mounts)?;
                }
                if let Some(n) = network {
                    let n = match n {
                        RunNetwork::None => "none",
                        RunNetwork::Host => "host",
                    };
                    m.serialize_entry("network", n)?;
                }
            }
            StepSpec::Env(vars) | StepSpec::Label(vars) => {
                let key = if matches!(self, StepSpec::Env(_)) {
                    "env"
                } else {
                    "label"
                };
                let table: indexmap_like::Pairs<'_> = indexmap_like::Pairs(vars);
                m.serialize_entry(key, &table)?;
            }
            StepSpec::Arg(args) => {
                let pairs: Vec<(String, String)> = args
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                    .collect();
                m.serialize_entry("arg", &indexmap_like::Pairs(&pairs))?;
            }
            StepSpec::Workdir(w) => m.serialize_entry("workdir", w)?,
            StepSpec::Maintainer(a) => m.serialize_entry("maintainer", a)?,
            StepSpec::OnBuild(t) => m.serialize_entry("onbuild", t)?,
            StepSpec::User(u) => m.serialize_entry("user", u)?,
            StepSpec::Expose(p) => m.serialize_entry("expose", p)?,
            StepSpec::Volume(v) => m.serialize_entry("volume", v)?,
            StepSpec::StopSignal(sig) => m.serialize_entry("stopsignal", sig)?,
            StepSpec::Cmd(c) => m.serialize_entry("cmd", c)?,
            StepSpec::Entrypoint(c) => m.serialize_entry("entrypoint", c)?,
            StepSpec::Shell(sh) => m.serialize_entry("shell", sh)?,
            StepSpec::Healthcheck(h) => m.serialize_entry("healthcheck", &HealthcheckOut(h))?,
        }
        m.end()
    }
}

struct HealthcheckOut<'a>(&'a ImageHealthcheck);

impl Serialize for HealthcheckOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let h = self.0;
        let mut m = s.serialize_map(None)?;
        match &h.command {
            Some(c) => m.serialize_entry("cmd", c)?,
            None => m.serialize_entry("cmd", "none")?,
        }
        if let Some(v) = h.interval {
            m.serialize_entry("interval", &v)?;
        }
        if let Some(v) = h.timeout {
            m.serialize_entry("timeout", &v)?;
        }
        if let Some(v) = h.retries {
            m.serialize_entry("retries", &v)?;
        }
        if let Some(v) = h.start_period {
            m.serialize_entry("start_period", &v)?;
        }
        m.end()
    }
}

mod indexmap_like {
    use serde::ser::SerializeMap;
    use serde::{Serialize, Serializer};

    /// Key/value pairs serialised as a map in their given order.
    pub struct Pairs<'a>(pub &'a [(String, String)]);

    impl Serialize for Pairs<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }
}

impl Decoder {
    /// A command in exec form (array of strings) or shell form (a string).
    pub fn command_line(&mut self, node: &Node, path: &str) -> Option<CommandLine> {
        match &node.value {
            Value::String(s) if s.trim().is_empty() => {
                self.invalid(node, path, "the command is empty", None);
                None
            }
            Value::String(s) => Some(CommandLine::Shell(s.clone())),
            Value::Array(a) if a.is_empty() => {
                self.invalid(node, path, "the command is empty", None);
                None
            }
            Value::Array(_) => self.string_list(node, path).map(CommandLine::Exec),
            _ => {
                self.type_error(node, path, "an array of strings or a string");
                None
            }
        }
    }

    /// The steps array of `[image]`.
    pub fn steps(&mut self, node: &Node, path: &str) -> Option<Vec<StepSpec>> {
        self.list(node, path, |d, n, p| d.step(n, p))
    }

    fn step(&mut self, node: &Node, path: &str) -> Option<StepSpec> {
        let table = self.table(node, path)?;
        let instructions: Vec<_> = table
            .entries
            .iter()
            .filter(|(k, _)| INSTRUCTIONS.contains(&k.name.as_str()))
            .collect();
        let (key, value) = match instructions.as_slice() {
            [one] => (&one.0, &one.1),
            [] => {
                // No instruction: an unknown key is probably a misspelt one.
                let mut d = node.diag(
                    "berth::invalid-step",
                    format!("`{path}` has no instruction"),
                    "no instruction key",
                );
                let typo = table.keys().find_map(|k| {
                    super::decode::suggest(&k.name, INSTRUCTIONS.iter().copied()).map(|s| (k, s))
                });
                d.help = Some(match typo {
                    Some((k, s)) => {
                        format!("`{}` is not an instruction; did you mean `{s}`?", k.name)
                    }
                    None => format!("a step has one of: {}", INSTRUCTIONS.join(", ")),
                });
                self.diags.push(d);
                return None;
            }
            [_, second, ..] => {
                let mut d = second.0.diag(
                    "berth::invalid-step",
                    format!("`{path}` has more than one instruction"),
                    "second instruction",
                );
                d.help = Some("write each instruction as its own [[image.steps]] table".into());
                self.diags.push(d);
                return None;
            }
        };
        let p = format!("{path}.{}", key.name);
        let options: &[&str] = match key.name.as_str() {
            "copy" => COPY_OPTIONS,
            "add" => ADD_OPTIONS,
            "run" => RUN_OPTIONS,
            _ => &[],
        };
        let mut allowed = vec![key.name.as_str()];
        allowed.extend_from_slice(options);
        self.known_keys(table, &allowed, path);
        let opt = |k: &str| table.get(k);
        match key.name.as_str() {
            "copy" | "add" => {
                let spec =
                    self.copy_spec(value, &p, opt("chown"), opt("chmod"), opt("from"), path)?;
                Some(if key.name == "copy" {
                    StepSpec::Copy(spec)
                } else {
                    StepSpec::Add(spec)
                })
            }
            "run" => {
                let command = self.command_line(value, &p)?;
                let network = match opt("network") {
                    None => None,
                    Some(n) => match self.string(n, &format!("{path}.network"))?.as_str() {
                        "none" => Some(RunNetwork::None),
                        "host" => Some(RunNetwork::Host),
                        other => {
                            self.invalid(
                                n,
                                &format!("{path}.network"),
                                format!("`{other}` is not none or host"),
                                None,
                            );
                            return None;
                        }
                    },
                };
                let mut mounts = Vec::new();
                if let Some(list) = opt("mounts") {
                    let mp = format!("{path}.mounts");
                    let Value::Array(items) = &list.value else {
                        self.invalid(
                            list,
                            &mp,
                            String::from("`mounts` is a list of strings"),
                            Some("mounts = [\"type=cache,target=/root/.cache\"]".into()),
                        );
                        return None;
                    };
                    for item in items {
                        let text = self.string(item, &mp)?;
                        match RunMount::parse(&text) {
                            Ok(m) => mounts.push(m),
                            Err(e) => {
                                self.invalid(item, &mp, e, None);
                                return None;
                            }
                        }
                    }
                }
                Some(StepSpec::Run {
                    command,
                    network,
                    mounts,
                })
            }
            "env" => self
                .env_table(value, &p)
                .map(|m| StepSpec::Env(m.into_iter().collect())),
            "label" => self.label_table(value, &p).map(StepSpec::Label),
            "arg" => self.arg_spec(value, &p).map(StepSpec::Arg),
            "workdir" => self.string(value, &p).map(StepSpec::Workdir),
            "user" => self.nonempty_string(value, &p).map(StepSpec::User),
            "expose" => self
                .one_or_many(value, &p, |d, n, p| d.parsed_or_int::<ExposedPort>(n, p))
                .map(StepSpec::Expose),
            "volume" => self
                .one_or_many(value, &p, |d, n, p| {
                    let s = d.string(n, p)?;
                    if s.starts_with('/') {
                        Some(s)
                    } else {
                        d.invalid(n, p, "a volume path must be absolute", None);
                        None
                    }
                })
                .map(StepSpec::Volume),
            "stopsignal" => self
                .parsed_or_int::<Signal>(value, &p)
                .map(StepSpec::StopSignal),
            "cmd" => self.command_line(value, &p).map(StepSpec::Cmd),
            "entrypoint" => self.command_line(value, &p).map(StepSpec::Entrypoint),
            "shell" => match self.string_list(value, &p)? {
                sh if sh.is_empty() => {
                    self.invalid(value, &p, "the shell is empty", None);
                    None
                }
                sh => Some(StepSpec::Shell(sh)),
            },
            "healthcheck" => self.image_healthcheck(value, &p).map(StepSpec::Healthcheck),
            _ => unreachable!("INSTRUCTIONS covers every key matched above"),
        }
    }

    fn nonempty_string(&mut self, node: &Node, path: &str) -> Option<String> {
        let s = self.string(node, path)?;
        if s.is_empty() {
            self.invalid(node, path, "must not be empty", None);
            return None;
        }
        Some(s)
    }

    /// A single value or an array of them.
    fn one_or_many<T>(
        &mut self,
        node: &Node,
        path: &str,
        mut item: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        match &node.value {
            Value::Array(_) => self.list(node, path, item),
            _ => item(self, node, path).map(|v| vec![v]),
        }
    }

    fn copy_spec(
        &mut self,
        value: &Node,
        p: &str,
        chown: Option<&Node>,
        chmod: Option<&Node>,
        from: Option<&Node>,
        path: &str,
    ) -> Option<CopySpec> {
        let mut all = self.string_list(value, p)?;
        if all.len() < 2 {
            self.invalid(
                value,
                p,
                "needs at least one source and a destination",
                Some(r#"e.g. copy = ["www/", "/www/"]"#.into()),
            );
            return None;
        }
        let dest = all.pop().expect("len >= 2");
        let chown = match chown {
            Some(n) => Some(self.nonempty_string(n, &format!("{path}.chown"))?),
            None => None,
        };
        let chmod = match chmod {
            Some(n) => {
                let s = self.string(n, &format!("{path}.chmod"))?;
                match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
                    Ok(m) if m <= 0o7777 => Some(m),
                    _ => {
                        self.invalid(
                            n,
                            &format!("{path}.chmod"),
                            format!("`{s}` is not an octal mode"),
                            Some(r#"e.g. chmod = "0644""#.into()),
                        );
                        return None;
                    }
                }
            }
            None => None,
        };
        let from = match from {
            Some(n) => Some(self.nonempty_string(n, &format!("{path}.from"))?),
            None => None,
        };
        Some(CopySpec {
            inline: Vec::new(),
            sources: all,
            dest,
            chown,
            chmod,
            from,
            exclude: Vec::new(),
            parents: false,
            checksum: None,
        })
    }

    fn label_table(&mut self, node: &Node, path: &str) -> Option<Vec<(String, String)>> {
        let table = self.table(node, path)?;
        let mut out = Vec::new();
        for (k, v) in &table.entries {
            out.push((
                k.name.clone(),
                self.string(v, &format!("{path}.{}", k.name))?,
            ));
        }
        Some(out)
    }

    fn arg_spec(&mut self, node: &Node, path: &str) -> Option<Vec<(String, Option<String>)>> {
        match &node.value {
            Value::String(name) if super::values::valid_env_name(name) => {
                Some(vec![(name.clone(), None)])
            }
            Value::String(name) => {
                self.invalid(
                    node,
                    path,
                    format!("`{name}` is not a valid argument name"),
                    None,
                );
                None
            }
            Value::Table(_) => self
                .env_table(node, path)
                .map(|m| m.into_iter().map(|(k, v)| (k, Some(v))).collect()),
            _ => {
                self.type_error(node, path, "a name or a table of defaults");
                None
            }
        }
    }

    fn image_healthcheck(&mut self, node: &Node, path: &str) -> Option<ImageHealthcheck> {
        let table = self.table(node, path)?;
        self.known_keys(table, HEALTHCHECK_KEYS, path);
        let Some(cmd) = table.get("cmd") else {
            self.invalid(
                node,
                path,
                "needs `cmd` (a command, or \"none\" to disable)",
                None,
            );
            return None;
        };
        let command = match &cmd.value {
            Value::String(s) if s == "none" => None,
            _ => Some(self.command_line(cmd, &format!("{path}.cmd"))?),
        };
        let dur = |d: &mut Self, k: &str| {
            table
                .get(k)
                .and_then(|n| d.parsed::<Duration>(n, &format!("{path}.{k}")))
        };
        Some(ImageHealthcheck {
            command,
            interval: dur(self, "interval"),
            timeout: dur(self, "timeout"),
            start_period: dur(self, "start_period"),
            start_interval: dur(self, "start_interval"),
            retries: table
                .get("retries")
                .and_then(|n| self.int_in(n, &format!("{path}.retries"), 0..=1000))
                .map(|n| n as u32),
        })
    }
}
