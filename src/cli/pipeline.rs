//! What the pipeline commands share: opening an environment, the progress they show on
//! stderr, interrupts from the terminal, and how a release is printed (one JSON document
//! with `--json`, the same shape whether it went live or not).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use miette::miette;
use serde_json::json;

use super::{CliError, ExitKind, GlobalOpts, Output};
use crate::deploy::api::HostState;
use crate::deploy::host::HostError;
use crate::deploy::rollout::{HostEnd, Interrupt, Progress, RolloutOutcome};
use crate::manifest::{AppConfig, Project};
use crate::promote::release::{Environment, ReleaseError, ReleaseProgress, Released};
use crate::store::Store;

/// One tokio runtime for the whole command.
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    crate::registry_client::runtime()
        .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))
}

/// Lines on stderr (with a spinner on a terminal) as a release goes.
pub struct Shown {
    quiet: bool,
    spinner: super::progress::Spinner,
}

impl Shown {
    /// Progress for `out` (silent with `--json` or `-q`).
    pub fn new(out: &Output) -> Shown {
        let quiet = out.quiet || out.json;
        Shown {
            quiet,
            spinner: super::progress::Spinner::new(!quiet),
        }
    }

    /// Prints a line above the spinner.
    pub fn line(&self, text: &str) {
        if !self.quiet {
            self.spinner.suspend(|| crate::say!("{text}"));
        }
    }

    /// Removes the spinner.
    pub fn finish(&self) {
        self.spinner.finish();
    }

    /// What `say` callbacks of this machine's engine print.
    pub fn say(self: &Arc<Self>) -> Arc<dyn Fn(String) + Send + Sync> {
        let me = self.clone();
        Arc::new(move |line: String| {
            me.line(&line);
            me.spinner.show(if line.starts_with("starting ") {
                "waiting for the new replicas to be healthy".to_string()
            } else {
                "draining the previous release".to_string()
            });
        })
    }
}

/// What a host runs, in words.
pub fn runs(now: Option<&HostState>) -> String {
    match now {
        None => "unknown (it did not answer)".to_string(),
        Some(HostState {
            release: Some(n),
            digest,
            ..
        }) => format!(
            "release {n}{}",
            digest
                .as_ref()
                .map(|d| format!(" ({})", d.short()))
                .unwrap_or_default()
        ),
        Some(_) => "nothing".to_string(),
    }
}

impl Progress for Shown {
    fn batch(&self, hosts: &[&str]) {
        self.spinner
            .show(format!("applying on {}", hosts.join(", ")));
    }
    fn live(&self, host: &str, now: &HostState) {
        self.line(&format!("{host}: {} is live", runs(Some(now))));
    }
    fn failed(&self, e: &HostError) {
        self.line(&format!(
            "{}: failed: {}",
            e.host,
            e.message.lines().next().unwrap_or_default()
        ));
    }
    fn putting_back(&self, host: &str) {
        self.spinner.show(format!("putting {host} back"));
    }
    fn put_back(&self, host: &str, result: &Result<HostState, HostError>) {
        match result {
            Ok(now) => self.line(&format!("{host}: put back, runs {}", runs(Some(now)))),
            Err(e) => self.line(&format!("{host}: could not be put back: {}", e.message)),
        }
    }
}

impl ReleaseProgress for Shown {
    fn note(&self, text: &str) {
        self.line(text);
    }
    fn rollout(&self) -> &dyn Progress {
        self
    }
}

static SIGNALS: AtomicU8 = AtomicU8::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
        let msg = b"\nberth: interrupted again: exiting now; the environment may be inconsistent, `berth status --env ENV` shows how\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is static.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(130);
        }
    }
}

