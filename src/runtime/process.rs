//! Starting a container: new namespaces, the root filesystem, `pivot_root`, `/proc`, `/dev`,
//! `/sys`, the `/etc` files, then the command, with Docker's capabilities, `no_new_privs`
//! and no inherited descriptors.
//!
//! Process layout: the berth process that starts the container stays on the host and waits.
//! It clones PID 1 of the container, which sets everything up, forks the command, and then
//! re-executes berth *from a sealed in-memory copy* as the container's init (it forwards
//! signals and reaps zombies, as tini does). So no process in the container ever runs the
//! host's berth binary: `/proc/1/exe` is the sealed copy, which cannot be written
//! (CVE-2019-5736).
//!
//! Only the overlay is mounted before `pivot_root` (on a path in berth's own store); every
//! other mount is made after it, relative to the container's root, so a symlink in the
//! image can never point a mount at the host.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Pid, Uid};

use super::caps;
use super::mount::{LinuxSyscall, Mount, Op, Syscall};

/// The container's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// A network namespace with only loopback.
    None,
    /// The host's network namespace.
    Host,
    /// A network namespace joined to a bridge by a veth pair (see
    /// [`Launch::interface`]).
    Bridge,
}

/// A mount besides the root filesystem, made by the container's process.
#[derive(Debug, Clone)]
pub struct ExtraMount {
    /// Host path (directory or file) to bind-mount; `None` mounts a fresh tmpfs.
    pub source: Option<PathBuf>,
    /// Absolute path inside the container.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
    /// Copy what the image has at `target` into `source` first, if `source` is empty (a
    /// named volume's first use, as Docker does).
    pub seed: bool,
    /// A tmpfs's size limit in bytes (`None`: the kernel's default, half the memory).
    pub tmpfs_size: Option<u64>,
}

/// The program a container (or `exec`) runs, and how.
#[derive(Debug, Clone, Default)]
pub struct Process {
    /// argv.
    pub args: Vec<String>,
    /// Environment, `K=V`.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// The image's or `--user`'s user (`name`, `uid`, `name:group`, `uid:gid`), resolved
    /// inside the container's root.
    pub user: String,
    /// Capabilities of a root process (numbers).
    pub capabilities: Vec<u32>,
    /// Send the command's standard output to standard error (builds keep stdout for
    /// results).
    pub stdout_to_stderr: bool,
    /// Keep standard input attached (`-i`); otherwise the command reads `/dev/null`.
    pub stdin: bool,
    /// A pty slave to make the command's controlling terminal and stdio (`-t`).
    pub tty: Option<std::os::fd::RawFd>,
    /// Descriptors to become the command's stdin, stdout and stderr (a supervisor's pipes).
    pub stdio: Option<[std::os::fd::RawFd; 3]>,
}

/// Everything needed to start a container's process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The overlay to mount as the root (or `None` when `rootfs` is a prepared copy).
    pub overlay: Option<Mount>,
    /// The root filesystem directory.
    pub rootfs: PathBuf,
    /// Files bind-mounted over `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`.
    pub etc_files: Vec<(PathBuf, &'static str)>,
    /// Host name.
    pub hostname: String,
    /// Network.
    pub network: Network,
    /// Mount the root read-only.
    pub read_only: bool,
    /// Bind mounts, volumes, tmpfs.
    pub mounts: Vec<ExtraMount>,
    /// The bridge network's interface, configured from inside the namespace.
    pub interface: Option<super::network::Interface>,
    /// The command.
    pub process: Process,
    /// Files the container's first process writes `0` into, before anything else, to move
    /// itself into its cgroup ([`super::cgroup::Cgroup::self_join_files`]).
    pub cgroup_join: Vec<PathBuf>,
    /// The container's own cgroup, mounted read-only at `/sys/fs/cgroup` through its cgroup
    /// namespace (`None`: an empty directory, as before).
    pub cgroupfs: Option<super::cgroup::CgroupFs>,
    /// Secrets delivered as files: `/run/secrets/NAME` on a tmpfs, mode 0400, owned by the
    /// command's user, the mount read-only once written.
    pub secret_files: Vec<(String, SecretBytes)>,
    /// What the init keeps for a supervisor that may have to adopt the container.
    pub handover: Option<Handover>,
    /// The container dies with the thread that started it (a build's RUN step: a killed
    /// build leaves no step running). Only for a caller that waits in that same thread.
    pub die_with_parent: bool,
}

