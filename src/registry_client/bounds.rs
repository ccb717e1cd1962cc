//! What a registry may make berth read and wait for. Documents (manifests, indexes,
//! configs, token answers, error bodies) are read into memory only up to a cap and within
//! a deadline; blobs stream to disk and must keep a minimum speed (curl's low-speed limit:
//! fewer than `BERTH_LOW_SPEED_LIMIT` bytes in `BERTH_LOW_SPEED_TIME` seconds is a stall,
//! which the caller retries or reports). A registry that sends 1 byte every 20 s, or a
//! 200 MB manifest, ends with an error instead of a hung or bloated process.

use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::RegistryError;

/// The largest manifest or index berth reads (containerd's and distribution's limit).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// The largest image config berth reads.
pub const MAX_CONFIG: u64 = 8 << 20;
/// The largest token-server answer.
pub const MAX_TOKEN: u64 = 1 << 20;
/// The most of an error body kept (the message shown to the user).
pub const MAX_ERROR_BODY: u64 = 64 << 10;
/// How long a request for a document may take in all, answer and body.
pub const DOCUMENT_DEADLINE: Duration = Duration::from_secs(120);

/// The minimum speed of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LowSpeed {
    /// At least this many bytes…
    pub bytes: u64,
    /// …in every window this long.
    pub window: Duration,
}

impl Default for LowSpeed {
    fn default() -> Self {
        LowSpeed {
            bytes: 1024,
            window: Duration::from_secs(30),
        }
    }
}

impl LowSpeed {
    /// The default, or `BERTH_LOW_SPEED_LIMIT` (bytes) and `BERTH_LOW_SPEED_TIME`
    /// (seconds) as this process's environment sets them.
    pub fn configured() -> LowSpeed {
        let mut l = LowSpeed::default();
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(b) = var("BERTH_LOW_SPEED_LIMIT") {
            l.bytes = b;
        }
        if let Some(s) = var("BERTH_LOW_SPEED_TIME").filter(|s| *s > 0) {
            l.window = Duration::from_secs(s);
        }
        l
    }
}

/// Watches one transfer's speed window by window.
pub struct SpeedWatch {
    limit: LowSpeed,
    window_end: Instant,
    got: u64,
}

/// A transfer that fell below its low-speed limit, or a body that broke.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Fewer bytes than the limit arrived in a window.
    #[error(
        "stalled: {got} bytes in {secs} s, below the low-speed limit of {limit} bytes (BERTH_LOW_SPEED_LIMIT / BERTH_LOW_SPEED_TIME)"
    )]
    Stalled {
        /// Bytes that arrived in the window.
        got: u64,
        /// The window, in seconds.
        secs: u64,
        /// The limit.
        limit: u64,
    },
    /// The connection broke.
    #[error("{0}")]
    Broken(String),
}

impl SpeedWatch {
    /// A watch whose first window starts now.
    pub fn new(limit: LowSpeed) -> SpeedWatch {
        SpeedWatch {
            limit,
            window_end: Instant::now() + limit.window,
            got: 0,
        }
    }

    /// The next chunk of `stream`, `None` at its end; an error when the window ends with
    /// fewer bytes than the limit, or the stream fails.
    pub async fn next<S, E>(&mut self, stream: &mut S) -> Result<Option<Bytes>, TransferError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        loop {
            let left = self.window_end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.next()).await {
                Ok(Some(Ok(b))) => {
                    self.got += b.len() as u64;
                    if Instant::now() >= self.window_end {
                        self.roll()?;
                    }
                    return Ok(Some(b));
                }
                Ok(Some(Err(e))) => return Err(TransferError::Broken(e.to_string())),
                Ok(None) => return Ok(None),
                Err(_) => self.roll()?,
            }
        }
    }

    /// Ends the current window: a stall if it had too few bytes, else a new window.
    fn roll(&mut self) -> Result<(), TransferError> {
        if self.got < self.limit.bytes {
            return Err(TransferError::Stalled {
                got: self.got,
                secs: self.limit.window.as_secs(),
                limit: self.limit.bytes,
            });
        }
        self.got = 0;
        self.window_end = Instant::now() + self.limit.window;
        Ok(())
    }
}

/// `stream` under a low-speed limit: a stall ends it with an error.
pub fn watched<S, E>(
    stream: S,
    limit: LowSpeed,
) -> impl Stream<Item = Result<Bytes, TransferError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
    E: std::fmt::Display + Send,
{
    futures_util::stream::unfold(Some((stream, SpeedWatch::new(limit))), |state| async move {
        let (mut s, mut w) = state?;
        match w.next(&mut s).await {
            Ok(Some(b)) => Some((Ok(b), Some((s, w)))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Reads a response body of at most `max` bytes (refusing a larger one as soon as its
/// `Content-Length` says so, or as soon as more arrives), under the low-speed limit.
/// `what` names the document in errors.
pub async fn read_bounded(
    resp: reqwest::Response,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, RegistryError> {
    let too_large = || {
        RegistryError::Protocol(format!(
            "{what} is larger than {max} bytes, the most berth reads (a hostile or broken registry?)"
        ))
    };
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut watch = SpeedWatch::new(LowSpeed::configured());
    while let Some(chunk) = watch
        .next(&mut stream)
        .await
        .map_err(|e| RegistryError::Protocol(format!("reading {what}: {e}")))?
    {
        if (out.len() + chunk.len()) as u64 > max {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// As [`read_bounded`] for an error body: at most [`MAX_ERROR_BODY`], never failing (what
/// could not be read is left out).
pub async fn error_body(resp: reqwest::Response) -> String {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    let read = async {
        while let Some(Ok(chunk)) = stream.next().await {
            let room = MAX_ERROR_BODY as usize - out.len();
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if out.len() >= MAX_ERROR_BODY as usize {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_trickle_is_a_stall_and_a_steady_stream_is_not() {
        let limit = LowSpeed {
            bytes: 100,
            window: Duration::from_secs(5),
        };
        // One byte every 2 s: 2-3 bytes a window.
        let trickle = futures_util::stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            (n < 1000).then(|| (Ok::<_, String>(Bytes::from_static(b"x")), n + 1))
        });
        let mut s = Box::pin(trickle);
        let mut w = SpeedWatch::new(limit);
        let mut got = 0;
        let err = loop {
            match w.next(&mut s).await {
                Ok(Some(_)) => got += 1,
                Ok(None) => panic!("the trickle ended"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, TransferError::Stalled { .. }), "{err}");
        assert!(got < 5, "stopped within the first window or two: {got}");

        // Nothing at all: a stall too.
        let mut silent = Box::pin(futures_util::stream::pending::<Result<Bytes, String>>());
        assert!(SpeedWatch::new(limit).next(&mut silent).await.is_err());

        // 100 bytes a second: fine for as long as it lasts.
        let steady = futures_util::stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            (n < 30).then(|| (Ok::<_, String>(Bytes::from(vec![0u8; 100])), n + 1))
        });
        let mut s = Box::pin(steady);
        let mut w = SpeedWatch::new(limit);
        let mut n = 0;
        while w.next(&mut s).await.unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 30);
    }
}
