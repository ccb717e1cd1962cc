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
const RUN_OPTIONS: &[&str] = &["network"];
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
            StepSpec::Run { command, network } => {
                m.serialize_entry("run", command)?;
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
                Some(StepSpec::Run { command, network })
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