/// Descriptors a supervisor leaves with the container's init, so the container outlives
/// the supervisor's death unharmed and a new supervisor can take it over: the read ends of
/// the command's output (or the pty's master), which keep its writes from failing with
/// EPIPE and which the new supervisor takes back with `pidfd_getfd`, and a file the init
/// writes the exit code to, since only a parent can wait for a process.
#[derive(Debug, Clone, Default)]
pub struct Handover {
    /// Descriptors (in the supervisor, and so in the init) to keep open.
    pub held: Vec<RawFd>,
    /// Where the init writes the exit code.
    pub status: Option<RawFd>,
}

/// A secret's value: never printed (`Debug` shows `<redacted>`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Open-file limit given to containers (soft = hard), capped by the host's hard limit.
pub const NOFILE: u64 = 1 << 20;

/// Why a container could not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A system call on the host side failed.
    #[error("cannot {what}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The container's setup or exec failed; the message comes from inside.
    #[error("{message}")]
    Container {
        /// What failed, e.g. `exec "nope": executable file not found in $PATH`.
        message: String,
        /// Docker's exit code for it: 127 not found, 126 not executable, 125 otherwise.
        code: i32,
    },
}

fn host(what: &'static str) -> impl FnOnce(io::Error) -> LaunchError {
    move |source| LaunchError::Host { what, source }
}

/// A started container.
pub struct Started {
    /// Host pid of the container's init.
    pub pid: Pid,
    pidfd: OwnedFd,
    /// Where to learn the exit code of an init that is not our child (adopted).
    orphan: Option<PathBuf>,
}

/// The tiny static init `build.rs` compiles (empty where it has no port).
const TINY_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/berth-init"));

/// A sealed in-memory copy of the container's init: the tiny static init, or the running
/// berth binary where there is none.
fn sealed_init() -> io::Result<OwnedFd> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"berth-init".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    let mut mem = unsafe { File::from_raw_fd(fd) };
    if TINY_INIT.is_empty() {
        io::copy(&mut File::open("/proc/self/exe")?, &mut mem)?;
    } else {
        mem.write_all(TINY_INIT)?;
    }
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(mem))
}

/// `struct clone_args` of clone3(2), up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3's flag: start the child in the cgroup `CloneArgs::cgroup` names (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// False when `BERTH_NO_CLONE3` is set: the fallback path, for measuring one against the
/// other (`bench/results.md`) and for kernels that misreport.
fn clone3_allowed() -> bool {
    std::env::var_os("BERTH_NO_CLONE3").is_none()
}

/// Creates the child as `fork` does, with `flags` and directly in the v2 cgroup `dir`,
/// through clone3. The child runs `child` and exits with what it returns. `None` where
/// the kernel cannot (older than 5.7, or the cgroup refuses): the caller falls back.
fn clone3_into(
    flags: CloneFlags,
    dir: &Path,
    child: &mut dyn FnMut() -> isize,
) -> io::Result<Option<(Pid, OwnedFd)>> {
    let Ok(cgroup) = File::open(dir) else {
        return Ok(None);
    };
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: flags.bits() as u64 | libc::CLONE_PIDFD as u64 | CLONE_INTO_CGROUP,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM and without a stack behaves as fork: the child gets
    // a copy of this (single-threaded) address space and returns 0 here, on its copy of
    // this stack. `args` outlives the call and `pidfd` receives the new descriptor.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == 0 {
        let code = child();
        // SAFETY: the child ends here without running the parent's destructors.
        unsafe { libc::_exit(code as i32) };
    }
    if ret < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EOPNOTSUPP | libc::EBUSY) => {
                Ok(None)
            }
            _ => Err(e),
        };
    }
    // SAFETY: CLONE_PIDFD stored a new descriptor we own.
    Ok(Some((Pid::from_raw(ret as i32), unsafe {
        OwnedFd::from_raw_fd(pidfd)
    })))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Starts the container described by `launch`. `before_start` runs on the host once the
