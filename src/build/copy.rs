//! COPY and ADD: which files a step reads (its cache inputs), where they land in the image
//! (Docker's destination rules, symlinked parents resolved inside the image), and writing
//! them as one sorted, normalised layer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::BuildError;
use super::archive;
use super::cache::{ContentHashReader, StatCache};
use super::context::{Context, ContextEntry, EntryKind};
use super::imagefs::{FsKind, FsNode, ImageFs, normalize, open_layer};
use super::layer::{EarlyCopy, EntryMeta, Layer, LayerCompression, LayerWriter, entry_error};
use crate::store::{Digest, Store, StoreError};

/// What a planned entry holds.
#[derive(Debug, Clone)]
pub enum Content {
    /// A directory.
    Dir,
    /// A file read from `path`; `stamp` set for context files (hashed into the stat cache).
    File {
        /// Where the bytes are.
        path: PathBuf,
        /// Size.
        size: u64,
        /// Context identity, for the stat cache.
        stamp: Option<(u64, u64, i128, i128)>,
    },
    /// A symlink.
    Symlink(String),
    /// A hardlink to another planned path.
    Hardlink(String),
}

/// One entry of the layer to write.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Content.
    pub content: Content,
    /// Metadata.
    pub meta: EntryMeta,
}

/// The layer to write: image path (no leading `/`) → entry, sorted.
pub type Plan = BTreeMap<String, Planned>;

/// Who owns copied files.
#[derive(Debug, Clone, Copy, Default)]
pub struct Owner {
    /// User id.
    pub uid: u64,
    /// Group id.
    pub gid: u64,
}

/// The inputs of a context COPY: every file's hash (or link target) and mode, keyed by
/// context path. `complete` is false when some hash is not in the stat cache yet.
#[derive(Debug, Default)]
pub struct Inputs {
    /// path → (hash, link target or "dir"; mode).
    pub files: BTreeMap<String, (String, u32)>,
    /// Every file's hash is known.
    pub complete: bool,
}

/// Context entries a COPY selected: each match with the listing of its subtree.
pub type Selection = Vec<(ContextEntry, Vec<ContextEntry>)>;

