//! Users and groups of an image: names resolved in its `/etc/passwd` and `/etc/group`,
//! read inside the root filesystem (never through a symlink that leads out of it).

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

/// Looks up a user (name or number) in `/etc/passwd` text: `(uid, primary gid)`.
pub fn lookup_user(passwd: &str, user: &str) -> Option<(u64, u64)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && (f[0] == user || f[2] == user))
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// Looks up a group (name or number) in `/etc/group` text.
pub fn lookup_group(group: &str, name: &str) -> Option<u64> {
    group.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && (f[0] == name || f[2] == name)).then(|| f[2].parse().ok())?
    })
}
/// Reads at most `limit` bytes of `rel` inside `root`, resolving every symlink inside the
/// root (`openat2` with `RESOLVE_IN_ROOT`). `None` when it does not exist or is unreadable.
pub fn read_in_root(root: &Path, rel: &str, limit: u64) -> Option<Vec<u8>> {
    let dir = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(
        &dir,
        OsStr::from_bytes(rel.trim_start_matches('/').as_bytes()),
        how,
    )
    .ok()?;
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(limit)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// A user resolved in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups: the primary group and every group of `/etc/group` that lists
    /// the user as a member, as Docker gives them.
    pub groups: Vec<u32>,
    /// The home directory `/etc/passwd` gives the user, else `/` (Docker's `HOME`).
    pub home: String,
}

/// Groups of `/etc/group` text that list `name` as a member.
fn memberships(group: &str, name: &str) -> Vec<u32> {
    group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[3].split(',').any(|m| m == name)).then(|| f[2].parse().ok())?
        })
        .collect()
}

/// Resolves an image's `USER` (`name`, `uid`, `name:group`, `uid:gid`; empty is root)
/// against the passwd and group files of `root`.
pub fn resolve_user(root: &Path, user: &str) -> Result<ResolvedUser, String> {
    let user = if user.is_empty() { "0" } else { user };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let text = |f: &str| {
        read_in_root(root, f, 4 << 20)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let passwd = text("etc/passwd");
    let group_file = text("etc/group");
    let (uid, primary) = match (u.parse::<u32>(), lookup_user(&passwd, u)) {
        (_, Some((uid, gid))) => (uid as u32, gid as u32),
        (Ok(uid), None) => (uid, 0),
        (Err(_), None) => return Err(format!("no user `{u}` in the image's /etc/passwd")),
    };
    let gid = match g {
        None => primary,
        Some(g) => match (g.parse::<u32>(), lookup_group(&group_file, g)) {
            (Ok(gid), _) => gid,
            (Err(_), Some(gid)) => gid as u32,
            (Err(_), None) => return Err(format!("no group `{g}` in the image's /etc/group")),
        },
    };
    let entry: Option<Vec<&str>> = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[2] == uid.to_string()).then_some(f)
    });
    let name = entry.as_ref().map(|f| f[0].to_string());
    let home = entry
        .as_ref()
        .and_then(|f| f.get(5))
        .filter(|h| h.starts_with('/'))
        .map_or_else(|| "/".to_string(), |h| h.to_string());
    let mut groups = vec![gid];
    if let Some(name) = name {
        for extra in memberships(&group_file, &name) {
            if !groups.contains(&extra) {
                groups.push(extra);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_and_group_lookups() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n";
        assert_eq!(lookup_user(passwd, "www"), Some((33, 34)));
        assert_eq!(lookup_user(passwd, "33"), Some((33, 34)));
        assert_eq!(lookup_user(passwd, "nobody"), None);
        assert_eq!(
            lookup_group("root:x:0:\nstaff:x:50:a,b\n", "staff"),
            Some(50)
        );
    }
    #[test]
    fn passwd_is_read_inside_the_root_even_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // An image whose passwd is a symlink to the host's: resolved inside the root, where
        // there is nothing, so the host file is never read.
        std::os::unix::fs::symlink("/etc/shadow", root.path().join("etc/passwd")).unwrap();
        assert_eq!(read_in_root(root.path(), "etc/passwd", 1 << 20), None);
        assert!(resolve_user(root.path(), "root").is_err());
        std::fs::write(
            root.path().join("etc/shadow"),
            "app:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("etc/group"),
            "app:x:1000:\nstaff:x:50:app,bob\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("shadow", root.path().join("etc/passwd2")).unwrap();
        let app = resolve_user(root.path(), "app").unwrap();
        assert_eq!(
            (app.uid, app.gid, app.groups),
            (1000, 1000, vec![1000, 50]),
            "memberships from /etc/group"
        );
        let numeric = resolve_user(root.path(), "1000:5").unwrap();
        assert_eq!((numeric.uid, numeric.gid), (1000, 5));
        assert_eq!(resolve_user(root.path(), "").unwrap().uid, 0);
    }
}
