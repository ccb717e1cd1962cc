//! Steps that change only the image config (ENV, LABEL, WORKDIR, USER, EXPOSE, VOLUME,
//! STOPSIGNAL, CMD, ENTRYPOINT, HEALTHCHECK, SHELL), with Docker's semantics.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::manifest::schema::CommandLine;
use crate::manifest::steps::{ImageHealthcheck, StepSpec};
use crate::store::ImageConfig;

/// Docker's default shell for shell-form commands.
pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// The shell shell-form commands run with: the image's `SHELL`, else `/bin/sh -c`.
pub fn shell_of(config: &ImageConfig) -> Vec<String> {
    config
        .extra
        .get("Shell")
        .and_then(|v| serde_json::from_value::<Vec<String>>(v.clone()).ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SHELL.iter().map(|s| s.to_string()).collect())
}

/// An argv for a command line: exec form as is, shell form through the image's shell.
pub fn argv(config: &ImageConfig, cmd: &CommandLine) -> Vec<String> {
    match cmd {
        CommandLine::Exec(v) => v.clone(),
        CommandLine::Shell(s) => {
            let mut v = shell_of(config);
            v.push(s.clone());
            v
        }
    }
}

/// The image's environment as `(name, value)` pairs, in order.
pub fn env_pairs(config: &ImageConfig) -> Vec<(String, String)> {
    config
        .oci
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default()
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv, String::new()),
        })
        .collect()
}

/// The image's working directory (default `/`).
pub fn workdir(config: &ImageConfig) -> String {
    config
        .oci
        .config()
        .as_ref()
        .and_then(|c| c.working_dir().clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into())
}

fn nanos(d: crate::manifest::values::Duration) -> Value {
    json!(d.0.as_nanos() as u64)
}

fn healthcheck_json(h: &ImageHealthcheck) -> Value {
    let test = match &h.command {
        None => json!(["NONE"]),
        Some(CommandLine::Exec(v)) => {
            let mut t = vec!["CMD".to_string()];
            t.extend(v.iter().cloned());
            json!(t)
        }
        Some(CommandLine::Shell(s)) => json!(["CMD-SHELL", s]),
    };
    let mut m = serde_json::Map::new();
    m.insert("Test".into(), test);
    if let Some(d) = h.interval {
        m.insert("Interval".into(), nanos(d));
    }
    if let Some(d) = h.timeout {
        m.insert("Timeout".into(), nanos(d));
    }
    if let Some(d) = h.start_period {
        m.insert("StartPeriod".into(), nanos(d));
    }
    if let Some(d) = h.start_interval {
        m.insert("StartInterval".into(), nanos(d));
    }
    if let Some(r) = h.retries {
        m.insert("Retries".into(), json!(r));
    }
    Value::Object(m)
}

