//! Running without root. A user who is not root gets berth's whole runtime inside a user
//! namespace of their own, as podman does:
//!
//! - One long-lived *pause* process per store holds a user namespace (ids 0-65535 mapped
//!   through `newuidmap`/`newgidmap` to the user and their range in `/etc/subuid` and
//!   `/etc/subgid`; without those, only the user's own id as 0, with a warning), a mount
//!   namespace and a network namespace. Its pid is in `<store>/berth/rootless.pid`.
//! - Every berth command joins the user and mount namespaces (`setns`) before it starts
//!   any thread, so it is root there: overlay mounts (`userxattr`), namespaces, chown into
//!   the mapped range all work, and every command sees the same mounts and can signal the
//!   same containers. berth stays in the host's network namespace, so registries on the
//!   host's loopback and host ports are where the user expects them.
//! - The pause process's network namespace holds berth's bridges and the containers'
//!   veths, as the host's does for root. Sockets that talk to containers (published
//!   ports' proxy, health checks) and netlink sockets are created in it
//!   ([`in_network`]); the proxy's listeners stay on the host, so `-p 8080:80` binds the
//!   host's port 8080 and fails there if it is taken.
//!
//! The store is the user's own (`$XDG_DATA_HOME/berth`). Files in it belong to the mapped
//! ids, so layers built without root carry the same owners, and digests, as layers built
//! as root.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use nix::sched::CloneFlags;

/// Where the network namespace of berth's rootless containers is bound, for every berth
/// process in the user namespace (set when berth joins it).
pub const NETNS_ENV: &str = "BERTH_ROOTLESS_NETNS";

/// How many ids a full map gives (0-65535, as podman's default range).
const RANGE: u32 = 65536;

/// Whether this process runs in a user namespace that is not the host's (so it is root
/// only there). Read once from `/proc/self/uid_map`.
pub fn active() -> bool {
    // 0: not known yet, 1: no, 2: yes. `join` sets it, so a non-root process that asked
    // before joining is not stuck with the old answer.
    match ACTIVE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let yes = std::fs::read_to_string("/proc/self/uid_map")
                .map(|m| !is_identity_map(&m))
                .unwrap_or(false);
            ACTIVE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// True for the initial namespace's map (`0 0 4294967295`).
fn is_identity_map(map: &str) -> bool {
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| !f.is_empty())
        .collect();
    lines.len() == 1 && lines[0] == ["0", "0", "4294967295"]
}

/// True when only one id is mapped (no subordinate ids): files owned by other ids cannot
/// be created.
pub fn single_id() -> bool {
    static SINGLE: OnceLock<bool> = OnceLock::new();
    *SINGLE.get_or_init(|| {
        std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
            let total: u64 = m
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
                .sum();
            total <= 1
        })
    })
}

/// What went wrong entering the user namespace.
#[derive(Debug, thiserror::Error)]
pub enum RootlessError {
    /// A system call or file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// The pause process could not be made.
    #[error("{0}")]
    Setup(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RootlessError {
    let what = what.into();
    move |source| RootlessError::Io { what, source }
}

fn errno(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> RootlessError {
    let what = what.into();
    move |e| RootlessError::Io {
        what,
        source: io::Error::from(e),
    }
}

/// The pause process's record: pid and start time (so a recycled pid is not mistaken
/// for it).
fn state_file(store: &Path) -> PathBuf {
    store.join("berth/rootless.pid")
}

/// The file the pause process's network namespace is bound on (inside the mount
/// namespace; on the host it is an empty file).
fn netns_file(store: &Path) -> PathBuf {
    store.join("berth/rootless.netns")
}

/// Opens (creating) a file for writing, refusing a symlink in its place.
fn create_nofollow(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
}

/// The pause process recorded for `store`, if it still runs.
fn recorded_pause(store: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(state_file(store)).ok()?;
    let mut f = text.split_whitespace();
    let pid: i32 = f.next()?.parse().ok()?;
    let start: u64 = f.next()?.parse().ok()?;
    // Ours, too: a pid file naming another user's process (which we could not join) is
    // as stale as one naming a dead process.
    let ours =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(format!("/proc/{pid}")).ok()?)
            == nix::unistd::getuid().as_raw();
    // A zombie (killed, not yet reaped by the command that made it) is not alive.
    (ours && super::container::process_start_time(pid) == Some(start)).then_some(pid)
}

/// Enters the rootless user namespace for `store` (creating it on first use). Does
/// nothing as root. Must run before any thread is started: `setns` into a user
/// namespace needs a single-threaded process.
pub fn enter(store: &Path) -> Result<(), RootlessError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    // Nothing in a store another user could write is trusted (its pid file names the
    // namespaces to join).
    for dir in [store.to_path_buf(), store.join("berth")] {
        std::fs::create_dir_all(&dir)
            .map_err(io_err(format!("create the store {}", dir.display())))?;
        crate::store::own_dir(&dir).map_err(io_err(format!("use the store {}", dir.display())))?;
    }
    let pid = match recorded_pause(store) {
        Some(pid) => pid,
        None => {
            // One creator at a time: a second berth waits, then finds the first's.
            let lock = create_nofollow(&store.join("berth/rootless.lock"))
                .map_err(io_err("create the rootless lock"))?;
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| errno("lock the rootless state")(e))
                .and_then(|_held| match recorded_pause(store) {
                    Some(pid) => Ok(pid),
                    None => create(store),
                })?
        }
    };
    join(pid, store)
}

