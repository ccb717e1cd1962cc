//! The device policy of every container (and every build's RUN step): Docker's, less the
//! console. Every device is denied except `mknod` of any character or block device (so
//! images that make their own nodes still unpack and run) and read/write/mknod of the
//! harmless ones — null, zero, full, random, urandom, tty, ptmx and the pty slaves.
//! Opening a node made with mknod (`/dev/sda`, `/dev/kmsg`, `/dev/loop-control`) fails
//! with EPERM. `/dev/console` (5:1) is not allowed: berth gives containers no console, and
//! a node made for it would reach the host's.
//!
//! On cgroup v1 the rules go to the devices controller (`devices.deny` `a`, then each
//! allow). On v2, which has no devices controller, a `BPF_PROG_TYPE_CGROUP_DEVICE`
//! program built from the same rules is attached to the container's cgroup, as runc and
//! crun do.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// A device type a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Character devices.
    Char,
    /// Block devices.
    Block,
}

/// Access a rule allows.
pub mod access {
    /// mknod.
    pub const MKNOD: u32 = 1;
    /// open for reading.
    pub const READ: u32 = 2;
    /// open for writing.
    pub const WRITE: u32 = 4;
    /// All three.
    pub const ALL: u32 = MKNOD | READ | WRITE;
}

/// One allow rule: a type, a major and minor (`None`: any), and the access allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Device type.
    pub kind: Kind,
    /// Major number, or any.
    pub major: Option<u32>,
    /// Minor number, or any.
    pub minor: Option<u32>,
    /// Bits of [`access`].
    pub access: u32,
}

const fn dev(kind: Kind, major: u32, minor: Option<u32>, access: u32) -> Rule {
    Rule {
        kind,
        major: Some(major),
        minor,
        access,
    }
}

/// Docker's default allow list less the console; everything else is denied.
pub const DEFAULT_ALLOW: &[Rule] = &[
    Rule {
        kind: Kind::Char,
        major: None,
        minor: None,
        access: access::MKNOD,
    },
    Rule {
        kind: Kind::Block,
        major: None,
        minor: None,
        access: access::MKNOD,
    },
    dev(Kind::Char, 1, Some(3), access::ALL), // null
    dev(Kind::Char, 1, Some(5), access::ALL), // zero
    dev(Kind::Char, 1, Some(7), access::ALL), // full
    dev(Kind::Char, 1, Some(8), access::ALL), // random
    dev(Kind::Char, 1, Some(9), access::ALL), // urandom
    dev(Kind::Char, 5, Some(0), access::ALL), // tty
    dev(Kind::Char, 5, Some(2), access::ALL), // ptmx
    dev(Kind::Char, 136, None, access::ALL),  // pts/*
];

impl Rule {
    /// The access as letters: `rwm`, `m`.
    pub fn access_letters(&self) -> String {
        [
            (access::READ, 'r'),
            (access::WRITE, 'w'),
            (access::MKNOD, 'm'),
        ]
        .iter()
        .filter(|(bit, _)| self.access & bit != 0)
        .map(|(_, c)| *c)
        .collect()
    }

    /// The rule as v1's `devices.allow` line: `c 1:3 rwm`, `b *:* m`.
    pub fn v1_line(&self) -> String {
        let num = |n: Option<u32>| n.map_or("*".to_string(), |n| n.to_string());
        let acc = self.access_letters();
        format!(
            "{} {}:{} {acc}",
            match self.kind {
                Kind::Char => 'c',
                Kind::Block => 'b',
            },
            num(self.major),
            num(self.minor)
        )
    }
}

/// Applies the rules to a v1 devices cgroup directory: deny everything, then allow each.
pub fn apply_v1(dir: &Path, rules: &[Rule]) -> io::Result<()> {
    let write = |file: &str, value: &str| {
        std::fs::write(dir.join(file), value).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("write {value:?} to {}: {e}", dir.join(file).display()),
            )
        })
    };
    write("devices.deny", "a")?;
    for r in rules {
        write("devices.allow", &r.v1_line())?;
    }
    Ok(())
}

