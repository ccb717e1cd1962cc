//! Progress display for long work: a spinner with elapsed time on stderr when it is a
//! terminal, nothing otherwise (logs and pipes stay clean).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A spinner that shows what is running; inert when stderr is not a terminal.
pub struct Spinner {
    bar: Option<ProgressBar>,
}

impl Spinner {
    /// A spinner, drawn only when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Spinner { bar: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Spinner { bar: Some(bar) }
    }

    /// Shows `msg` as the work in progress.
    pub fn show(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.reset_elapsed();
            b.set_message(msg);
        }
    }

    /// Runs `f` (which prints a result line) with the spinner hidden.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    /// Removes the spinner for good.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// One bar per blob (bytes, total, rate) while blobs move to or from a registry; inert
/// when stderr is not a terminal or output is `--json`/`-q`.
pub struct Transfers {
    multi: Option<indicatif::MultiProgress>,
    bars: std::sync::Mutex<std::collections::HashMap<String, ProgressBar>>,
}

impl Transfers {
    /// A display, drawn only when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> std::sync::Arc<Transfers> {
        let multi = (enabled && std::io::stderr().is_terminal())
            .then(|| indicatif::MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        std::sync::Arc::new(Transfers {
            multi,
            bars: Default::default(),
        })
    }

    /// Whether anything is drawn.
    pub fn active(&self) -> bool {
        self.multi.is_some()
    }

    /// `n` more bytes of blob `name` (of `total`).
    pub fn advance(&self, name: &str, total: u64, n: u64) {
        let Some(multi) = &self.multi else { return };
        let mut bars = self.bars.lock().expect("not poisoned");
        let bar = bars.entry(name.to_string()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(name.to_string());
            bar
        });
        bar.inc(n);
    }

    /// Blob `name` is settled: its bar goes, `line` (if any) is printed in its place.
    pub fn done(&self, name: &str, line: Option<String>) {
        let bar = self.bars.lock().expect("not poisoned").remove(name);
        match (&self.multi, bar) {
            (Some(m), Some(bar)) => {
                bar.finish_and_clear();
                m.remove(&bar);
                if let Some(l) = line {
                    let _ = m.println(l);
                }
            }
            (Some(m), None) => {
                if let Some(l) = line {
                    let _ = m.println(l);
                }
            }
            (None, _) => {
                if let Some(l) = line {
                    crate::say!("{l}");
                }
            }
        }
    }
}