/// container's init exists but before it sets anything up (to place it in a cgroup).
pub fn start(
    launch: &Launch,
    before_start: &mut dyn FnMut(Pid) -> io::Result<()>,
) -> Result<Started, LaunchError> {
    // The child is created with a raw clone: no other thread may hold a lock then.
    crate::background::settle();
    let init_binary = sealed_init().map_err(host("make a sealed copy of the container's init"))?;
    let etc: Vec<(Vec<u8>, &'static str)> = launch
        .etc_files
        .iter()
        .map(|(p, dest)| std::fs::read(p).map(|c| (c, *dest)))
        .collect::<io::Result<_>>()
        .map_err(host("read the container's /etc files"))?;
    let (go_r, go_w) = pipe().map_err(host("create a pipe"))?;
    let (err_r, err_w) = pipe().map_err(host("create a pipe"))?;
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    // No CLONE_NEWCGROUP here: the child unshares it once it is in its own cgroup, so
    // the namespace's root is that cgroup (as runc does).
    if launch.network != Network::Host {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    // Set before each way of creating the child, which sees the value of the moment.
    let joined = std::cell::Cell::new(false);
    let mut child = || -> isize {
        let mut report = File::from(err_w.try_clone().expect("dup the error pipe"));
        match container_init(launch, joined.get(), &go_r, &init_binary, &etc, &err_w) {
            Ok(never) => match never {},
            Err((code, message)) => {
                let _ = report.write_all(format!("{code} {message}").as_bytes());
                code as isize
            }
        }
    };
    // cgroup v2: the child starts in its cgroup (clone3's CLONE_INTO_CGROUP), with no
    // write to `cgroup.procs` and none of the lock that write takes. The v2 cgroup is the
    // directory of the one `cgroup.procs` the launch would have the child join.
    let v2_cgroup = match launch.cgroup_join.as_slice() {
        [procs] if procs.ends_with("cgroup.procs") && clone3_allowed() => procs.parent(),
        _ => None,
    };
    joined.set(true);
    let cloned = match v2_cgroup {
        Some(dir) => clone3_into(flags, dir, &mut child)
            .map_err(|e| host("create the container in its cgroup")(e))?,
        None => None,
    };
    let (pid, pidfd) = match cloned {
        Some(cloned) => cloned,
        None => {
            joined.set(false);
            let mut stack = vec![0u8; 1 << 20];
            // SAFETY: the child runs `container_init` on its own stack in a copy of this
            // address space (no CLONE_VM); this process is single-threaded here, so the
            // copy is consistent.
            let pid = unsafe {
                nix::sched::clone(Box::new(&mut child), &mut stack, flags, Some(libc::SIGCHLD))
            }
            .map_err(|e| host("create the container's namespaces")(e.into()))?;
            // SAFETY: pidfd_open(2) with a pid we just created and no flags.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
            if pidfd < 0 {
                return Err(host("open a pidfd")(io::Error::last_os_error()));
            }
            // SAFETY: a new descriptor we own.
            (pid, unsafe { OwnedFd::from_raw_fd(pidfd as i32) })
        }
    };
    drop(err_w);
    drop(go_r);
    let started = Started {
        pid,
        pidfd,
        orphan: None,
    };
    if let Err(e) = before_start(pid) {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let _ = started.wait();
        return Err(host("connect the container to its network")(e));
    }
    File::from(go_w)
        .write_all(b"1")
        .map_err(host("start the container"))?;
    // The error pipe closes (EOF) when the command and the init have both exec'd.
    let mut msg = String::new();
    File::from(err_r)
        .read_to_string(&mut msg)
        .map_err(host("read the container's start-up status"))?;
    if !msg.is_empty() {
        let _ = started.wait();
        let (code, message) = msg.split_once(' ').unwrap_or(("125", &msg));
        let mut code = code.parse().unwrap_or(125);
        if code == 125 && out_of_space(message) {
            // The store's filesystem is full: berth's failure (1), not the container's.
            code = 1;
        }
        return Err(LaunchError::Container {
            message: message.to_string(),
            code,
        });
    }
    Ok(started)
}

impl Started {
    /// A child of this process, started some other way (`exec`).
    pub fn adopt(pid: Pid) -> io::Result<Started> {
        // SAFETY: pidfd_open(2) with a pid of our own child and no flags.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        Ok(Started {
            pid,
            pidfd,
            orphan: None,
        })
    }

    /// The init of a container whose supervisor died: `pid`, if it is still the process
    /// that started at `start` (clock ticks since boot). Its exit code is read from
    /// `status`, the file [`Handover::status`] names; it is not our child.
    pub fn adopt_orphan(pid: Pid, start: u64, status: PathBuf) -> io::Result<Started> {
        // SAFETY: pidfd_open(2) with no flags; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        // Checked after opening: the pidfd now pins the process, so a reused pid is caught.
        if super::container::process_start_time(pid.as_raw()) != Some(start) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(Started {
            pid,
            pidfd,
            orphan: Some(status),
        })
    }

    /// A copy of descriptor `fd` of the init (`pidfd_getfd`), close-on-exec.
    pub fn take_fd(&self, fd: RawFd) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd(2) on our pidfd with no flags; the result is checked.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.pidfd.as_raw_fd(), fd, 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own (pidfd_getfd sets close-on-exec).
        Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
    }

    /// A pidfd of the container's init: readable once it has exited.
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Collects the exit status of an init that has exited (128+n for signal n); `None`
    /// for an adopted init that died without saying (killed with SIGKILL).
    pub fn reap(&self) -> io::Result<Option<i32>> {
        if let Some(status) = &self.orphan {
            return Ok(orphan_exit_code(self.pid.as_raw(), status));
        }
        self.reap_child().map(Some)
    }

    fn reap_child(&self) -> io::Result<i32> {
        match nix::sys::wait::waitpid(self.pid, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => Ok(code),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => Ok(128 + sig as i32),
            Ok(other) => Err(io::Error::other(format!(
                "unexpected wait status {other:?}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for the container to exit, forwarding SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1
    /// and SIGUSR2 received meanwhile to it. Returns the exit code (128+n for signal n).
    pub fn wait(&self) -> io::Result<i32> {
        self.wait_with_tty(None)
    }

    /// [`Started::wait`], also passing window-size changes of berth's terminal on to the
    /// container's pty (`master`).
    pub fn wait_with_tty(&self, master: Option<&OwnedFd>) -> io::Result<i32> {
        use nix::sys::signalfd::SignalFd;
        let mut forward = SigSet::empty();
        for s in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGWINCH,
        ] {
            forward.add(s);
        }
        let old = forward
            .thread_swap_mask(SigmaskHow::SIG_BLOCK)
            .map_err(io::Error::from)?;
        let sfd = SignalFd::new(&forward).map_err(io::Error::from)?;
        let result = loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: std::os::fd::AsFd::as_fd(&sfd).as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two valid descriptors in a local array.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(e);
            }
            if fds[1].revents != 0
                && let Ok(Some(info)) = sfd.read_signal()
                && let Ok(sig) = Signal::try_from(info.ssi_signo as i32)
            {
                match (sig, master) {
                    (Signal::SIGWINCH, Some(m)) => copy_window_size(m),
                    (Signal::SIGWINCH, None) => {}
                    _ => {
                        let _ = nix::sys::signal::kill(self.pid, sig);
                    }
                }
            }
            if fds[0].revents != 0 {
                break self.reap_child();
            }
        };
        let _ = old.thread_set_mask();
        result
    }
}

/// Sets the pty's window size to berth's terminal's.
/// Whether a failure the container's set-up reported came from a full disk (ENOSPC,
/// EDQUOT, as `std::io::Error` or nix's `Errno` print them).
fn out_of_space(message: &str) -> bool {
    ["(os error 28)", "(os error 122)", "ENOSPC", "EDQUOT"]
        .iter()
        .any(|m| message.contains(m))
}

/// The exit code of an init that is not our child: what it wrote into `status`, else
/// what the kernel still shows of it while it is a zombie (field 52 of `/proc/PID/stat`).
pub fn orphan_exit_code(pid: i32, status: &Path) -> Option<i32> {
    if let Ok(text) = std::fs::read_to_string(status)
        && let Ok(code) = text.trim().parse()
    {
        return Some(code);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    if rest.split(' ').next()? != "Z" {
        return None;
    }
    let raw: i32 = rest.split(' ').nth(49)?.trim().parse().ok()?;
    Some(if raw & 0x7f == 0 {
        (raw >> 8) & 0xff
    } else {
        128 + (raw & 0x7f)
    })
}

fn copy_window_size(master: &OwnedFd) {
    let mut ws = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ/TIOCSWINSZ with a winsize struct we own.
    unsafe {
        if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
        }
    }
}

type Fail = (i32, String);

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> Fail + '_ {
    move |e| (125, format!("{what}: {e}"))
}

