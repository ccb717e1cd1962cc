//! Starting one of berth's own long-lived helpers (a container's supervisor, a service's
//! router): berth re-executed in a session of its own, its output in a log file, and a
//! pipe on which it says `ok` once it is ready — or why it could not start — before the
//! caller returns. The helper outlives the caller; a long-lived caller (the agent) reaps
//! it when it exits.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The variables a helper inherits: berth's settings, never credentials.
const PASSED: &[&str] = &[
    "BERTH_LAYER_MAX_BYTES",
    "BERTH_LAYER_MAX_ENTRIES",
    "BERTH_DISK_RESERVE",
    "BERTH_LOW_SPEED_LIMIT",
    "BERTH_LOW_SPEED_TIME",
    "RUST_BACKTRACE",
    super::rootless::NETNS_ENV,
];

/// The `PATH` a helper gets.
const HELPER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `program` (as `arg0`) with `args` and the ready descriptor's number appended,
/// detached, logging to `log`. Returns once the helper reported: `Ok` for `ok`, else
/// what it said (empty if it exited without a word).
pub fn spawn(
    program: &Path,
    arg0: &str,
    args: &[&OsStr],
    log: &Path,
) -> io::Result<Result<(), String>> {
    use std::os::unix::process::CommandExt;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let log = super::logs::open_append(log)?;
    let w_fd = w.as_raw_fd();
    let mut cmd = std::process::Command::new(program);
    // Only what a helper needs: never the caller's environment, which may hold secrets
    // (registry passwords, `[secrets]` variables) that would show in /proc/PID/environ;
    // berth's own settings (limits) pass, so a helper unpacks under the caller's limits.
    cmd.arg0(arg0).env_clear().env("PATH", HELPER_PATH);
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| PASSED.contains(&k)) {
            cmd.env(k, v);
        }
    }
    cmd.args(args)
        .arg(w_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The caller's stray descriptors (a shell's, a CI runner's pipes) must not live
            // on in a helper that outlives it: one would keep the runner waiting for EOF.
            // (close_range is async-signal-safe; before Linux 5.11 they are inherited.)
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if libc::setsid() < 0 || libc::fcntl(w_fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(w);
    let mut status = String::new();
    File::from(r).read_to_string(&mut status)?;
    std::thread::spawn(move || child.wait());
    let status = status.trim_end();
    Ok(if status == "ok" {
        Ok(())
    } else {
        Err(status.to_string())
    })
}