/// An [`Interrupt`] raised by the first SIGINT or SIGTERM (the rollout then starts no new
/// host and puts the updated ones back); a second one exits at once with a warning.
pub fn interrupt_on_signals(shown: &Arc<Shown>) -> Interrupt {
    let interrupt = Interrupt::new();
    let handler = nix::sys::signal::SigHandler::Handler(on_signal);
    let action = nix::sys::signal::SigAction::new(
        handler,
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    for sig in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM] {
        // SAFETY: the handler only touches an atomic and async-signal-safe calls.
        let _ = unsafe { nix::sys::signal::sigaction(sig, &action) };
    }
    let (flag, shown) = (interrupt.clone(), shown.clone());
    std::thread::spawn(move || {
        loop {
            if SIGNALS.load(Ordering::SeqCst) > 0 && !flag.is_raised() {
                flag.raise();
                shown.line(
                    "interrupted: no new host starts; the hosts already updated go back (again to exit at once)",
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    interrupt
}

/// The project's environment `name`: configuration, hosts, ledger.
pub fn open(
    g: &GlobalOpts,
    name: &str,
    rt: &tokio::runtime::Runtime,
    shown: &Arc<Shown>,
) -> Result<(Environment, Store), CliError> {
    let config = Project::load(&g.project_dir())?.resolve(name)?;
    open_config(g, config, rt, shown)
}

/// The environment of a resolved configuration.
pub fn open_config(
    g: &GlobalOpts,
    config: AppConfig,
    rt: &tokio::runtime::Runtime,
    shown: &Arc<Shown>,
) -> Result<(Environment, Store), CliError> {
    let store = Store::open(&g.store_dir())?;
    let env = Environment::open(
        config,
        &store,
        &g.store_dir(),
        rt.handle().clone(),
        shown.say(),
    )
    .map_err(release_error)?;
    Ok((env, store))
}

/// A release error as the CLI reports it: bad input is exit 2, anything else 1.
pub fn release_error(e: ReleaseError) -> CliError {
    match e {
        ReleaseError::Invalid { message, help } => CliError::invalid(match help {
            Some(h) => miette!(help = h, "{message}"),
            None => miette!("{message}"),
        }),
        ReleaseError::Preflight { problems } => CliError::failed(miette!(
            help = "fix these and run it again; no host, registry or ledger was changed",
            "nothing changed: {} problem(s) found before the release\n{}",
            problems.len(),
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )),
        other => CliError::failed(miette::Report::from_err(other)),
    }
}

/// A release as one JSON document.
pub fn release_json(config: &AppConfig, r: &Released) -> serde_json::Value {
    json!({
        "environment": config.environment,
        "deployment": format!("{}-{}", config.app.name, config.environment),
        "release": r.release.number,
        "kind": r.release.kind,
        "outcome": r.release.outcome,
        "digest": r.release.digest,
        "revision": r.release.revision,
        "source": r.release.source,
        "forced": r.release.forced,
        "reason": r.release.reason,
        "error": r.release.error,
        "recorded": r.recorded,
        "warnings": r.warnings,
        "transfer": r.transfer,
        "retries": crate::registry_client::retry::count(),
        "hosts": r.report.hosts.iter().map(|h| json!({
            "host": h.host,
            "end": h.end,
            "release": h.now.as_ref().and_then(|n| n.release),
            "digest": h.now.as_ref().and_then(|n| n.digest.clone()),
            "known": h.now.is_some(),
            "error": h.error,
        })).collect::<Vec<_>>(),
    })
}

/// Prints a release that rolled out (live or not) and returns the command's result: the
/// per-host table, what is live, warnings; exit 1 if it did not go live, 130 if
/// interrupted.
pub fn finish(
    config: &AppConfig,
    result: Result<Released, ReleaseError>,
    what: Option<&str>,
    out: &mut Output,
) -> Result<(), CliError> {
    let released = match result {
        Ok(r) => r,
        Err(ReleaseError::Rollout(r)) => *r,
        Err(e) => {
            if out.json {
                let problems = match &e {
                    ReleaseError::Preflight { problems } => problems.clone(),
                    other => vec![other.to_string()],
                };
                out.json_value(&json!({
                    "environment": config.environment,
                    "outcome": "refused",
                    "problems": problems,
                }))?;
            }
            return Err(release_error(e));
        }
    };
    if out.json {
        out.json_value(&release_json(config, &released))?;
    } else {
        let width = released
            .report
            .hosts
            .iter()
            .map(|h| h.host.len())
            .max()
            .unwrap_or(4)
            .max(4);
        if !out.quiet {
            out.line(format!("{:<width$}  {:<12} NOW RUNS", "HOST", "OUTCOME"))?;
            for h in &released.report.hosts {
                let end = serde_json::to_value(h.end)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                out.line(format!(
                    "{:<width$}  {:<12} {}",
                    h.host,
                    end,
                    if h.end == HostEnd::NotStarted {
                        "unchanged".to_string()
                    } else {
                        runs(h.now.as_ref())
                    }
                ))?;
            }
        }
        for w in &released.warnings {
            crate::say!("warning: {w}");
        }
    }
    let deployment = format!("{}-{}", config.app.name, config.environment);
    match released.report.outcome {
        RolloutOutcome::Live => {
            if !out.json {
                let failed = released
                    .report
                    .hosts
                    .iter()
                    .filter(|h| h.end == HostEnd::Failed)
                    .count();
                out.note(format!(
                    "{deployment} release {} is live{} on {} host(s){}: {}",
                    released.release.number,
                    what.map(|w| format!(" ({w})")).unwrap_or_default(),
                    released.report.hosts.len() - failed,
                    if failed > 0 {
                        format!(" ({failed} failed, within max_failures)")
                    } else {
                        String::new()
                    },
                    released.release.digest
                ))?;
            }
            Ok(())
        }
        RolloutOutcome::Failed => {
            let e = CliError::failed(miette!(
                help = "every host now runs what the table says; the ledger records the release as failed",
                "release {} failed: {}",
                released.release.number,
                released.report.first_error().unwrap_or_default()
            ));
            Err(e)
        }
        RolloutOutcome::Interrupted => {
            if !out.json {
                crate::say!(
                    "release {} was interrupted; every host runs what the table says, and the ledger records it as interrupted",
                    released.release.number
                );
            }
            Err(CliError::reported(ExitKind::Code(130)))
        }
    }
}
