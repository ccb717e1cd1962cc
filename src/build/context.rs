//! The build context: a directory whose files COPY and ADD read. Every path is resolved
//! inside it ([`super::scope`]): a symlink is followed only within the context (`etc ->
//! /etc` means the context's own `etc`), `..` never climbs out, and file contents are
//! opened with `RESOLVE_IN_ROOT`. A source that names a symlink is followed (Docker's
//! rule) and keeps its own name; symlinks inside a copied directory stay symlinks. Ignore
//! rules apply to the paths sources resolve to, so no link reaches an excluded file.

use std::fs;
use std::path::{Path, PathBuf};

use super::BuildError;
use super::ignore::{IgnoreRules, glob_component};
use super::scope;

/// What kind of file a context entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink with its target, as written.
    Symlink(String),
}

/// A file in the context with the metadata a layer and the stat cache need.
#[derive(Debug, Clone)]
pub struct ContextEntry {
    /// Path relative to the context root, `/`-separated, no leading `/`, with every symlink
    /// resolved inside the context.
    pub rel: String,
    /// The entry's name as the COPY source named it (a followed link keeps its own name).
    pub name: String,
    /// Kind.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes (files).
    pub size: u64,
    /// Identity for the stat cache: (device, inode, mtime ns, ctime ns).
    pub stamp: (u64, u64, i128, i128),
}

