//! A rollout: one release applied to an environment's hosts in batches of `batch`, each
//! batch at once and done before the next, up to `max_failures` hosts failing before it
//! stops. When it stops — a failure beyond the limit, or an interrupt (SIGINT/SIGTERM)
//! between batches — the hosts already updated are put back on what they ran before
//! (nothing, for a first release), unless told to keep them. The report says, per host,
//! how it ended and what it runs now; it claims nothing a host did not confirm.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use super::api::{DeploymentName, HostState};
use super::host::{Host, HostError};

/// Raised once an interrupt asks the rollout to stop starting hosts.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// A flag nobody has raised.
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Asks the rollout to stop.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it was asked to stop.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How one host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostEnd {
    /// It runs the new release.
    Live,
    /// The release failed there; the host kept (or went back to) what it ran.
    Failed,
    /// It ran the new release, then was put back on what it ran before.
    PutBack,
    /// It ran the new release and keeps it although the rollout failed (`--no-rollback`),
    /// or putting it back failed.
    Kept,
    /// The rollout stopped before it reached this host.
    NotStarted,
}

/// One host's part in a rollout.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// The host.
    pub host: String,
    /// How it ended.
    pub end: HostEnd,
    /// What it runs now, as it said (`None`: it could not say).
    pub now: Option<HostState>,
    /// What went wrong there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutOutcome {
    /// Every host it reached runs the release (up to `max_failures` may have failed).
    Live,
    /// It stopped on failures.
    Failed,
    /// It stopped on an interrupt.
    Interrupted,
}

/// What a rollout did.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutReport {
    /// How it ended.
    pub outcome: RolloutOutcome,
    /// Each host, in the environment's order.
    pub hosts: Vec<HostReport>,
}

impl RolloutReport {
    /// The first failure, as a sentence naming its host.
    pub fn first_error(&self) -> Option<String> {
        self.hosts
            .iter()
            .find(|h| h.end == HostEnd::Failed)
            .and_then(|h| h.error.as_ref().map(|e| format!("{}: {e}", h.host)))
    }
}

/// What a rollout tells its caller as it goes (spinners and lines in the CLI, a recorder
/// in tests). Every method has a default that ignores it.
pub trait Progress: Sync {
    /// A batch starts.
    fn batch(&self, _hosts: &[&str]) {}
    /// A host runs the release.
    fn live(&self, _host: &str, _now: &HostState) {}
    /// A host failed.
    fn failed(&self, _error: &HostError) {}
    /// A host is being put back.
    fn putting_back(&self, _host: &str) {}
    /// A host was put back (or could not be).
    fn put_back(&self, _host: &str, _result: &Result<HostState, HostError>) {}
}

/// Progress nobody listens to.
pub struct Silent;
impl Progress for Silent {}

/// A rollout over hosts.
pub struct Rollout<'a> {
    /// The hosts, in order.
    pub hosts: &'a [Arc<dyn Host>],
    /// Hosts updated at once.
    pub batch: usize,
    /// Hosts that may fail before the rollout stops.
    pub max_failures: usize,
    /// Put the hosts already updated back when it stops (else keep them).
    pub put_back: bool,
    /// Checked between batches.
    pub interrupt: Interrupt,
}

