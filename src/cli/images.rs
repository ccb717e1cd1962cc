//! Image commands: `images`, `history`, `inspect`, `tag`, `rmi`, `gc`, `import`, `export`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::json;

use super::{CliError, GlobalOpts, Output, human_size};
use crate::build::layer::LayerCompression;
use crate::manifest::schema::Compression;
use crate::store::export::ExportFormat;
use crate::store::{Digest, Store};

/// Arguments of `berth history` and `berth inspect`.
#[derive(Debug, clap::Args)]
pub struct ImageArg {
    /// An image: NAME[:TAG], a digest, or a unique digest prefix.
    pub image: String,
}

/// Arguments of `berth tag`.
#[derive(Debug, clap::Args)]
pub struct TagArgs {
    /// The image to tag.
    pub source: String,
    /// The new name, NAME[:TAG].
    pub target: String,
}

/// Arguments of `berth rmi`.
#[derive(Debug, clap::Args)]
pub struct RmiArgs {
    /// Images to remove: tags, digests or digest prefixes (a digest removes all its tags).
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Remove the names even of an image a container or a kept release uses (its blobs
    /// stay while they do).
    #[arg(short, long)]
    pub force: bool,
}

/// Arguments of `berth gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Say what would be removed, and list what is kept and why; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also empty the `RUN --mount=type=cache` directories no build is using.
    #[arg(long)]
    pub cache: bool,
}

/// Arguments of `berth import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// A root filesystem: a directory, or a tar archive (optionally gzipped).
    pub path: PathBuf,
    /// The tag to give the image.
    #[arg(long, short = 't', value_name = "NAME[:TAG]")]
    pub tag: String,
    /// A Dockerfile instruction for the config (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER,
    /// VOLUME, WORKDIR, STOPSIGNAL, ONBUILD), as `docker import --change` (repeatable).
    #[arg(long = "change", short = 'c', value_name = "INSTRUCTION")]
    pub changes: Vec<String>,
}

/// Archive formats for `berth export`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FormatArg {
    /// An OCI image layout in a tar (oci-archive).
    Oci,
    /// Docker's archive (`docker save`, `podman load`).
    Docker,
}

/// Arguments of `berth export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The image to export.
    pub image: String,
    /// The archive to write (`-` for stdout).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Archive format.
    #[arg(long, value_enum, default_value = "oci")]
    pub format: FormatArg,
}

fn open(g: &GlobalOpts) -> Result<Store, CliError> {
    Ok(Store::open(&g.store_dir())?)
}

/// `berth images` options.
#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    /// Show full digests (as `docker images --digests`).
    #[arg(long)]
    pub digests: bool,
}

