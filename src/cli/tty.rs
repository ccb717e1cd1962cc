//! `berth run -t`: a pseudo-terminal for the container. The command gets the pty's slave as
//! its controlling terminal and stdio; berth puts its own terminal in raw mode (restored
//! after), copies bytes both ways, and passes on the window size, so Ctrl-C, line editing
//! and full-screen programs behave as in a local shell.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::termios::{self, SetArg, Termios};

/// A pty pair for one container.
pub struct Pty {
    /// berth's side.
    pub master: OwnedFd,
    /// The container's side.
    pub slave: OwnedFd,
}

impl Pty {
    /// Opens a pty sized like berth's own terminal (if it has one).
    pub fn open() -> io::Result<Pty> {
        let size = window_size(&io::stdin());
        let p = nix::pty::openpty(size.as_ref(), None).map_err(io::Error::from)?;
        for fd in [&p.master, &p.slave] {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(io::Error::from)?;
        }
        Ok(Pty {
            master: p.master,
            slave: p.slave,
        })
    }
}

pub fn window_size(fd: &impl AsFd) -> Option<nix::pty::Winsize> {
    let mut ws = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills a winsize struct we own.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0).then_some(ws)
}

/// berth's terminal in raw mode until dropped.
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Puts stdin in raw mode when it is a terminal.
    pub fn enter() -> RawMode {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return RawMode { saved: None };
        }
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(io::stdin(), SetArg::TCSANOW, saved);
        }
    }
}

/// Copies the container's output to stdout until the pty closes, and (with `input`) stdin to
/// the container, on threads of their own. Returns the output thread to join after exit.
pub fn pump(master: &OwnedFd, input: bool) -> io::Result<std::thread::JoinHandle<()>> {
    let mut from = File::from(master.try_clone()?);
    let out = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut stdout = io::stdout();
        // EIO once every slave descriptor is closed: the container has exited.
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
            {
                break;
            }
        }
    });
    if input {
        let mut to = File::from(master.try_clone()?);
        std::thread::spawn(move || {
            let _ = io::copy(&mut io::stdin(), &mut to);
        });
    }
    Ok(out)
}

/// berth's end of a started process's terminal (`-t`): its output pumped to ours, our
/// terminal raw while input goes through (`-i`). Without a pty, nothing.
pub struct Attached {
    master: Option<OwnedFd>,
    output: Option<std::thread::JoinHandle<()>>,
    raw: Option<RawMode>,
}

impl Attached {
    /// Attaches to `pty` now that the process holds its slave (ours is closed here, so the
    /// output reaches EOF when the process ends).
    pub fn new(pty: Option<Pty>, interactive: bool) -> io::Result<Attached> {
        let Some(p) = pty else {
            return Ok(Attached {
                master: None,
                output: None,
                raw: None,
            });
        };
        drop(p.slave);
        let output = pump(&p.master, interactive)?;
        Ok(Attached {
            master: Some(p.master),
            output: Some(output),
            raw: interactive.then(RawMode::enter),
        })
    }

    /// The pty's master, to pass window-size changes on.
    pub fn master(&self) -> Option<&OwnedFd> {
        self.master.as_ref()
    }

    /// Waits for the last output and restores our terminal.
    pub fn finish(mut self) {
        if let Some(o) = self.output.take() {
            let _ = o.join();
        }
        drop(self.raw.take());
    }
}