impl Rollout<'_> {
    /// Runs `action` (an apply, a rollback) on every host for release `release` of
    /// `deployment`.
    pub fn run(
        &self,
        deployment: &DeploymentName,
        release: u32,
        action: &(dyn Fn(&dyn Host) -> Result<HostState, HostError> + Sync),
        progress: &dyn Progress,
    ) -> RolloutReport {
        let mut reports: Vec<HostReport> = self
            .hosts
            .iter()
            .map(|h| HostReport {
                host: h.name().to_string(),
                end: HostEnd::NotStarted,
                now: None,
                error: None,
            })
            .collect();
        let mut failures = 0;
        let mut stopped = None;
        let batch = self.batch.max(1);
        for (b, group) in self.hosts.chunks(batch).enumerate() {
            if self.interrupt.is_raised() {
                stopped = Some(RolloutOutcome::Interrupted);
                break;
            }
            let names: Vec<&str> = group.iter().map(|h| h.name()).collect();
            progress.batch(&names);
            let results: Vec<Result<HostState, HostError>> = std::thread::scope(|s| {
                let handles: Vec<_> = group
                    .iter()
                    .map(|h| s.spawn(move || action(h.as_ref())))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a host's thread"))
                    .collect()
            });
            for (i, (host, result)) in group.iter().zip(results).enumerate() {
                let report = &mut reports[b * batch + i];
                match result {
                    Ok(now) => {
                        progress.live(host.name(), &now);
                        report.end = HostEnd::Live;
                        report.now = Some(now);
                    }
                    Err(e) => {
                        progress.failed(&e);
                        failures += 1;
                        report.end = HostEnd::Failed;
                        report.error = Some(e.message.clone());
                        // What it runs after its own failure: it says, or we do not know.
                        report.now = host.status(deployment).ok();
                    }
                }
            }
            if failures > self.max_failures {
                stopped = Some(RolloutOutcome::Failed);
                break;
            }
        }
        let Some(outcome) = stopped else {
            return RolloutReport {
                outcome: RolloutOutcome::Live,
                hosts: reports,
            };
        };
        let why = match outcome {
            RolloutOutcome::Interrupted => format!("release {release} was interrupted"),
            _ => format!("release {release} failed on another host"),
        };
        let updated: Vec<usize> = (0..reports.len())
            .filter(|i| reports[*i].end == HostEnd::Live)
            .collect();
        if !self.put_back {
            for i in updated {
                reports[i].end = HostEnd::Kept;
            }
        } else {
            let results: Vec<(usize, Result<HostState, HostError>)> = std::thread::scope(|s| {
                let handles: Vec<_> = updated
                    .iter()
                    .map(|&i| {
                        let (host, why) = (&self.hosts[i], &why);
                        progress.putting_back(host.name());
                        s.spawn(move || (i, host.revert(deployment, release, why)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a host's thread"))
                    .collect()
            });
            for (i, result) in results {
                progress.put_back(self.hosts[i].name(), &result);
                let report = &mut reports[i];
                match result {
                    Ok(now) => {
                        report.end = HostEnd::PutBack;
                        report.now = Some(now);
                    }
                    Err(e) => {
                        report.end = HostEnd::Kept;
                        report.error = Some(format!("could not be put back: {}", e.message));
                        report.now = self.hosts[i].status(deployment).ok();
                    }
                }
            }
        }
        RolloutReport {
            outcome,
            hosts: reports,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::deploy::ReleasePlan;
    use crate::deploy::api::{LogsQuery, RollbackRequest};
    use crate::deploy::host::HostErrorKind;
    use crate::deploy::local::ReplicaLine;
    use crate::store::Digest;

    /// A host that runs what it is told, remembers it, and fails when set to.
    pub struct FakeHost {
        pub name: String,
        pub fail_apply: bool,
        pub unreachable: bool,
        /// Releases it ran, oldest first, and what it runs now (index into `ran`).
        pub ran: Mutex<Vec<(u32, Digest)>>,
        pub live: Mutex<Option<usize>>,
        pub calls: Mutex<Vec<String>>,
        /// Raised when this host's apply starts (an interrupt arriving mid-rollout).
        pub on_apply: Option<Interrupt>,
    }

    impl FakeHost {
        pub fn new(name: &str) -> FakeHost {
            FakeHost {
                name: name.into(),
                fail_apply: false,
                unreachable: false,
                ran: Mutex::new(Vec::new()),
                live: Mutex::new(None),
                calls: Mutex::new(Vec::new()),
                on_apply: None,
            }
        }

        pub fn state(&self) -> HostState {
            let ran = self.ran.lock().unwrap();
            match *self.live.lock().unwrap() {
                Some(i) => HostState {
                    release: Some(ran[i].0),
                    digest: Some(ran[i].1.clone()),
                    ..HostState::default()
                },
                None => HostState::default(),
            }
        }

        fn err(&self, kind: HostErrorKind, m: &str) -> HostError {
            HostError::new(&self.name, kind, m)
        }
    }

    impl Host for FakeHost {
        fn name(&self) -> &str {
            &self.name
        }
        fn preflight(&self, _plan: &ReleasePlan) -> Result<Vec<String>, HostError> {
            self.calls.lock().unwrap().push("preflight".into());
            if self.unreachable {
                return Err(self.err(HostErrorKind::Unreachable, "connection refused"));
            }
            Ok(Vec::new())
        }
        fn apply(
            &self,
            plan: &ReleasePlan,
            _secrets: &crate::deploy::SecretValues,
        ) -> Result<HostState, HostError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("apply {}", plan.release));
            if let Some(i) = &self.on_apply {
                i.raise();
            }
            if self.unreachable {
                return Err(self.err(HostErrorKind::Unreachable, "connection refused"));
            }
            if self.fail_apply {
                return Err(self.err(HostErrorKind::Unhealthy, "web did not become healthy"));
            }
            let mut ran = self.ran.lock().unwrap();
            ran.push((plan.release, plan.digest.clone()));
            *self.live.lock().unwrap() = Some(ran.len() - 1);
            drop(ran);
            Ok(self.state())
        }
        fn rollback(&self, r: &RollbackRequest) -> Result<HostState, HostError> {
            // The rollout engine never calls it (rollbacks are new releases applied with
            // `apply`); a fake that is asked anyway says so instead of pretending.
            self.calls.lock().unwrap().push(format!("rollback {r:?}"));
            Err(self.err(
                HostErrorKind::Refused,
                "the fake host keeps no earlier releases to roll back to",
            ))
        }
        fn revert(
            &self,
            _d: &DeploymentName,
            release: u32,
            _why: &str,
        ) -> Result<HostState, HostError> {
            self.calls.lock().unwrap().push(format!("revert {release}"));
            let ran = self.ran.lock().unwrap();
            let mut live = self.live.lock().unwrap();
            if let Some(i) = *live
                && ran[i].0 == release
            {
                *live = i.checked_sub(1);
            }
            drop((ran, live));
            Ok(self.state())
        }
        fn status(&self, _d: &DeploymentName) -> Result<HostState, HostError> {
            if self.unreachable {
                return Err(self.err(HostErrorKind::Unreachable, "connection refused"));
            }
            Ok(self.state())
        }
        fn down(&self, _d: &DeploymentName) -> Result<usize, HostError> {
            *self.live.lock().unwrap() = None;
            Ok(1)
        }
        fn logs(&self, _q: &LogsQuery) -> Result<Vec<ReplicaLine>, HostError> {
            Ok(Vec::new())
        }
    }

    pub fn plan(release: u32, digest: &Digest) -> ReleasePlan {
        ReleasePlan {
            app: "app".into(),
            environment: "uat".into(),
            release,
            digest: digest.clone(),
            revision: None,
            services: Vec::new(),
            rollout: crate::deploy::RolloutPlan {
                drain: std::time::Duration::ZERO,
                timeout: std::time::Duration::from_secs(1),
                keep: 1,
            },
        }
    }

    fn run(
        hosts: &[Arc<dyn Host>],
        batch: usize,
        max_failures: usize,
        p: &ReleasePlan,
    ) -> RolloutReport {
        let r = Rollout {
            hosts,
            batch,
            max_failures,
            put_back: true,
            interrupt: Interrupt::new(),
        };
        r.run(
            &"app-uat".parse().unwrap(),
            p.release,
            &|h| h.apply(p, &Default::default()),
            &Silent,
        )
    }

    #[test]
    fn a_first_release_that_fails_on_host_2_leaves_host_1_running_nothing() {
        let d = Digest::of(b"new");
        let mut two = FakeHost::new("h2");
        two.fail_apply = true;
        let one = Arc::new(FakeHost::new("h1"));
        let hosts: Vec<Arc<dyn Host>> = vec![one.clone(), Arc::new(two)];
        let report = run(&hosts, 1, 0, &plan(1, &d));
        assert_eq!(report.outcome, RolloutOutcome::Failed);
        assert_eq!(report.hosts[0].end, HostEnd::PutBack);
        assert_eq!(
            report.hosts[0].now,
            Some(HostState::default()),
            "runs nothing"
        );
        assert_eq!(report.hosts[1].end, HostEnd::Failed);
        assert_eq!(one.state(), HostState::default());
        assert!(report.first_error().unwrap().starts_with("h2: "));
    }

    #[test]
    fn a_later_release_that_fails_puts_every_updated_host_back_on_the_previous() {
        let (old, new) = (Digest::of(b"old"), Digest::of(b"new"));
        let hosts: Vec<Arc<FakeHost>> = (0..3)
            .map(|i| Arc::new(FakeHost::new(&format!("h{i}"))))
            .collect();
        let dyn_hosts: Vec<Arc<dyn Host>> =
            hosts.iter().map(|h| h.clone() as Arc<dyn Host>).collect();
        assert_eq!(
            run(&dyn_hosts, 3, 0, &plan(1, &old)).outcome,
            RolloutOutcome::Live
        );
        let mut third = FakeHost::new("h2");
        third.ran = Mutex::new(vec![(1, old.clone())]);
        third.live = Mutex::new(Some(0));
        third.fail_apply = true;
        let dyn_hosts: Vec<Arc<dyn Host>> =
            vec![hosts[0].clone(), hosts[1].clone(), Arc::new(third)];
        let report = run(&dyn_hosts, 2, 0, &plan(2, &new));
        assert_eq!(report.outcome, RolloutOutcome::Failed);
        for h in &report.hosts {
            assert_eq!(h.now.as_ref().unwrap().release, Some(1), "{h:?}");
        }
        assert_eq!(
            report.hosts.iter().map(|h| h.end).collect::<Vec<_>>(),
            [HostEnd::PutBack, HostEnd::PutBack, HostEnd::Failed]
        );
    }

    #[test]
    fn batches_and_max_failures_bound_what_is_touched() {
        let d = Digest::of(b"x");
        let mut hosts: Vec<Arc<FakeHost>> = Vec::new();
        for i in 0..5 {
            let mut h = FakeHost::new(&format!("h{i}"));
            h.fail_apply = i == 0;
            hosts.push(Arc::new(h));
        }
        let dyn_hosts: Vec<Arc<dyn Host>> =
            hosts.iter().map(|h| h.clone() as Arc<dyn Host>).collect();
        // One failure allowed: the rollout goes on, host 0 is reported as failed.
        let report = run(&dyn_hosts, 2, 1, &plan(1, &d));
        assert_eq!(report.outcome, RolloutOutcome::Live);
        assert_eq!(
            report
                .hosts
                .iter()
                .filter(|h| h.end == HostEnd::Live)
                .count(),
            4
        );
        // None allowed, batches of two: hosts 2-4 are never touched.
        for h in &hosts {
            h.calls.lock().unwrap().clear();
        }
        let report = run(&dyn_hosts, 2, 0, &plan(2, &d));
        assert_eq!(report.outcome, RolloutOutcome::Failed);
        for h in &hosts[2..] {
            assert!(h.calls.lock().unwrap().is_empty(), "{} was touched", h.name);
        }
        assert_eq!(report.hosts[2].end, HostEnd::NotStarted);
        assert_eq!(report.hosts[1].end, HostEnd::PutBack);
        assert_eq!(report.hosts[1].now.as_ref().unwrap().release, Some(1));
    }

    #[test]
    fn an_interrupt_stops_new_hosts_and_puts_the_updated_back() {
        let d = Digest::of(b"x");
        let interrupt = Interrupt::new();
        let mut first = FakeHost::new("h0");
        first.on_apply = Some(interrupt.clone());
        let hosts: Vec<Arc<dyn Host>> = vec![
            Arc::new(first),
            Arc::new(FakeHost::new("h1")),
            Arc::new(FakeHost::new("h2")),
        ];
        let r = Rollout {
            hosts: &hosts,
            batch: 1,
            max_failures: 0,
            put_back: true,
            interrupt: interrupt.clone(),
        };
        let p = plan(1, &d);
        let report = r.run(
            &"app-uat".parse().unwrap(),
            1,
            &|h| h.apply(&p, &Default::default()),
            &Silent,
        );
        assert_eq!(report.outcome, RolloutOutcome::Interrupted);
        assert_eq!(
            report.hosts.iter().map(|h| h.end).collect::<Vec<_>>(),
            [HostEnd::PutBack, HostEnd::NotStarted, HostEnd::NotStarted]
        );
    }

    #[test]
    fn no_rollback_keeps_the_updated_hosts_and_says_so() {
        let d = Digest::of(b"x");
        let mut bad = FakeHost::new("h1");
        bad.unreachable = true;
        let hosts: Vec<Arc<dyn Host>> = vec![Arc::new(FakeHost::new("h0")), Arc::new(bad)];
        let r = Rollout {
            hosts: &hosts,
            batch: 1,
            max_failures: 0,
            put_back: false,
            interrupt: Interrupt::new(),
        };
        let p = plan(1, &d);
        let report = r.run(
            &"app-uat".parse().unwrap(),
            1,
            &|h| h.apply(&p, &Default::default()),
            &Silent,
        );
        assert_eq!(report.hosts[0].end, HostEnd::Kept);
        assert_eq!(report.hosts[0].now.as_ref().unwrap().release, Some(1));
        assert_eq!(report.hosts[1].end, HostEnd::Failed);
        assert_eq!(
            report.hosts[1].now, None,
            "an unreachable host's state is unknown"
        );
    }
}