/// `berth images`: every tag with its digest, creation time, size and shared size.
pub fn images(g: &GlobalOpts, args: &ImagesArgs, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let tags = store.tags()?;
    let mut users: BTreeMap<Digest, BTreeSet<Digest>> = BTreeMap::new();
    let mut loaded = Vec::new();
    for t in &tags {
        let img = store.image(&t.digest())?;
        let blobs = std::iter::once(img.config_digest.clone())
            .chain(img.layers().into_iter().map(|(d, _)| d));
        for b in blobs {
            users.entry(b).or_default().insert(img.digest.clone());
        }
        loaded.push((t.name.clone(), img));
    }
    // Untagged images something needs (a container's, a kept release's), as Docker's
    // `<none>`: what gc keeps is never invisible.
    let roots = crate::deploy::local::roots(&store);
    let mut untagged: Vec<&Digest> = roots
        .iter()
        .map(|r| &r.digest)
        .filter(|d| !tags.iter().any(|t| t.digest() == **d))
        .collect();
    untagged.sort();
    untagged.dedup();
    for d in untagged {
        if let Ok(img) = store.image(d) {
            let blobs = std::iter::once(img.config_digest.clone())
                .chain(img.layers().into_iter().map(|(d, _)| d));
            for b in blobs {
                users.entry(b).or_default().insert(img.digest.clone());
            }
            loaded.push(("<none>".to_string(), img));
        }
    }
    let rows: Vec<_> = loaded
        .iter()
        .map(|(name, img)| {
            let shared: u64 = img.layers().iter().filter(|(d, _)| users[d].len() > 1).map(|(_, l)| l.size()).sum();
            let created = img.config.oci.created().clone().unwrap_or_default();
            json!({ "name": name, "digest": img.digest, "created": created, "size": img.total_size(), "shared_size": shared })
        })
        .collect();
    if out.json {
        return Ok(out.json_value(&rows)?);
    }
    let width = if args.digests { 71 } else { 12 };
    // Names as wide as the longest (a digest reference is 90 characters), at least 40.
    let names = rows
        .iter()
        .map(|r| r["name"].as_str().unwrap_or_default().chars().count())
        .max()
        .unwrap_or(0)
        .max(40);
    out.line(format!(
        "{:<names$} {:<width$}   {:<22} {:>10} {:>10}",
        "NAME", "DIGEST", "CREATED", "SIZE", "SHARED"
    ))?;
    for r in rows {
        let digest: Digest = r["digest"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .expect("stored digest");
        out.line(format!(
            "{:<names$} {:<width$}   {:<22} {:>10} {:>10}",
            r["name"].as_str().unwrap_or_default(),
            if args.digests {
                digest.as_str()
            } else {
                digest.short()
            },
            r["created"].as_str().unwrap_or_default(),
            human_size(r["size"].as_u64().unwrap_or(0)),
            human_size(r["shared_size"].as_u64().unwrap_or(0)),
        ))?;
    }
    // What rebuilds and removed tags left behind (docker shows it as <none> images).
    let garbage = store.unreachable(&roots)?;
    if !garbage.is_empty() && !out.quiet {
        let bytes: u64 = garbage.iter().map(|(_, size)| size).sum();
        out.line(format!(
            "{} in {} blob(s) no tag, container or kept release needs: `berth gc` removes them",
            human_size(bytes),
            garbage.len()
        ))?;
    }
    Ok(())
}

/// `berth history IMG`: each history entry, newest first, with its layer.
pub fn history(g: &GlobalOpts, args: &ImageArg, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let img = store.load_image(&args.image)?;
    let mut layers = img.layers().into_iter();
    let mut rows = Vec::new();
    for h in img.config.oci.history().clone().unwrap_or_default() {
        let layer = if h.empty_layer().unwrap_or(false) {
            None
        } else {
            layers.next()
        };
        rows.push(json!({
            "created": h.created(),
            "created_by": h.created_by(),
            "size": layer.as_ref().map_or(0, |(_, d)| d.size()),
            "digest": layer.as_ref().map(|(d, _)| d.to_string()),
        }));
    }
    rows.reverse();
    if out.json {
        return Ok(out.json_value(&rows)?);
    }
    out.line(format!("{:<14} {:>10}  {}", "LAYER", "SIZE", "CREATED BY"))?;
    for r in rows {
        let layer = r["digest"]
            .as_str()
            .map_or("-".to_string(), |d| d[7..19].to_string());
        out.line(format!(
            "{:<14} {:>10}  {}",
            layer,
            human_size(r["size"].as_u64().unwrap_or(0)),
            r["created_by"].as_str().unwrap_or("")
        ))?;
    }
    Ok(())
}

/// `berth inspect IMG`: the digest, tags, manifest and config as JSON.
pub fn inspect(g: &GlobalOpts, args: &ImageArg, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let img = store.load_image(&args.image)?;
    let tags: Vec<String> = store
        .tags()?
        .into_iter()
        .filter(|t| t.digest() == img.digest)
        .map(|t| t.name)
        .collect();
    let manifest: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&img.digest)?).unwrap_or_default();
    let config: serde_json::Value =
        serde_json::from_slice(&img.config.to_bytes()).unwrap_or_default();
    Ok(out.json_value(
        &json!({ "digest": img.digest, "tags": tags, "manifest": manifest, "config": config }),
    )?)
}

/// `berth tag SRC DST`.
pub fn tag(g: &GlobalOpts, args: &TagArgs, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let img = store.load_image(&args.source)?;
    store.set_tag(&args.target, &img.descriptor())?;
    let name = crate::store::normalize_tag(&args.target)?;
    if out.json {
        return Ok(out.json_value(&json!({ "name": name, "digest": img.digest }))?);
    }
    out.note(format!("{name} → {}", img.digest))?;
    Ok(())
}

