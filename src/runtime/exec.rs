//! `berth exec`: a new process in a running container. It joins the container's cgroup and
//! every namespace of its init (cgroup, IPC, UTS, network, PID, mount — the mount namespace
//! last, which also makes the container's root its root), then runs as a container process
//! does: the container's user and capabilities, no_new_privs, seccomp, no inherited
//! descriptors.
//!
//! The joining process is a copy of berth until it execs, so it first makes itself
//! non-dumpable: nothing in the container can ptrace it or open its `/proc/PID/exe` (the
//! host's binary) in that window.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use nix::sched::CloneFlags;
use nix::sys::signal::SigSet;
use nix::unistd::Pid;

use super::cgroup::Cgroup;
use super::process::{LaunchError, Process, Started};

/// Runs `process` in the container whose init is `pid`, in cgroup `cgroup`.
pub fn exec(pid: i32, cgroup: &Cgroup, process: &Process) -> Result<Started, LaunchError> {
    let host = |what: &'static str| move |source: io::Error| LaunchError::Host { what, source };
    let namespaces = ["cgroup", "ipc", "uts", "net", "pid", "mnt"]
        .iter()
        .filter_map(|ns| {
            let path = format!("/proc/{pid}/ns/{ns}");
            std::path::Path::new(&format!("/proc/self/ns/{ns}"))
                .exists()
                .then(|| File::open(&path).map(OwnedFd::from))
        })
        .collect::<io::Result<Vec<OwnedFd>>>()
        .map_err(host("open the container's namespaces"))?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| host("create a pipe")(e.into()))?;
    let (pid_r, pid_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| host("create a pipe")(e.into()))?;
    let mask = SigSet::thread_get_mask().map_err(|e| host("read the signal mask")(e.into()))?;
    crate::background::settle();
    // SAFETY: berth is single-threaded when it execs into a container (settled above).
    match unsafe { nix::unistd::fork() }.map_err(|e| host("fork")(e.into()))? {
        nix::unistd::ForkResult::Child => {
            drop(err_r);
            drop(pid_r);
            let fail = |code: i32, msg: String| -> ! {
                let _ = File::from(err_w.try_clone().expect("dup"))
                    .write_all(format!("{code} {msg}").as_bytes());
                // SAFETY: leaving the forked child without running destructors.
                unsafe { libc::_exit(code) }
            };
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
            if let Err(e) = cgroup.join_self() {
                fail(125, format!("join the container's cgroup: {e}"));
            }
            for ns in &namespaces {
                if let Err(e) = nix::sched::setns(ns, CloneFlags::empty()) {
                    fail(125, format!("join the container's namespaces: {e}"));
                }
            }
            drop(namespaces);
            // A new PID namespace applies to children: the command is one, made a child of
            // berth itself (CLONE_PARENT) so berth can wait for it directly.
            let mut stack = vec![0u8; 1 << 20];
            let child = Box::new(|| -> isize {
                match super::process::exec_in_container(process, &mask) {
                    Ok(never) => match never {},
                    Err((code, msg)) => {
                        let _ = File::from(err_w.try_clone().expect("dup"))
                            .write_all(format!("{code} {msg}").as_bytes());
                        code as isize
                    }
                }
            });
            // SAFETY: the child runs in a copy of this single-threaded address space.
            let grandchild = unsafe {
                nix::sched::clone(
                    child,
                    &mut stack,
                    CloneFlags::CLONE_PARENT,
                    Some(libc::SIGCHLD),
                )
            };
            match grandchild {
                Ok(p) => {
                    let _ = File::from(pid_w).write_all(p.as_raw().to_string().as_bytes());
                    // SAFETY: leaving the forked child.
                    unsafe { libc::_exit(0) }
                }
                Err(e) => fail(125, format!("start the process in the container: {e}")),
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(err_w);
            drop(pid_w);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut pid_text = String::new();
            let _ = File::from(pid_r).read_to_string(&mut pid_text);
            let mut msg = String::new();
            // EOF once the command has exec'd (the pipe is close-on-exec) or failed.
            File::from(err_r)
                .read_to_string(&mut msg)
                .map_err(host("read the process's start-up status"))?;
            let command = pid_text.trim().parse::<i32>().ok().map(Pid::from_raw);
            if !msg.is_empty() {
                if let Some(p) = command {
                    let _ = nix::sys::wait::waitpid(p, None);
                }
                let (code, message) = msg.split_once(' ').unwrap_or(("125", &msg));
                return Err(LaunchError::Container {
                    message: message.to_string(),
                    code: code.parse().unwrap_or(125),
                });
            }
            let command = command.ok_or_else(|| LaunchError::Container {
                message: "the process did not start".into(),
                code: 125,
            })?;
            Started::adopt(command).map_err(host("open a pidfd"))
        }
    }
}
