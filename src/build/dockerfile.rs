//! A Dockerfile/Containerfile parser producing a [`BuildPlan`].
//!
//! Covers parser directives (`# escape=`), line continuations, comments, FROM (with `AS`),
//! COPY and ADD (`--from`, `--chown`, `--chmod`), RUN (exec and shell form, `--network`),
//! ENV, ARG, LABEL, EXPOSE, USER, WORKDIR, VOLUME, STOPSIGNAL, CMD, ENTRYPOINT (exec and
//! shell form), HEALTHCHECK, SHELL, MAINTAINER and ONBUILD, heredocs and BuildKit's
//! `RUN --mount`. What it does not support is an error naming the line; every error of
//! the file is reported.

use std::ops::Range;

use super::plan::{Base, BuildPlan, Origin, Stage, Step};
use super::shell_words::split_words;
use crate::manifest::schema::CommandLine;
use crate::manifest::steps::{CopySpec, ImageHealthcheck, RunNetwork, StepSpec};
use crate::manifest::values::{Duration, ExposedPort, Signal};
use crate::manifest::{ConfigDiagnostic, Diagnostics, SourceFile};

/// A logical line: an instruction with its continuation lines joined, and the bodies of
/// the heredocs it opens (`RUN <<EOF`, `COPY <<EOF /file`).
struct Line {
    span: Range<usize>,
    keyword: String,
    args: String,
    heredocs: Vec<Heredoc>,
}

/// A heredoc's body.
#[derive(Debug, Clone)]
struct Heredoc {
    /// Its delimiter word.
    name: String,
    /// The lines between the instruction and the delimiter.
    body: String,
    /// The delimiter was quoted: no variable expansion.
    quoted: bool,
}

/// The heredocs an instruction's arguments open: `<<WORD`, `<<-WORD`, `<<"WORD"`.
fn heredoc_markers(args: &str) -> Vec<(String, bool, bool)> {
    let mut out = Vec::new();
    let mut rest = args;
    while let Some(at) = rest.find("<<") {
        let mut after = &rest[at + 2..];
        let strip = after.starts_with('-');
        if strip {
            after = &after[1..];
        }
        let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'');
        let body = quote.map_or(after, |q| &after[q.len_utf8()..]);
        let word: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !word.is_empty() {
            out.push((word.clone(), strip, quote.is_some()));
        }
        rest = &body[word.len()..];
    }
    out
}

struct Parser<'a> {
    file: &'a SourceFile,
    escape: char,
    diags: Diagnostics,
}

/// Parses a Dockerfile.
/// Instructions outside a Dockerfile (ONBUILD triggers, `import --change`), parsed as the
/// steps of a stage: `name` is what errors call their source.
pub fn parse_instructions(name: &str, text: &str) -> Result<Vec<Step>, Diagnostics> {
    let plan = parse(&SourceFile {
        name: name.to_string(),
        text: std::sync::Arc::new(format!("FROM scratch\n{text}\n")),
    })?;
    Ok(plan.stages.into_iter().flat_map(|s| s.steps).collect())
}

/// Parses a Dockerfile.
pub fn parse(file: &SourceFile) -> Result<BuildPlan, Diagnostics> {
    let mut p = Parser {
        file,
        escape: '\\',
        diags: Diagnostics::default(),
    };
    let text = file.text.as_str();
    let body_start = p.directives(text);
    let lines = p.logical_lines(text, body_start);
    let mut plan = BuildPlan {
        global_args: Vec::new(),
        stages: Vec::new(),
    };
    for line in lines {
        let origin = Origin::Dockerfile {
            file: file.clone(),
            span: line.span.clone(),
        };
        if line.keyword == "FROM" {
            if let Some(stage) = p.from(&line, origin) {
                if let Some(name) = &stage.name
                    && plan.stages.iter().any(|s| s.name.as_ref() == Some(name))
                {
                    p.error(
                        &line.span,
                        format!("a stage named `{name}` is already defined"),
                        "second definition",
                        Some("stage names are case-insensitive and unique".into()),
                    );
                }
                plan.stages.push(stage);
            }
            continue;
        }
        let Some(stage) = plan.stages.last_mut() else {
            if line.keyword == "ARG" {
                if let Some(StepSpec::Arg(args)) = p.instruction(&line) {
                    plan.global_args.extend(args);
                }
            } else {
                p.error(
                    &line.span,
                    format!("{} before the first FROM", line.keyword),
                    "only ARG may come before FROM",
                    None,
                );
            }
            continue;
        };
        if let Some(spec) = p.instruction(&line) {
            stage.steps.push(Step {
                spec,
                origin,
                expand: true,
            });
        }
    }
    if plan.stages.is_empty() && p.diags.is_empty() {
        p.error(
            &(0..0),
            "the Dockerfile has no FROM".into(),
            "empty build",
            Some("start with FROM IMAGE or FROM scratch".into()),
        );
    }
    if p.diags.is_empty() {
        Ok(plan)
    } else {
        Err(p.diags)
    }
}

