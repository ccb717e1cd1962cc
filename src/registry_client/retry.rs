//! One retry policy for every registry call — push, pull, copy, promote, the ledger:
//! exponential backoff with jitter (or the registry's `Retry-After`), a bounded number of
//! attempts, and each retry told to an observer (the CLI prints a line on stderr) and
//! counted (JSON outputs carry the count). An upload whose body stops moving, or a
//! request whose answer does not come, is a failure to retry like any other.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// A retry about to happen.
#[derive(Debug, Clone)]
pub struct Retry {
    /// The registry.
    pub registry: String,
    /// What is retried (`PUT /v2/app/blobs/uploads/…`).
    pub what: String,
    /// The attempt that failed (1-based).
    pub attempt: u32,
    /// Attempts allowed.
    pub of: u32,
    /// The wait before the next.
    pub wait: Duration,
    /// Why it failed.
    pub why: String,
}

impl std::fmt::Display for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "retrying {} on {} in {:.1} s (attempt {} of {} failed: {})",
            self.what,
            self.registry,
            self.wait.as_secs_f64(),
            self.attempt,
            self.of,
            self.why
        )
    }
}

type Observer = Arc<dyn Fn(&Retry) + Send + Sync>;

static OBSERVER: OnceLock<Observer> = OnceLock::new();
static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Sets who hears about retries in this process (once).
pub fn observe(f: Observer) {
    let _ = OBSERVER.set(f);
}

/// Retries made in this process so far.
pub fn count() -> u64 {
    RETRIES.load(Ordering::SeqCst)
}

/// Tells the observer, counts it, and waits.
pub async fn retry(r: Retry) {
    RETRIES.fetch_add(1, Ordering::SeqCst);
    if let Some(o) = OBSERVER.get() {
        o(&r);
    }
    tokio::time::sleep(r.wait).await;
}

/// Exponential backoff with jitter: 0.4 s, 0.8 s, … at most 10 s, plus up to half again.
pub fn backoff(attempt: u32) -> Duration {
    let d = Duration::from_millis(200 * (1u64 << attempt.min(6))).min(Duration::from_secs(10));
    let mut b = [0u8; 1];
    // SAFETY: getrandom into a one-byte buffer we own.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, libc::GRND_NONBLOCK) };
    d + d * u32::from(b[0]) / 512
}

/// The wait a 429 or 503 asks for (`Retry-After`, seconds, at most a minute), else the
/// backoff for `attempt`.
pub fn wait_for(resp: Option<&reqwest::Response>, attempt: u32) -> Duration {
    resp.and_then(|r| r.headers().get(reqwest::header::RETRY_AFTER))
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(60)))
        .unwrap_or_else(|| backoff(attempt))
}

/// When a request body last moved (milliseconds since `start`), and whether it is done.
#[derive(Debug)]
pub struct Movement {
    start: tokio::time::Instant,
    last: AtomicU64,
    done: std::sync::atomic::AtomicBool,
}

impl Movement {
    /// A body that has not moved yet.
    pub fn new() -> Arc<Movement> {
        Arc::new(Movement {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            done: Default::default(),
        })
    }

    fn moved(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    /// How long since the body last moved.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::SeqCst));
        self.start.elapsed().saturating_sub(last)
    }

    /// Whether the whole body went.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
}

/// A request body that records each frame it gives up (so a watchdog can tell an upload
/// the registry stopped reading).
pub struct Watched {
    inner: reqwest::Body,
    movement: Arc<Movement>,
}

impl Watched {
    /// `inner`, recording into `movement`.
    pub fn new(inner: reqwest::Body, movement: Arc<Movement>) -> Watched {
        Watched { inner, movement }
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => self.movement.moved(),
            Poll::Ready(None) => {
                self.movement.moved();
                self.movement.done.store(true, Ordering::SeqCst);
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(
            backoff(1) >= Duration::from_millis(400) && backoff(1) < Duration::from_millis(601)
        );
        assert!(backoff(20) <= Duration::from_secs(15));
        assert!(wait_for(None, 1) >= Duration::from_millis(400));
    }
}