/// `berth rmi IMG...`: untag, then delete the blobs no remaining tag uses.
pub fn rmi(g: &GlobalOpts, args: &RmiArgs, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let roots = crate::deploy::local::roots(&store);
    let mut removed = Vec::new();
    let mut untagged = Vec::new();
    for reference in &args.images {
        let img = store.load_image(reference)?;
        let tags = store.tags()?;
        let all: Vec<String> = tags
            .iter()
            .filter(|t| t.digest() == img.digest)
            .map(|t| t.name.clone())
            .collect();
        let names: Vec<String> = match crate::store::normalize_tag(reference) {
            Ok(n) if tags.iter().any(|t| t.name == n) => vec![n],
            _ => {
                // As Docker: by id, an image with several names needs -f.
                if all.len() > 1 && !args.force {
                    return Err(CliError::failed(miette::miette!(
                        help = "remove the names one by one, or -f to remove them all",
                        "{reference} has {} names ({}): not removed",
                        all.len(),
                        all.join(", ")
                    )));
                }
                all.clone()
            }
        };
        // As Docker: an image in use keeps its last name, naming its users, unless forced.
        let users: Vec<&str> = roots
            .iter()
            .filter(|r| r.digest == img.digest)
            .map(|r| r.why.as_str())
            .collect();
        if names.len() == all.len() && !users.is_empty() && !args.force {
            return Err(CliError::failed(miette::miette!(
                help = "stop and remove those first, or -f to remove only its names (its blobs stay while they are needed)",
                "{reference} is in use: {}",
                users.join(", ")
            )));
        }
        for n in names {
            store.remove_tag(&n)?;
            if !out.json {
                out.note(format!("untagged {n}"))?;
            }
            untagged.push(n);
        }
        removed.push(img);
    }
    let report = store.remove_unreferenced(&removed, &roots)?;
    if out.json {
        out.json_value(&json!({ "untagged": untagged, "removed": report }))?;
    } else {
        out.note(format!(
            "deleted {} blobs, {} freed",
            report.blobs,
            human_size(report.bytes)
        ))?;
    }
    Ok(())
}

/// `berth gc [--dry-run]`: every blob and unpacked layer no tag, container or kept release
/// needs goes (with `--dry-run`: what would go, and what is kept and why).
pub fn gc(g: &GlobalOpts, args: &GcArgs, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let report = store.gc(&crate::deploy::local::roots(&store), args.dry_run)?;
    let caches = if args.cache {
        crate::build::mounts::clear(&store, args.dry_run).map_err(|e| {
            CliError::failed(miette::miette!("cannot clear the build cache mounts: {e}"))
        })?
    } else {
        Vec::new()
    };
    if out.json {
        let mut v =
            serde_json::to_value(&report).map_err(|e| CliError::failed(miette::miette!("{e}")))?;
        if args.cache {
            v["cache_mounts"] = serde_json::to_value(&caches).unwrap_or_default();
        }
        return Ok(out.json_value(&v)?);
    }
    for c in &caches {
        let verb = match (c.removed, args.dry_run) {
            (false, _) => "keep (in use)",
            (true, true) => "would remove",
            (true, false) => "removed",
        };
        out.line(format!(
            "{verb} cache mount {} ({})",
            c.id,
            human_size(c.size)
        ))?;
    }
    if args.dry_run {
        for r in &report.kept {
            out.line(format!("keep {} ({})", r.digest.short(), r.why))?;
        }
    }
    out.line(format!(
        "{} {} blob(s) and {} unpacked layer(s), {} freed",
        if args.dry_run {
            "would remove"
        } else {
            "removed"
        },
        report.blobs,
        report.snapshots,
        human_size(report.bytes + report.snapshot_bytes)
    ))?;
    Ok(())
}

