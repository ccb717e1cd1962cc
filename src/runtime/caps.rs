//! Capabilities, `no_new_privs` and descriptor hygiene for the container's process.

use std::io;

use nix::errno::Errno;

/// Docker's default capability set, as capability numbers (see `capability.h`):
/// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE,
/// NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
pub const DOCKER_DEFAULT: [u32; 14] = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];

/// The highest capability this kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops every capability not in `keep` from the bounding set (needs CAP_SETPCAP).
pub fn drop_bounding(keep: &[u32]) -> io::Result<()> {
    for cap in 0..=last_cap() {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 && Errno::last() != Errno::EINVAL {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets the effective and permitted sets to exactly `caps`, and the inheritable and ambient
/// sets to nothing (as Docker does since CVE-2022-24769).
pub fn set_capabilities(caps: &[u32]) -> io::Result<()> {
    let mut data = [CapData::default(); 2];
    for &c in caps {
        let (word, bit) = ((c / 32) as usize, 1u32 << (c % 32));
        data[word].effective |= bit;
        data[word].permitted |= bit;
    }
    let mut header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    // SAFETY: capset(2) with a v3 header and two data words, both valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Clear the ambient set: nothing is raised implicitly across exec.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Sets `no_new_privs`: exec can never grant privileges (setuid bits, file capabilities).
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Marks every descriptor from 3 up close-on-exec, so nothing berth holds (store files,
/// pipes, directory handles) reaches the container's program.
pub fn cloexec_from_3() -> io::Result<()> {
    // SAFETY: close_range(2) with integer arguments only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.11: walk /proc/self/fd.
    for e in std::fs::read_dir("/proc/self/fd")?.flatten() {
        if let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
            && fd > 2
        {
            // SAFETY: setting FD_CLOEXEC on a descriptor number; a stale one fails harmlessly.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

/// Capability names by number (`capability.h`).
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A capability by name, as Docker's `--cap-add` takes it: `NET_ADMIN`, `CAP_NET_ADMIN`,
/// `net_admin`; `ALL` stands for every capability.
pub fn parse(name: &str) -> Result<Vec<u32>, String> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if bare == "ALL" {
        return Ok((0..=last_cap().min(NAMES.len() as u32 - 1)).collect());
    }
    NAMES
        .iter()
        .position(|n| *n == bare)
        .map(|i| vec![i as u32])
        .ok_or_else(|| format!("`{name}` is not a capability (e.g. NET_ADMIN, SYS_PTRACE)"))
}

/// Docker's default set with `add` added and `drop` removed (drops win, as in Docker).
pub fn effective_set(add: &[String], drop: &[String]) -> Result<Vec<u32>, String> {
    let mut set: Vec<u32> = DOCKER_DEFAULT.to_vec();
    for a in add {
        for c in parse(a)? {
            if !set.contains(&c) {
                set.push(c);
            }
        }
    }
    for d in drop {
        let gone = parse(d)?;
        set.retain(|c| !gone.contains(c));
    }
    set.sort_unstable();
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sets() {
        assert_eq!(parse("NET_ADMIN").unwrap(), [12]);
        assert_eq!(parse("cap_sys_ptrace").unwrap(), [19]);
        assert!(parse("FLY").is_err());
        let set = effective_set(
            &["SYS_PTRACE".into()],
            &["NET_RAW".into(), "cap_mknod".into()],
        )
        .unwrap();
        assert!(set.contains(&19) && !set.contains(&13) && !set.contains(&27) && set.contains(&0));
        assert!(effective_set(&[], &["ALL".into()]).unwrap().is_empty());
    }
}
