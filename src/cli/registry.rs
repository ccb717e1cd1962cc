//! `berth push`, `berth pull`, `berth login`, `berth logout`.

use std::io::Read;
use std::path::PathBuf;

use miette::miette;

use super::{CliError, GlobalOpts, Output, human_size};
use crate::registry_client::auth::{self, Credential, Secret};
use crate::registry_client::push::{BlobAction, BlobReport};
use crate::registry_client::{Client, ClientOptions, Reference, RegistryError, pull, push};
use crate::store::Store;

/// Arguments of `berth push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// Only find out what would be sent (HEAD requests only).
    #[arg(long)]
    pub dry_run: bool,
    /// A CA certificate (PEM) to trust for this registry (also read: certs.d/HOST:PORT/*.crt
    /// under ~/.config/berth, /etc/containers, /etc/docker).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The local image.
    pub image: String,
    /// Where to: REGISTRY/REPOSITORY[:TAG] (http:// for a plain-HTTP registry).
    pub destination: String,
}

/// Arguments of `berth pull`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// A CA certificate (PEM) to trust for this registry (also read: certs.d/HOST:PORT/*.crt
    /// under ~/.config/berth, /etc/containers, /etc/docker).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// REGISTRY/REPOSITORY[:TAG][@DIGEST].
    pub reference: String,
}

/// Arguments of `berth copy`.
#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// Only find out what would be copied (HEAD requests only).
    #[arg(long)]
    pub dry_run: bool,
    /// A CA certificate (PEM) to trust for both registries.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// REGISTRY/REPOSITORY[:TAG][@DIGEST].
    pub source: String,
    /// REGISTRY/REPOSITORY[:TAG] (without a tag: the source's).
    pub destination: String,
}

/// Arguments of `berth login`.
#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// User name.
    #[arg(short, long)]
    pub username: String,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// A CA certificate (PEM) to trust for this registry (also read: certs.d/HOST:PORT/*.crt
    /// under ~/.config/berth, /etc/containers, /etc/docker).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The registry (host[:port]).
    pub registry: String,
}

/// Arguments of `berth logout`.
#[derive(Debug, clap::Args)]
pub struct LogoutArgs {
    /// The registry (host[:port]).
    pub registry: String,
}

/// A registry error as a report with its hint.
pub fn registry_error(e: RegistryError) -> CliError {
    let hint = e.hint();
    let report = match hint {
        Some(h) => miette!(help = h, "{e}"),
        None => miette!("{e}"),
    };
    CliError::failed(report)
}