/// eBPF instructions, as the kernel reads them.
mod insn {
    /// One instruction.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Insn {
        pub code: u8,
        /// dst in the low nibble, src in the high one.
        pub regs: u8,
        pub off: i16,
        pub imm: i32,
    }

    const LDX_MEM_W: u8 = 0x61;
    const ALU64_AND_K: u8 = 0x57;
    const ALU64_RSH_K: u8 = 0x77;
    const ALU64_MOV_X: u8 = 0xbf;
    const ALU64_MOV_K: u8 = 0xb7;
    const JMP_JNE_K: u8 = 0x55;
    const JMP_EXIT: u8 = 0x95;

    /// `dst = *(u32 *)(src + off)`.
    pub fn load32(dst: u8, src: u8, off: i16) -> Insn {
        Insn {
            code: LDX_MEM_W,
            regs: dst | (src << 4),
            off,
            imm: 0,
        }
    }
    /// `dst &= imm`.
    pub fn and(dst: u8, imm: i32) -> Insn {
        Insn {
            code: ALU64_AND_K,
            regs: dst,
            off: 0,
            imm,
        }
    }
    /// `dst >>= imm`.
    pub fn rsh(dst: u8, imm: i32) -> Insn {
        Insn {
            code: ALU64_RSH_K,
            regs: dst,
            off: 0,
            imm,
        }
    }
    /// `dst = src`.
    pub fn mov(dst: u8, src: u8) -> Insn {
        Insn {
            code: ALU64_MOV_X,
            regs: dst | (src << 4),
            off: 0,
            imm: 0,
        }
    }
    /// `dst = imm`.
    pub fn mov_imm(dst: u8, imm: i32) -> Insn {
        Insn {
            code: ALU64_MOV_K,
            regs: dst,
            off: 0,
            imm,
        }
    }
    /// `if dst != imm goto +off`.
    pub fn jne(dst: u8, imm: i32, off: i16) -> Insn {
        Insn {
            code: JMP_JNE_K,
            regs: dst,
            off,
            imm,
        }
    }
    /// `return r0`.
    pub fn exit() -> Insn {
        Insn {
            code: JMP_EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        }
    }
}

pub use insn::Insn;

/// `BPF_DEVCG_DEV_BLOCK` and `BPF_DEVCG_DEV_CHAR`.
fn devcg_type(k: Kind) -> i32 {
    match k {
        Kind::Block => 1,
        Kind::Char => 2,
    }
}

/// A `BPF_PROG_TYPE_CGROUP_DEVICE` program that allows what `rules` allow and denies the
/// rest. Its context is `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32
/// minor; }`, `access_type` holding the device type in its low 16 bits and the access in
/// the high ones; it returns 1 to allow, 0 to deny.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    use insn::*;
    // r2 = type, r3 = access, r4 = major, r5 = minor.
    let mut p = vec![
        load32(2, 1, 0),
        and(2, 0xffff),
        load32(3, 1, 0),
        rsh(3, 16),
        load32(4, 1, 4),
        load32(5, 1, 8),
    ];
    for r in rules {
        // Each block falls through to the next rule when a test fails.
        let mut block = vec![jne(2, devcg_type(r.kind), 0)];
        if r.access != access::ALL {
            // The access asked for must be within the rule's.
            block.push(mov(1, 3));
            block.push(and(1, !(r.access as i32)));
            block.push(jne(1, 0, 0));
        }
        if let Some(m) = r.major {
            block.push(jne(4, m as i32, 0));
        }
        if let Some(m) = r.minor {
            block.push(jne(5, m as i32, 0));
        }
        block.push(mov_imm(0, 1));
        block.push(exit());
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.code == 0x55 {
                ins.off = (len - i - 1) as i16;
            }
        }
        p.extend(block);
    }
    p.push(mov_imm(0, 0));
    p.push(exit());
    p
}

