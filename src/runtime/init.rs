//! The container's init (PID 1): forwards signals to the command and reaps every child, as
//! tini does, then exits with the command's status. Runs from a sealed in-memory copy of
//! berth (see [`super::process`]) and is not dumpable, so nothing in the container can
//! ptrace it or reach the host's binary through it.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::os::fd::FromRawFd;

/// Reaps children without blocking; returns the command's exit code once it has exited.
fn reap(command: Pid) -> Option<i32> {
    let mut code = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, c)) if pid == command => code = Some(c),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == command => {
                code = Some(128 + sig as i32)
            }
            Ok(WaitStatus::StillAlive) => return code,
            Ok(_) => {}
            Err(_) => return code.or(Some(0)),
        }
    }
}

/// Runs the init loop for `command` (a child of this process) and exits with its status.
/// `ready` is a descriptor to write one byte to once running: the command's process waits
/// for it before it moves the root away. With `status`, the exit code is written there in
/// decimal before the init exits (for a supervisor that adopted the container).
pub fn run(command: i32, ready: i32, status: Option<i32>) -> ! {
    let command = Pid::from_raw(command);
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // SAFETY: `ready` was passed by the process that exec'd us and is ours to close.
    let mut ready = unsafe { std::fs::File::from_raw_fd(ready) };
    let _ = std::io::Write::write_all(&mut ready, b"1");
    drop(ready);
    // Every signal was blocked before exec; read them all from a signalfd.
    let sfd = SignalFd::new(&SigSet::all()).unwrap_or_else(|_| std::process::exit(125));
    loop {
        if let Some(code) = reap(command) {
            if let Some(fd) = status {
                // SAFETY: the descriptor was passed to us for this and is ours.
                let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
                let _ = std::io::Write::write_all(&mut f, format!("{code}\n").as_bytes());
            }
            std::process::exit(code);
        }
        if let Ok(Some(info)) = sfd.read_signal()
            && let Ok(sig) = Signal::try_from(info.ssi_signo as i32)
            && sig != Signal::SIGCHLD
        {
            let _ = nix::sys::signal::kill(command, sig);
        }
    }
}
