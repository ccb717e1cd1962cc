//! A fault-injecting HTTP proxy between berth and a registry, on 127.0.0.1: it answers some
//! requests itself with 429 (Retry-After) or 503, resets one large upload midway (after
//! passing part of it to the registry) and cuts one large download short. One request per
//! connection (`Connection: close` both ways), so each fault hits exactly one request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Which faults to inject.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The first N requests get `429 Too Many Requests` with `Retry-After: 1`.
    pub throttle_first: u32,
    /// Every Nth request (counting all) gets `503 Service Unavailable`.
    pub unavailable_every: Option<u32>,
    /// The first request whose body is larger than this is passed on only this far, then
    /// both connections are reset.
    pub reset_upload_after: Option<usize>,
    /// The first response whose body is larger than this is passed back only this far,
    /// then the connection is reset.
    pub cut_download_after: Option<usize>,
    /// Requests with a body after the first N hang (a stalled upload), for a minute.
    pub stall_uploads_after: Option<u32>,
    /// Only this many of those hang; later ones pass (a stall that a retry gets past).
    pub stall_uploads_count: Option<u32>,
    /// Only bodies at least this large count as uploads to stall.
    pub stall_min_body: usize,
    /// Read each request's whole body before passing it on, and drop requests whose body
    /// never arrives whole, as nginx does by default (`proxy_request_buffering on`).
    pub buffer_requests: bool,
    /// Pass response bodies back at this many bytes per second.
    pub download_bytes_per_sec: Option<u64>,
    /// Read request bodies at this many bytes per second.
    pub upload_bytes_per_sec: Option<u64>,
    /// Requests whose request line contains this get `403 Forbidden` (after the first
    /// `refuse_after` of them pass), until [`FaultProxy::heal`].
    pub refuse_containing: Option<String>,
    /// How many matching requests pass before the refusals start.
    pub refuse_after: u32,
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU32,
    pub throttled: AtomicU32,
    pub unavailable: AtomicU32,
    pub uploads_reset: AtomicU32,
    pub downloads_cut: AtomicU32,
    pub uploads: AtomicU32,
    pub matched: AtomicU32,
    pub refused: AtomicU32,
    /// Uploads held without an answer.
    pub stalled: AtomicU32,
    /// Requests whose body never arrived whole (with `buffer_requests`).
    pub dropped: AtomicU32,
    /// Set by [`FaultProxy::heal`]: no more refusals.
    pub healed: AtomicBool,
}

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    pub port: u16,
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

fn reset(s: &TcpStream) {
    // SO_LINGER 0: close sends RST.
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a linger struct that outlives the call.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn read_head(r: &mut impl BufRead) -> Option<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Some(lines);
        }
        lines.push(line);
    }
}

