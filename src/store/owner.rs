//! Who owns a temporary file or directory in the store: every one berth makes carries its
//! process's id and start time in its name (`blob-4711.98231-…`), so a later command can
//! tell one a live process is writing from one a killed process left behind — without
//! guessing from its age. [`sweep`] removes the abandoned ones.

use std::path::Path;
use std::sync::OnceLock;

/// This process's owner tag: `PID.STARTTIME` (start time in clock ticks since boot, as
/// `/proc/PID/stat` gives it, so a reused pid does not pass for the old process).
pub fn tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let pid = std::process::id();
        format!("{pid}.{}", start_time(pid).unwrap_or(0))
    })
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command is in parentheses and may hold spaces: fields resume after ") ".
    let rest = stat.rsplit_once(") ")?.1;
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether the process a tag names still runs (the same process, not a reused pid).
pub fn alive(tag: &str) -> bool {
    let Some((pid, start)) = tag.split_once('.') else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    start_time(pid) == Some(start)
}

/// The owner tag in a name made as `{prefix}{tag}-{random}`, if it has one.
pub fn owner_of<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    let (tag, _) = rest.split_once('-')?;
    tag.contains('.').then_some(tag)
}

/// Removes the entries of `dir` named `{prefix}…` whose owner is dead (files and
/// directories). Entries without an owner tag (made by an older berth) go when older than
/// a day. Returns the bytes freed.
pub fn sweep(dir: &Path, prefix: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(24 * 3600);
    let mut freed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(prefix) {
            continue;
        }
        let abandoned = match owner_of(name, prefix) {
            Some(owner) => !alive(owner),
            None => e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < day_ago),
        };
        if !abandoned {
            continue;
        }
        let path = e.path();
        freed += size_of(&path);
        let _ = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => remove_tree(&path),
            _ => std::fs::remove_file(&path),
        };
    }
    freed
}

/// Bytes a file or tree takes.
pub fn size_of(path: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| size_of(&e.path()))
        .sum()
}

/// Removes a tree, clearing overlayfs' immutable-ish leftovers first (a killed build can
/// leave a work directory whose `work/` subdirectory is mode 000).
fn remove_tree(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    // A mount left under it (a killed RUN step's overlay) is detached first.
    let _ = nix::mount::umount2(&path.join("merged"), nix::mount::MntFlags::MNT_DETACH);
    std::fs::remove_dir_all(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_name_live_processes_only() {
        assert!(alive(tag()));
        assert!(!alive("1.0"), "pid 1 did not start at tick 0");
        assert!(!alive("999999999.5"));
        assert!(!alive("nonsense"));
        assert_eq!(owner_of("blob-12.34-abc", "blob-"), Some("12.34"));
        assert_eq!(owner_of("blob-abc", "blob-"), None);
    }

    #[test]
    fn a_sweep_removes_what_dead_owners_left_and_keeps_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let mine = d.path().join(format!("blob-{}-x", tag()));
        let dead = d.path().join("blob-999999999.5-y");
        let dead_dir = d.path().join("build-999999999.5-z");
        std::fs::write(&mine, b"live").unwrap();
        std::fs::write(&dead, b"abandoned").unwrap();
        std::fs::create_dir_all(dead_dir.join("a/b")).unwrap();
        std::fs::write(dead_dir.join("a/b/f"), b"x").unwrap();
        assert_eq!(sweep(d.path(), "blob-"), 9);
        assert_eq!(sweep(d.path(), "build-"), 1);
        assert!(mine.exists() && !dead.exists() && !dead_dir.exists());
    }
}