/// Selects the context entries `sources` name and what is known of their content.
pub fn context_inputs(
    ctx: &Context,
    sources: &[String],
    stat: &StatCache,
    exclude: &super::ignore::IgnoreRules,
) -> Result<(Selection, Inputs), BuildError> {
    // A wildcard that matches nothing is no error while another source matches
    // (`COPY *.json *.lock ./`), as in BuildKit; a missing plain path always is.
    let mut selected = Vec::new();
    let mut empty_glob = None;
    for s in sources {
        match ctx.select(s) {
            Ok(found) => selected.extend(found),
            Err(e @ BuildError::MissingSource(_)) if s.contains(['*', '?', '[']) => {
                empty_glob.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    if let (true, Some(e)) = (selected.is_empty(), empty_glob) {
        return Err(e);
    }
    // `--exclude`: patterns relative to each source (a glob's match by its name).
    if !exclude.is_empty() {
        selected.retain(|(root, _)| !exclude.is_excluded(&root.name));
        for (root, children) in &mut selected {
            let prefix = if root.rel.is_empty() {
                String::new()
            } else {
                format!("{}/", root.rel)
            };
            children.retain(|c| {
                c.rel
                    .strip_prefix(&prefix)
                    .is_none_or(|rel| !exclude.is_excluded(rel))
            });
        }
    }
    let mut inputs = Inputs {
        files: BTreeMap::new(),
        complete: true,
    };
    for (root, children) in &selected {
        for e in std::iter::once(root).chain(children) {
            let value = match &e.kind {
                EntryKind::Dir => "dir".to_string(),
                EntryKind::Symlink(t) => format!("-> {t}"),
                EntryKind::File => match stat.get(&ctx.root().join(&e.rel), e.size, e.stamp) {
                    Some(h) => h.to_string(),
                    None => {
                        inputs.complete = false;
                        String::new()
                    }
                },
            };
            inputs.files.insert(
                if e.rel.is_empty() {
                    ".".into()
                } else {
                    e.rel.clone()
                },
                (value, e.mode),
            );
        }
    }
    Ok((selected, inputs))
}

/// Hashes the selected files whose hash `inputs` lacks, recording them in the stat cache.
pub fn hash_missing(
    ctx: &Context,
    selected: &[(ContextEntry, Vec<ContextEntry>)],
    stat: &mut StatCache,
    inputs: &mut Inputs,
) -> Result<(), BuildError> {
    for (root, children) in selected {
        for e in std::iter::once(root).chain(children) {
            let Some(slot) = inputs.files.get_mut(&e.rel) else {
                continue;
            };
            if e.kind != EntryKind::File || !slot.0.is_empty() {
                continue;
            }
            let abs = ctx.root().join(&e.rel);
            let f = ctx.open_file(&e.rel)?;
            let mut r = ContentHashReader::new(f);
            io::copy(&mut r, &mut io::sink()).map_err(|err| BuildError::Context {
                path: abs.clone(),
                source: err,
            })?;
            let hash = r.finish();
            stat.put(&abs, e.size, e.stamp, &hash);
            slot.0 = hash;
        }
    }
    inputs.complete = true;
    Ok(())
}

fn join(dir: &str, name: &str) -> String {
    match (dir.is_empty(), name.is_empty()) {
        (_, true) => dir.to_string(),
        (true, _) => name.to_string(),
        _ => format!("{dir}/{name}"),
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Where a COPY writes: `(path, is_dir)`, the destination resolved through symlinks in the
/// image. `dest` is absolute; `dir_form` when it must be a directory (trailing `/`, several
/// sources, a directory source, or an existing directory).
fn destination(
    fs: &ImageFs,
    dest: &str,
    several: bool,
    dir_source: bool,
) -> Result<(String, bool), BuildError> {
    let trimmed = dest.trim_end_matches('/');
    let resolved_full = fs
        .resolve(trimmed, true)
        .ok_or_else(|| BuildError::Destination(dest.to_string(), "too many symlinks".into()))?;
    let exists_dir = fs
        .get(&resolved_full)
        .is_some_and(|n| n.kind == FsKind::Dir)
        || resolved_full.is_empty();
    if dest.ends_with('/') || several || dir_source || exists_dir {
        return Ok((resolved_full, true));
    }
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => ("", trimmed),
    };
    let parent = fs
        .resolve(parent, true)
        .ok_or_else(|| BuildError::Destination(dest.to_string(), "too many symlinks".into()))?;
    Ok((join(&parent, name), false))
}

/// Adds every ancestor of the planned paths: a missing one as a new directory (0755,
/// root), an existing one with the metadata it has. Layers are unpacked one by one and
/// stacked by overlayfs, where the topmost copy of a directory decides its owner and mode:
/// an ancestor a layer left implicit would come back as root's 0755 (BuildKit's layers
/// carry their ancestors too).
pub(crate) fn add_parents(plan: &mut Plan, fs: &ImageFs, epoch: u64) -> Result<(), BuildError> {
    let mut added = Plan::new();
    // In sorted order a directory comes before what is under it, so the first ancestor
    // found planned had its own ancestors seen to already: the climb stops there.
    for p in plan.keys() {
        let mut cur = p.as_str();
        while let Some((parent, _)) = cur.rsplit_once('/') {
            cur = parent;
            if let Some(planned) = plan.get(parent) {
                // An archive entry under a link the same archive made (`evil -> /etc`, then
                // `evil/x`): berth never writes through links, and a layer holding both would
                // not unpack.
                if matches!(planned.content, Content::Symlink(_)) {
                    return Err(BuildError::Destination(
                        format!("/{p}"),
                        format!("/{parent} is a symlink; berth does not write through links"),
                    ));
                }
                break;
            }
            if added.contains_key(parent) {
                break;
            }
            match fs.get(parent) {
                Some(n) if n.kind == FsKind::Dir => {
                    added.insert(
                        parent.to_string(),
                        Planned {
                            content: Content::Dir,
                            meta: EntryMeta {
                                mode: n.mode,
                                uid: n.uid,
                                gid: n.gid,
                                mtime: epoch,
                            },
                        },
                    );
                }
                Some(_) => {
                    return Err(BuildError::Destination(
                        format!("/{p}"),
                        format!("/{parent} is not a directory"),
                    ));
                }
                None => {
                    added.insert(
                        parent.to_string(),
                        Planned {
                            content: Content::Dir,
                            meta: EntryMeta {
                                mode: 0o755,
                                uid: 0,
                                gid: 0,
                                mtime: epoch,
                            },
                        },
                    );
                }
            }
        }
    }
    plan.extend(added);
    Ok(())
}

/// Plans a COPY/ADD from the context.
#[allow(clippy::too_many_arguments)]
pub fn plan_from_context(
    ctx: &Context,
    selected: &[(ContextEntry, Vec<ContextEntry>)],
    dest: &str,
    chown: Option<Owner>,
    chmod: Option<u32>,
    add: bool,
    fs: &ImageFs,
    epoch: u64,
    spool: &Path,
) -> Result<Plan, BuildError> {
    let several = selected.len() > 1;
    let dir_source = selected
        .first()
        .is_some_and(|(e, _)| e.kind == EntryKind::Dir);
    let (target, is_dir) = destination(fs, dest, several, dir_source)?;
    let mut plan = Plan::new();
    let owner = chown.unwrap_or_default();
    let meta = |mode: u32| EntryMeta {
        mode: chmod.unwrap_or(mode),
        uid: owner.uid,
        gid: owner.gid,
        mtime: epoch,
    };
    for (root, children) in selected {
        if add
            && root.kind == EntryKind::File
            && let Some(kind) =
                archive::sniff(ctx.open_file(&root.rel)?, &ctx.root().join(&root.rel))?
        {
            // A local archive is extracted into the destination, which is then a directory;
            // entries keep their archive ownership unless --chown says otherwise.
            extract_archive(
                ctx.open_file(&root.rel)?,
                &ctx.root().join(&root.rel),
                kind,
                &target,
                chmod,
                chown,
                epoch,
                spool,
                &mut plan,
            )?;
            continue;
        }
        let base = match root.kind {
            EntryKind::Dir => target.clone(),
            _ if is_dir => join(&target, &root.name),
            _ => target.clone(),
        };
        let prefix_len = if root.rel.is_empty() {
            0
        } else {
            root.rel.len() + 1
        };
        for e in std::iter::once(root).chain(children) {
            let path = if std::ptr::eq(e, root) {
                base.clone()
            } else {
                join(&base, &e.rel[prefix_len..])
            };
            if path.is_empty() {
                continue; // COPY into `/`: the root directory itself is not an entry.
            }
            let content = match &e.kind {
                EntryKind::Dir => Content::Dir,
                EntryKind::Symlink(t) => Content::Symlink(t.clone()),
                EntryKind::File => Content::File {
                    path: ctx.root().join(&e.rel),
                    size: e.size,
                    stamp: Some(e.stamp),
                },
            };
            let mode = if matches!(e.kind, EntryKind::Symlink(_)) {
                0o777
            } else {
                e.mode
            };
            plan.insert(
                path,
                Planned {
                    content,
                    meta: meta(mode),
                },
            );
        }
    }
    add_parents(&mut plan, fs, epoch)?;
    Ok(plan)
}

/// Extracts a local archive (ADD) into the plan under `dir`, spooling file contents.
#[allow(clippy::too_many_arguments)]
fn extract_archive(
    file: File,
    path: &Path,
    kind: archive::Kind,
    dir: &str,
    chmod: Option<u32>,
    owner: Option<Owner>,
    epoch: u64,
    spool: &Path,
    plan: &mut Plan,
) -> Result<(), BuildError> {
    let mut n = 0;
    archive::for_each(file, path, kind, |e, content| {
        let h = &e.header;
        let meta = EntryMeta {
            mode: chmod.unwrap_or(h.mode().unwrap_or(0o644) & 0o7777),
            uid: owner.map_or(h.uid().unwrap_or(0), |o| o.uid),
            gid: owner.map_or(h.gid().unwrap_or(0), |o| o.gid),
            mtime: epoch,
        };
        let content = match (h.entry_type(), e.link) {
            (tar::EntryType::Directory, _) => Content::Dir,
            (tar::EntryType::Symlink, Some(target)) => Content::Symlink(target),
            (tar::EntryType::Link, Some(target)) => Content::Hardlink(join(dir, &target)),
            (tar::EntryType::Regular | tar::EntryType::Continuous, _) => {
                n += 1;
                let spooled = spool.join(format!("add-{n}"));
                let mut out = File::create(&spooled).map_err(|source| BuildError::Context {
                    path: spooled.clone(),
                    source,
                })?;
                let size = io::copy(content, &mut out).map_err(|err| BuildError::Archive {
                    path: path.to_path_buf(),
                    why: err.to_string(),
                })?;
                Content::File {
                    path: spooled,
                    size,
                    stamp: None,
                }
            }
            (other, _) => {
                return Err(BuildError::Archive {
                    path: path.to_path_buf(),
                    why: format!(
                        "entry `{}` is a {other:?}, which ADD does not create",
                        e.rel
                    ),
                });
            }
        };
        plan.insert(join(dir, &e.rel), Planned { content, meta });
        Ok(())
    })
}

/// Plans a `COPY --from`: entries of another image, contents spooled from its layers.
#[allow(clippy::too_many_arguments)]
pub fn plan_from_image(
    store: &Store,
    src: &ImageFs,
    sources: &[String],
    exclude: &super::ignore::IgnoreRules,
    dest: &str,
    owner: Owner,
    chmod: Option<u32>,
    fs: &ImageFs,
    epoch: u64,
    spool: &Path,
) -> Result<Plan, BuildError> {
    // Resolve sources (globs in the last component) to image paths, each with the name
    // it is copied under: a followed link keeps its own name (`COPY --from=busybox
    // /bin/paste /test/` makes /test/paste), as in Docker.
    let mut roots: Vec<String> = Vec::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for s in sources {
        let resolved = src
            .resolve(s, true)
            .ok_or_else(|| BuildError::MissingSource(s.clone()))?;
        let name = basename(&resolved);
        if name.contains(['*', '?', '[']) {
            let parent = resolved.rsplit_once('/').map_or("", |(p, _)| p);
            let prefix = if parent.is_empty() {
                String::new()
            } else {
                format!("{parent}/")
            };
            let hits: Vec<String> = src
                .nodes
                .keys()
                .filter(|p| {
                    p.starts_with(&prefix)
                        && !p[prefix.len()..].contains('/')
                        && super::ignore::glob_component(name, &p[prefix.len()..])
                })
                .cloned()
                .collect();
            if hits.is_empty() {
                return Err(BuildError::MissingSource(s.clone()));
            }
            roots.extend(hits);
        } else if resolved.is_empty() || src.get(&resolved).is_some() {
            let named = basename(s.trim_end_matches('/'));
            if !named.is_empty() && named != "." && named != ".." {
                names.insert(resolved.clone(), named.to_string());
            }
            roots.push(resolved);
        } else {
            return Err(BuildError::MissingSource(s.clone()));
        }
    }
    let several = roots.len() > 1;
    let dir_source = roots
        .first()
        .is_some_and(|r| r.is_empty() || src.get(r).is_some_and(|n| n.kind == FsKind::Dir));
    let (target, is_dir) = destination(fs, dest, several, dir_source)?;
    let mut plan = Plan::new();
    // Files whose bytes must be spooled: (source path) → destination path(s).
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for root in &roots {
        let root_is_dir = root.is_empty() || src.get(root).is_some_and(|n| n.kind == FsKind::Dir);
        let base = if root_is_dir {
            target.clone()
        } else if is_dir {
            join(
                &target,
                names
                    .get(root)
                    .map_or_else(|| basename(root), String::as_str),
            )
        } else {
            target.clone()
        };
        let prefix = if root.is_empty() {
            String::new()
        } else {
            format!("{root}/")
        };
        let under = src
            .nodes
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, n)| (p.clone(), n));
        let items: Vec<(String, &FsNode)> = if root.is_empty() {
            under.collect()
        } else {
            std::iter::once((root.clone(), src.get(root).expect("checked")))
                .chain(under)
                .collect()
        };
        for (path, node) in items {
            let rel = if path == *root {
                ""
            } else {
                &path[prefix.len()..]
            };
            let dst = join(&base, rel);
            if dst.is_empty() || (!rel.is_empty() && exclude.is_excluded(rel)) {
                continue;
            }
            let meta = EntryMeta {
                mode: chmod.unwrap_or(node.mode),
                uid: owner.uid,
                gid: owner.gid,
                mtime: epoch,
            };
            let content = match &node.kind {
                FsKind::Dir => Content::Dir,
                FsKind::Symlink(t) => Content::Symlink(t.clone()),
                FsKind::File => {
                    wanted.entry(path.clone()).or_default().push(dst.clone());
                    Content::File {
                        path: PathBuf::new(),
                        size: node.size,
                        stamp: None,
                    }
                }
                FsKind::Hardlink(t) => {
                    wanted.entry(t.clone()).or_default().push(dst.clone());
                    Content::File {
                        path: PathBuf::new(),
                        size: src.get(t).map_or(0, |n| n.size),
                        stamp: None,
                    }
                }
                FsKind::Other => return Err(BuildError::SpecialFile(format!("/{path}"))),
            };
            plan.insert(dst, Planned { content, meta });
        }
    }
    spool_files(store, src, &wanted, spool, &mut plan)?;
    add_parents(&mut plan, fs, epoch)?;
    Ok(plan)
}

/// Streams each layer that holds wanted files once, writing their bytes to spool files.
fn spool_files(
    store: &Store,
    src: &ImageFs,
    wanted: &BTreeMap<String, Vec<String>>,
    spool: &Path,
    plan: &mut Plan,
) -> Result<(), BuildError> {
    let mut by_layer: BTreeMap<usize, Vec<&String>> = BTreeMap::new();
    for path in wanted.keys() {
        let layer = src
            .get(path)
            .map(|n| n.layer)
            .ok_or_else(|| BuildError::MissingSource(format!("/{path}")))?;
        by_layer.entry(layer).or_default().push(path);
    }
    let mut n = 0;
    for (layer, paths) in by_layer {
        let (digest, media_type) = &src.layers[layer];
        let bad = |e: io::Error| {
            BuildError::Store(StoreError::BadDocument {
                what: "layer",
                digest: digest.to_string(),
                message: e.to_string(),
            })
        };
        let mut archive = tar::Archive::new(open_layer(store, digest, media_type)?);
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let raw = entry.path_bytes().into_owned();
            let Some(path) = std::str::from_utf8(&raw).ok().and_then(normalize) else {
                continue;
            };
            if !paths.contains(&&path) {
                continue;
            }
            n += 1;
            let spooled = spool.join(format!("from-{n}"));
            let mut out = File::create(&spooled).map_err(|e| BuildError::Context {
                path: spooled.clone(),
                source: e,
            })?;
            let size = io::copy(&mut entry, &mut out).map_err(bad)?;
            for dst in &wanted[&path] {
                if let Some(p) = plan.get_mut(dst) {
                    p.content = Content::File {
                        path: spooled.clone(),
                        size,
                        stamp: None,
                    };
                }
            }
        }
    }
    Ok(())
}

/// The context-relative path of a planned file read from the context.
fn context_rel<'a>(
    src: &'a Path,
    stamp: &Option<(u64, u64, i128, i128)>,
    ctx: Option<&Context>,
) -> Option<&'a str> {
    use std::os::unix::ffi::OsStrExt;
    match (stamp, ctx) {
        // Planned as the root joined with a clean relative path: cut at the byte level
        // (`Path::strip_prefix` compares component by component).
        (Some(_), Some(c)) => {
            let root = c.root().as_os_str().as_bytes();
            let rest = src.as_os_str().as_bytes().strip_prefix(root)?;
            let rel = match root.ends_with(b"/") {
                true => rest, // The context is `/`.
                false => rest.strip_prefix(b"/")?,
            };
            std::str::from_utf8(rel).ok()
        }
        _ => None,
    }
}