/// Joins the pause process's user and mount namespaces.
fn join(pid: i32, store: &Path) -> Result<(), RootlessError> {
    let open = |ns: &str| {
        File::open(format!("/proc/{pid}/ns/{ns}")).map_err(io_err(format!(
            "open the rootless {ns} namespace (pid {pid})"
        )))
    };
    let (user, mnt) = (open("user")?, open("mnt")?);
    // Joining a mount namespace moves the caller to its root: come back to the same path.
    let cwd = std::env::current_dir().ok();
    nix::sched::setns(user.as_fd(), CloneFlags::CLONE_NEWUSER)
        .map_err(errno("join the rootless user namespace"))?;
    nix::sched::setns(mnt.as_fd(), CloneFlags::CLONE_NEWNS)
        .map_err(errno("join the rootless mount namespace"))?;
    if let Some(cwd) = cwd {
        std::env::set_current_dir(&cwd).map_err(io_err(format!("return to {}", cwd.display())))?;
    }
    // Root there, with every capability the namespace gives. Supplementary groups of the
    // host are not mapped: drop them where allowed (a single-id map denies setgroups).
    let _ = nix::unistd::setgroups(&[]);
    // SAFETY: no other thread runs yet (the caller's contract), so changing the
    // environment races with nothing.
    unsafe { std::env::set_var(NETNS_ENV, netns_file(store)) };
    ACTIVE.store(2, Ordering::Relaxed);
    Ok(())
}

/// The subordinate id range of `user`/`id` in `/etc/subuid` or `/etc/subgid`.
fn subordinate(file: &str, user: &str, id: u32) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.trim().splitn(3, ':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        (who == user || who == id.to_string())
            .then(|| Some((start.parse().ok()?, count.parse().ok()?)))
            .flatten()
    })
}

/// Which helper maps ids, and with what, or why only one id can be mapped.
struct Maps {
    uid: Option<(u32, u32)>,
    gid: Option<(u32, u32)>,
    why_single: Option<String>,
}