fn content_length(head: &[String]) -> usize {
    head.iter()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

fn with_close(head: &[String]) -> Vec<u8> {
    let mut out = String::new();
    for (i, l) in head.iter().enumerate() {
        if i > 0 && l.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out += l;
        out += "\r\n";
    }
    out += "Connection: close\r\n\r\n";
    out.into_bytes()
}

impl FaultProxy {
    /// A proxy to 127.0.0.1:`upstream` with `faults`.
    pub fn start(upstream: u16, faults: Faults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let reset_done = Arc::new(AtomicBool::new(false));
        let cut_done = Arc::new(AtomicBool::new(false));
        let (c, s) = (counters.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let (c, f) = (c.clone(), faults.clone());
                let (reset_done, cut_done) = (reset_done.clone(), cut_done.clone());
                std::thread::spawn(move || {
                    handle(client, upstream, &f, &c, &reset_done, &cut_done);
                });
            }
        });
        FaultProxy {
            port,
            counters,
            stop,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops refusing requests.
    pub fn heal(&self) {
        self.counters.healed.store(true, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn handle(
    client: TcpStream,
    upstream: u16,
    f: &Faults,
    c: &Counters,
    reset_done: &AtomicBool,
    cut_done: &AtomicBool,
) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let Some(head) = read_head(&mut reader) else {
        return;
    };
    let n = c.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let len = content_length(&head);
    let mut writer = client;
    let mut answer = |w: &mut TcpStream, status: &str, extra: &str| {
        // Drain the body so the client sees the answer, not a reset.
        let mut body = vec![0u8; len];
        let _ = reader.read_exact(&mut body);
        let _ = write!(
            w,
            "HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
    };
    if let Some(pattern) = &f.refuse_containing
        && head[0].contains(pattern.as_str())
        && !c.healed.load(Ordering::SeqCst)
        && c.matched.fetch_add(1, Ordering::SeqCst) >= f.refuse_after
    {
        c.refused.fetch_add(1, Ordering::SeqCst);
        return answer(&mut writer, "403 Forbidden", "");
    }
    if n <= f.throttle_first {
        c.throttled.fetch_add(1, Ordering::SeqCst);
        return answer(&mut writer, "429 Too Many Requests", "Retry-After: 1\r\n");
    }
    if f.unavailable_every.is_some_and(|k| n.is_multiple_of(k)) {
        c.unavailable.fetch_add(1, Ordering::SeqCst);
        return answer(&mut writer, "503 Service Unavailable", "");
    }
    if len > 0 && len >= f.stall_min_body {
        let k = c.uploads.fetch_add(1, Ordering::SeqCst) + 1;
        if f.stall_uploads_after
            .is_some_and(|n| k > n && f.stall_uploads_count.is_none_or(|count| k <= n + count))
        {
            c.stalled.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_secs(60));
            return;
        }
    }
    let mut buffered = None;
    if f.buffer_requests && len > 0 {
        let mut whole = vec![0u8; len];
        let mut at = 0;
        while at < len {
            let k = (len - at).min(64 * 1024);
            if reader.read_exact(&mut whole[at..at + k]).is_err() {
                // Cut short: the upstream never hears of it.
                c.dropped.fetch_add(1, Ordering::SeqCst);
                return;
            }
            at += k;
            if let Some(bps) = f.upload_bytes_per_sec {
                std::thread::sleep(std::time::Duration::from_secs_f64(k as f64 / bps as f64));
            }
        }
        buffered = Some(whole);
    }
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
        let _ = write!(
            writer,
            "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    };
    if up.write_all(&with_close(&head)).is_err() {
        return;
    }
    let mut reader: Box<dyn Read> = match buffered {
        Some(whole) => Box::new(std::io::Cursor::new(whole)),
        None => Box::new(reader),
    };
    let reset_now = f
        .reset_upload_after
        .is_some_and(|t| len > t && !reset_done.swap(true, Ordering::SeqCst));
    let limit = if reset_now {
        f.reset_upload_after.unwrap()
    } else {
        len
    };
    let mut body = vec![0u8; 64 * 1024];
    let mut left = limit;
    while left > 0 {
        let k = left.min(body.len());
        if reader.read_exact(&mut body[..k]).is_err() || up.write_all(&body[..k]).is_err() {
            return;
        }
        left -= k;
    }
    if reset_now {
        c.uploads_reset.fetch_add(1, Ordering::SeqCst);
        reset(&up);
        reset(&writer);
        return;
    }
    // The response: head (with Connection: close), then the body as it comes.
    let mut up_reader = BufReader::new(up);
    let Some(resp_head) = read_head(&mut up_reader) else {
        return;
    };
    let resp_len = content_length(&resp_head);
    if writer.write_all(&with_close(&resp_head)).is_err() {
        return;
    }
    let is_head = head[0].starts_with("HEAD ");
    let cut_now = !is_head
        && f.cut_download_after
            .is_some_and(|t| resp_len > t && !cut_done.swap(true, Ordering::SeqCst));
    let resp_len = if is_head { 0 } else { resp_len };
    let mut left = if cut_now {
        f.cut_download_after.unwrap()
    } else {
        resp_len
    };
    while left > 0 {
        let k = left.min(body.len());
        match up_reader.read(&mut body[..k]) {
            Ok(0) | Err(_) => break,
            Ok(got) => {
                if writer.write_all(&body[..got]).is_err() {
                    return;
                }
                left -= got;
                if let Some(bps) = f.download_bytes_per_sec {
                    std::thread::sleep(std::time::Duration::from_secs_f64(got as f64 / bps as f64));
                }
            }
        }
    }
    if cut_now {
        c.downloads_cut.fetch_add(1, Ordering::SeqCst);
        reset(&writer);
    }
}