fn reference(s: &str) -> Result<Reference, CliError> {
    s.parse::<Reference>().map_err(|e| {
        CliError::invalid(miette!(
            help = "like 127.0.0.1:5000/app:1 or ghcr.io/org/app:tag",
            "{e}"
        ))
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    crate::registry_client::runtime()
        .map_err(|e| CliError::failed(miette!("cannot start the network runtime: {e}")))
}

/// `berth push [--dry-run] IMG REF`.
pub fn push(g: &GlobalOpts, args: &PushArgs, out: &mut Output) -> Result<(), CliError> {
    let store = Store::open(&g.store_dir())?;
    let digest = store.resolve(&args.image)?;
    let mut dst = reference(&args.destination)?;
    if dst.digest.is_some() {
        return Err(CliError::invalid(miette!(
            "push to a tag, not a digest: the registry computes the digest"
        )));
    }
    if dst.tag.is_none() {
        dst = dst.with_tag("latest");
    }
    let options = ClientOptions {
        ca_file: args.ca_file.clone(),
        attempts: None,
    };
    let client = Client::new(&dst, &options).map_err(registry_error)?;
    let verbose = !out.json && !out.quiet;
    let transfers = super::progress::Transfers::new(verbose);
    let on_blob = |b: &BlobReport| {
        let what = match &b.action {
            BlobAction::Present => "present".to_string(),
            BlobAction::Mount { from } => format!("mounted from {from}"),
            BlobAction::Upload if args.dry_run => format!("upload {}", human_size(b.size)),
            BlobAction::Upload => format!("uploaded {}", human_size(b.size)),
        };
        let show = verbose && (transfers.active() || args.dry_run || g.verbose > 0);
        transfers.done(
            b.digest.short(),
            show.then(|| format!("{} {what}", b.digest.short())),
        );
    };
    let bars = transfers.clone();
    let progress: push::BytesProgress =
        std::sync::Arc::new(move |d, total, n| bars.advance(d.short(), total, n));
    let report = runtime()?
        .block_on(push::push(
            &client,
            &store,
            &digest,
            &dst,
            args.dry_run,
            &on_blob,
            transfers.active().then_some(progress),
        ))
        .map_err(registry_error)?;
    if out.json {
        return Ok(out.json_value(&report)?);
    }
    let upload: u64 = report
        .blobs
        .iter()
        .filter(|b| b.action == BlobAction::Upload)
        .map(|b| b.size)
        .sum();
    let count = |f: fn(&BlobAction) -> bool| report.blobs.iter().filter(|b| f(&b.action)).count();
    let present = count(|a| matches!(a, BlobAction::Present));
    let mounted = count(|a| matches!(a, BlobAction::Mount { .. }));
    let uploaded = count(|a| matches!(a, BlobAction::Upload));
    if args.dry_run {
        out.note(format!(
            "would push {dst}: {present} blobs present, {mounted} to mount, {uploaded} to upload ({})",
            human_size(upload)
        ))?;
    } else {
        out.note(format!(
            "pushed {dst}: {present} blobs present, {mounted} mounted, {uploaded} uploaded ({}) in {:.2} s",
            human_size(report.bytes_sent),
            report.seconds
        ))?;
    }
    out.line(&report.digest)?;
    Ok(())
}

/// `berth pull REF`.
pub fn pull(g: &GlobalOpts, args: &PullArgs, out: &mut Output) -> Result<(), CliError> {
    let store = Store::open(&g.store_dir())?;
    let src = reference(&args.reference)?;
    let options = ClientOptions {
        ca_file: args.ca_file.clone(),
        attempts: None,
    };
    let client = Client::new(&src, &options).map_err(registry_error)?;
    let transfers = super::progress::Transfers::new(!out.json && !out.quiet);
    let on_blob = |d: &crate::store::Digest, size: u64, fetched: bool| {
        let line = if fetched {
            format!("{} fetched {}", d.short(), human_size(size))
        } else {
            format!("{} present", d.short())
        };
        transfers.done(
            d.short(),
            (transfers.active() || g.verbose > 0).then_some(line),
        );
    };
    let bars = transfers.clone();
    let progress: push::BytesProgress =
        std::sync::Arc::new(move |d, total, n| bars.advance(d.short(), total, n));
    let report = runtime()?
        .block_on(pull::pull(
            &client,
            &store,
            &src,
            &on_blob,
            transfers.active().then_some(progress),
        ))
        .map_err(registry_error)?;
    if out.json {
        return Ok(out.json_value(&report)?);
    }
    out.note(format!(
        "pulled {}: {} blobs fetched ({}), {} already here, in {:.2} s",
        report.tag,
        report.blobs_fetched,
        human_size(report.bytes),
        report.blobs_present,
        report.seconds
    ))?;
    out.line(&report.digest)?;
    Ok(())
}

/// `berth copy SRC DST`: digest-preserving, only what the destination lacks.
pub fn copy(_g: &GlobalOpts, args: &CopyArgs, out: &mut Output) -> Result<(), CliError> {
    let from = reference(&args.source)?;
    let to = reference(&args.destination)?;
    let options = ClientOptions {
        ca_file: args.ca_file.clone(),
        attempts: None,
    };
    let src = Client::new(&from, &options).map_err(registry_error)?;
    let dst = Client::new(&to, &options).map_err(registry_error)?;
    let report = runtime()?
        .block_on(crate::registry_client::copy::copy(
            &src,
            &dst,
            &from,
            &to,
            args.dry_run,
        ))
        .map_err(registry_error)?;
    if out.json {
        return Ok(out.json_value(&report)?);
    }
    for b in &report.blobs {
        let what = match &b.action {
            BlobAction::Present => "present".to_string(),
            BlobAction::Mount { from } => format!("mount from {from}"),
            BlobAction::Upload => format!("copy {}", human_size(b.size)),
        };
        out.note(format!("{} {what}", b.digest.short()))?;
    }
    let amount = if args.dry_run {
        let to_copy: u64 = report
            .blobs
            .iter()
            .filter(|b| b.action == BlobAction::Upload)
            .map(|b| b.size)
            .sum();
        format!("{} to copy", human_size(to_copy))
    } else {
        format!("{} copied", human_size(report.bytes_copied))
    };
    out.note(format!(
        "{} {} → {} ({amount}) in {:.2} s",
        if args.dry_run { "would copy" } else { "copied" },
        report.source,
        report.destination,
        report.seconds
    ))?;
    out.line(&report.digest)?;
    Ok(())
}

/// `berth login -u USER --password-stdin REGISTRY`: checks the credentials against the
/// registry, then stores them where Docker does.
pub fn login(_g: &GlobalOpts, args: &LoginArgs, out: &mut Output) -> Result<(), CliError> {
    if !args.password_stdin {
        return Err(CliError::invalid(miette!(
            help = "echo \"$TOKEN\" | berth login -u USER --password-stdin REGISTRY",
            "give the password on standard input with --password-stdin (never as an argument)"
        )));
    }
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .map_err(|e| CliError::failed(miette!("cannot read the password: {e}")))?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    let r = reference(&format!("{}/berth-login-check", args.registry))?;
    let options = ClientOptions {
        ca_file: args.ca_file.clone(),
        attempts: Some(2),
    };
    let client = Client::new(&r, &options)
        .map_err(registry_error)?
        .with_credential(Credential::Basic {
            username: args.username.clone(),
            password: Secret(password.clone()),
        });
    runtime()?
        .block_on(client.check())
        .map_err(registry_error)?;
    let path = auth::login(&r.registry, &args.username, &password)
        .map_err(|e| CliError::failed(miette::Report::from_err(e)))?;
    out.note(format!(
        "login succeeded; credentials saved in {}",
        path.display()
    ))?;
    Ok(())
}

/// `berth logout REGISTRY`.
pub fn logout(_g: &GlobalOpts, args: &LogoutArgs, out: &mut Output) -> Result<(), CliError> {
    let r = reference(&format!("{}/x", args.registry))?;
    let removed =
        auth::logout(&r.registry).map_err(|e| CliError::failed(miette::Report::from_err(e)))?;
    out.note(if removed {
        format!("removed the credentials for {}", r.registry)
    } else {
        format!("no credentials were stored for {}", r.registry)
    })?;
    Ok(())
}
