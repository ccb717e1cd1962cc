//! `berth import`: a root filesystem, as a directory or a tar archive (optionally gzipped),
//! becomes a one-layer base image, as `docker import` does. Ownership and modes are kept;
//! times are normalised so the same tree imports to the same digest. Device nodes, FIFOs and
//! sockets are skipped: the runtime provides `/dev`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use oci_spec::image::{HistoryBuilder, ImageConfiguration, Os};

use super::BuildError;
use super::archive;
use super::layer::{EntryMeta, Layer, LayerCompression, LayerWriter, entry_error};
use crate::store::{ImageConfig, Store, StoredImage};

/// What an import produced.
pub struct Imported {
    /// The new image.
    pub image: StoredImage,
    /// Entries skipped (devices, FIFOs, sockets).
    pub skipped: usize,
    /// Keeps the image from gc until the caller has tagged it.
    pub pin: crate::store::Pin,
}

fn ctx_err(path: &Path) -> impl Fn(io::Error) -> BuildError + '_ {
    move |e| {
        entry_error(e, |source| BuildError::Context {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Imports `path` (a directory or a tar/tar.gz file) into a one-layer image.
pub fn import(
    store: &Store,
    path: &Path,
    compression: LayerCompression,
    epoch: u64,
    changes: &[crate::manifest::steps::StepSpec],
) -> Result<Imported, BuildError> {
    let _guard = store.use_guard()?;
    let md = fs::metadata(path).map_err(ctx_err(path))?;
    let mut w = LayerWriter::new(store, compression, &[])?;
    let skipped = if md.is_dir() {
        import_dir(&mut w, path, epoch)?
    } else {
        import_tar(&mut w, path, epoch)?
    };
    let layer = w.finish()?;
    let image = write_config(store, &layer, path, epoch, changes)?;
    let pin = store.pin(&image.digest)?;
    Ok(Imported {
        image,
        skipped,
        pin,
    })
}

fn import_dir(w: &mut LayerWriter, root: &Path, epoch: u64) -> Result<usize, BuildError> {
    let mut skipped = 0;
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let mut names: Vec<String> = Vec::new();
        for e in fs::read_dir(&dir).map_err(ctx_err(&dir))? {
            let e = e.map_err(ctx_err(&dir))?;
            names.push(
                e.file_name()
                    .into_string()
                    .map_err(|n| BuildError::NonUtf8Path(dir.join(n)))?,
            );
        }
        names.sort();
        // A directory's entries are written in sorted order, then its subdirectories are
        // walked in sorted order: a parent always precedes its children and the order
        // depends only on the tree.
        let mut subdirs = Vec::new();
        for name in names {
            let rel_child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let abs = root.join(&rel_child);
            let md = fs::symlink_metadata(&abs).map_err(ctx_err(&abs))?;
            let meta = EntryMeta {
                mode: md.mode() & 0o7777,
                uid: u64::from(md.uid()),
                gid: u64::from(md.gid()),
                mtime: epoch,
            };
            let ft = md.file_type();
            let werr = ctx_err(&abs);
            if ft.is_dir() {
                w.dir(&rel_child, &meta).map_err(&werr)?;
                subdirs.push(rel_child);
            } else if ft.is_symlink() {
                let target = fs::read_link(&abs).map_err(&werr)?;
                w.symlink(&rel_child, &target.to_string_lossy(), &meta)
                    .map_err(&werr)?;
            } else if ft.is_file() {
                if md.nlink() > 1 {
                    if let Some(first) = links.get(&(md.dev(), md.ino())) {
                        w.hardlink(&rel_child, first, &meta).map_err(&werr)?;
                        continue;
                    }
                    links.insert((md.dev(), md.ino()), rel_child.clone());
                }
                let f = File::open(&abs).map_err(&werr)?;
                w.file(
                    &rel_child,
                    &meta,
                    md.len(),
                    io::BufReader::with_capacity(128 << 10, f),
                )
                .map_err(&werr)?;
            } else if ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket()
            {
                skipped += 1;
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(skipped)
}

fn import_tar(w: &mut LayerWriter, path: &Path, epoch: u64) -> Result<usize, BuildError> {
    // Anything that is not gzip is read as a plain tar (old archives lack the ustar magic).
    let open = || {
        File::open(path).map_err(|e| BuildError::Context {
            path: path.to_path_buf(),
            source: e,
        })
    };
    let kind = archive::sniff(open()?, path)?.unwrap_or(archive::Kind::Tar);
    let bad = |e: io::Error| {
        entry_error(e, |e| BuildError::Archive {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    };
    let mut skipped = 0;
    archive::for_each(open()?, path, kind, |e, content| {
        let h = &e.header;
        let meta = EntryMeta {
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            mtime: epoch,
        };
        match (h.entry_type(), e.link) {
            (tar::EntryType::Directory, _) => w.dir(&e.rel, &meta).map_err(bad),
            (tar::EntryType::Symlink, Some(target)) => {
                w.symlink(&e.rel, &target, &meta).map_err(bad)
            }
            (tar::EntryType::Link, Some(target)) => w.hardlink(&e.rel, &target, &meta).map_err(bad),
            (tar::EntryType::Regular | tar::EntryType::Continuous, _) => w
                .file(&e.rel, &meta, h.size().unwrap_or(0), content)
                .map_err(bad),
            _ => {
                skipped += 1;
                Ok(())
            }
        }
    })?;
    Ok(skipped)
}

fn write_config(
    store: &Store,
    layer: &Layer,
    source: &Path,
    epoch: u64,
    changes: &[crate::manifest::steps::StepSpec],
) -> Result<StoredImage, BuildError> {
    let created = jiff::Timestamp::from_second(epoch as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into());
    let mut oci = ImageConfiguration::default();
    oci.set_architecture(match std::env::consts::ARCH {
        "x86_64" => oci_spec::image::Arch::Amd64,
        "aarch64" => oci_spec::image::Arch::ARM64,
        other => oci_spec::image::Arch::Other(other.to_string()),
    });
    oci.set_os(Os::Linux);
    oci.set_created(Some(created.clone()));
    oci.rootfs_mut()
        .diff_ids_mut()
        .push(layer.diff_id.to_string());
    let name = source.file_name().map_or_else(
        || source.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let history = HistoryBuilder::default()
        .created(created)
        .created_by(format!("berth import {name}"))
        .comment("berth".to_string())
        .build()
        .expect("history fields are set");
    oci.set_history(Some(vec![history]));
    let mut config = ImageConfig {
        oci,
        extra: Default::default(),
    };
    // `--change`: Dockerfile metadata instructions applied to the config, as
    // `docker import --change` does.
    for change in changes {
        // Words keep their quotes until expanded, as in a build (with the config's ENV).
        let env = super::meta::env_pairs(&config);
        let expanded = super::engine::expand_spec(change, &|k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })?;
        super::meta::apply(&mut config, &expanded);
    }
    Ok(store.write_image(&config, vec![layer.descriptor()])?)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::manifest::schema::Compression;

    #[test]
    fn a_directory_imports_reproducibly_with_hardlinks() {
        let src = tempfile::tempdir().unwrap();
        let p = src.path();
        fs::create_dir_all(p.join("bin")).unwrap();
        fs::write(p.join("bin/busybox"), b"\x7fELF").unwrap();
        fs::hard_link(p.join("bin/busybox"), p.join("bin/sh-hard")).unwrap();
        std::os::unix::fs::symlink("busybox", p.join("bin/sh")).unwrap();
        let c = LayerCompression {
            algorithm: Compression::Gzip,
            level: None,
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ia = import(&Store::open(a.path()).unwrap(), p, c, 0, &[]).unwrap();
        let ib = import(&Store::open(b.path()).unwrap(), p, c, 0, &[]).unwrap();
        assert_eq!(ia.image.digest, ib.image.digest);
        let store = Store::open(a.path()).unwrap();
        let layer = &ia.image.layers()[0];
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(store.open_blob(&layer.0).unwrap())
            .read_to_end(&mut tar_bytes)
            .unwrap();
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let entries: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("bin/".to_string(), tar::EntryType::Directory),
                ("bin/busybox".to_string(), tar::EntryType::Regular),
                ("bin/sh".to_string(), tar::EntryType::Symlink),
                ("bin/sh-hard".to_string(), tar::EntryType::Link),
            ]
        );
    }
}
