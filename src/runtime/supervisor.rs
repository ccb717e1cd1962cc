//! The supervisor of a detached container (what conmon is to podman): one small process per
//! container, started by `berth run -d` or `berth start` and detached from them. It holds
//! the container's stdio (pipes or a pty) and writes the log, owns the port proxy, waits
//! for the exit, records the exit code and time, and applies the restart policy with an
//! exponential backoff (100 ms doubling to 10 s, reset after 10 s of running).
//!
//! It stays single-threaded (it clones containers; the proxy runs in a child process) and
//! is the container init's parent, so it alone can collect the exit status. If it dies, the
//! container keeps running; the record says so (`supervisor_lost`) and `rm -f` cleans up.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::container::{Containers, ProcRef, Status, now, process_start_time};
use super::instance::{self, Stdio};
use super::logs::LogWriter;
use super::proxy::ProxyProcess;
use crate::store::Store;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A run this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);

/// Starts a supervisor for container `id` and waits until the container runs (or could
/// not start). `program` is berth's own binary.
pub fn spawn(program: &Path, store_dir: &Path, dir: &Path, id: &str) -> Result<(), (i32, String)> {
    let args = [
        std::ffi::OsStr::new("--store"),
        store_dir.as_os_str(),
        std::ffi::OsStr::new("__supervise"),
        std::ffi::OsStr::new(id),
    ];
    let status = super::daemon::spawn(
        program,
        "berth-supervisor",
        &args,
        &dir.join("supervisor.log"),
    )
    .map_err(|e| (125, format!("cannot start the container's supervisor: {e}")))?;
    let Err(status) = status else {
        return Ok(());
    };
    match status.split_once(' ') {
        Some((code, msg)) if code.parse::<i32>().is_ok() => {
            Err((code.parse().expect("checked"), msg.to_string()))
        }
        _ if status.is_empty() => Err((
            125,
            format!(
                "the supervisor exited before the container started (see {})",
                dir.join("supervisor.log").display()
            ),
        )),
        _ => Err((125, status)),
    }
}

