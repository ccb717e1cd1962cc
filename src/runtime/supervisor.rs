//! The supervisor of a detached container (what conmon is to podman): one small process per
//! container, started by `berth run -d` or `berth start` and detached from them. It holds
//! the container's stdio (pipes or a pty) and writes the log, owns the port proxy, waits
//! for the exit, records the exit code and time, and applies the restart policy with an
//! exponential backoff (100 ms doubling to 10 s, reset after 10 s of running).
//!
//! It stays single-threaded (it clones containers; the proxy runs in a child process) and
//! is the container init's parent, so it alone can wait for it. It leaves the init the
//! read ends of the output and a file to write the exit code to ([`process::Handover`]):
//! if the supervisor dies, the container keeps running undisturbed, and the next berth
//! command (or the agent's reconciler) starts a new supervisor that adopts it — a pidfd on
//! the init, the output taken back with `pidfd_getfd`, the exit code from that file — or,
//! if it ended meanwhile, starts it again under its restart policy ([`adopt_lost`]).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::container::{Containers, EXIT_STATUS, ProcRef, Status, now, process_start_time};
use super::instance::{self, Stdio};
use super::logs::LogWriter;
use super::process;
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
    .map_err(|e| (1, format!("cannot start the container's supervisor: {e}")))?;
    let Err(status) = status else {
        return Ok(());
    };
    match status.split_once(' ') {
        Some((code, msg)) if code.parse::<i32>().is_ok() => {
            Err((code.parse().expect("checked"), msg.to_string()))
        }
        _ if status.is_empty() => Err((
            1,
            format!(
                "the supervisor exited before the container started (see {})",
                dir.join("supervisor.log").display()
            ),
        )),
        _ => Err((1, status)),
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
            // The caller first: the log may be on a full disk.
            if let Some(mut r) = ready.take() {
                let _ = write!(r, "{code} {msg}");
            }
            note(id, &msg);
            1
        }
    }
}

/// A line in the supervisor's log; never fails (`eprintln!` panics when stderr is a file
/// on a full disk).
fn note(id: &str, msg: &str) {
    let _ = writeln!(io::stderr(), "{} berth-supervisor {id}: {msg}", now());
}

fn ready_fd_of(ready: &Option<File>) -> RawFd {
    ready.as_ref().map_or(-1, AsRawFd::as_raw_fd)
}

/// How one round of supervision begins.
enum Round {
    /// Start the container's process.
    Start,
    /// Watch a process that already runs (adopted after its supervisor died), with the
    /// output descriptors taken back from its init.
    Adopted(Box<instance::Instance>, Vec<(usize, OwnedFd)>),
    /// The process ended while nobody watched, with this code (if known).
    Ended(Option<i32>),
}

