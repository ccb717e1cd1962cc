//! The one step list both inputs compile to: stages of steps. `[image]` steps in
//! `berth.toml` make one stage; a Dockerfile makes one stage per `FROM`. The engine sees only
//! this.

use std::ops::Range;

use crate::manifest::SourceFile;
use crate::manifest::schema::{CommandLine, ImageSpec};
use crate::manifest::steps::StepSpec;

/// Where a step was written, for errors and `--explain`.
#[derive(Debug, Clone)]
pub enum Origin {
    /// `[[image.steps]]` number `index` (0-based) in berth.toml.
    Toml {
        /// Index of the step.
        index: usize,
    },
    /// A Dockerfile line.
    Dockerfile {
        /// The Dockerfile.
        file: SourceFile,
        /// Byte range of the instruction.
        span: Range<usize>,
    },
}

impl Origin {
    /// `berth.toml step 3` or `Dockerfile:12`.
    pub fn describe(&self) -> String {
        match self {
            Origin::Toml { index } => format!("berth.toml [[image.steps]] #{}", index + 1),
            Origin::Dockerfile { file, span } => {
                format!("{}:{}", file.name, file.line_col(span.start).0)
            }
        }
    }
}

/// One build step.
#[derive(Debug, Clone)]
pub struct Step {
    /// The instruction.
    pub spec: StepSpec,
    /// Where it was written.
    pub origin: Origin,
    /// Dockerfile words keep their quotes and `$VAR`s until the build expands them with the
    /// environment in force; TOML values are literal.
    pub expand: bool,
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// The empty image.
    Scratch,
    /// An image reference (raw; may contain `$ARG`s for Dockerfiles).
    Image(String),
}

/// A stage: a base and steps.
#[derive(Debug, Clone)]
pub struct Stage {
    /// `AS name`, if any.
    pub name: Option<String>,
    /// What it starts from (an image, or an earlier stage by name: resolved by the engine).
    pub base: Base,
    /// Where its FROM was written.
    pub origin: Origin,
    /// Its steps.
    pub steps: Vec<Step>,
}

/// Everything to build.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    /// `ARG`s before the first `FROM` (usable in `FROM` lines).
    pub global_args: Vec<(String, Option<String>)>,
    /// The stages, in order.
    pub stages: Vec<Stage>,
}

impl BuildPlan {
    /// The plan for `[image]` steps.
    pub fn from_toml(image: &ImageSpec) -> BuildPlan {
        let base = match &image.from {
            None => Base::Scratch,
            Some(f) if f.is_scratch() => Base::Scratch,
            Some(f) => Base::Image(f.as_str().to_string()),
        };
        let steps = image
            .steps
            .iter()
            .enumerate()
            .map(|(index, spec)| Step {
                spec: spec.clone(),
                origin: Origin::Toml { index },
                expand: false,
            })
            .collect();
        BuildPlan {
            global_args: Vec::new(),
            stages: vec![Stage {
                name: None,
                base,
                origin: Origin::Toml { index: 0 },
                steps,
            }],
        }
    }

    /// The index of the stage to build: `target` by name, else the last.
    pub fn target_index(&self, target: Option<&str>) -> Option<usize> {
        match target {
            None => Some(self.stages.len().checked_sub(1)?),
            Some(t) => self
                .stages
                .iter()
                .position(|s| s.name.as_deref() == Some(t.to_ascii_lowercase().as_str())),
        }
    }
}

/// The text a step records as `created_by` in history, Docker-style.
pub fn describe_step(spec: &StepSpec) -> String {
    fn cmd(c: &CommandLine) -> String {
        match c {
            CommandLine::Exec(v) => serde_json::to_string(v).expect("strings serialise"),
            CommandLine::Shell(s) => s.clone(),
        }
    }
    fn pairs(v: &[(String, String)]) -> String {
        v.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
    match spec {
        StepSpec::Copy(c) | StepSpec::Add(c) => {
            let verb = if matches!(spec, StepSpec::Copy(_)) {
                "COPY"
            } else {
                "ADD"
            };
            let mut s = verb.to_string();
            if let Some(f) = &c.from {
                s += &format!(" --from={f}");
            }
            if let Some(o) = &c.chown {
                s += &format!(" --chown={o}");
            }
            if let Some(m) = c.chmod {
                s += &format!(" --chmod={m:04o}");
            }
            for e in &c.exclude {
                s += &format!(" --exclude={e}");
            }
            if c.parents {
                s += " --parents";
            }
            if let Some(sum) = &c.checksum {
                s += &format!(" --checksum={sum}");
            }
            let sources: Vec<String> = c
                .sources
                .iter()
                .map(|src| {
                    if c.inline.iter().any(|(n, _, _)| n == src) {
                        format!("<<{src}")
                    } else {
                        src.clone()
                    }
                })
                .collect();
            format!("{s} {} {}", sources.join(" "), c.dest)
        }
        StepSpec::Run { command, .. } => format!("RUN {}", cmd(command)),
        StepSpec::Env(v) => format!("ENV {}", pairs(v)),
        StepSpec::Label(v) => format!("LABEL {}", pairs(v)),
        StepSpec::Arg(v) => format!(
            "ARG {}",
            v.iter()
                .map(|(k, d)| d.as_ref().map_or(k.clone(), |d| format!("{k}={d}")))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        StepSpec::Workdir(w) => format!("WORKDIR {w}"),
        StepSpec::Maintainer(a) => format!("MAINTAINER {a}"),
        StepSpec::OnBuild(t) => format!("ONBUILD {t}"),
        StepSpec::User(u) => format!("USER {u}"),
        StepSpec::Expose(p) => format!(
            "EXPOSE {}",
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        StepSpec::Volume(v) => format!(
            "VOLUME {}",
            serde_json::to_string(v).expect("strings serialise")
        ),
        StepSpec::StopSignal(s) => format!("STOPSIGNAL {s}"),
        StepSpec::Cmd(c) => format!("CMD {}", cmd(c)),
        StepSpec::Entrypoint(c) => format!("ENTRYPOINT {}", cmd(c)),
        StepSpec::Shell(s) => format!(
            "SHELL {}",
            serde_json::to_string(s).expect("strings serialise")
        ),
        StepSpec::Healthcheck(h) => match &h.command {
            None => "HEALTHCHECK NONE".into(),
            Some(c) => format!("HEALTHCHECK CMD {}", cmd(c)),
        },
    }
}