/// Applies a metadata step (already expanded) to `config`. Returns false for steps that are
/// not metadata (COPY, ADD, RUN, ARG).
pub fn apply(config: &mut ImageConfig, spec: &StepSpec) -> bool {
    let mut c = config.oci.config().clone().unwrap_or_default();
    match spec {
        StepSpec::Maintainer(a) => {
            // Docker keeps it as the image's author, not a label.
            config.oci.set_author(Some(a.clone()));
            return true;
        }
        StepSpec::OnBuild(t) => {
            let list = config
                .extra
                .entry("OnBuild")
                .or_insert_with(|| Value::Array(Vec::new()));
            if !list.is_array() {
                *list = Value::Array(Vec::new());
            }
            if let Value::Array(items) = list {
                items.push(Value::String(t.clone()));
            }
            return true;
        }
        StepSpec::Env(vars) => {
            let mut env = env_pairs(config);
            for (k, v) in vars {
                match env.iter_mut().find(|(name, _)| name == k) {
                    Some(slot) => slot.1 = v.clone(),
                    None => env.push((k.clone(), v.clone())),
                }
            }
            c.set_env(Some(
                env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            ));
        }
        StepSpec::Label(labels) => {
            let mut l: HashMap<String, String> = c.labels().clone().unwrap_or_default();
            l.extend(labels.iter().cloned());
            c.set_labels(Some(l));
        }
        StepSpec::Workdir(w) => {
            let joined = if w.starts_with('/') {
                w.clone()
            } else {
                format!("{}/{w}", workdir(config).trim_end_matches('/'))
            };
            c.set_working_dir(Some(clean_abs(&joined)));
        }
        StepSpec::User(u) => {
            c.set_user(Some(u.clone()));
        }
        StepSpec::Expose(ports) => {
            let mut p = c.exposed_ports().clone().unwrap_or_default();
            for port in ports {
                let s = port.to_string();
                if !p.contains(&s) {
                    p.push(s);
                }
            }
            p.sort();
            c.set_exposed_ports(Some(p));
        }
        StepSpec::Volume(vols) => {
            let mut v = c.volumes().clone().unwrap_or_default();
            for vol in vols {
                if !v.contains(vol) {
                    v.push(vol.clone());
                }
            }
            v.sort();
            c.set_volumes(Some(v));
        }
        StepSpec::StopSignal(s) => {
            c.set_stop_signal(Some(s.to_string()));
        }
        StepSpec::Cmd(cmd) => {
            c.set_cmd(Some(argv(config, cmd)));
        }
        StepSpec::Entrypoint(cmd) => {
            c.set_entrypoint(Some(argv(config, cmd)));
            // Docker: an ENTRYPOINT resets a CMD inherited from the base image.
            c.set_cmd(None);
        }
        StepSpec::Healthcheck(h) => {
            let hc = healthcheck_json(h);
            config.extra.insert("Healthcheck".into(), hc);
            return true;
        }
        StepSpec::Shell(sh) => {
            config.extra.insert("Shell".into(), json!(sh));
            return true;
        }
        StepSpec::Copy(_) | StepSpec::Add(_) | StepSpec::Run { .. } | StepSpec::Arg(_) => {
            return false;
        }
    }
    config.oci.set_config(Some(c));
    true
}

/// Lexically cleans an absolute path (`/a/./b/../c` → `/a/c`).
pub fn clean_abs(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::values::ExposedPort;

    fn empty() -> ImageConfig {
        ImageConfig {
            oci: Default::default(),
            extra: Default::default(),
        }
    }

    #[test]
    fn docker_semantics() {
        let mut c = empty();
        apply(
            &mut c,
            &StepSpec::Env(vec![("A".into(), "1".into()), ("B".into(), "2".into())]),
        );
        apply(&mut c, &StepSpec::Env(vec![("A".into(), "3".into())]));
        assert_eq!(
            env_pairs(&c),
            [("A".into(), "3".into()), ("B".into(), "2".into())]
        );
        apply(&mut c, &StepSpec::Workdir("/app".into()));
        apply(&mut c, &StepSpec::Workdir("src/../lib".into()));
        assert_eq!(workdir(&c), "/app/lib");
        apply(&mut c, &StepSpec::Cmd(CommandLine::Shell("echo hi".into())));
        assert_eq!(
            c.oci.config().as_ref().unwrap().cmd().clone().unwrap(),
            ["/bin/sh", "-c", "echo hi"]
        );
        apply(
            &mut c,
            &StepSpec::Shell(vec!["/bin/bash".into(), "-ec".into()]),
        );
        apply(
            &mut c,
            &StepSpec::Entrypoint(CommandLine::Shell("run".into())),
        );
        let cfg = c.oci.config().as_ref().unwrap();
        assert_eq!(
            cfg.entrypoint().clone().unwrap(),
            ["/bin/bash", "-ec", "run"]
        );
        assert!(cfg.cmd().is_none(), "ENTRYPOINT resets CMD");
        apply(
            &mut c,
            &StepSpec::Expose(vec![
                "8080".parse::<ExposedPort>().unwrap(),
                "53/udp".parse().unwrap(),
            ]),
        );
        assert_eq!(
            c.oci
                .config()
                .as_ref()
                .unwrap()
                .exposed_ports()
                .clone()
                .unwrap(),
            ["53/udp", "8080/tcp"]
        );
        let hc = ImageHealthcheck {
            command: Some(CommandLine::Shell("true".into())),
            interval: Some("2s".parse().unwrap()),
            timeout: None,
            retries: Some(3),
            start_period: None,
            start_interval: None,
        };
        apply(&mut c, &StepSpec::Healthcheck(hc));
        assert_eq!(
            c.extra["Healthcheck"],
            json!({"Test": ["CMD-SHELL", "true"], "Interval": 2_000_000_000u64, "Retries": 3})
        );
        let bytes = c.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v["config"]["Healthcheck"]["Retries"], 3,
            "extras are written into config"
        );
    }
}
