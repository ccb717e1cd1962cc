//! Promotion: the exact image that passed one environment moved into the next — gates
//! checked, bytes copied digest-for-digest, rolled out with the deploy machinery — and the
//! [`ledger`] of releases that makes it and [`diff`] explainable.
//!
//! The gates are a pure function of evidence gathered elsewhere (ledgers, hosts' answers,
//! the clock), so every rule is tested without a registry or a host.

pub mod diff;
pub mod ledger;
pub mod promotion;
pub mod release;

use std::time::Duration;

use serde::Serialize;

use self::ledger::{Release, Verdict, current, serving_since};
use crate::store::Digest;

/// What one host of the source environment runs.
#[derive(Debug, Clone, Serialize)]
pub struct HostState {
    /// The host.
    pub host: String,
    /// The image it serves, if it answered and serves one.
    pub digest: Option<Digest>,
    /// Replicas running.
    pub running: usize,
    /// Replicas it should run.
    pub total: usize,
    /// Why it could not say.
    pub error: Option<String>,
}

/// Everything the gates look at.
pub struct Evidence<'a> {
    /// The source environment.
    pub source: &'a str,
    /// Its ledger.
    pub source_history: &'a [Release],
    /// The image to promote.
    pub digest: &'a Digest,
    /// The source's hosts.
    pub hosts: &'a [HostState],
    /// The target's `soak`.
    pub soak: Option<Duration>,
    /// The target's `require` environments and their ledgers.
    pub required: &'a [(String, Vec<Release>)],
    /// Now.
    pub now: jiff::Timestamp,
}

/// One gate's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gate {
    /// `current`, `healthy`, `soak` or `require`.
    pub name: &'static str,
    /// Whether it let the image through.
    pub passed: bool,
    /// Why.
    pub detail: String,
}

fn short(d: &Digest) -> &str {
    d.short()
}

/// The gates, in order: the image is the source's current release; it runs healthy on
/// every source host; it has served there for the target's `soak`; every environment the
/// target `require`s has released it.
pub fn check(e: &Evidence<'_>) -> Vec<Gate> {
    let mut gates = Vec::new();
    let cur = current(e.source_history);
    gates.push(Gate {
        name: "current",
        passed: cur.is_some_and(|r| r.digest == *e.digest),
        detail: match cur {
            Some(r) if r.digest == *e.digest => {
                format!(
                    "{} is release {} of {}",
                    short(e.digest),
                    r.number,
                    e.source
                )
            }
            Some(r) => format!(
                "{} is not {}'s current release (release {} runs {})",
                short(e.digest),
                e.source,
                r.number,
                short(&r.digest)
            ),
            None => format!("{} has no release", e.source),
        },
    });
    let mut sick = Vec::new();
    for h in e.hosts {
        match (&h.error, &h.digest) {
            (Some(err), _) => sick.push(format!("{} did not answer ({err})", h.host)),
            (None, None) => sick.push(format!("{} runs nothing", h.host)),
            (None, Some(d)) if d != e.digest => sick.push(format!("{} runs {}", h.host, short(d))),
            _ if h.total == 0 || h.running < h.total => sick.push(format!(
                "{} has {}/{} replicas running",
                h.host, h.running, h.total
            )),
            _ => {}
        }
    }
    gates.push(Gate {
        name: "healthy",
        passed: sick.is_empty() && !e.hosts.is_empty(),
        detail: if e.hosts.is_empty() {
            format!("{} has no hosts", e.source)
        } else if sick.is_empty() {
            format!(
                "every replica runs on {} host(s) of {}",
                e.hosts.len(),
                e.source
            )
        } else {
            sick.join("; ")
        },
    });
    if let Some(soak) = e.soak {
        let since = serving_since(e.source_history, e.digest)
            .and_then(|t| t.parse::<jiff::Timestamp>().ok());
        let served = since
            .map(|t| {
                let s = e.now.as_second() - t.as_second();
                Duration::from_secs(s.max(0) as u64)
            })
            .unwrap_or_default();
        gates.push(Gate {
            name: "soak",
            passed: since.is_some() && served >= soak,
            detail: format!(
                "it has served in {} for {} of the {} required",
                e.source,
                human(served),
                human(soak)
            ),
        });
    }
    for (env, history) in e.required {
        let passed = history.iter().find(|r| {
            r.digest == *e.digest && r.outcome == Verdict::Live && r.kind != ledger::Kind::Down
        });
        gates.push(Gate {
            name: "require",
            passed: passed.is_some(),
            detail: match passed {
                Some(r) => format!("{env} released it as release {}", r.number),
                None => format!("{} was never released in {env}", short(e.digest)),
            },
        });
    }
    gates
}

/// `1h2m3s`, `10m`, `4s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if s > 0 || out.is_empty() {
        out += &format!("{s}s");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u32, d: &Digest, t: &str, outcome: Verdict) -> Release {
        super::ledger::sample(n, d, t, outcome)
    }

    fn healthy(d: &Digest) -> Vec<HostState> {
        vec![HostState {
            host: "h1".into(),
            digest: Some(d.clone()),
            running: 2,
            total: 2,
            error: None,
        }]
    }

    fn gates(
        history: &[Release],
        d: &Digest,
        hosts: &[HostState],
        soak: Option<Duration>,
        required: &[(String, Vec<Release>)],
    ) -> Vec<(&'static str, bool)> {
        check(&Evidence {
            source: "uat",
            source_history: history,
            digest: d,
            hosts,
            soak,
            required,
            now: "2026-11-30T12:00:00Z".parse().unwrap(),
        })
        .into_iter()
        .map(|g| (g.name, g.passed))
        .collect()
    }

    #[test]
    fn a_healthy_current_soaked_required_release_passes_every_gate() {
        let d = Digest::of(b"image");
        let h = vec![rec(1, &d, "2026-11-30T11:00:00Z", Verdict::Live)];
        let req = vec![("uat".to_string(), h.clone())];
        assert_eq!(
            gates(&h, &d, &healthy(&d), Some(Duration::from_secs(600)), &req),
            [
                ("current", true),
                ("healthy", true),
                ("soak", true),
                ("require", true)
            ]
        );
    }

    #[test]
    fn each_gate_fails_for_its_own_reason() {
        let (d, other) = (Digest::of(b"image"), Digest::of(b"other"));
        let h = vec![
            rec(1, &d, "2026-11-30T11:55:00Z", Verdict::Live),
            rec(2, &other, "2026-11-30T11:58:00Z", Verdict::Failed),
        ];
        // A failed later release does not make the image stop being current.
        let mut hosts = healthy(&d);
        hosts[0].running = 1;
        let req = vec![("qa".to_string(), vec![])];
        assert_eq!(
            gates(&h, &d, &hosts, Some(Duration::from_secs(600)), &req),
            [
                ("current", true),
                ("healthy", false),
                ("soak", false),
                ("require", false)
            ]
        );
        assert_eq!(
            gates(&h, &other, &healthy(&other), None, &[])[0],
            ("current", false)
        );
        assert_eq!(
            gates(&[], &d, &[], None, &[])[..2],
            [("current", false), ("healthy", false)]
        );
        let unreachable = vec![HostState {
            error: Some("refused".into()),
            ..healthy(&d)[0].clone()
        }];
        assert_eq!(
            gates(&h, &d, &unreachable, None, &[])[1],
            ("healthy", false)
        );
    }

    #[test]
    fn durations_read_like_the_config() {
        assert_eq!(human(Duration::from_secs(600)), "10m");
        assert_eq!(human(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(human(Duration::ZERO), "0s");
    }
}