fn supervise(store_dir: &Path, id: &str, ready: &mut Option<File>) -> Result<(), (i32, String)> {
    // Failures of berth's own (the store, a full disk): exit 1 for whoever started us.
    let err = |e: &dyn std::fmt::Display| (1, e.to_string());
    let store = Store::open(store_dir).map_err(|e| err(&e))?;
    let containers = Containers::new(&store).map_err(|e| err(&e))?;
    let spec = containers.spec(id).map_err(|e| err(&e))?;
    let dir = containers.dir(id);
    let me = ProcRef::of(std::process::id() as i32);
    // Take over under the record's lock, never while another supervisor lives. A process
    // that still runs is adopted as it is; one whose supervisor died while it was
    // restarting (or that ended unwatched) starts again, counted as a restart.
    let mut taken = None;
    let st = containers
        .update(id, |s| {
            if let Some(other) = s.supervisor
                && other.alive()
                && Some(other) != me
            {
                return;
            }
            let running = s.status == Status::Running && s.process().is_some_and(|p| p.alive());
            if !running {
                if s.supervisor_lost && s.status == Status::Stopped {
                    s.restarts += 1;
                }
                s.stop_requested = false;
            }
            taken = Some(running);
            s.supervisor = me;
            s.supervisor_lost = false;
        })
        .map_err(|e| err(&e))?;
    let Some(running) = taken else {
        return Err((
            125,
            format!(
                "container {} already has a supervisor (pid {})",
                st.short_id(),
                st.supervisor.map_or(0, |p| p.pid)
            ),
        ));
    };
    let mut round = if running {
        adopt(&containers, &st)
    } else {
        Round::Start
    };
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
    if let Round::Adopted(..) = round {
        let _ = log.record(
            "stderr",
            "berth: supervision resumed after the supervisor died\n",
        );
    }
    let mut backoff = BACKOFF_START;
    loop {
        let started_at = Instant::now();
        let (inst, readers) = match std::mem::replace(&mut round, Round::Start) {
            Round::Adopted(inst, readers) => (Ok(*inst), readers),
            Round::Ended(code) => {
                let (stopped, st) = record_exit(&containers, id, &spec, code, false)?;
                if stopped {
                    break;
                }
                restarts = st.restarts;
                continue;
            }
            Round::Start => {
                let st = containers.get(id).map_err(|e| err(&e))?;
                let (stdio, readers, keep) = open_stdio(spec.tty).map_err(|e| err(&e))?;
                let status = status_file(&dir).map_err(|e| err(&e))?;
                let handover = process::Handover {
                    held: readers.iter().map(|(_, fd)| fd.as_raw_fd()).collect(),
                    status: Some(status.as_raw_fd()),
                };
                let held: Vec<(usize, i32)> =
                    readers.iter().map(|(s, fd)| (*s, fd.as_raw_fd())).collect();
                let outcome =
                    instance::start(&store, &containers, &st, &spec, stdio, Some(handover));
                drop(keep);
                drop(status);
                match outcome {
                    Ok(inst) => {
                        let pid = inst.started.pid.as_raw();
                        let recorded = containers.update(id, |s| {
                            s.status = Status::Running;
                            s.pid = Some(pid);
                            s.pid_start = process_start_time(pid);
                            s.started = Some(now());
                            s.finished = None;
                            s.ip = inst.ip.map(Into::into);
                            s.restarts = restarts;
                            s.held = held;
                            s.health = spec
                                .health
                                .as_ref()
                                .map(|_| super::health::HealthState::starting());
                        });
                        if let Err(e) = recorded {
                            // A container berth cannot record (a full disk) must not run
                            // on unseen: nothing could stop it.
                            let _ = nix::sys::signal::kill(
                                inst.started.pid,
                                nix::sys::signal::Signal::SIGKILL,
                            );
                            let _ = inst.started.reap();
                            let _ = inst.cgroup.remove();
                            let _ = containers.update(id, |s| s.supervisor = None);
                            return Err(err(&e));
                        }
                        (Ok(inst), readers)
                    }
                    Err(e) => (Err(e), readers),
                }
            }
        };
        let code = match inst {
            Ok(inst) => {
                if let Some(p) = proxy.as_mut() {
                    let _ = p.set_hosts(&instance::backend(inst.ip));
                }
                if let Some(mut r) = ready.take() {
                    let _ = r.write_all(b"ok\n");
                }
                let mut prober = spec
                    .health
                    .clone()
                    .map(|check| Prober::new(check, &containers, id, &spec, restarts));
                let code = pump(&inst, readers, &mut log, prober.as_mut()).map_err(|e| err(&e))?;
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
                (Some(e.exit_code()), false)
            }
        };
        let (code, oom) = code;
        let _ = log.flush();
        let (stopped, st) = record_exit(&containers, id, &spec, code, oom)?;
        if stopped {
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
    if let Some(mut r) = ready.take() {
        let _ = r.write_all(b"ok\n");
    }
    drop(proxy.take());
    let st = containers
        .update(id, |s| {
            s.supervisor = None;
        })
        .map_err(|e| err(&e))?;
    if spec.auto_remove && st.status == Status::Stopped {
        // `run -d --rm`: gone once it has stopped for good, as with Docker.
        let _ = instance::remove_container(&store, &containers, &st);
    }
    Ok(())
}

/// Records an exit (`code` unknown when an adopted init died without saying) and applies
/// the restart policy; true when the container stays stopped.
fn record_exit(
    containers: &Containers,
    id: &str,
    spec: &crate::runtime::spec::ContainerSpec,
    code: Option<i32>,
    oom: bool,
) -> Result<(bool, super::container::ContainerState), (i32, String)> {
    let st = containers
        .update(id, |s| {
            s.pid = None;
            s.pid_start = None;
            s.held.clear();
            s.health = None;
            s.exit_code = code;
            s.oom_killed = oom;
            s.finished = Some(now());
            // Unknown means the init was killed outright: a failure, as SIGKILL's 137.
            if !s.stop_requested && spec.restart.should_restart(code.unwrap_or(137), s.restarts) {
                s.status = Status::Restarting;
                s.restarts += 1;
            } else {
                s.status = Status::Stopped;
            }
        })
        .map_err(|e| (125, e.to_string()))?;
    Ok((st.status != Status::Restarting, st))
}

/// Takes over a container whose process runs but whose supervisor died: a pidfd on its
/// init, its output descriptors back from the init, its cgroup.
fn adopt(containers: &Containers, st: &super::container::ContainerState) -> Round {
    let dir = containers.dir(&st.id);
    let status = dir.join(EXIT_STATUS);
    let (Some(pid), Some(start)) = (st.pid, st.pid_start) else {
        return Round::Ended(None);
    };
    let started = match process::Started::adopt_orphan(
        nix::unistd::Pid::from_raw(pid),
        start,
        status.clone(),
    ) {
        Ok(s) => s,
        Err(_) => return Round::Ended(process::orphan_exit_code(pid, &status)),
    };
    let mut readers = Vec::new();
    for (stream, fd) in &st.held {
        match started.take_fd(*fd) {
            Ok(got) => readers.push((*stream, got)),
            Err(e) => note(
                &st.id,
                &format!("cannot take the output back (it is lost): {e}"),
            ),
        }
    }
    let ip = match st.ip {
        Some(std::net::IpAddr::V4(ip)) => Some(ip),
        _ => None,
    };
    let inst = instance::Instance {
        started,
        cgroup: super::cgroup::Cgroup::of(&st.id),
        ip,
        rootfs_plan: String::new(),
    };
    Round::Adopted(Box::new(inst), readers)
}

/// The file the init writes the exit code to, emptied for a new start.
fn status_file(dir: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(EXIT_STATUS))
}

/// Adopts every container of `store` whose supervisor died: one that still runs gets a new
/// supervisor without being restarted; one that ended (or was waiting to restart) while
/// unsupervised starts again if its restart policy says so. `program` is berth's binary.
/// Returns how many containers got a supervisor.
pub fn adopt_lost(store: &Store, program: &Path) -> usize {
    let Ok(containers) = Containers::new(store) else {
        return 0;
    };
    let Ok(list) = containers.list() else {
        return 0;
    };
    let mut n = 0;
    for st in list {
        if !st.supervisor_lost || st.supervised() {
            continue;
        }
        let Ok(spec) = containers.spec(&st.id) else {
            continue;
        };
        let wanted = match st.status {
            Status::Running => true,
            Status::Stopped if !st.stop_requested => spec
                .restart
                .should_restart(st.exit_code.unwrap_or(137), st.restarts),
            _ => false,
        };
        if wanted {
            if spawn(program, store.root(), &containers.dir(&st.id), &st.id).is_ok() {
                n += 1;
            }
        } else if st.status == Status::Stopped {
            if spec.auto_remove {
                // `--rm`, ended while unsupervised: what its supervisor would have done.
                let _ = instance::remove_container(store, &containers, &st);
            } else {
                let _ = containers.update(&st.id, |s| s.supervisor_lost = false);
            }
        }
    }
    n
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
    // Room for a megabyte of output while no supervisor reads (between its death and its
    // successor's adoption) before the command's writes block.
    for fd in [&out_w, &err_w] {
        // SAFETY: fcntl on a pipe we own; failure only leaves the default size.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    }
    Ok((
        Stdio::Fds([null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()]),
        vec![(0, out_r), (1, err_r)],
        vec![null, out_w, err_w],
    ))
}

/// The health check a supervisor runs beside its container, between reads of the output
/// (the supervisor stays single-threaded). Each change is recorded; a container that turns
/// unhealthy is killed a moment later — once the router has seen it and sends it nothing
/// more — when its restart policy would start it again, and left running (unhealthy, out
/// of rotation) otherwise, as Docker leaves it.
struct Prober<'a> {
    check: super::health::Check,
    containers: &'a Containers,
    id: &'a str,
    spec: &'a crate::runtime::spec::ContainerSpec,
    restarts: u32,
    started: Instant,
    next: Instant,
    state: super::health::HealthState,
    kill_at: Option<Instant>,
}

/// How long an unhealthy container stays up after it is marked, so a router stops sending
/// it connections before it goes.
const UNHEALTHY_GRACE: Duration = Duration::from_millis(1000);

impl<'a> Prober<'a> {
    fn new(
        check: super::health::Check,
        containers: &'a Containers,
        id: &'a str,
        spec: &'a crate::runtime::spec::ContainerSpec,
        restarts: u32,
    ) -> Prober<'a> {
        let now = Instant::now();
        Prober {
            // The first probe soon after the start (Docker waits an interval; a deploy has
            // already seen it pass), then every interval.
            next: now + check.interval.min(Duration::from_secs(1)),
            check,
            containers,
            id,
            spec,
            restarts,
            started: now,
            state: super::health::HealthState::starting(),
            kill_at: None,
        }
    }

    /// Milliseconds until something is due.
    fn wait_ms(&self) -> i32 {
        let next = self.kill_at.map_or(self.next, |k| k.min(self.next));
        next.saturating_duration_since(Instant::now())
            .as_millis()
            .min(i32::MAX as u128) as i32
    }

    /// Runs what is due: a probe, or the kill of an unhealthy container.
    fn due(&mut self, inst: &instance::Instance, log: &mut LogWriter) {
        let now = Instant::now();
        if self.kill_at.is_some_and(|k| now >= k) {
            self.kill_at = None;
            let _ = log.record(
                "stderr",
                &format!(
                    "berth: unhealthy ({}): restarting\n",
                    self.state.last_error.as_deref().unwrap_or("")
                ),
            );
            let _ = nix::sys::signal::kill(inst.started.pid, nix::sys::signal::Signal::SIGKILL);
        }
        if now < self.next {
            return;
        }
        let ip = inst.ip.map(std::net::IpAddr::V4).or_else(|| {
            matches!(self.spec.network, crate::runtime::spec::NetworkMode::Host)
                .then_some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
        });
        let exec = |argv: &[String]| probe_exec(inst, self.spec, argv, self.check.timeout);
        let result = super::health::probe(&self.check, ip, &exec);
        let was = self.state.status;
        let in_start = self.started.elapsed() < self.check.start_period;
        if self.state.record(result, &self.check, in_start) {
            let state = self.state.clone();
            let _ = self.containers.update(self.id, |s| s.health = Some(state));
        }
        if was != super::health::Health::Unhealthy
            && self.state.status == super::health::Health::Unhealthy
            && self.spec.restart.should_restart(137, self.restarts)
        {
            self.kill_at = Some(Instant::now() + UNHEALTHY_GRACE);
        }
        self.next = Instant::now() + self.check.interval;
    }
}