/// Opens a planned file: a context file inside the context (never through a symlink out
/// of it); a spooled one is berth's own.
fn open_content(src: &Path, rel: Option<&str>, ctx: Option<&Context>) -> Result<File, BuildError> {
    match (rel, ctx) {
        (Some(rel), Some(c)) => c.open_file(rel),
        _ => File::open(src).map_err(|e| BuildError::Context {
            path: src.to_path_buf(),
            source: e,
        }),
    }
}

/// How a planned entry appears in the layer's entry index.
fn describe_planned(path: &str, p: &Planned) -> super::imagefs::IndexEntry {
    use super::layer::describe;
    match &p.content {
        Content::Dir => describe(path, 'd', &p.meta, 0, ""),
        Content::File { size, .. } => describe(path, 'f', &p.meta, *size, ""),
        Content::Symlink(t) => describe(path, 'l', &p.meta, 0, t),
        Content::Hardlink(t) => describe(path, 'h', &p.meta, 0, t),
    }
}

/// A written layer and the nodes it added.
pub type Written = (Layer, Vec<(String, FsNode)>);

/// Writes a plan as a layer. Context files are hashed as they stream into the layer; their
/// hashes go into the stat cache and `inputs`, so a cold build reads each file once.
///
/// When every file's hash is known already (a rebuild) and an earlier layer of this step
/// began with the same entries, the layer resumes after them (see
/// [`LayerWriter::resuming`]): a change deep in the tree costs the bytes after it, not
/// the whole layer.
#[allow(clippy::too_many_arguments)]
pub fn write_plan(
    store: &Store,
    plan: &Plan,
    compression: LayerCompression,
    reuse_from: &[Digest],
    early: Option<EarlyCopy>,
    ctx: Option<&Context>,
    stat: &mut StatCache,
    inputs: &mut Inputs,
) -> Result<Written, BuildError> {
    let mut resumed = false;
    let mut early = early;
    let mut attempt = |reuse_from: &[Digest], resumed: &mut bool| {
        write_plan_once(
            store,
            plan,
            compression,
            reuse_from,
            early.take(),
            ctx,
            stat,
            inputs,
            resumed,
        )
    };
    match attempt(reuse_from, &mut resumed) {
        // A resumed layer that failed (the earlier blob damaged or gone, its saved state
        // wrong, or anything else) is written again in full: what that one says is the
        // error worth reporting.
        Err(e) if resumed => {
            crate::say!(
                "warning: could not resume this layer after the last build's ({e}); writing it in full"
            );
            attempt(&[], &mut resumed)
        }
        other => other,
    }
}