fn plan_maps(uid: u32, gid: u32) -> Maps {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let tools = ["newuidmap", "newgidmap"]
        .iter()
        .all(|t| find_program(t).is_some());
    let sub_u = subordinate("/etc/subuid", &user, uid);
    let sub_g = subordinate("/etc/subgid", &user, gid);
    let why = if !tools {
        Some("newuidmap/newgidmap are missing (Debian's `uidmap` package)".to_string())
    } else if sub_u.is_none_or(|(_, n)| n < RANGE - 1) || sub_g.is_none_or(|(_, n)| n < RANGE - 1) {
        Some(format!(
            "{user} has no range of at least {} ids in /etc/subuid and /etc/subgid (add `{user}:100000:65536` to both)",
            RANGE - 1
        ))
    } else {
        None
    };
    Maps {
        uid: sub_u,
        gid: sub_g,
        why_single: why,
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
        .to_str()
        .unwrap_or("/usr/bin:/bin")
        .split(':')
        .chain(["/usr/bin", "/usr/sbin", "/bin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Starts the pause process: it makes the namespaces, we map its ids, it binds its
/// network namespace and waits forever. Returns its pid.
fn create(store: &Path) -> Result<i32, RootlessError> {
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let maps = plan_maps(uid, gid);
    let netns = netns_file(store);
    create_nofollow(&netns).map_err(io_err(format!("create {}", netns.display())))?;
    let (to_parent_r, to_parent_w) = nix::unistd::pipe().map_err(errno("create a pipe"))?;
    let (to_child_r, to_child_w) = nix::unistd::pipe().map_err(errno("create a pipe"))?;
    let netns_c = CString::new(netns.as_os_str().as_encoded_bytes())
        .map_err(|_| RootlessError::Setup("the store path holds a NUL byte".into()))?;
    // SAFETY: the caller is single-threaded (see `enter`); the child only makes system
    // calls and exits.
    match unsafe { nix::unistd::fork() }.map_err(errno("fork the rootless pause process"))? {
        nix::unistd::ForkResult::Child => {
            drop(to_parent_r);
            drop(to_child_w);
            let code = pause_process(to_parent_w, to_child_r, &netns_c);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(to_parent_w);
            drop(to_child_r);
            let pid = child.as_raw();
            let result = map_and_wait(pid, uid, gid, &maps, to_parent_r, to_child_w);
            if let Err(e) = result {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(e);
            }
            let start = super::container::process_start_time(pid).ok_or_else(|| {
                RootlessError::Setup("the rootless pause process exited at once".into())
            })?;
            let state = state_file(store);
            let tmp = state.with_extension("pid.tmp");
            std::fs::write(&tmp, format!("{pid} {start}\n"))
                .and_then(|()| std::fs::rename(&tmp, &state))
                .map_err(io_err(format!("write {}", state.display())))?;
            announce(&maps, uid);
            Ok(pid)
        }
    }
}

/// In the parent: maps the child's ids once it has its user namespace, then waits until
/// it says it is ready.
fn map_and_wait(
    pid: i32,
    uid: u32,
    gid: u32,
    maps: &Maps,
    from_child: OwnedFd,
    to_child: OwnedFd,
) -> Result<(), RootlessError> {
    let mut from_child = File::from(from_child);
    let mut byte = [0u8; 1];
    let why = |from_child: &mut File| {
        let mut why = String::new();
        let _ = from_child.read_to_string(&mut why);
        why.trim_start_matches('x').to_string()
    };
    from_child
        .read_exact(&mut byte)
        .map_err(io_err("wait for the rootless user namespace"))?;
    if byte[0] != b'u' {
        return Err(RootlessError::Setup(why(&mut from_child)));
    }
    match (maps.uid, maps.gid, &maps.why_single) {
        (Some((su, nu)), Some((sg, ng)), None) => {
            let run = |tool: &str, id: u32, start: u32, count: u32| {
                let count = count.min(RANGE - 1);
                let out = std::process::Command::new(find_program(tool).unwrap_or(tool.into()))
                    .args([
                        pid.to_string(),
                        "0".into(),
                        id.to_string(),
                        "1".into(),
                        "1".into(),
                        start.to_string(),
                        count.to_string(),
                    ])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .map_err(io_err(format!("run {tool}")))?;
                if !out.status.success() {
                    return Err(RootlessError::Setup(format!(
                        "{tool} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                Ok(())
            };
            run("newuidmap", uid, su, nu)?;
            run("newgidmap", gid, sg, ng)?;
        }
        _ => {
            // Only our own ids, which an unprivileged process may map itself (after
            // giving up setgroups).
            let write = |file: &str, text: String| {
                std::fs::write(format!("/proc/{pid}/{file}"), text)
                    .map_err(io_err(format!("write /proc/{pid}/{file}")))
            };
            write("uid_map", format!("0 {uid} 1\n"))?;
            write("setgroups", "deny".into())?;
            write("gid_map", format!("0 {gid} 1\n"))?;
        }
    }
    File::from(to_child)
        .write_all(b"m")
        .map_err(io_err("tell the rootless pause process its ids are mapped"))?;
    match from_child.read(&mut byte) {
        Ok(1) if byte[0] == b'r' => Ok(()),
        _ => Err(RootlessError::Setup(format!(
            "the rootless pause process could not set up its namespaces: {}",
            why(&mut from_child)
        ))),
    }
}

/// The pause process (in the forked child): a user namespace, mapped by the parent, then
/// mount and network namespaces; its network namespace bound on `netns` (in its mount
/// namespace) and its loopback up; then it waits, detached from the caller's terminal
/// and descriptors, for as long as it lives.
fn pause_process(to_parent: OwnedFd, from_parent: OwnedFd, netns: &CString) -> i32 {
    let mut to_parent = File::from(to_parent);
    let fail = |what: &str, e: io::Error| {
        let _ = write!(&to_parent, "x{what}: {e}");
        1
    };
    let _ = nix::unistd::setsid();
    // Hold no directory of the caller's.
    let _ = nix::unistd::chdir("/");
    // SAFETY: prctl with a static NUL-terminated name: `ps` shows what it is.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"berth-pause".as_ptr()) };
    if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWUSER) {
        return fail("create a user namespace", e.into());
    }
    if let Err(e) = (&to_parent).write_all(b"u") {
        return fail("report", e);
    }
    let mut byte = [0u8; 1];
    if File::from(from_parent).read_exact(&mut byte).is_err() {
        return 1;
    }
    if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET) {
        return fail("create mount and network namespaces", e.into());
    }
    // SAFETY: mount(2) with valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"/proc/self/ns/net".as_ptr(),
            netns.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return fail("bind the network namespace", io::Error::last_os_error());
    }
    if let Err(e) = super::netlink::Netlink::open().and_then(|mut nl| nl.up("lo")) {
        return fail("bring up loopback", e);
    }
    // Nothing of the caller's stays open here (a pipe held open would keep a caller's
    // `berth … | cat` from ever ending).
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2(2) onto the standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    // Everything else inherited goes too (among it the creators' lock).
    let keep = to_parent.as_raw_fd() as libc::c_uint;
    // SAFETY: close_range(2) on descriptor numbers only.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3, keep - 1, 0);
        libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0);
    }
    if to_parent.write_all(b"r").is_err() {
        return 1;
    }
    drop(to_parent);
    // SAFETY: plain signal dispositions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    loop {
        // SAFETY: pause(2) takes nothing.
        unsafe { libc::pause() };
    }
}

/// Says once, when the namespace is made, that berth runs rootless and what that limits.
fn announce(maps: &Maps, uid: u32) {
    let ids = match (&maps.why_single, maps.uid) {
        (None, Some((start, count))) => format!(
            "ids 0-{} map to uid {uid} and {start}-{}",
            count.min(RANGE - 1),
            start + count.min(RANGE - 1) - 1
        ),
        _ => format!("only id 0 is mapped, to uid {uid}"),
    };
    crate::say!(
        "berth: running rootless, in a user namespace of your own ({ids}). Limits: cgroup limits (--memory, --cpus, --pids-limit) apply only where the user has a delegated cgroup v2 subtree; containers on a bridge reach each other, but neither the host's addresses nor published ports; ports below 1024 cannot be published. The namespace lives in a process named berth-pause."
    );
    if let Some(why) = &maps.why_single {
        crate::say!(
            "berth: warning: {why}; only files owned by root can be unpacked with their owners, other owners become root, and layers built so differ from a root build's"
        );
    }
}

/// The network namespace of rootless containers, when this process runs rootless.
pub fn network_namespace() -> Option<PathBuf> {
    if !active() {
        return None;
    }
    std::env::var_os(NETNS_ENV).map(PathBuf::from)
}

/// Runs `f` where sockets that talk to containers are made: as root, right here; rootless,
/// on a thread that joined the containers' network namespace (sockets keep the namespace
/// they were made in, so the caller can use what `f` returns anywhere).
pub fn in_network<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let Some(ns) = network_namespace() else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&ns).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("open the rootless network namespace {}: {e}", ns.display()),
                )
            })?;
            nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!(
                        "join the rootless network namespace {}: {e} (is the rootless pause process gone? `berth ps` makes a new one)",
                        ns.display()
                    ),
                )
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("a network thread panicked")))
    })
}