/// `--change` instructions, parsed as Dockerfile lines; only those that set the config.
fn import_changes(changes: &[String]) -> Result<Vec<crate::manifest::steps::StepSpec>, CliError> {
    use crate::manifest::steps::StepSpec;
    let mut out = Vec::new();
    for change in changes {
        let steps = crate::build::dockerfile::parse_instructions("--change", change).map_err(
            |diagnostics| CliError::invalid(crate::manifest::InvalidConfig { diagnostics }),
        )?;
        for step in steps {
            match step.spec {
                StepSpec::Cmd(_)
                | StepSpec::Entrypoint(_)
                | StepSpec::Env(_)
                | StepSpec::Expose(_)
                | StepSpec::Label(_)
                | StepSpec::User(_)
                | StepSpec::Volume(_)
                | StepSpec::Workdir(_)
                | StepSpec::StopSignal(_)
                | StepSpec::OnBuild(_)
                | StepSpec::Healthcheck(_)
                | StepSpec::Shell(_) => out.push(step.spec),
                _ => {
                    return Err(CliError::invalid(miette::miette!(
                        help = "--change takes CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME, WORKDIR, STOPSIGNAL, ONBUILD, HEALTHCHECK or SHELL",
                        "`{change}` changes files, not the config"
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// `berth import PATH --tag T`.
pub fn import(g: &GlobalOpts, args: &ImportArgs, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let name = crate::store::normalize_tag(&args.tag)?;
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let compression = LayerCompression {
        algorithm: Compression::Gzip,
        level: None,
    };
    let changes = import_changes(&args.changes)?;
    let imported = crate::build::import::import(&store, &args.path, compression, epoch, &changes)
        .map_err(|e| CliError::failed(miette::Report::from_err(e)))?;
    store.set_tag(&name, &imported.image.descriptor())?;
    if imported.skipped > 0 {
        out.note(format!(
            "skipped {} device nodes, FIFOs and sockets (the runtime provides /dev)",
            imported.skipped
        ))?;
    }
    if out.json {
        out.json_value(&json!({ "digest": imported.image.digest, "tag": name }))?;
    } else {
        out.line(&imported.image.digest)?;
    }
    Ok(())
}

/// `berth export IMG -o FILE [--format oci|docker]`.
pub fn export(g: &GlobalOpts, args: &ExportArgs, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let img = store.load_image(&args.image)?;
    let name = crate::store::normalize_tag(&args.image)
        .ok()
        .filter(|n| store.tags().is_ok_and(|t| t.iter().any(|t| &t.name == n)));
    let format = match args.format {
        FormatArg::Oci => ExportFormat::Oci,
        FormatArg::Docker => ExportFormat::Docker,
    };
    if args.output.as_os_str() == "-" {
        store.export(&img, name.as_deref(), format, std::io::stdout().lock())?;
        return Ok(());
    }
    let dir = args
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".berth-export-")
        .tempfile_in(dir)?;
    store.export(
        &img,
        name.as_deref(),
        format,
        std::io::BufWriter::new(tmp.as_file_mut()),
    )?;
    tmp.persist(&args.output)
        .map_err(|e| CliError::from(e.error))?;
    if out.json {
        return Ok(out.json_value(&json!({
            "path": args.output, "digest": img.digest, "format": format!("{:?}", args.format).to_lowercase(),
        }))?);
    }
    out.note(format!("wrote {} ({})", args.output.display(), img.digest))?;
    Ok(())
}

/// Arguments of `berth bundle`.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// The image.
    pub image: String,
    /// The bundle directory to write (created; must be empty if it exists).
    pub dir: PathBuf,
    /// The container's host name.
    #[arg(long, default_value = "berth")]
    pub hostname: String,
    /// The command, in place of the image's CMD (after its ENTRYPOINT), as `docker run`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// `berth bundle IMG DIR`: an OCI runtime bundle runc accepts.
pub fn bundle(g: &GlobalOpts, args: &BundleArgs, out: &mut Output) -> Result<(), CliError> {
    let store = open(g)?;
    let img = store.load_image(&args.image)?;
    crate::runtime::bundle::write_bundle(&store, &img, &args.dir, &args.hostname, &args.command)
        .map_err(|e| CliError::failed(miette::Report::from_err(e)))?;
    out.note(format!(
        "wrote {} (runc run --bundle {} ID)",
        args.dir.display(),
        args.dir.display()
    ))?;
    Ok(())
}