#[allow(clippy::too_many_arguments)]
fn write_plan_once(
    store: &Store,
    plan: &Plan,
    compression: LayerCompression,
    reuse_from: &[Digest],
    early: Option<EarlyCopy>,
    ctx: Option<&Context>,
    stat: &mut StatCache,
    inputs: &mut Inputs,
    resumed: &mut bool,
) -> Result<Written, BuildError> {
    // Each entry's identity as far as known before writing: a context file by the hash
    // the stat cache gave it; a file copied from an image has none.
    let identity = |inputs: &Inputs, p: &Planned| -> Option<String> {
        match &p.content {
            Content::File { path, stamp, .. } => context_rel(path, stamp, ctx)
                .and_then(|rel| inputs.files.get(rel))
                .map(|slot| slot.0.clone())
                .filter(|h| !h.is_empty()),
            _ => Some(String::new()),
        }
    };
    // The entries known before writing, as the index describes them, with their
    // identities: what a resumed layer announces for the entries it does not write.
    let mut planned: Vec<[u8; 32]> = Vec::new();
    let mut known: Vec<(super::imagefs::IndexEntry, String)> = Vec::new();
    for (path, p) in plan {
        let Some(id) = identity(inputs, p) else { break };
        let entry = describe_planned(path, p);
        planned.push(super::layer::fingerprint(
            planned.last(),
            &entry,
            p.meta.mtime,
            &id,
        ));
        known.push((entry, id));
    }
    let (mut w, resume_at) =
        LayerWriter::resuming(store, compression, reuse_from, &planned, early)?;
    *resumed = resume_at.is_some();
    let mut nodes = Vec::with_capacity(plan.len());
    let werr = |path: &str, e: io::Error| {
        entry_error(e, |source| BuildError::Context {
            path: PathBuf::from(format!("/{path}")),
            source,
        })
    };
    for (i, (path, p)) in plan.iter().enumerate() {
        let (kind, size) = match &p.content {
            Content::Dir => (FsKind::Dir, 0),
            Content::Symlink(t) => (FsKind::Symlink(t.clone()), 0),
            Content::Hardlink(t) => (FsKind::Hardlink(t.clone()), 0),
            Content::File { size, .. } => (FsKind::File, *size),
        };
        nodes.push((
            path.clone(),
            FsNode {
                kind,
                mode: p.meta.mode,
                uid: p.meta.uid,
                gid: p.meta.gid,
                size,
                layer: 0,
            },
        ));
        match resume_at {
            // Already in the layer.
            Some(at) if i < at.entry => {
                let (entry, id) = std::mem::take(&mut known[i]);
                w.skip(entry, &p.meta, id);
                continue;
            }
            // The entry the layer resumed in: its bytes from there on.
            Some(at) if i == at.entry => {
                let (entry, id) = std::mem::take(&mut known[i]);
                let content = match &p.content {
                    Content::File {
                        path: src, stamp, ..
                    } => {
                        let rel = context_rel(src, stamp, ctx);
                        Some(open_content(src, rel, ctx)?)
                    }
                    _ => None,
                };
                let src = match &p.content {
                    Content::File { path: src, .. } => src.clone(),
                    _ => PathBuf::from(format!("/{path}")),
                };
                w.finish_entry(entry, &p.meta, &id, content, at.offset)
                    .map_err(|e| {
                        entry_error(e, |source| BuildError::Context { path: src, source })
                    })?;
                continue;
            }
            _ => {}
        }
        match &p.content {
            Content::Dir => w.dir(path, &p.meta).map_err(|e| werr(path, e))?,
            Content::Symlink(t) => w.symlink(path, t, &p.meta).map_err(|e| werr(path, e))?,
            Content::Hardlink(t) => w.hardlink(path, t, &p.meta).map_err(|e| werr(path, e))?,
            Content::File {
                path: src,
                size,
                stamp,
            } => {
                let rel = context_rel(src, stamp, ctx);
                let f = open_content(src, rel, ctx)?;
                let reader = io::BufReader::with_capacity(128 << 10, f);
                // The input slot of a context file: hash it while it streams only when the
                // stat cache did not know it (a first build); otherwise it is known already.
                let slot = match (stamp, rel) {
                    (Some(stamp), Some(rel)) => {
                        inputs.files.get_mut(rel).map(|slot| (slot, *stamp))
                    }
                    _ => None,
                };
                let ctx_err = |e| {
                    entry_error(e, |source| BuildError::Context {
                        path: src.clone(),
                        source,
                    })
                };
                match slot {
                    Some((slot, stamp)) if slot.0.is_empty() => {
                        let mut hashing = ContentHashReader::new(reader);
                        w.file(path, &p.meta, *size, &mut hashing)
                            .map_err(ctx_err)?;
                        let hash = hashing.finish();
                        stat.put(src, *size, stamp, &hash);
                        w.identify_last(&hash);
                        slot.0 = hash;
                    }
                    Some((slot, _)) => {
                        w.file(path, &p.meta, *size, reader).map_err(ctx_err)?;
                        w.identify_last(&slot.0);
                    }
                    None => w.file(path, &p.meta, *size, reader).map_err(ctx_err)?,
                }
            }
        }
    }
    let layer = w.finish()?;
    inputs.complete = true;
    Ok((layer, nodes))
}

/// The digest of a step's cache inputs.
pub fn inputs_digest(inputs: &Inputs) -> Digest {
    // Streamed into the hash: the JSON of a large context is hundreds of kilobytes.
    let hashing = crate::store::HashingWriter::new(io::sink());
    let mut w = io::BufWriter::with_capacity(64 << 10, hashing);
    serde_json::to_writer(&mut w, &inputs.files).expect("inputs serialise");
    let hashing = w
        .into_inner()
        .map_err(|e| e.into_error())
        .expect("a sink never fails");
    hashing.finish().1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inputs_digest_is_that_of_their_json() {
        // Cache keys stay what they were when the JSON was built in memory.
        let mut inputs = Inputs {
            files: BTreeMap::new(),
            complete: true,
        };
        for i in 0..5000u32 {
            let hash = format!("b3:{}", blake3::hash(&i.to_le_bytes()).to_hex());
            inputs
                .files
                .insert(format!("deps/pkg{i}/mod \"{i}\".py"), (hash, 0o644));
        }
        let json = serde_json::to_vec(&inputs.files).unwrap();
        assert!(json.len() > 64 << 10, "more than one buffer's worth");
        assert_eq!(inputs_digest(&inputs), Digest::of(&json));
    }
}