/// The supervisor's main: supervises `id` until it stops for good. `ready` receives `ok`
/// once the container runs, or `CODE message` if it could not start.
pub fn run(store_dir: &Path, id: &str, ready: RawFd) -> i32 {
    // SAFETY: the descriptor was passed to us by `spawn` and is ours alone. Close-on-exec
    // again, or the container's init would inherit it and `spawn` would wait forever.
    let mut ready = Some(unsafe { File::from_raw_fd(ready) });
    // SAFETY: fcntl on that descriptor.
    unsafe { libc::fcntl(ready_fd_of(&ready), libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: ignoring SIGHUP (the terminal that started us may go away).
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    match supervise(store_dir, id, &mut ready) {
        Ok(()) => 0,
        Err((code, msg)) => {
            eprintln!("{} berth-supervisor {id}: {msg}", now());
            if let Some(mut r) = ready.take() {
                let _ = write!(r, "{code} {msg}");
            }
            1
        }
    }
}

fn ready_fd_of(ready: &Option<File>) -> RawFd {
    ready.as_ref().map_or(-1, AsRawFd::as_raw_fd)
}

fn supervise(store_dir: &Path, id: &str, ready: &mut Option<File>) -> Result<(), (i32, String)> {
    let err = |e: &dyn std::fmt::Display| (125, e.to_string());
    let store = Store::open(store_dir).map_err(|e| err(&e))?;
    let containers = Containers::new(&store).map_err(|e| err(&e))?;
    let spec = containers.spec(id).map_err(|e| err(&e))?;
    let dir = containers.dir(id);
    let me = ProcRef::of(std::process::id() as i32);
    let st = containers
        .update(id, |s| {
            s.supervisor = me;
            s.supervisor_lost = false;
            s.stop_requested = false;
        })
        .map_err(|e| err(&e))?;
    let mut restarts = st.restarts;
    let mut proxy = if spec.ports.is_empty() {
        None
    } else {
        Some(ProxyProcess::spawn(&spec.ports).map_err(|e| {
            let _ = containers.update(id, |s| s.supervisor = None);
            err(&e)
        })?)
    };
    let mut log = LogWriter::open(&dir).map_err(|e| err(&e))?;
    let mut backoff = BACKOFF_START;
    loop {
        let st = containers.get(id).map_err(|e| err(&e))?;
        let (stdio, readers, keep) = open_stdio(spec.tty).map_err(|e| err(&e))?;
        let started_at = Instant::now();
        let outcome = instance::start(&store, &containers, &st, &spec, stdio);
        drop(keep);
        let code = match outcome {
            Ok(inst) => {
                let pid = inst.started.pid.as_raw();
                let ip = inst.ip;
                containers
                    .update(id, |s| {
                        s.status = Status::Running;
                        s.pid = Some(pid);
                        s.pid_start = process_start_time(pid);
                        s.started = Some(now());
                        s.finished = None;
                        s.ip = ip.map(Into::into);
                        s.restarts = restarts;
                    })
                    .map_err(|e| err(&e))?;
                if let Some(p) = proxy.as_mut() {
                    let _ = p.set_hosts(&instance::backend(ip));
                }
                if let Some(mut r) = ready.take() {
                    let _ = r.write_all(b"ok\n");
                }
                let code = pump(&inst, readers, &mut log).map_err(|e| err(&e))?;
                let oom = inst.cgroup.oom_killed();
                let _ = inst.cgroup.remove();
                (code, oom)
            }
            Err(e) => {
                if ready.is_some() {
                    let _ = containers.update(id, |s| {
                        s.supervisor = None;
                        s.status = Status::Stopped;
                        s.exit_code = Some(e.exit_code());
                        s.finished = Some(now());
                    });
                    return Err((e.exit_code(), e.to_string()));
                }
                let _ = log.record("stderr", &format!("berth: {e}\n"));
                (e.exit_code(), false)
            }
        };
        let (code, oom) = code;
        let _ = log.flush();
        let st = containers
            .update(id, |s| {
                s.pid = None;
                s.pid_start = None;
                s.exit_code = Some(code);
                s.oom_killed = oom;
                s.finished = Some(now());
                if !s.stop_requested && spec.restart.should_restart(code, s.restarts) {
                    s.status = Status::Restarting;
                    s.restarts += 1;
                } else {
                    s.status = Status::Stopped;
                }
            })
            .map_err(|e| err(&e))?;
        if st.status != Status::Restarting {
            break;
        }
        restarts = st.restarts;
        if started_at.elapsed() >= STABLE {
            backoff = BACKOFF_START;
        }
        if !sleep_unless_stopped(&containers, id, backoff) {
            containers
                .update(id, |s| s.status = Status::Stopped)
                .map_err(|e| err(&e))?;
            break;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    drop(proxy.take());
    containers
        .update(id, |s| {
            s.supervisor = None;
        })
        .map_err(|e| err(&e))?;
    Ok(())
}

/// Sleeps `d` unless a stop is requested meanwhile; false when it was.
fn sleep_unless_stopped(containers: &Containers, id: &str, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if containers.get(id).is_ok_and(|s| s.stop_requested) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
    !containers.get(id).is_ok_and(|s| s.stop_requested)
}

/// The container's stdio: what it gets, what the supervisor reads (stream 0 stdout, 1
/// stderr), and the container's ends, to close once it has started.
type StdioSet = (Stdio, Vec<(usize, OwnedFd)>, Vec<OwnedFd>);

fn open_stdio(tty: bool) -> io::Result<StdioSet> {
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    if tty {
        let p = nix::pty::openpty(None, None).map_err(io::Error::from)?;
        for fd in [&p.master, &p.slave] {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(io::Error::from)?;
        }
        return Ok((
            Stdio::Tty(p.slave.as_raw_fd()),
            vec![(0, p.master)],
            vec![p.slave],
        ));
    }
    let null: OwnedFd = File::open("/dev/null")?.into();
    let (out_r, out_w) = nix::unistd::pipe2(cloexec)?;
    let (err_r, err_w) = nix::unistd::pipe2(cloexec)?;
    Ok((
        Stdio::Fds([null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()]),
        vec![(0, out_r), (1, err_r)],
        vec![null, out_w, err_w],
    ))
}

/// Copies the container's output into the log until it exits; returns its exit code.
fn pump(
    inst: &instance::Instance,
    mut readers: Vec<(usize, OwnedFd)>,
    log: &mut LogWriter,
) -> io::Result<i32> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut exited = None;
    let mut drain_until = None;
    loop {
        if readers.is_empty() {
            if exited.is_some() {
                break;
            }
        } else if drain_until.is_some_and(|t| Instant::now() >= t) {
            // Something in the container passed its stdout on and outlived it; stop reading.
            break;
        }
        let mut fds: Vec<libc::pollfd> = readers
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if exited.is_none() {
            fds.push(libc::pollfd {
                fd: inst.started.pidfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = if exited.is_some() { 100 } else { -1 };
        // SAFETY: poll on descriptors we own, in a local array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if exited.is_none() && fds.last().is_some_and(|f| f.revents != 0) {
            exited = Some(inst.started.reap()?);
            drain_until = Some(Instant::now() + Duration::from_secs(2));
        }
        let mut closed = Vec::new();
        for (i, f) in fds.iter().enumerate().take(readers.len()) {
            if f.revents == 0 {
                continue;
            }
            let (stream, fd) = &readers[i];
            // SAFETY: read into our buffer from a descriptor we own.
            let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r > 0 {
                log.write(*stream, &buf[..r as usize])?;
            } else if r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // EOF, or EIO from a pty whose other side closed.
                closed.push(i);
            }
        }
        for i in closed.into_iter().rev() {
            readers.remove(i);
        }
    }
    log.flush()?;
    Ok(exited.unwrap_or(0))
}