/// Runs a probe command in the container (as `exec` does), its output discarded; its exit
/// code, or an error once `timeout` passes (the command is killed).
fn probe_exec(
    inst: &instance::Instance,
    spec: &crate::runtime::spec::ContainerSpec,
    argv: &[String],
    timeout: Duration,
) -> Result<i32, String> {
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| e.to_string())?;
    let fd = null.as_raw_fd();
    let process = process::Process {
        args: argv.to_vec(),
        env: instance::process_env(spec).map_err(|e| e.to_string())?,
        cwd: spec.cwd.clone(),
        user: spec.user.clone(),
        capabilities: spec.capabilities.clone(),
        stdio: Some([fd, fd, fd]),
        ..Default::default()
    };
    let started = super::exec::exec(inst.started.pid.as_raw(), &inst.cgroup, &process)
        .map_err(|e| e.to_string())?;
    let mut pfd = libc::pollfd {
        fd: started.pidfd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll on one descriptor we own.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n <= 0 {
        let _ = nix::sys::signal::kill(started.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = started.reap();
        return Err(format!("{} timed out after {timeout:?}", argv.join(" ")));
    }
    started
        .reap()
        .map_err(|e| e.to_string())
        .map(|c| c.unwrap_or(137))
}

/// Copies the container's output into the log until it exits; returns its exit code
/// (unknown when an adopted init died without saying).
fn pump(
    inst: &instance::Instance,
    mut readers: Vec<(usize, OwnedFd)>,
    log: &mut LogWriter,
    mut prober: Option<&mut Prober<'_>>,
) -> io::Result<Option<i32>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut exited = None;
    let mut drain_until = None;
    loop {
        if exited.is_none()
            && let Some(p) = prober.as_deref_mut()
        {
            p.due(inst, log);
        }
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
        let timeout = match (&exited, prober.as_deref()) {
            (Some(_), _) => 100,
            (None, Some(p)) => p.wait_ms(),
            (None, None) => -1,
        };
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
                // A log that cannot be written (a full disk) loses the output, not the
                // container's supervision.
                let _ = log.write(*stream, &buf[..r as usize]);
            } else if r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // EOF, or EIO from a pty whose other side closed.
                closed.push(i);
            }
        }
        for i in closed.into_iter().rev() {
            readers.remove(i);
        }
    }
    let _ = log.flush();
    Ok(exited.flatten())
}