/// A RUN with heredocs as a shell command. `RUN <<EOF` alone runs the body as a script
/// (with its `#!` interpreter if it names one); otherwise the line and the bodies with their
/// delimiters are one shell script, as the shell reads here-documents itself.
fn heredoc_command(args: &str, docs: &[Heredoc]) -> CommandLine {
    let only = args.trim();
    if docs.len() == 1
        && heredoc_markers(only).len() == 1
        && only
            .trim_start_matches("<<")
            .trim_start_matches('-')
            .trim_matches(['"', '\''])
            == docs[0].name
    {
        let body = &docs[0].body;
        if body.starts_with("#!") {
            let script = format!(
                "f=$(mktemp) && cat > \"$f\" <<'BERTH_HEREDOC_END'\n{body}BERTH_HEREDOC_END\nchmod +x \"$f\" && \"$f\"; r=$?; rm -f \"$f\"; exit $r"
            );
            return CommandLine::Shell(script);
        }
        return CommandLine::Shell(body.clone());
    }
    let mut script = args.to_string();
    for d in docs {
        script.push('\n');
        script.push_str(&d.body);
        script.push_str(&d.name);
    }
    CommandLine::Shell(script)
}

impl Parser<'_> {
    fn error(&mut self, span: &Range<usize>, message: String, label: &str, help: Option<String>) {
        self.diags.push(ConfigDiagnostic {
            message,
            label: label.to_string(),
            help,
            code: "berth::dockerfile",
            file: self.file.clone(),
            span: span.clone(),
        });
    }

    /// Reads `# directive=value` lines at the top; returns where the body starts.
    fn directives(&mut self, text: &str) -> usize {
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            let t = line.trim();
            let Some(rest) = t.strip_prefix('#') else {
                break;
            };
            let Some((key, value)) = rest.split_once('=') else {
                break;
            };
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
                break;
            }
            if key == "escape" {
                match value {
                    "\\" => self.escape = '\\',
                    "`" => self.escape = '`',
                    _ => self.error(
                        &(offset..offset + line.len()),
                        format!("invalid escape character `{value}`"),
                        "must be \\ or `",
                        None,
                    ),
                }
            }
            offset += line.len();
        }
        offset
    }

    /// Joins continuation lines and drops comments and blank lines; a RUN, COPY or ADD
    /// that opens heredocs takes the lines up to each delimiter as their bodies.
    fn logical_lines(&mut self, text: &str, start: usize) -> Vec<Line> {
        let mut lines: Vec<Line> = Vec::new();
        let mut current: Option<(usize, String)> = None;
        let mut offset = start;
        let raws: Vec<&str> = text[start..].split_inclusive('\n').collect();
        let mut i = 0;
        while i < raws.len() {
            let raw = raws[i];
            i += 1;
            let line_start = offset;
            offset += raw.len();
            let content = raw.trim_end_matches(['\n', '\r']);
            let trimmed = content.trim_start();
            // Comments, and blank lines (also inside a continuation, which Docker skips
            // with a warning), are no part of an instruction.
            if trimmed.starts_with('#') || trimmed.is_empty() {
                continue;
            }
            let (continues, piece) = match content.trim_end().strip_suffix(self.escape) {
                Some(p) => (true, p),
                None => (false, content),
            };
            let (begin, mut acc) = current
                .take()
                .unwrap_or((line_start + (content.len() - trimmed.len()), String::new()));
            acc.push_str(piece);
            if continues {
                current = Some((begin, acc));
            } else {
                self.push_line(&mut lines, begin, offset, acc);
                let Some(line) = lines.last_mut() else {
                    continue;
                };
                if !matches!(line.keyword.as_str(), "RUN" | "COPY" | "ADD") {
                    continue;
                }
                for (name, strip, quoted) in heredoc_markers(&line.args) {
                    let mut body = String::new();
                    let mut closed = false;
                    while i < raws.len() {
                        let raw = raws[i];
                        i += 1;
                        offset += raw.len();
                        let content = raw.trim_end_matches(['\n', '\r']);
                        let content = if strip {
                            content.trim_start_matches('\t')
                        } else {
                            content
                        };
                        if content == name {
                            closed = true;
                            break;
                        }
                        body.push_str(content);
                        body.push('\n');
                    }
                    if !closed {
                        let span = line.span.clone();
                        self.error(
                            &span,
                            format!("the heredoc `{name}` is never closed"),
                            "opened here",
                            Some(format!("end it with a line holding only {name}")),
                        );
                        break;
                    }
                    line.span.end = offset.min(self.file.text.len());
                    line.heredocs.push(Heredoc { name, body, quoted });
                }
            }
        }
        if let Some((begin, acc)) = current {
            self.push_line(&mut lines, begin, offset, acc);
        }
        lines
    }

    fn push_line(&mut self, lines: &mut Vec<Line>, begin: usize, end: usize, text: String) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let (kw, args) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
        let end = self.file.text[begin..end].trim_end().len() + begin;
        lines.push(Line {
            span: begin..end,
            keyword: kw.to_ascii_uppercase(),
            args: args.trim().to_string(),
            heredocs: Vec::new(),
        });
    }

    /// Splits leading `--flag=value` options off the arguments.
    fn flags<'l>(
        &mut self,
        line: &'l Line,
        allowed: &[&str],
    ) -> Option<(Vec<(String, String)>, &'l str)> {
        let mut rest = line.args.as_str();
        let mut flags = Vec::new();
        while let Some(after) = rest.strip_prefix("--") {
            let (flag, tail) = after.split_once(char::is_whitespace).unwrap_or((after, ""));
            let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
            let takes_value = !matches!(name, "link" | "parents" | "keep-git-dir");
            if !flag.contains('=') && takes_value && allowed.contains(&name) {
                let next = tail.split_whitespace().next().unwrap_or("VALUE");
                self.error(
                    &line.span,
                    format!("{} --{name} needs `=`", line.keyword),
                    "flag without a value",
                    Some(format!("write --{name}={next}")),
                );
                return None;
            }
            if !allowed.contains(&name) {
                let help = if allowed.is_empty() {
                    None
                } else {
                    Some(format!(
                        "{} accepts: --{}",
                        line.keyword,
                        allowed.join(", --")
                    ))
                };
                self.error(
                    &line.span,
                    format!("{} --{name} is not supported", line.keyword),
                    "unsupported flag",
                    help,
                );
                return None;
            }
            flags.push((name.to_string(), value.to_string()));
            rest = tail.trim_start();
        }
        Some((flags, rest))
    }

    fn words(&mut self, line: &Line, s: &str) -> Option<Vec<String>> {
        match split_words(s, self.escape) {
            Ok(w) => Some(w),
            Err(e) => {
                self.error(
                    &line.span,
                    format!("cannot parse {}: {e}", line.keyword),
                    "here",
                    None,
                );
                None
            }
        }
    }

    /// Exec form (a JSON array of strings) or shell form.
    fn command(&mut self, line: &Line, s: &str) -> Option<CommandLine> {
        if s.trim_start().starts_with('[')
            && let Ok(v) = serde_json::from_str::<Vec<String>>(s)
        {
            // `CMD []` and `ENTRYPOINT []` clear what the base set, as in Docker.
            if v.is_empty() && line.keyword == "RUN" {
                self.error(
                    &line.span,
                    format!("{} has an empty command", line.keyword),
                    "empty",
                    None,
                );
                return None;
            }
            return Some(CommandLine::Exec(v));
        }
        if s.trim().is_empty() {
            self.error(
                &line.span,
                format!("{} needs a command", line.keyword),
                "missing command",
                None,
            );
            return None;
        }
        Some(CommandLine::Shell(s.to_string()))
    }

    fn from(&mut self, line: &Line, origin: Origin) -> Option<Stage> {
        let (flags, rest) = self.flags(line, &["platform"])?;
        // berth builds for this machine's platform (no emulation): a literal other one is
        // refused rather than silently ignored.
        if let Some((_, platform)) = flags.iter().find(|(k, _)| k == "platform")
            && !platform.contains('$')
        {
            let arch = match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            };
            let here = format!("linux/{arch}");
            if !platform.eq_ignore_ascii_case(&here) {
                self.error(
                    &line.span,
                    format!("FROM --platform={platform}: berth builds for {here}, this machine's platform"),
                    "another platform",
                    Some(format!("drop --platform, or write --platform=$BUILDPLATFORM ({here})")),
                );
                return None;
            }
        }
        let words = self.words(line, rest)?;
        let (image, name) = match words.as_slice() {
            [image] => (image.clone(), None),
            [image, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                (image.clone(), Some(name.to_ascii_lowercase()))
            }
            _ => {
                self.error(
                    &line.span,
                    "FROM takes an image and an optional `AS name`".into(),
                    "here",
                    Some("e.g. FROM base:1 AS build".into()),
                );
                return None;
            }
        };
        let base = if image == "scratch" {
            Base::Scratch
        } else {
            Base::Image(image)
        };
        Some(Stage {
            name,
            base,
            origin,
            steps: Vec::new(),
        })
    }

    fn single(&mut self, line: &Line) -> Option<String> {
        if line.args.is_empty() {
            self.error(
                &line.span,
                format!("{} needs an argument", line.keyword),
                "missing argument",
                None,
            );
            return None;
        }
        Some(line.args.clone())
    }

    /// `k=v k2="v 2"` pairs (ENV, LABEL), or the legacy `ENV key value` form.
    fn pairs(&mut self, line: &Line) -> Option<Vec<(String, String)>> {
        let words = self.words(line, &line.args)?;
        if words.is_empty() {
            self.error(
                &line.span,
                format!("{} needs key=value", line.keyword),
                "missing",
                None,
            );
            return None;
        }
        if !words[0].contains('=') {
            // The legacy `ENV key value` / `LABEL key value`: the rest of the line is the value.
            if words.len() < 2 {
                self.error(
                    &line.span,
                    format!("{} needs key=value pairs", line.keyword),
                    "missing `=`",
                    None,
                );
                return None;
            }
            let value = line.args[words[0].len()..].trim().to_string();
            return Some(vec![(words[0].clone(), value)]);
        }
        let mut out = Vec::new();
        for w in words {
            match w.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    out.push((k.trim_matches('"').to_string(), v.to_string()))
                }
                _ => {
                    self.error(&line.span, format!("`{w}` is not key=value"), "here", None);
                    return None;
                }
            }
        }
        Some(out)
    }

    fn instruction(&mut self, line: &Line) -> Option<StepSpec> {
        match line.keyword.as_str() {
            "RUN" => {
                let (flags, rest) = self.flags(line, &["network", "mount"])?;
                let mut mounts = Vec::new();
                for (_, v) in flags.iter().filter(|(k, _)| k == "mount") {
                    match crate::manifest::steps::RunMount::parse(v) {
                        Ok(m) => mounts.push(m),
                        Err(e) => {
                            self.error(
                                &line.span,
                                format!("RUN --mount={v}: {e}"),
                                "this mount",
                                None,
                            );
                            return None;
                        }
                    }
                }
                let network = match flags
                    .iter()
                    .find(|(k, _)| k == "network")
                    .map(|(_, v)| v.as_str())
                {
                    None | Some("default") => None,
                    Some("none") => Some(RunNetwork::None),
                    Some("host") => Some(RunNetwork::Host),
                    Some(other) => {
                        self.error(
                            &line.span,
                            format!("RUN --network={other} is not supported"),
                            "use none or host",
                            None,
                        );
                        return None;
                    }
                };
                let command = if line.heredocs.is_empty() {
                    self.command(line, rest)?
                } else {
                    heredoc_command(rest, &line.heredocs)
                };
                Some(StepSpec::Run {
                    command,
                    network,
                    mounts,
                })
            }
            "CMD" => self.command(line, &line.args).map(StepSpec::Cmd),
            "ENTRYPOINT" => self.command(line, &line.args).map(StepSpec::Entrypoint),
            "SHELL" => match serde_json::from_str::<Vec<String>>(&line.args) {
                Ok(v) if !v.is_empty() => Some(StepSpec::Shell(v)),
                _ => {
                    self.error(
                        &line.span,
                        "SHELL needs a JSON array".into(),
                        "here",
                        Some(r#"e.g. SHELL ["/bin/sh", "-c"]"#.into()),
                    );
                    None
                }
            },
            "COPY" | "ADD" => self.copy(line),
            "ENV" => self.pairs(line).map(StepSpec::Env),
            "LABEL" => self.pairs(line).map(StepSpec::Label),
            "MAINTAINER" => self.single(line).map(StepSpec::Maintainer),
            "ARG" => {
                let words = self.words(line, &line.args)?;
                if words.is_empty() {
                    self.error(&line.span, "ARG needs a name".into(), "missing name", None);
                    return None;
                }
                Some(StepSpec::Arg(
                    words
                        .into_iter()
                        .map(|w| match w.split_once('=') {
                            Some((k, v)) => (k.to_string(), Some(v.to_string())),
                            None => (w, None),
                        })
                        .collect(),
                ))
            }
            "WORKDIR" => self.single(line).map(StepSpec::Workdir),
            "USER" => self.single(line).map(StepSpec::User),
            "VOLUME" => {
                let arg = self.single(line)?;
                let vols = match serde_json::from_str::<Vec<String>>(&arg) {
                    Ok(v) => v,
                    Err(_) => self.words(line, &arg)?,
                };
                Some(StepSpec::Volume(vols))
            }
            "EXPOSE" => {
                let words = self.words(line, &line.args)?;
                let mut ports = Vec::new();
                for w in words {
                    // A range (`8000-8002[/udp]`) exposes each port in it.
                    if let Some((range, proto)) = w
                        .split_once('/')
                        .map_or(Some((w.as_str(), "")), |(r, p)| Some((r, p)))
                        && let Some((lo, hi)) = range.split_once('-')
                        && let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>())
                        && lo <= hi
                    {
                        for port in lo..=hi {
                            let one = if proto.is_empty() {
                                port.to_string()
                            } else {
                                format!("{port}/{proto}")
                            };
                            match one.parse::<ExposedPort>() {
                                Ok(p) => ports.push(p),
                                Err(e) => {
                                    self.error(
                                        &line.span,
                                        format!("invalid EXPOSE: {e}"),
                                        "here",
                                        None,
                                    );
                                    return None;
                                }
                            }
                        }
                        continue;
                    }
                    match w.parse::<ExposedPort>() {
                        Ok(p) => ports.push(p),
                        Err(e) => {
                            let help = w
                                .contains('$')
                                .then(|| "berth does not expand variables in EXPOSE".to_string());
                            self.error(&line.span, format!("invalid EXPOSE: {e}"), "here", help);
                            return None;
                        }
                    }
                }
                if ports.is_empty() {
                    self.error(
                        &line.span,
                        "EXPOSE needs a port".into(),
                        "missing port",
                        None,
                    );
                    return None;
                }
                Some(StepSpec::Expose(ports))
            }
            "STOPSIGNAL" => match line.args.parse::<Signal>() {
                Ok(s) => Some(StepSpec::StopSignal(s)),
                Err(e) => {
                    self.error(&line.span, format!("invalid STOPSIGNAL: {e}"), "here", None);
                    None
                }
            },
            "HEALTHCHECK" => self.healthcheck(line),
            "ONBUILD" => {
                // A trigger for images built FROM this one: kept as written (in the
                // config's OnBuild, as Docker does), checked now as an instruction.
                let trigger = line.args.trim();
                let keyword = trigger
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_ascii_uppercase();
                if matches!(keyword.as_str(), "ONBUILD" | "FROM" | "MAINTAINER" | "") {
                    self.error(
                        &line.span,
                        format!(
                            "ONBUILD cannot trigger {}",
                            if keyword.is_empty() {
                                "nothing"
                            } else {
                                &keyword
                            }
                        ),
                        "not a trigger",
                        Some("ONBUILD takes one instruction such as RUN or COPY".into()),
                    );
                    return None;
                }
                if let Err(e) = parse_instructions("ONBUILD", trigger) {
                    let why = e.0.first().map(|d| d.message.clone()).unwrap_or_default();
                    self.error(&line.span, format!("ONBUILD {why}"), "this trigger", None);
                    return None;
                }
                Some(StepSpec::OnBuild(trigger.to_string()))
            }
            other => {
                let known = [
                    "FROM",
                    "RUN",
                    "CMD",
                    "LABEL",
                    "EXPOSE",
                    "ENV",
                    "ADD",
                    "COPY",
                    "ENTRYPOINT",
                    "VOLUME",
                    "USER",
                    "WORKDIR",
                    "ARG",
                    "STOPSIGNAL",
                    "HEALTHCHECK",
                    "SHELL",
                    "MAINTAINER",
                ];
                let help = crate::manifest::decode::suggest(other, known)
                    .map(|s| format!("did you mean {s}?"));
                self.error(
                    &line.span,
                    format!("unknown instruction `{other}`"),
                    "unknown instruction",
                    help,
                );
                None
            }
        }
    }

    fn copy(&mut self, line: &Line) -> Option<StepSpec> {
        let add = line.keyword == "ADD";
        let allowed: &[&str] = if add {
            &[
                "chown",
                "chmod",
                "link",
                "checksum",
                "exclude",
                "keep-git-dir",
            ]
        } else {
            &["from", "chown", "chmod", "link", "exclude", "parents"]
        };
        let (flags, rest) = self.flags(line, allowed)?;
        let mut args = match serde_json::from_str::<Vec<String>>(rest) {
            Ok(v) if rest.trim_start().starts_with('[') => v,
            _ => self.words(line, rest)?,
        };
        if args.len() < 2 {
            self.error(
                &line.span,
                format!(
                    "{} needs at least one source and a destination",
                    line.keyword
                ),
                "here",
                None,
            );
            return None;
        }
        let urls = args[..args.len() - 1]
            .iter()
            .filter(|a| a.contains("://"))
            .count();
        if let Some(other) = args[..args.len() - 1]
            .iter()
            .find(|a| a.contains("://") && !a.starts_with("http://") && !a.starts_with("https://"))
        {
            self.error(
                &line.span,
                format!("ADD from {other} is not supported"),
                "remote source",
                Some(
                    "ADD fetches http:// and https:// URLs; clone a repository in a RUN step"
                        .into(),
                ),
            );
            return None;
        }
        if urls > 0 && urls + 1 != args.len() {
            self.error(
                &line.span,
                "ADD cannot mix URLs and local sources".into(),
                "here",
                Some("write one ADD for the URLs and one for the local files".into()),
            );
            return None;
        }
        let checksum = flags
            .iter()
            .find(|(n, _)| n == "checksum")
            .map(|(_, v)| v.clone());
        if let Some(sum) = &checksum {
            let valid = sum
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !valid || urls == 0 {
                self.error(
                    &line.span,
                    format!("ADD --checksum={sum} needs a sha256:<64 hex> digest and a URL source"),
                    "here",
                    None,
                );
                return None;
            }
        }
        let dest = args.pop().expect("len >= 2");
        // Heredoc sources (`<<EOF`) carry their content; they are named after the word.
        let mut inline = Vec::new();
        for a in args.iter_mut() {
            if let Some(m) = heredoc_markers(a).into_iter().next()
                && a.starts_with("<<")
                && let Some(d) = line.heredocs.iter().find(|d| d.name == m.0)
            {
                inline.push((d.name.clone(), d.body.clone(), !d.quoted));
                *a = d.name.clone();
            }
        }
        let flag = |k: &str| flags.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let chmod = match flag("chmod") {
            None => None,
            Some(m) => match u32::from_str_radix(&m, 8) {
                Ok(m) if m <= 0o7777 => Some(m),
                _ => {
                    self.error(
                        &line.span,
                        format!("--chmod={m} is not an octal mode"),
                        "here",
                        None,
                    );
                    return None;
                }
            },
        };
        let spec = CopySpec {
            inline,
            sources: args,
            dest,
            chown: flag("chown"),
            chmod,
            from: flag("from"),
            exclude: flags
                .iter()
                .filter(|(n, _)| n == "exclude")
                .map(|(_, v)| v.clone())
                .collect(),
            parents: flags.iter().any(|(n, v)| n == "parents" && v != "false"),
            checksum,
        };
        Some(if add {
            StepSpec::Add(spec)
        } else {
            StepSpec::Copy(spec)
        })
    }

    fn healthcheck(&mut self, line: &Line) -> Option<StepSpec> {
        let (flags, rest) = self.flags(
            line,
            &[
                "interval",
                "timeout",
                "start-period",
                "start-interval",
                "retries",
            ],
        )?;
        let (kw, cmd) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let command = match kw.to_ascii_uppercase().as_str() {
            "NONE" => None,
            "CMD" => Some(self.command(line, cmd.trim())?),
            _ => {
                self.error(
                    &line.span,
                    "HEALTHCHECK needs CMD or NONE".into(),
                    "here",
                    None,
                );
                return None;
            }
        };
        let mut h = ImageHealthcheck {
            command,
            interval: None,
            timeout: None,
            retries: None,
            start_period: None,
            start_interval: None,
        };
        for (k, v) in flags {
            let dur = || v.parse::<Duration>();
            let bad = match k.as_str() {
                "interval" => dur().map(|d| h.interval = Some(d)).err(),
                "timeout" => dur().map(|d| h.timeout = Some(d)).err(),
                "start-period" => dur().map(|d| h.start_period = Some(d)).err(),
                "start-interval" => dur().map(|d| h.start_interval = Some(d)).err(),
                _ => v
                    .parse::<u32>()
                    .map(|n| h.retries = Some(n))
                    .map_err(|e| e.to_string())
                    .err(),
            };
            if let Some(e) = bad {
                self.error(
                    &line.span,
                    format!("invalid HEALTHCHECK --{k}: {e}"),
                    "here",
                    None,
                );
                return None;
            }
        }
        Some(StepSpec::Healthcheck(h))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn df(text: &str) -> Result<BuildPlan, Diagnostics> {
        parse(&SourceFile {
            name: "Dockerfile".into(),
            text: Arc::new(text.into()),
        })
    }

    fn line_of(d: &ConfigDiagnostic) -> usize {
        d.file.line_col(d.span.start).0
    }

    #[test]
    fn a_classic_node_dockerfile() {
        let plan = df("# syntax=docker/dockerfile:1\nARG BASE=base:1\nFROM ${BASE} AS app\nWORKDIR /app\nCOPY package.json ./\nRUN npm install \\\n    --production\nCOPY . .\nEXPOSE 3000\nENV NODE_ENV=production PORT=\"3000\"\nCMD [\"node\", \"server.js\"]\n").unwrap();
        assert_eq!(plan.global_args, [("BASE".into(), Some("base:1".into()))]);
        let st = &plan.stages[0];
        assert_eq!(
            (st.name.as_deref(), &st.base),
            (Some("app"), &Base::Image("${BASE}".into()))
        );
        let kinds: Vec<String> = st
            .steps
            .iter()
            .map(|s| super::super::plan::describe_step(&s.spec))
            .collect();
        assert_eq!(
            kinds,
            [
                "WORKDIR /app",
                "COPY package.json ./",
                "RUN npm install     --production",
                "COPY . .",
                "EXPOSE 3000/tcp",
                "ENV NODE_ENV=production PORT=\"3000\"",
                "CMD [\"node\",\"server.js\"]",
            ]
        );
        let Origin::Dockerfile { file, span } = &st.steps[2].origin else {
            panic!()
        };
        assert_eq!(
            file.line_col(span.start).0,
            6,
            "a continued line reports where it starts"
        );
    }

    #[test]
    fn multi_stage_and_copy_flags() {
        let plan = df("FROM base:1 AS build\nRUN [\"make\"]\nFROM scratch\nCOPY --from=build --chown=10:10 --chmod=755 /out/app /app\n").unwrap();
        assert_eq!(plan.stages.len(), 2);
        assert_eq!(plan.stages[1].base, Base::Scratch);
        let StepSpec::Copy(c) = &plan.stages[1].steps[0].spec else {
            panic!()
        };
        assert_eq!(
            (c.from.as_deref(), c.chown.as_deref(), c.chmod),
            (Some("build"), Some("10:10"), Some(0o755))
        );
        assert_eq!(plan.target_index(Some("build")), Some(0));
        assert_eq!(plan.target_index(None), Some(1));
    }

    #[test]
    fn escape_directive_and_comments() {
        let plan = df("# escape=`\nFROM scratch\n# a comment\nCOPY a `\n  b /dst/\n").unwrap();
        let StepSpec::Copy(c) = &plan.stages[0].steps[0].spec else {
            panic!()
        };
        assert_eq!(c.sources, ["a", "b"]);
    }

    #[test]
    fn healthcheck_forms() {
        let plan = df("FROM scratch\nHEALTHCHECK --interval=5s --retries=2 CMD curl -f http://localhost/\nHEALTHCHECK NONE\n").unwrap();
        let StepSpec::Healthcheck(h) = &plan.stages[0].steps[0].spec else {
            panic!()
        };
        assert_eq!(
            (h.interval.map(|d| d.to_string()), h.retries),
            (Some("5s".into()), Some(2))
        );
        let StepSpec::Healthcheck(none) = &plan.stages[0].steps[1].spec else {
            panic!()
        };
        assert!(none.command.is_none());
    }

    #[test]
    fn every_error_names_its_line() {
        let err = df("FROM base:1\nONBUILD FROM x\nADD git://example.com/x /x\nCOPY onlyone\nFRUM x\nRUN --mount=type=ssh make\nEXPOSE eighty\n").unwrap_err();
        let lines: Vec<usize> = err.0.iter().map(line_of).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7], "{err:#?}");
        assert!(
            err.0[3].help.as_deref() == Some("did you mean FROM?"),
            "{:?}",
            err.0[3].help
        );
    }

    #[test]
    fn legacy_and_edge_syntax() {
        let plan = df("FROM scratch\nMAINTAINER Jane <j@x>\nLABEL version 1.0 beta\nRUN echo a \\\n\n  # comment in a continuation\n  b\nCMD []\nENTRYPOINT []\nEXPOSE 8000-8002 9000-9001/udp\nHEALTHCHECK --start-interval=2s CMD true\n").unwrap();
        let kinds: Vec<String> = plan.stages[0]
            .steps
            .iter()
            .map(|s| super::super::plan::describe_step(&s.spec))
            .collect();
        assert_eq!(kinds[0], "MAINTAINER Jane <j@x>");
        let StepSpec::Label(l) = &plan.stages[0].steps[1].spec else {
            panic!()
        };
        assert_eq!(l, &[("version".to_string(), "1.0 beta".to_string())]);
        assert_eq!(kinds[2], "RUN echo a   b");
        assert_eq!(kinds[3], "CMD []");
        assert_eq!(kinds[4], "ENTRYPOINT []");
        let StepSpec::Expose(ports) = &plan.stages[0].steps[5].spec else {
            panic!()
        };
        let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            ports,
            ["8000/tcp", "8001/tcp", "8002/tcp", "9000/udp", "9001/udp"]
        );
        let StepSpec::Healthcheck(h) = &plan.stages[0].steps[6].spec else {
            panic!()
        };
        assert_eq!(h.start_interval.map(|d| d.to_string()), Some("2s".into()));

        let err = df("FROM scratch\nCOPY --chown 1:1 a /b\n").unwrap_err();
        assert!(
            err.0[0].message.contains("--chown=")
                || err.0[0].help.iter().any(|h| h.contains("--chown=")),
            "{err:#?}"
        );
        assert!(df("FROM scratch\nRUN []\n").is_err(), "RUN needs a command");
    }

    #[test]
    fn buildkit_flags() {
        let plan = df("FROM base:1\nONBUILD RUN echo child\nRUN --mount=type=cache,target=/root/.cache,sharing=locked --mount=type=secret,id=npm,target=/root/.npmrc make\nCOPY --exclude=*.md --exclude=tmp --parents a/b.txt /dst/\nADD --checksum=sha256:c18243bcea0987f0dabe57a6714acda33fe58db2d6096c58a8b5be13ed378588 https://example.com/f.tgz /f/\n").unwrap();
        let steps = &plan.stages[0].steps;
        assert!(matches!(&steps[0].spec, StepSpec::OnBuild(t) if t == "RUN echo child"));
        let StepSpec::Run { mounts, .. } = &steps[1].spec else {
            panic!()
        };
        let shown: Vec<String> = mounts.iter().map(|m| m.to_string()).collect();
        assert_eq!(
            shown,
            [
                "type=cache,id=/root/.cache,target=/root/.cache,sharing=locked",
                "type=secret,id=npm,target=/root/.npmrc",
            ]
        );
        let StepSpec::Copy(c) = &steps[2].spec else {
            panic!()
        };
        assert_eq!(
            (c.exclude.as_slice(), c.parents),
            (&["*.md".to_string(), "tmp".to_string()][..], true)
        );
        let StepSpec::Add(a) = &steps[3].spec else {
            panic!()
        };
        assert!(
            a.checksum
                .as_deref()
                .is_some_and(|s| s.starts_with("sha256:c182"))
        );
        for bad in [
            "RUN --mount=type=cache make\n",
            "RUN --mount=type=bogus,target=/x make\n",
            "ADD --checksum=sha256:00 https://x/y /y\n",
            "ADD --checksum=sha256:c18243bcea0987f0dabe57a6714acda33fe58db2d6096c58a8b5be13ed378588 local /y\n",
            "ADD https://x/y local /y\n",
            "ONBUILD ONBUILD RUN x\n",
        ] {
            assert!(df(&format!("FROM base:1\n{bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn heredocs() {
        let plan = df("FROM scratch\nRUN <<EOF\necho one\necho two\nEOF\nRUN <<-'END' sh\n\techo $HOME\n\tEND\nCOPY <<A <<-B /dir/\nalpha $X\nA\nbeta\nB\nCMD true\n").unwrap();
        let steps = &plan.stages[0].steps;
        assert_eq!(steps.len(), 4, "{steps:#?}");
        let StepSpec::Copy(c) = &steps[2].spec else {
            panic!("{:?}", steps[2].spec)
        };
        let inline: Vec<(&str, &str, bool)> = c
            .inline
            .iter()
            .map(|(n, b, e)| (n.as_str(), b.as_str(), *e))
            .collect();
        assert_eq!(inline, [("A", "alpha $X\n", true), ("B", "beta\n", true)]);
        assert_eq!(c.dest, "/dir/");
        assert_eq!(
            super::super::plan::describe_step(&steps[2].spec),
            "COPY <<A <<B /dir/"
        );
        let StepSpec::Run { command, .. } = &steps[0].spec else {
            panic!()
        };
        assert_eq!(command, &CommandLine::Shell("echo one\necho two\n".into()));
        let err = df("FROM scratch\nRUN <<EOF\necho never closed\n").unwrap_err();
        assert_eq!(line_of(&err.0[0]), 2, "{err:#?}");
    }

    #[test]
    fn instructions_before_from_and_empty_files() {
        let err = df("COPY a b\n").unwrap_err();
        assert!(err.0[0].message.contains("before the first FROM"));
        assert!(
            df("# nothing\n").unwrap_err().0[0]
                .message
                .contains("no FROM")
        );
    }
}
