//! The container's init (PID 1) as a tiny static program: no libc, no allocator, no
//! dynamic loader. `build.rs` compiles it on its own with rustc and berth embeds the bytes;
//! each container start writes them (a few kilobytes, not berth's megabytes) into a sealed
//! memfd and executes that, so `/proc/1/exe` is never the host's berth (CVE-2019-5736) and
//! the init runs the moment it is exec'd.
//!
//! It does what `runtime::init` does, as tini does: makes itself non-dumpable, reports
//! readiness on the descriptor it is given, then forwards every signal to the command and
//! reaps every child until the command exits, and exits with its status (128+n for signal
//! n). Arguments, as for berth's `__init`: `berth-init __init COMMAND_PID READY_FD
//! [STATUS_FD]`; with STATUS_FD it writes the exit code there, in decimal, before it exits,
//! for a supervisor that adopted the container and so cannot wait for it. Every signal is
//! already blocked when it starts.

#![no_std]
#![no_main]

use core::arch::asm;

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const CLOSE: usize = 3;
    pub const WAIT4: usize = 61;
    pub const KILL: usize = 62;
    pub const PRCTL: usize = 157;
    pub const EXIT_GROUP: usize = 231;
    pub const SIGNALFD4: usize = 289;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const READ: usize = 63;
    pub const WRITE: usize = 64;
    pub const CLOSE: usize = 57;
    pub const WAIT4: usize = 260;
    pub const KILL: usize = 129;
    pub const PRCTL: usize = 167;
    pub const EXIT_GROUP: usize = 94;
    pub const SIGNALFD4: usize = 74;
}

#[cfg(target_arch = "x86_64")]
unsafe fn syscall(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a, in("rsi") b,
             in("rdx") c, in("r10") d, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

#[cfg(target_arch = "aarch64")]
unsafe fn syscall(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    unsafe {
        asm!("svc 0", inlateout("x0") a as isize => ret, in("x1") b, in("x2") c, in("x3") d,
             in("x8") n, options(nostack));
    }
    ret
}

fn exit(code: i32) -> ! {
    unsafe { syscall(nr::EXIT_GROUP, code as usize, 0, 0, 0) };
    loop {}
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(125)
}

/// A decimal argument.
unsafe fn number(mut s: *const u8) -> Option<usize> {
    let mut n: usize = 0;
    let mut digits = 0;
    unsafe {
        while *s != 0 {
            let c = *s;
            if !c.is_ascii_digit() {
                return None;
            }
            n = n.checked_mul(10)?.checked_add((c - b'0') as usize)?;
            digits += 1;
            s = s.add(1);
        }
    }
    (digits > 0).then_some(n)
}

const WNOHANG: usize = 1;
const ECHILD: isize = 10;
const SIGCHLD: u32 = 17;
const PR_SET_DUMPABLE: usize = 4;

fn status_code(status: i32) -> i32 {
    if status & 0x7f == 0 {
        (status >> 8) & 0xff
    } else {
        128 + (status & 0x7f)
    }
}

/// Reaps every exited child; the command's exit code once it has exited.
fn reap(command: isize) -> Option<i32> {
    let mut code = None;
    loop {
        let mut status: i32 = 0;
        let pid = unsafe {
            syscall(nr::WAIT4, usize::MAX, &mut status as *mut i32 as usize, WNOHANG, 0)
        };
        if pid == command {
            code = Some(status_code(status));
        } else if pid == 0 {
            return code;
        } else if pid == -ECHILD {
            return code.or(Some(0));
        } else if pid < 0 {
            return code;
        }
    }
}

/// Writes `code` (0..=255, as `status_code` makes it) in decimal and a newline to `fd`.
/// No indexing or arithmetic that could panic: core's panic paths need an unwinder.
fn report(fd: usize, code: i32) {
    let c = (code & 0xff) as u8;
    let digits = [b'0' + c / 100, b'0' + (c / 10) % 10, b'0' + c % 10, b'\n'];
    let skip = if c >= 100 {
        0
    } else if c >= 10 {
        1
    } else {
        2
    };
    unsafe {
        syscall(
            nr::WRITE,
            fd,
            digits.as_ptr().add(skip) as usize,
            4 - skip,
            0,
        )
    };
}

unsafe extern "C" fn main(sp: *const usize) -> ! {
    let (argc, argv) = unsafe { (*sp, sp.add(1) as *const *const u8) };
    if argc < 4 {
        exit(125);
    }
    let (command, ready) = unsafe { (number(*argv.add(2)), number(*argv.add(3))) };
    let (Some(command), Some(ready)) = (command, ready) else {
        exit(125)
    };
    let status = if argc > 4 {
        unsafe { number(*argv.add(4)) }
    } else {
        None
    };
    let command = command as isize;
    unsafe {
        syscall(nr::PRCTL, PR_SET_DUMPABLE, 0, 0, 0);
        syscall(nr::WRITE, ready, b"1".as_ptr() as usize, 1, 0);
        syscall(nr::CLOSE, ready, 0, 0, 0);
    }
    let mask: u64 = !0;
    let sfd = unsafe { syscall(nr::SIGNALFD4, usize::MAX, &mask as *const u64 as usize, 8, 0) };
    if sfd < 0 {
        exit(125);
    }
    // struct signalfd_siginfo is 128 bytes; the signal number comes first.
    let mut info = [0u32; 32];
    loop {
        if let Some(code) = reap(command) {
            if let Some(fd) = status {
                report(fd, code);
            }
            exit(code);
        }
        let n = unsafe { syscall(nr::READ, sfd as usize, info.as_mut_ptr() as usize, 128, 0) };
        if n == 128 && info[0] != SIGCHLD {
            unsafe { syscall(nr::KILL, command as usize, info[0] as usize, 0, 0) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
unsafe extern "C" fn _start() -> ! {
    core::arch::naked_asm!("mov rdi, rsp", "and rsp, -16", "call {main}", "ud2", main = sym main)
}

#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
unsafe extern "C" fn _start() -> ! {
    core::arch::naked_asm!("mov x0, sp", "bl {main}", "brk #0", main = sym main)
}