/// A new socket (non-blocking, close-on-exec) in the containers' network namespace.
pub fn socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    in_network(|| {
        // SAFETY: socket(2) with integer arguments; the result is checked.
        let fd = unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// The extended attribute overlayfs marks opaque directories with: `trusted.` as root,
/// `user.` in a user namespace (with the `userxattr` mount option).
pub fn overlay_opaque_xattr() -> &'static std::ffi::CStr {
    if active() {
        c"user.overlay.opaque"
    } else {
        c"trusted.overlay.opaque"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_pause_process_is_not_alive() {
        use super::super::container::process_start_time;
        // SAFETY: the child only exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => unsafe { libc::_exit(0) },
            nix::unistd::ForkResult::Parent { child } => {
                let pid = child.as_raw();
                // Not reaped yet: a zombie, whose /proc entry is still there.
                let mut zombie = false;
                for _ in 0..200 {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
                    if stat.contains(") Z ") {
                        zombie = true;
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                assert!(zombie);
                assert_eq!(process_start_time(pid), None, "a zombie is dead");
                let _ = nix::sys::wait::waitpid(child, None);
                assert!(process_start_time(std::process::id() as i32).is_some());
            }
        }
    }

    #[test]
    fn identity_maps_are_recognised() {
        assert!(is_identity_map("         0          0 4294967295\n"));
        assert!(!is_identity_map("0 1000 1\n"));
        assert!(!is_identity_map("0 1000 1\n1 100000 65535\n"));
    }

    #[test]
    fn subordinate_ranges_are_found_by_name_or_id() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("subuid");
        std::fs::write(&f, "alice:100000:65536\n1001:300000:65536\nbob:x:1\n").unwrap();
        let f = f.to_str().unwrap();
        assert_eq!(subordinate(f, "alice", 1000), Some((100000, 65536)));
        assert_eq!(subordinate(f, "carol", 1001), Some((300000, 65536)));
        assert_eq!(subordinate(f, "bob", 1002), None);
        assert_eq!(subordinate(f, "dave", 1003), None);
    }
}