/// Runs `prog` on one request, as the kernel would (for tests of the program itself).
pub fn interpret(prog: &[Insn], kind: Kind, major: u32, minor: u32, acc: u32) -> u64 {
    let mut r = [0u64; 11];
    let ctx = [(acc << 16) | devcg_type(kind) as u32, major, minor];
    let mut pc = 0usize;
    loop {
        let i = prog[pc];
        let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
        pc += 1;
        match i.code {
            0x61 => r[dst] = u64::from(ctx[(i.off / 4) as usize]),
            0x57 => r[dst] &= i.imm as i64 as u64,
            0x77 => r[dst] >>= i.imm,
            0xbf => r[dst] = r[src],
            0xb7 => r[dst] = i.imm as i64 as u64,
            0x55 => {
                if r[dst] != i.imm as i64 as u64 {
                    pc += i.off as usize;
                }
            }
            0x95 => return r[0],
            other => panic!("opcode {other:#x}"),
        }
    }
}

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a command and a properly laid out, zero-padded attribute struct
    // of the size given; the kernel reads (and for PROG_LOAD writes a log into) memory we
    // own for the call's duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads the program for `rules` and attaches it to the v2 cgroup `dir` (beside any
/// program a parent has: with `BPF_F_ALLOW_MULTI` every one must allow). It stays
/// attached as long as the cgroup exists.
pub fn attach_v2(dir: &Path, rules: &[Rule]) -> io::Result<()> {
    let prog = program(rules);
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 4096];
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"berth_device");
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let prog_fd = match bpf(BPF_PROG_LOAD, &mut load) {
        Ok(fd) => {
            // SAFETY: a new descriptor the kernel returned to us.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        }
        Err(e) => {
            let verifier = String::from_utf8_lossy(&log);
            let verifier = verifier.trim_end_matches('\0').trim();
            return Err(io::Error::new(
                e.kind(),
                format!("load the device filter program: {e}; verifier: {verifier}"),
            ));
        }
    };
    let cgroup = std::fs::File::open(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", dir.display())))?;
    let mut attach = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attach).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("attach the device filter program to {}: {e}", dir.display()),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines_are_what_the_devices_controller_reads() {
        let lines: Vec<String> = DEFAULT_ALLOW.iter().map(Rule::v1_line).collect();
        assert_eq!(lines[0], "c *:* m");
        assert_eq!(lines[1], "b *:* m");
        assert_eq!(lines[2], "c 1:3 rwm");
        assert_eq!(lines.last().unwrap(), "c 136:* rwm");
    }

    #[test]
    fn the_program_allows_exactly_the_default_list() {
        use access::*;
        let p = program(DEFAULT_ALLOW);
        let allowed = |k, maj, min, acc| interpret(&p, k, maj, min, acc) == 1;
        for (maj, min) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 2),
            (136, 7),
        ] {
            assert!(allowed(Kind::Char, maj, min, READ | WRITE), "c {maj}:{min}");
        }
        // The attack: kmsg, loop devices, loop-control, a disk.
        for (k, maj, min) in [
            (Kind::Char, 1, 11),
            (Kind::Block, 7, 0),
            (Kind::Char, 10, 237),
            (Kind::Block, 8, 0),
            (Kind::Char, 1, 1),
            (Kind::Char, 5, 1),
        ] {
            assert!(!allowed(k, maj, min, READ), "{k:?} {maj}:{min} read");
            assert!(!allowed(k, maj, min, WRITE), "{k:?} {maj}:{min} write");
            assert!(
                !allowed(k, maj, min, READ | MKNOD),
                "{k:?} {maj}:{min} read+mknod"
            );
            assert!(
                allowed(k, maj, min, MKNOD),
                "{k:?} {maj}:{min} mknod is Docker's"
            );
        }
    }
}