fn mount(
    fstype: Option<&str>,
    source: Option<&str>,
    dest: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Fail> {
    let op = super::mount::mount_op(fstype, source, dest, flags, data);
    super::mount::perform(&LinuxSyscall, &[op]).map_err(|e| (125, e.to_string()))
}

/// The container's PID 1 before it becomes the init. It forks the command's process, then
/// re-executes berth from the sealed copy as the init *while the host's root is still its
/// root* (berth is dynamically linked; the container has no loader for it). The command's
/// process waits for that exec, then sets everything up, pivots into the container's root
/// (which moves the init's root too: they share the mount namespace) and execs the command.
/// Returns only on failure.
fn container_init(
    l: &Launch,
    joined: bool,
    go: &OwnedFd,
    init_binary: &OwnedFd,
    etc: &[(Vec<u8>, &'static str)],
    err_w: &OwnedFd,
) -> Result<std::convert::Infallible, Fail> {
    if l.die_with_parent {
        // SAFETY: prctl with integer arguments only. Should the parent be gone already,
        // the read below sees EOF and we give up.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    }
    // Wait until the host has done its part (a bridge's veth), then move into our cgroup
    // ourselves (see `self_join_files`) and make it the root of a new cgroup namespace.
    let mut byte = [0u8; 1];
    File::from(go.try_clone().map_err(fail("dup"))?)
        .read_exact(&mut byte)
        .map_err(fail("wait for the host"))?;
    if !joined {
        for file in &l.cgroup_join {
            std::fs::write(file, "0").map_err(|e| {
                (
                    125,
                    format!("join the container's cgroup: write {}: {e}", file.display()),
                )
            })?;
        }
    }
    if Path::new("/proc/self/ns/cgroup").exists() {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| fail("create the cgroup namespace")(io::Error::from(e)))?;
    }
    // Every signal blocked from here: the init inherits the mask and reads them from a
    // signalfd; the command restores the original mask before exec.
    let old_mask = SigSet::all()
        .thread_swap_mask(SigmaskHow::SIG_SETMASK)
        .map_err(fail("block signals"))?;
    let (exec_r, exec_w) = pipe().map_err(fail("create a pipe"))?;
    // SAFETY: single-threaded process; the child only calls functions that are fine after
    // fork (no locks held by other threads exist).
    match unsafe { nix::unistd::fork() }.map_err(fail("fork the command"))? {
        nix::unistd::ForkResult::Child => {
            drop(exec_w);
            // The init writes a byte once it runs (its libraries loaded from the host's root);
            // EOF means it failed.
            if File::from(exec_r).read(&mut byte).unwrap_or(0) != 1 {
                std::process::exit(125);
            }
            let (code, msg) = match setup(l, etc).and_then(|()| exec_command(&l.process, &old_mask))
            {
                Ok(never) => match never {},
                Err(failure) => failure,
            };
            if let Ok(fd) = err_w.try_clone() {
                let _ = File::from(fd).write_all(format!("{code} {msg}").as_bytes());
            }
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(exec_r);
            let c = &l.process.capabilities;
            caps::drop_bounding(c).map_err(fail("drop capabilities"))?;
            caps::set_capabilities(c).map_err(fail("set capabilities"))?;
            caps::set_no_new_privs().map_err(fail("set no_new_privs"))?;
            // The ready pipe must survive the exec: the init writes to it once it runs. So
            // must what the supervisor hands over (the command's process closes them all).
            // Nothing else of the caller's passes to the init (a shell's or CI runner's
            // stray descriptors would otherwise live as long as the container).
            caps::cloexec_from_3().map_err(fail("close inherited descriptors"))?;
            let handover = l.handover.clone().unwrap_or_default();
            for fd in [exec_w.as_raw_fd()]
                .into_iter()
                .chain(handover.held.iter().copied())
                .chain(handover.status)
            {
                // SAFETY: fcntl on a descriptor of this process.
                if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                    return Err(fail("pass descriptors to the init")(
                        io::Error::last_os_error(),
                    ));
                }
            }
            let mut argv = vec![
                CString::new("berth-init").expect("static"),
                CString::new("__init").expect("static"),
                CString::new(child.as_raw().to_string()).expect("digits"),
                CString::new(exec_w.as_raw_fd().to_string()).expect("digits"),
            ];
            if let Some(fd) = handover.status {
                argv.push(CString::new(fd.to_string()).expect("digits"));
            }
            let env: [CString; 0] = [];
            // The init runs under the same filter as the command: a process of the
            // container that may ptrace (--cap-add SYS_PTRACE) cannot use PID 1 to make
            // the calls the filter denies it.
            super::seccomp::install().map_err(fail("install the seccomp filter"))?;
            let e = nix::unistd::fexecve(init_binary, &argv, &env).unwrap_err();
            drop(exec_w);
            Err((125, format!("start the container's init: {e}")))
        }
    }
}

/// In the command's process: the root filesystem, `pivot_root`, `/proc`, `/dev`, `/sys`,
/// the `/etc` files, masked paths, host name, working directory, read-only root.
fn setup(l: &Launch, etc: &[(Vec<u8>, &'static str)]) -> Result<(), Fail> {
    // Sources of bind mounts are host paths: each is cloned as a detached mount
    // (open_tree) while the host's root is still ours, and attached after pivot_root
    // (move_mount), so no mount is ever made on a path resolved outside the container.
    let sources = l
        .mounts
        .iter()
        .map(|m| m.source.as_ref().map(|s| detached_bind(s)).transpose())
        .collect::<Result<Vec<Option<OwnedFd>>, Fail>>()?;
    if l.network != Network::Host {
        match &l.interface {
            Some(i) => i
                .configure()
                .map_err(fail("configure the container's network"))?,
            None => super::netlink::Netlink::open()
                .and_then(|mut nl| nl.up("lo"))
                .map_err(fail("bring up loopback"))?,
        }
    }
    mount(
        None,
        Some("none"),
        "/",
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    match &l.overlay {
        Some(m) => LinuxSyscall.mount(m).map_err(|e| (125, e.to_string()))?,
        None => {
            let root = l
                .rootfs
                .to_str()
                .ok_or((125, "the root path is not UTF-8".to_string()))?;
            mount(
                None,
                Some(root),
                root,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
        }
    }
    // The new root, then inside it the kernel's filesystems, the /etc files (their
    // contents read on the host side), Docker's masked and read-only paths and the user's
    // mounts: one plan (see `mount::kernel_filesystems`, `etc_files`, `hidden_paths`,
    // `user_mounts`, tested without root) applied through the seam.
    // In a user namespace, procfs, sysfs and the device nodes are made now, while the
    // host's are in sight (see `mount::Detached`), and attached after pivot_root.
    let held = if super::rootless::active() {
        Some(rootless_mounts(l.network == Network::Host)?)
    } else {
        None
    };
    let detached_fds = held
        .as_ref()
        .map(|(proc, sys, devices)| super::mount::Detached {
            proc: proc.as_raw_fd(),
            sys: sys.as_ref().map(AsRawFd::as_raw_fd),
            devices: devices.iter().map(AsRawFd::as_raw_fd).collect(),
            tty_group: !super::rootless::single_id(),
        });
    let user_mounts = l
        .mounts
        .iter()
        .zip(&sources)
        .map(|(m, source)| {
            let source = source
                .as_ref()
                .map(|fd| {
                    nix::sys::stat::fstat(fd)
                        .map(|st| (fd.as_raw_fd(), st.st_mode & libc::S_IFMT == libc::S_IFDIR))
                        .map_err(fail("stat a bind mount source"))
                })
                .transpose()?;
            Ok(super::mount::UserMount {
                target: &m.target,
                source,
                read_only: m.read_only,
                seed: m.seed,
                tmpfs_size: m.tmpfs_size,
            })
        })
        .collect::<Result<Vec<_>, Fail>>()?;
    let mut ops = vec![Op::PivotRoot(l.rootfs.clone())];
    ops.extend(super::mount::kernel_filesystems(
        l.network == Network::Host,
        l.cgroupfs.as_ref(),
        detached_fds.as_ref(),
    ));
    ops.extend(super::mount::etc_files(etc));
    ops.extend(super::mount::hidden_paths());
    ops.extend(super::mount::user_mounts(&user_mounts));
    super::mount::perform(&LinuxSyscall, &ops).map_err(|e| (125, e.to_string()))?;
    // Secrets go to the command's user, whose name is resolved in the container's own
    // /etc/passwd (as the user's mounts left it); then the host name.
    let mut ops = Vec::new();
    if !l.secret_files.is_empty() {
        let user =
            super::users::resolve_user(Path::new("/"), &l.process.user).map_err(|e| (125, e))?;
        ops = super::mount::secret_files(&l.secret_files, user.uid, user.gid);
    }
    ops.push(Op::Hostname(l.hostname.clone()));
    super::mount::perform(&LinuxSyscall, &ops).map_err(|e| (125, e.to_string()))?;
    // The working directory, created if missing (Docker does), before privileges drop.
    let cwd = &l.process.cwd;
    if std::fs::symlink_metadata(cwd).is_err() {
        std::fs::create_dir_all(cwd)
            .map_err(|e| (125, format!("create the working directory {cwd}: {e}")))?;
    }
    if l.read_only {
        mount(
            None,
            None,
            "/",
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// The detached procfs, sysfs (not with the host's network) and device nodes of a
/// container in a user namespace.
type RootlessMounts = (OwnedFd, Option<OwnedFd>, Vec<OwnedFd>);

fn rootless_mounts(host_network: bool) -> Result<RootlessMounts, Fail> {
    use super::mount::{
        MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY, fs_context,
        fs_mount,
    };
    let safe = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
    let new = |fstype: &std::ffi::CStr, attrs| {
        fs_context(fstype).and_then(|fs| fs_mount(&fs, attrs)).map_err(|e| {
            (
                125,
                format!(
                    "mount {} in the user namespace: {e}{}",
                    fstype.to_string_lossy(),
                    if e.raw_os_error() == Some(libc::EPERM) {
                        " (the kernel allows it only where the host's is fully visible: is part of the host's /proc or /sys covered by another mount?)"
                    } else {
                        ""
                    }
                ),
            )
        })
    };
    let proc = new(c"proc", safe)?;
    let sys = if host_network {
        None
    } else {
        Some(new(c"sysfs", safe | MOUNT_ATTR_RDONLY)?)
    };
    let devices = super::mount::DEVICES
        .iter()
        .map(|(name, _, _)| detached(Path::new(&format!("/dev/{name}")), false))
        .collect::<Result<Vec<OwnedFd>, Fail>>()?;
    Ok((proc, sys, devices))
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// A detached copy of the mount tree at host path `source` (open_tree(2) with
/// `OPEN_TREE_CLONE`), to be attached inside the container later.
fn detached_bind(source: &Path) -> Result<OwnedFd, Fail> {
    detached(source, true)
}

/// A detached copy of the mount at `source`, with the mounts below it when `recursive`.
fn detached(source: &Path, recursive: bool) -> Result<OwnedFd, Fail> {
    let path = CString::new(source.as_os_str().as_bytes()).map_err(fail("bind source"))?;
    // SAFETY: open_tree(2) with a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE
                | if recursive { AT_RECURSIVE } else { 0 }
                | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err((
            125,
            format!(
                "bind mount source {}: {}",
                source.display(),
                io::Error::last_os_error()
            ),
        ));
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Copies the image's content at `from` (a path in the container) into an empty volume
/// directory `to`: directories, regular files and symlinks (as links, never followed), with
/// modes and owners.
pub(crate) fn seed(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(from) {
        Ok(md) if md.is_dir() => {}
        _ => return Ok(()),
    }
    if std::fs::read_dir(to)?.next().is_some() {
        return Ok(());
    }
    copy_tree(from, to)
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let md = std::fs::symlink_metadata(&src)?;
        let ft = md.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&dst)?;
            copy_tree(&src, &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if ft.is_file() {
            io::copy(
                &mut File::open(&src)?,
                &mut std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dst)?,
            )?;
        } else {
            continue;
        }
        std::os::unix::fs::lchown(&dst, Some(md.uid()), Some(md.gid()))?;
        if !ft.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
        }
    }
    Ok(())
}

/// Runs `process` from inside a container's namespaces (`exec`); returns only on failure,
/// with Docker's exit code and a message.
pub fn exec_in_container(
    process: &Process,
    old_mask: &SigSet,
) -> Result<std::convert::Infallible, (i32, String)> {
    exec_command(process, old_mask)
}

/// In the command's process: user, capabilities, no_new_privs, descriptors, working
/// directory, signals, then exec.
fn exec_command(l: &Process, old_mask: &SigSet) -> Result<std::convert::Infallible, Fail> {
    nix::unistd::setsid().map_err(fail("setsid"))?;
    caps::drop_bounding(&l.capabilities).map_err(fail("drop capabilities"))?;
    // After pivot_root, "/" is the container's root: its passwd and group are read there.
    let user = super::users::resolve_user(Path::new("/"), &l.user).map_err(|e| (125, e))?;
    let (uid, gid) = (user.uid, user.gid);
    let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    // A single-id user namespace denies setgroups (see `rootless`): the groups stay.
    let unmapped = |what: &'static str, id: u32| {
        move |e: nix::errno::Errno| -> Fail {
            if e == nix::errno::Errno::EINVAL && super::rootless::active() {
                (
                    125,
                    format!(
                        "{what} {id}: this user namespace does not map that id; give your user subordinate ids in /etc/subuid and /etc/subgid (Debian's `uidmap` package; see the README's \"Without root\")"
                    ),
                )
            } else {
                fail(what)(e)
            }
        }
    };
    if !super::rootless::single_id() {
        let first = groups.first().map_or(gid, |g| g.as_raw());
        nix::unistd::setgroups(&groups).map_err(unmapped("setgroups: group", first))?;
    }
    nix::unistd::setgid(Gid::from_raw(gid)).map_err(unmapped("setgid", gid))?;
    nix::unistd::setuid(Uid::from_raw(uid)).map_err(unmapped("setuid", uid))?;
    if uid == 0 {
        caps::set_capabilities(&l.capabilities).map_err(fail("set capabilities"))?;
    }
    caps::set_no_new_privs().map_err(fail("set no_new_privs"))?;
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    caps::cloexec_from_3().map_err(fail("close inherited descriptors"))?;
    if let Some(tty) = l.tty {
        // SAFETY: TIOCSCTTY and dup2 on a descriptor inherited from the host side.
        unsafe {
            if libc::ioctl(tty, libc::TIOCSCTTY, 0) != 0 {
                return Err((
                    125,
                    format!(
                        "set the controlling terminal: {}",
                        io::Error::last_os_error()
                    ),
                ));
            }
            for std_fd in 0..3 {
                if libc::dup2(tty, std_fd) < 0 {
                    return Err((
                        125,
                        format!("attach the terminal: {}", io::Error::last_os_error()),
                    ));
                }
            }
        }
    } else if let Some(fds) = l.stdio {
        for (std_fd, fd) in fds.into_iter().enumerate() {
            // SAFETY: dup2 of a descriptor inherited from the host side onto stdio.
            if unsafe { libc::dup2(fd, std_fd as i32) } < 0 {
                return Err((125, format!("attach stdio: {}", io::Error::last_os_error())));
            }
        }
    } else if !l.stdin {
        let null = File::open("/dev/null").map_err(fail("open /dev/null"))?;
        // SAFETY: dup2 onto standard input.
        if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
            return Err((125, format!("detach stdin: {}", io::Error::last_os_error())));
        }
    }
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(fail("read limits"))?;
    let nofile = NOFILE.min(hard);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, nofile, nofile)
        .map_err(fail("set the open-file limit"))?;
    if l.stdout_to_stderr {
        // SAFETY: dup2 on the standard descriptors.
        if unsafe { libc::dup2(2, 1) } < 0 {
            return Err((
                125,
                format!("redirect stdout: {}", io::Error::last_os_error()),
            ));
        }
    }
    nix::unistd::chdir(l.cwd.as_str()).map_err(|e| (125, format!("chdir {}: {e}", l.cwd)))?;
    // Default dispositions and the original mask for the program.
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: resetting a disposition to the default handler.
            let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
        }
    }
    old_mask
        .thread_set_mask()
        .map_err(fail("restore the signal mask"))?;

    let program = l.args.first().ok_or((125, "no command".to_string()))?;
    let path = resolve_program(program, &l.env)?;
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(fail("command"))?;
    let argv: Vec<CString> = l
        .args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(fail("argument"))?;
    // HOME from the user's passwd entry when the image and the caller set none, as Docker.
    let home =
        (!l.env.iter().any(|e| e.starts_with("HOME="))).then(|| format!("HOME={}", user.home));
    let envp: Vec<CString> = l
        .env
        .iter()
        .chain(home.as_ref())
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(fail("environment"))?;
    // Last: from here on the filter applies.
    super::seccomp::install().map_err(fail("install the seccomp filter"))?;
    let e = nix::unistd::execve(&cpath, &argv, &envp).unwrap_err();
    let code = if e == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    };
    Err((code, format!("exec {program:?}: {e}")))
}

/// Finds a program: as given when it has a `/`, else in the container's `PATH`.
fn resolve_program(program: &str, env: &[String]) -> Result<PathBuf, Fail> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(OsStr::new(program));
        if nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok()
            && candidate.is_file()
        {
            return Ok(candidate);
        }
    }
    Err((
        127,
        format!("exec {program:?}: executable file not found in $PATH"),
    ))
}
