//! `berth exec --env E SERVICE`: a command in one replica of an environment's live release,
//! run on its host. The host runs it as `berth exec` does locally — a child `berth exec`
//! against its own store, with pipes, or a pty of its own with `-t` — and bridges that
//! child's stdio to a framed stream ([`super::frames`]): an agent's upgraded connection, or
//! an in-process pipe for `hosts = ["local"]`. Nothing goes through a shell on the host.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::api::ExecRequest;
use super::frames::{self, Frame};
use crate::runtime::container::{Containers, Status};
use crate::store::Store;

/// The container of `service`'s replica `replica` (1-based; the first that runs without
/// one) in the live release of `deployment` on this host.
pub fn target(
    store: &Store,
    deployment: &str,
    service: &str,
    replica: Option<usize>,
) -> Result<String, String> {
    let live = super::local::current(store, deployment)
        .ok_or_else(|| format!("{deployment} runs no release here"))?;
    let ids = live.replicas.get(service).ok_or_else(|| {
        let names: Vec<&str> = live.replicas.keys().map(String::as_str).collect();
        format!(
            "{deployment} has no service `{service}` (its services: {})",
            names.join(", ")
        )
    })?;
    let containers = Containers::new(store).map_err(|e| e.to_string())?;
    let running = |id: &String| {
        containers
            .get(id)
            .is_ok_and(|c| c.status == Status::Running)
    };
    match replica {
        Some(n) => {
            let id = ids.get(n - 1).ok_or_else(|| {
                format!(
                    "{service} has {} replica(s) on this host, not {n}",
                    ids.len()
                )
            })?;
            if !running(id) {
                return Err(format!("{service} replica {n} is not running"));
            }
            Ok(id.clone())
        }
        None => ids
            .iter()
            .find(|id| running(id))
            .cloned()
            .ok_or_else(|| format!("no replica of {service} runs here")),
    }
}

/// Runs `req` in container `id` of the store at `store_dir` (through `program`'s `exec`),
/// its stdio framed on `io`, until it exits; the exit code is the last frame.
pub async fn serve(
    program: &Path,
    store_dir: &Path,
    req: &ExecRequest,
    id: &str,
    io: impl AsyncRead + AsyncWrite + Send + 'static,
) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(32);
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if frames::write(&mut wr, &f).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let result = run(program, store_dir, req, id, &mut rd, out_tx.clone()).await;
    let last = match result {
        Ok(code) => Frame::Exit(code),
        Err(e) => Frame::Error(e),
    };
    let _ = out_tx.send(last).await;
    drop(out_tx);
    let _ = writer.await;
}

fn command(
    program: &Path,
    store_dir: &Path,
    req: &ExecRequest,
    id: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    // Only what `exec` needs: never the agent's environment.
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .arg("--store")
        .arg(store_dir)
        .arg("exec");
    if req.interactive {
        cmd.arg("-i");
    }
    if req.tty {
        cmd.arg("-t");
    }
    for kv in &req.env {
        cmd.arg("-e").arg(kv);
    }
    if let Some(u) = &req.user {
        cmd.arg("-u").arg(u);
    }
    if let Some(w) = &req.workdir {
        cmd.arg("-w").arg(w);
    }
    cmd.arg(id).arg("--").args(&req.command);
    cmd.kill_on_drop(true);
    cmd
}

async fn run(
    program: &Path,
    store_dir: &Path,
    req: &ExecRequest,
    id: &str,
    rd: &mut (impl AsyncRead + Unpin),
    out: mpsc::Sender<Frame>,
) -> Result<i32, String> {
    let mut cmd = command(program, store_dir, req, id);
    let master = if req.tty {
        let size = req.size.map(|(rows, cols)| nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let p = nix::pty::openpty(size.as_ref(), None).map_err(|e| format!("openpty: {e}"))?;
        for fd in [&p.master, &p.slave] {
            // SAFETY: fcntl on descriptors we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let slave = p.slave;
        cmd.stdin(Stdio::from(slave.try_clone().map_err(|e| e.to_string())?))
            .stdout(Stdio::from(slave.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Some(p.master)
    } else {
        cmd.stdin(if req.interactive {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        None
    };
    let mut child = cmd.spawn().map_err(|e| format!("cannot start exec: {e}"))?;
    // Drop our copies of the slave (held by `cmd`): the master reads EOF when the child is done.
    drop(cmd);
    let mut producers = Vec::new();
    let mut stdin: Option<Box<dyn std::io::Write + Send>> = None;
    match &master {
        Some(m) => {
            producers.push(read_blocking(m, out.clone(), Frame::Stdout)?);
            if req.interactive {
                stdin = Some(Box::new(std::fs::File::from(
                    m.try_clone().map_err(|e| e.to_string())?,
                )));
            }
        }
        None => {
            if let Some(o) = child.stdout.take() {
                producers.push(tokio::spawn(forward(o, out.clone(), Frame::Stdout)));
            }
            if let Some(e) = child.stderr.take() {
                producers.push(tokio::spawn(forward(e, out.clone(), Frame::Stderr)));
            }
        }
    }
    let mut child_stdin = child.stdin.take();
    let master_fd = master.as_ref().map(AsRawFd::as_raw_fd);
    // Input until the command exits: stdin bytes, its end, window sizes.
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(|e| e.to_string())?,
            frame = frames::read(rd) => match frame {
                Ok(Some(Frame::Stdin(bytes))) => {
                    if let Some(s) = child_stdin.as_mut() {
                        let _ = s.write_all(&bytes).await;
                    } else if let Some(s) = stdin.as_mut() {
                        let _ = s.write_all(&bytes);
                    }
                }
                Ok(Some(Frame::StdinClosed)) => {
                    child_stdin = None;
                    if let Some(mut s) = stdin.take() {
                        // A terminal's end of input: Ctrl-D.
                        let _ = s.write_all(&[4]);
                    }
                }
                Ok(Some(Frame::Resize(rows, cols))) => {
                    if let Some(fd) = master_fd {
                        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
                        // SAFETY: TIOCSWINSZ with a winsize we own, on our pty master.
                        unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
                    }
                }
                Ok(Some(_)) => {}
                // The client went away: the command goes too.
                Ok(None) | Err(_) => {
                    let _ = child.kill().await;
                    return Err("the client went away".into());
                }
            },
        }
    };
    drop(child_stdin);
    drop(stdin);
    for p in producers {
        let _ = p.await;
    }
    Ok(status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    }))
}

/// Forwards an output pipe as frames until its end.
async fn forward(
    mut r: impl AsyncRead + Unpin,
    out: mpsc::Sender<Frame>,
    wrap: fn(Vec<u8>) -> Frame,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.send(wrap(buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Forwards a pty master's output (read in a blocking thread) until it closes.
fn read_blocking(
    master: &OwnedFd,
    out: mpsc::Sender<Frame>,
    wrap: fn(Vec<u8>) -> Frame,
) -> Result<tokio::task::JoinHandle<()>, String> {
    use std::io::Read;
    let mut f = std::fs::File::from(master.try_clone().map_err(|e| e.to_string())?);
    Ok(tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 32 * 1024];
        // EIO once the last slave descriptor is closed: the command is done.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 || out.blocking_send(wrap(buf[..n].to_vec())).is_err() {
                break;
            }
        }
    }))
}