/// A build context directory with its ignore rules.
pub struct Context {
    root: PathBuf,
    dir: scope::Root,
    ignore: IgnoreRules,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Normalises a source path: relative to the context root, `.` and empty components dropped,
/// `..` resolved lexically. `None` if it climbs out of the context.
pub fn clean_relative(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

impl Context {
    /// Opens a context directory, reading `.berthignore`, else `.containerignore`, else
    /// `.dockerignore` (each resolved inside the context, like every other file).
    pub fn open(root: &Path) -> Result<Context, BuildError> {
        Context::open_with(root, None)
    }

    /// Opens a context directory whose ignore rules come from `ignore_file` when given (a
    /// named Dockerfile's own `Dockerfile.dockerignore`, as BuildKit reads it).
    pub fn open_with(root: &Path, ignore_file: Option<&Path>) -> Result<Context, BuildError> {
        let root = fs::canonicalize(root).map_err(|e| BuildError::Context {
            path: root.to_path_buf(),
            source: e,
        })?;
        if !root.is_dir() {
            return Err(BuildError::Context {
                path: root,
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let dir = scope::Root::new(&root).map_err(|e| BuildError::Context {
            path: root.clone(),
            source: e,
        })?;
        let mut ignore = IgnoreRules::default();
        if let Some(file) = ignore_file {
            let text = fs::read_to_string(file).map_err(|e| BuildError::Context {
                path: file.to_path_buf(),
                source: e,
            })?;
            return Ok(Context {
                root,
                dir,
                ignore: IgnoreRules::parse(&text),
            });
        }
        for name in [".berthignore", ".containerignore", ".dockerignore"] {
            match dir.read_to_string(name) {
                Ok(text) => {
                    ignore = IgnoreRules::parse(&text);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(BuildError::Context {
                        path: root.join(name),
                        source: e,
                    });
                }
            }
        }
        Ok(Context { root, dir, ignore })
    }

    /// Opens the file `rel` for reading, resolved inside the context.
    pub fn open_file(&self, rel: &str) -> Result<fs::File, BuildError> {
        self.dir.open(rel).map_err(|e| BuildError::Context {
            path: self.abs(rel),
            source: e,
        })
    }

    /// `rel` resolved inside the context (see [`scope::resolve`]).
    pub fn resolve(&self, rel: &str, follow_last: bool) -> Result<String, BuildError> {
        scope::resolve(&self.root, rel, follow_last).map_err(|e| BuildError::Context {
            path: self.abs(rel),
            source: e,
        })
    }

    /// The context's absolute root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The entries a COPY source names: the matches of `source` (a path or a glob, relative
    /// to the context root even when written with a leading `/`), each resolved inside the
    /// context (a symlink followed, keeping the name the source gave it) and followed by
    /// everything under it when it is a directory, in sorted order. Each match is returned
    /// with the listing of its subtree.
    pub fn select(
        &self,
        source: &str,
    ) -> Result<Vec<(ContextEntry, Vec<ContextEntry>)>, BuildError> {
        let clean =
            clean_relative(source).ok_or_else(|| BuildError::OutsideContext(source.to_string()))?;
        let roots = if has_glob(&clean) {
            self.glob(&clean)?
        } else {
            vec![clean.clone()]
        };
        let mut out = Vec::new();
        let mut resolved_elsewhere = None;
        for named in roots {
            let rel = self.resolve(&named, true)?;
            if rel != named {
                resolved_elsewhere = Some(rel.clone());
            }
            if !rel.is_empty() && self.ignore.is_excluded(&rel) {
                continue;
            }
            let Some(mut entry) = self.entry(&rel)? else {
                continue;
            };
            entry.name = named.rsplit('/').next().unwrap_or_default().to_string();
            let mut children = Vec::new();
            if entry.kind == EntryKind::Dir {
                let path = self.abs(&rel);
                let dir = open_dir(None, &path).map_err(|e| BuildError::Context {
                    path: path.clone(),
                    source: e,
                })?;
                self.walk(&rel, dir, &mut children)?;
            }
            out.push((entry, children));
        }
        if out.is_empty() {
            return Err(match resolved_elsewhere {
                Some(resolved) if !has_glob(&clean) => BuildError::MissingResolved {
                    named: source.to_string(),
                    resolved,
                },
                _ => BuildError::MissingSource(source.to_string()),
            });
        }
        Ok(out)
    }

    fn abs(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// The entry at `rel` (a path [`Context::resolve`] gave, so no symlink before its last
    /// component), without following a symlink there; `None` if absent.
    pub fn entry(&self, rel: &str) -> Result<Option<ContextEntry>, BuildError> {
        let name = rel.rsplit('/').next().unwrap_or_default();
        stat_entry(nix::fcntl::AT_FDCWD, &self.abs(rel), rel, name)
    }

    /// The names in directory `rel`, sorted. A name that is not UTF-8 cannot be a layer
    /// path: it is skipped when the ignore file excludes it (matched by its lossy form) or
    /// when only a glob looks (`strict` false: it matches no pattern), and an error when a
    /// copy would need it.
    fn sorted_children(&self, rel: &str, strict: bool) -> Result<Vec<String>, BuildError> {
        let path = self.abs(rel);
        let dir = open_dir(None, &path).map_err(|e| BuildError::Context { path, source: e })?;
        self.names_in(rel, &dir, strict)
    }

    /// [`Context::sorted_children`] of `rel`, open as `dir`.
    fn names_in(&self, rel: &str, dir: &fs::File, strict: bool) -> Result<Vec<String>, BuildError> {
        use std::os::unix::ffi::OsStrExt;
        let err = |e: nix::errno::Errno| BuildError::Context {
            path: self.abs(rel),
            source: e.into(),
        };
        let fd = dir.try_clone().map_err(|e| BuildError::Context {
            path: self.abs(rel),
            source: e,
        })?;
        let mut listing = nix::dir::Dir::from_fd(fd.into()).map_err(err)?;
        let mut names = Vec::new();
        for e in listing.iter() {
            let bytes = e.map_err(err)?.file_name().to_bytes().to_vec();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            match String::from_utf8(bytes) {
                Ok(name) => names.push(name),
                Err(e) => {
                    let n = std::ffi::OsStr::from_bytes(e.as_bytes());
                    let lossy = n.to_string_lossy().into_owned();
                    let child = if rel.is_empty() {
                        lossy
                    } else {
                        format!("{rel}/{lossy}")
                    };
                    if strict && !self.ignore.is_excluded(&child) {
                        return Err(BuildError::NonUtf8Path(self.abs(rel).join(n)));
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Appends everything under directory `rel`, open as `dir` (depth first, sorted,
    /// parents before children), skipping ignored paths. Each child is looked at through
    /// its directory's descriptor (`fstatat`, `openat` without following links): no path
    /// is walked again from the root, and a directory swapped for a link mid-walk is not
    /// followed.
    ///
    /// A large tree's walk is mostly those calls, one per file, and they run in parallel:
    /// directories are listed by this thread and by helpers (as jobs, newest first, so the
    /// descriptors open at once stay about as many as the tree is deep), and their
    /// listings are put together here in order. The result, and the first error in that
    /// order, are those of a walk by one thread.
    fn walk(
        &self,
        rel: &str,
        dir: fs::File,
        out: &mut Vec<ContextEntry>,
    ) -> Result<(), BuildError> {
        let helpers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) - 1;
        let walk = Walk::default();
        walk.push(vec![Job::Open(rel.to_string(), dir)]);
        std::thread::scope(|scope| {
            // Also if this thread panics: the helpers must end for the scope to.
            let _stop = StopWalk(&walk);
            for _ in 0..helpers {
                // A helper that cannot start leaves the work to the others.
                let _ = std::thread::Builder::new().spawn_scoped(scope, || {
                    while let Some(job) = walk.next_job() {
                        let listed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.list(&walk, job)
                        }));
                        if listed.is_err() {
                            walk.fail();
                        }
                    }
                });
            }
            self.put_together(&walk, rel, out)
        })
    }

    /// Appends the listing of `rel` and, after each directory in it, its own.
    fn put_together(
        &self,
        walk: &Walk,
        rel: &str,
        out: &mut Vec<ContextEntry>,
    ) -> Result<(), BuildError> {
        let listing = walk
            .take(rel, |job| self.list(walk, job))
            .map_err(|e| match e {
                Some(e) => e,
                None => BuildError::Context {
                    path: self.abs(rel),
                    source: std::io::Error::other("a thread listing the context panicked"),
                },
            })?;
        for item in listing {
            let (entry, sub) = item?;
            if let Some(entry) = entry {
                out.push(entry);
            }
            if let Some(sub) = sub {
                self.put_together(walk, &sub, out)?;
            }
        }
        Ok(())
    }

    /// Lists a directory: its children in order, each stat'ed (unless ignored with all
    /// under it), its subdirectories handed on as jobs. A child that cannot be looked at
    /// ends the listing with its error in its place: what comes before it (subdirectories
    /// included) is walked first, as one thread would.
    fn list(&self, walk: &Walk, job: Job) {
        let (rel, dir) = match job {
            Job::Open(rel, dir) => (rel, Ok(dir)),
            Job::At(rel, parent, name) => {
                let dir = open_dir(Some(&parent), Path::new(&name));
                (rel, dir)
            }
        };
        let mut jobs = Vec::new();
        let listing = dir
            .map_err(|e| BuildError::Context {
                path: self.abs(&rel),
                source: e,
            })
            .and_then(|dir| {
                let dir = std::sync::Arc::new(dir);
                let mut listing = Vec::new();
                for name in self.names_in(&rel, &dir, true)? {
                    let child = if rel.is_empty() {
                        name.clone()
                    } else {
                        format!("{rel}/{name}")
                    };
                    let excluded = self.ignore.is_excluded(&child);
                    if excluded && !self.ignore.may_reinclude_under(&child) {
                        continue;
                    }
                    let entry = match stat_entry(&*dir, Path::new(&name), &child, &name) {
                        Ok(Some(entry)) => entry,
                        Ok(None) => continue,
                        Err(e) => {
                            listing.push(Err(e));
                            break;
                        }
                    };
                    let sub = (entry.kind == EntryKind::Dir).then(|| child.clone());
                    if sub.is_some() {
                        jobs.push(Job::At(child, std::sync::Arc::clone(&dir), name));
                    }
                    listing.push(Ok(((!excluded).then_some(entry), sub)));
                }
                Ok(listing)
            });
        // The first subdirectory is taken first (the jobs are a stack).
        jobs.reverse();
        walk.listed(rel, listing, jobs);
    }

    /// Paths matching a glob, component by component, sorted. Directories on the way are
    /// resolved inside the context; each match's last component is left as it is named.
    fn glob(&self, pattern: &str) -> Result<Vec<String>, BuildError> {
        let mut current = vec![String::new()];
        for comp in pattern.split('/') {
            let mut next = Vec::new();
            for base in &current {
                let dir = self.resolve(base, true)?;
                if !has_glob(comp) {
                    let p = if dir.is_empty() {
                        comp.to_string()
                    } else {
                        format!("{dir}/{comp}")
                    };
                    if fs::symlink_metadata(self.abs(&p)).is_ok() {
                        next.push(p);
                    }
                    continue;
                }
                if !fs::symlink_metadata(self.abs(&dir)).is_ok_and(|m| m.is_dir()) {
                    continue;
                }
                for name in self.sorted_children(&dir, false)? {
                    if glob_component(comp, &name) {
                        next.push(if dir.is_empty() {
                            name
                        } else {
                            format!("{dir}/{name}")
                        });
                    }
                }
            }
            current = next;
        }
        Ok(current)
    }
}

/// A directory to list: one open already, or one to open in its (open) parent.
enum Job {
    Open(String, fs::File),
    At(String, std::sync::Arc<fs::File>, String),
}

/// A directory's children in order: each entry (`None` when ignored but looked into for
/// re-included paths) and, for a directory, its path, whose own listing follows it; or,
/// last, the error of the child that could not be looked at.
type Listing = Vec<Result<(Option<ContextEntry>, Option<String>), BuildError>>;

/// The work of a walk shared by its threads.
#[derive(Default)]
struct Walk {
    state: std::sync::Mutex<WalkState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct WalkState {
    jobs: Vec<Job>,
    listed: std::collections::HashMap<String, Result<Listing, BuildError>>,
    stopped: bool,
    panicked: bool,
}

impl Walk {
    fn lock(&self) -> std::sync::MutexGuard<'_, WalkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, jobs: Vec<Job>) {
        self.lock().jobs.extend(jobs);
        self.changed.notify_all();
    }

    /// Records a directory's listing and the jobs it gave.
    fn listed(&self, rel: String, listing: Result<Listing, BuildError>, jobs: Vec<Job>) {
        let mut state = self.lock();
        state.listed.insert(rel, listing);
        state.jobs.extend(jobs);
        drop(state);
        self.changed.notify_all();
    }

    /// A helper's next job; `None` once the walk is over.
    fn next_job(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if state.stopped {
                return None;
            }
            if let Some(job) = state.jobs.pop() {
                return Some(job);
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The listing of `rel`, doing jobs (with `work`) while it is not there yet. `Err(None)`
    /// if a helper panicked.
    fn take(&self, rel: &str, mut work: impl FnMut(Job)) -> Result<Listing, Option<BuildError>> {
        let mut state = self.lock();
        loop {
            if let Some(listing) = state.listed.remove(rel) {
                return listing.map_err(Some);
            }
            if state.panicked {
                return Err(None);
            }
            if let Some(job) = state.jobs.pop() {
                drop(state);
                work(job);
                state = self.lock();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn fail(&self) {
        self.lock().panicked = true;
        self.changed.notify_all();
    }

    fn stop(&self) {
        let mut state = self.lock();
        state.stopped = true;
        state.jobs.clear();
        drop(state);
        self.changed.notify_all();
    }
}

/// Stops a walk's helpers when dropped.
struct StopWalk<'a>(&'a Walk);

impl Drop for StopWalk<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The context entry `rel` (named `name`) at `path` relative to `dir`, without following
/// a symlink there; `None` if absent.
fn stat_entry<Fd: std::os::fd::AsFd + Copy>(
    dir: Fd,
    path: &Path,
    rel: &str,
    name: &str,
) -> Result<Option<ContextEntry>, BuildError> {
    let err = |e: nix::errno::Errno| BuildError::Context {
        path: path.to_path_buf(),
        source: e.into(),
    };
    let st = match nix::sys::stat::fstatat(dir, path, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let fmt = st.st_mode & libc::S_IFMT;
    let kind = match fmt {
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFREG => EntryKind::File,
        libc::S_IFLNK => {
            let target = nix::fcntl::readlinkat(dir, path).map_err(err)?;
            EntryKind::Symlink(target.to_string_lossy().into_owned())
        }
        _ => return Err(BuildError::SpecialFile(rel.to_string())),
    };
    Ok(Some(ContextEntry {
        rel: rel.to_string(),
        name: name.to_string(),
        kind,
        mode: st.st_mode & 0o7777,
        size: if fmt == libc::S_IFREG {
            st.st_size as u64
        } else {
            0
        },
        stamp: (
            st.st_dev,
            st.st_ino,
            i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
            i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        ),
    }))
}

/// Opens a directory (relative to `at` when given) for reading, never through a symlink in
/// its last component.
fn open_dir(at: Option<&fs::File>, path: &Path) -> std::io::Result<fs::File> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match at {
        Some(dir) => nix::fcntl::openat(dir, path, flags, Mode::empty()),
        None => nix::fcntl::open(path, flags, Mode::empty()),
    }?;
    Ok(fs::File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> (tempfile::TempDir, Context) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs::create_dir_all(p.join("www/css")).unwrap();
        fs::write(p.join("www/index.html"), "hi").unwrap();
        fs::write(p.join("www/css/a.css"), "a").unwrap();
        fs::write(p.join("www/notes.md"), "n").unwrap();
        fs::write(p.join("app.js"), "js").unwrap();
        fs::write(p.join("lib.js"), "js").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("www/passwd")).unwrap();
        fs::write(p.join(".dockerignore"), "**/*.md\n").unwrap();
        let c = Context::open(p).unwrap();
        (d, c)
    }

    #[test]
    fn directories_list_their_tree_sorted_without_ignored_files() {
        let (_d, c) = ctx();
        let sel = c.select("www/").unwrap();
        assert_eq!(sel.len(), 1);
        let names: Vec<_> = sel[0].1.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(
            names,
            ["www/css", "www/css/a.css", "www/index.html", "www/passwd"]
        );
        assert_eq!(
            sel[0].1[3].kind,
            EntryKind::Symlink("/etc/passwd".into()),
            "symlinks are not followed"
        );
    }

    #[test]
    fn a_large_tree_walks_in_order_and_fails_where_one_thread_would() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        // Wide and deep, names that sort around `/` (`a-b`, `a.b`, `a/...`), ignored
        // subtrees with a re-included file.
        for i in 0..40 {
            for j in 0..8 {
                let dir = p.join(format!("t/d{i:02}/e{j}/f"));
                fs::create_dir_all(&dir).unwrap();
                fs::write(dir.join("x"), "x").unwrap();
                fs::write(dir.parent().unwrap().join("y.log"), "y").unwrap();
            }
            fs::write(p.join(format!("t/d{i:02}-z")), "z").unwrap();
            fs::write(p.join(format!("t/d{i:02}.z")), "z").unwrap();
        }
        fs::write(p.join(".dockerignore"), "t/d1*\n!t/d13/e1/f/x\n**/*.log\n").unwrap();
        // The same walk, one directory at a time, by the standard library.
        fn reference(root: &Path, rel: &str, ignore: &IgnoreRules, out: &mut Vec<String>) {
            let mut names: Vec<_> = fs::read_dir(root.join(rel))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                let child = format!("{rel}/{}", name.to_str().unwrap());
                let excluded = ignore.is_excluded(&child);
                if excluded && !ignore.may_reinclude_under(&child) {
                    continue;
                }
                if !excluded {
                    out.push(child.clone());
                }
                if root.join(&child).is_dir() {
                    reference(root, &child, ignore, out);
                }
            }
        }
        let c = Context::open(p).unwrap();
        let mut want = Vec::new();
        reference(p, "t", &c.ignore, &mut want);
        assert!(want.contains(&"t/d13/e1/f/x".to_string()));
        assert!(!want.iter().any(|w| w.starts_with("t/d12")));
        let got: Vec<String> = c.select("t").unwrap()[0]
            .1
            .iter()
            .map(|e| e.rel.clone())
            .collect();
        assert_eq!(got, want);
        // A file no layer can hold, deep in the tree, and others after it in walk order
        // (one a sibling of a directory it is under, another deeper): the error is the
        // first one's, every time.
        let bad = |dir: &str| p.join(dir).join(std::ffi::OsStr::from_bytes(b"bad\xff"));
        fs::write(bad("t/d05/e3/f"), "").unwrap();
        fs::write(bad("t/d30/e0"), "").unwrap();
        nix::sys::stat::mknod(
            &p.join("t/d05/zz.fifo"),
            nix::sys::stat::SFlag::S_IFIFO,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
            0,
        )
        .unwrap();
        for _ in 0..20 {
            match c.select("t") {
                Err(BuildError::NonUtf8Path(path)) => assert!(path.starts_with(p.join("t/d05"))),
                other => panic!("{:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn globs_and_escapes() {
        let (_d, c) = ctx();
        let sel = c.select("*.js").unwrap();
        assert_eq!(
            sel.iter().map(|s| s.0.rel.as_str()).collect::<Vec<_>>(),
            ["app.js", "lib.js"]
        );
        assert!(matches!(
            c.select("../outside"),
            Err(BuildError::OutsideContext(_))
        ));
        assert!(matches!(
            c.select("www/../../x"),
            Err(BuildError::OutsideContext(_))
        ));
        assert!(matches!(
            c.select("nope.txt"),
            Err(BuildError::MissingSource(_))
        ));
        assert!(
            matches!(c.select("www/notes.md"), Err(BuildError::MissingSource(_))),
            "ignored files are not in the context"
        );
        assert_eq!(c.select("/app.js").unwrap()[0].0.rel, "app.js");
    }
}
