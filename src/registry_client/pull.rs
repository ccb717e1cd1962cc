//! Pulling an image into the store: the manifest (from an index, the one for linux and this
//! machine's architecture), verified against its digest, then every blob the store lacks,
//! streamed into the store's ingest and verified for size and digest before it gets its
//! final name. A download that breaks resumes with `Range`. Layers come four at a time.

use std::io::Write;
use std::time::Instant;

use futures_util::StreamExt;
use oci_spec::image::{DescriptorBuilder, MediaType};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, RANGE};
use serde::Serialize;

use super::bounds::{DOCUMENT_DEADLINE, MAX_CONFIG, MAX_MANIFEST, SpeedWatch, read_bounded};
use super::push::{BlobLocations, BytesProgress, PARALLEL, manifest_blobs, manifest_media_type};
use super::{Client, MANIFEST_ACCEPT, Reference, RegistryError, pull_scope};
use crate::store::{Digest, Store};

/// The outcome of a pull.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    /// What was pulled.
    pub reference: String,
    /// The image manifest's digest.
    pub digest: Digest,
    /// The name it has in the store (`registry/repository:tag`, or `@sha256:…` for a
    /// pull by digest).
    pub tag: String,
    /// Blobs downloaded (the others were in the store).
    pub blobs_fetched: usize,
    /// Blobs already present.
    pub blobs_present: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Requests retried in this process (each also printed on stderr).
    pub retries: u64,
}

/// The architecture name OCI uses for this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

fn is_index(media: &str) -> bool {
    media.contains("image.index") || media.contains("manifest.list")
}

/// Fetches a manifest by tag or digest; returns its raw bytes, media type and digest,
/// verified against `expect` when given.
pub async fn fetch_manifest(
    client: &Client,
    repository: &str,
    reference: &str,
    expect: Option<&Digest>,
) -> Result<(Vec<u8>, String, Digest), RegistryError> {
    let url = client.url(&format!("{repository}/manifests/{reference}"));
    let resp = client
        .send(&pull_scope(repository), &|| {
            Ok(client
                .http()
                .get(&url)
                .header(ACCEPT, MANIFEST_ACCEPT)
                .timeout(DOCUMENT_DEADLINE))
        })
        .await?;
    if !resp.status().is_success() {
        return Err(client
            .fail(resp, repository, &format!("manifest {reference}"))
            .await);
    }
    let header_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
    let what = format!("manifest {repository}:{reference}");
    let bytes = read_bounded(resp, MAX_MANIFEST, &what).await?;
    let digest = Digest::of(&bytes);
    if let Some(want) = expect
        && *want != digest
    {
        return Err(RegistryError::DigestMismatch {
            what: format!("manifest {repository}@{want}"),
            expected: want.to_string(),
            actual: digest.to_string(),
        });
    }
    let media = match header_type {
        Some(t) if t.contains("manifest") || t.contains("index") => t,
        _ => manifest_media_type(&bytes),
    };
    Ok((bytes.to_vec(), media, digest))
}

/// From an index, the manifest for linux and this machine's architecture.
pub fn pick_platform(index: &[u8]) -> Result<Digest, RegistryError> {
    let v: serde_json::Value = serde_json::from_slice(index)
        .map_err(|e| RegistryError::Protocol(format!("an index that is not JSON: {e}")))?;
    let arch = oci_arch();
    let entries = v["manifests"].as_array().cloned().unwrap_or_default();
    let found = entries
        .iter()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch);
    let m = found.ok_or_else(|| {
        let have: Vec<String> = entries
            .iter()
            .map(|m| {
                format!(
                    "{}/{}",
                    m["platform"]["os"].as_str().unwrap_or("?"),
                    m["platform"]["architecture"].as_str().unwrap_or("?")
                )
            })
            .collect();
        RegistryError::Protocol(format!(
            "the image has no linux/{arch} variant (it has: {})",
            have.join(", ")
        ))
    })?;
    m["digest"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| RegistryError::Protocol("an index entry without a digest".into()))
}

/// Where a download goes.
enum Sink {
    /// The blob's partial file: continued across processes.
    Partial(crate::store::partial::PartialBlob),
    /// A private ingest file (another process holds the partial file).
    Private(crate::store::BlobWriter),
}

impl Sink {
    fn len(&self) -> u64 {
        match self {
            Sink::Partial(p) => p.len(),
            Sink::Private(_) => 0,
        }
    }

    fn restart(&mut self, store: &Store) -> Result<(), RegistryError> {
        match self {
            Sink::Partial(p) => p.restart().map_err(|source| RegistryError::Io {
                what: "restart a partial download".into(),
                source,
            }),
            Sink::Private(w) => {
                *w = store.blob_writer()?;
                Ok(())
            }
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Partial(p) => p.write_all(bytes),
            Sink::Private(w) => w.write_all(bytes),
        }
    }

    fn commit(self, digest: &Digest, size: u64) -> Result<(), crate::store::StoreError> {
        match self {
            Sink::Partial(p) => p.commit(digest, size),
            Sink::Private(w) => w.commit(Some((digest, size))).map(drop),
        }
    }
}

/// Downloads one blob into the store, verified; resumes with Range when the stream breaks
/// and where a killed pull stopped. Returns the bytes downloaded.
async fn fetch_blob(
    client: &Client,
    store: &Store,
    repository: &str,
    digest: &Digest,
    size: u64,
    progress: Option<&BytesProgress>,
) -> Result<u64, RegistryError> {
    let resumed = store.partial_len(digest) > 0;
    match fetch_blob_once(client, store, repository, digest, size, progress).await {
        // What an earlier pull left was not the blob's beginning (a corrupted partial,
        // now removed): once more, from zero.
        Err(RegistryError::DigestMismatch { .. }) if resumed => {
            fetch_blob_once(client, store, repository, digest, size, progress).await
        }
        r => r,
    }
}

async fn fetch_blob_once(
    client: &Client,
    store: &Store,
    repository: &str,
    digest: &Digest,
    size: u64,
    progress: Option<&BytesProgress>,
) -> Result<u64, RegistryError> {
    let url = client.url(&format!("{repository}/blobs/{digest}"));
    // The store's filesystem keeps its free-space reserve: a descriptor that claims more
    // than there is room for is refused up front, and the room is checked as bytes come.
    let limits = crate::store::limits::LayerLimits::configured()
        .map_err(|e| RegistryError::Protocol(e.to_string()))?;
    let room = |need: u64| -> Result<(), RegistryError> {
        let Ok((free, total)) =
            std::fs::File::open(store.root()).and_then(crate::store::limits::free_space)
        else {
            return Ok(());
        };
        let reserve = limits.reserve_bytes(total);
        if free < reserve.saturating_add(need) {
            return Err(RegistryError::Protocol(format!(
                "blob {digest} needs {need} more bytes, and the store's filesystem has {free} free with a reserve of {reserve} (BERTH_DISK_RESERVE)"
            )));
        }
        Ok(())
    };
    // Into the blob's partial file, continuing what a killed pull left (else, when another
    // process is downloading the same blob, into a private ingest file).
    let mut writer = match store.partial(digest)? {
        Some(p) => Sink::Partial(p),
        None => Sink::Private(store.blob_writer()?),
    };
    let mut have = writer.len();
    if have > size {
        writer.restart(store)?;
        have = 0;
    }
    if let Err(e) = room(size - have) {
        // Refused before a byte came: no empty partial file left behind.
        if have == 0
            && let Sink::Partial(p) = writer
        {
            p.discard();
        }
        return Err(e);
    }
    let mut next_check = 16u64 << 20;
    let mut downloaded = 0u64;
    let mut attempts = 0;
    while have < size || size == 0 {
        attempts += 1;
        let from = have;
        let resp = client
            .send(&pull_scope(repository), &|| {
                let r = client.http().get(&url);
                Ok(if from > 0 {
                    r.header(RANGE, format!("bytes={from}-"))
                } else {
                    r
                })
            })
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT if from > 0 => {}
            StatusCode::OK => {
                if from > 0 {
                    // No ranges here: start over.
                    writer.restart(store)?;
                    have = 0;
                }
            }
            _ => {
                return Err(client
                    .fail(resp, repository, &format!("blob {digest}"))
                    .await);
            }
        }
        let mut stream = resp.bytes_stream();
        let mut watch = SpeedWatch::new(client.low_speed());
        let mut broken = None;
        loop {
            match watch.next(&mut stream).await {
                Ok(Some(bytes)) => {
                    // Never more than the descriptor says: a registry cannot fill the disk.
                    if have + bytes.len() as u64 > size {
                        return Err(RegistryError::Protocol(format!(
                            "blob {digest} is larger than its descriptor says ({size} bytes)"
                        )));
                    }
                    writer
                        .write_all(&bytes)
                        .map_err(|source| RegistryError::Io {
                            what: format!("write blob {digest}"),
                            source,
                        })?;
                    have += bytes.len() as u64;
                    downloaded += bytes.len() as u64;
                    if downloaded >= next_check {
                        next_check = downloaded + (16 << 20);
                        room(0)?;
                    }
                    if let Some(p) = progress {
                        p(digest, size, bytes.len() as u64);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        if broken.is_none() && have == size {
            break;
        }
        if attempts >= 8 {
            return Err(RegistryError::Transport {
                registry: client.registry().to_string(),
                message: format!(
                    "the download of {digest} kept breaking at {have} of {size} bytes{}",
                    broken.map(|e| format!(" ({e})")).unwrap_or_default()
                ),
                hint: None,
            });
        }
        super::retry::retry(super::retry::Retry {
            registry: client.registry().to_string(),
            what: format!("the download of {} from byte {have}", digest.short()),
            attempt: attempts,
            of: 8,
            wait: super::retry::backoff(attempts),
            why: broken
                .map(|e| e.to_string())
                .unwrap_or_else(|| "the stream ended early".into()),
        })
        .await;
    }
    writer.commit(digest, size).map_err(|e| match e {
        crate::store::StoreError::DigestMismatch {
            actual,
            actual_size,
            ..
        } => RegistryError::DigestMismatch {
            what: format!("blob from {repository} ({size} bytes expected)"),
            expected: digest.to_string(),
            actual: format!("{actual} ({actual_size} bytes)"),
        },
        e => e.into(),
    })?;
    Ok(downloaded)
}

/// Pulls `src` into the store and tags it as `registry/repository:tag`.
pub async fn pull(
    client: &Client,
    store: &Store,
    src: &Reference,
    on_blob: &(dyn Fn(&Digest, u64, bool) + Sync),
    progress: Option<BytesProgress>,
) -> Result<PullReport, RegistryError> {
    let began = Instant::now();
    // No gc while blobs arrive that nothing references yet (until the tag is set).
    let _guard = store.use_guard()?;
    let repo = src.repository.as_str();
    let (mut bytes, mut media, mut digest) =
        fetch_manifest(client, repo, &src.manifest_ref(), src.digest.as_ref()).await?;
    if is_index(&media) {
        let want = pick_platform(&bytes)?;
        (bytes, media, digest) = fetch_manifest(client, repo, want.as_str(), Some(&want)).await?;
        if is_index(&media) {
            return Err(RegistryError::Protocol("an index inside an index".into()));
        }
    }
    let blobs = manifest_blobs(&bytes)?;
    if let Some((config, size)) = blobs.first()
        && *size > MAX_CONFIG
    {
        return Err(RegistryError::Protocol(format!(
            "the image's config {config} is {size} bytes, more than the {MAX_CONFIG} berth reads"
        )));
    }
    let known = BlobLocations::new(store, client.registry());
    let results: Vec<Result<(bool, u64), RegistryError>> = futures_util::stream::iter(blobs)
        .map(|(d, size)| {
            let known = &known;
            let progress = &progress;
            async move {
                if store.has_blob(&d) {
                    on_blob(&d, size, false);
                    return Ok((false, 0));
                }
                let n = fetch_blob(client, store, repo, &d, size, progress.as_ref()).await?;
                known.record(&d, repo);
                on_blob(&d, size, true);
                Ok((true, n))
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let (mut fetched, mut present, mut total) = (0, 0, 0);
    for r in results {
        let (got, n) = r?;
        if got {
            fetched += 1;
        } else {
            present += 1;
        }
        total += n;
    }
    // The manifest's exact bytes go into the store last, once everything it names is there.
    let (stored, size) = store.put_blob(&bytes)?;
    debug_assert_eq!(stored, digest);
    let tag = src.store_tag();
    let desc = DescriptorBuilder::default()
        .media_type(MediaType::from(media.as_str()))
        .digest(digest.to_oci())
        .size(size)
        .build()
        .map_err(|e| RegistryError::Protocol(format!("a descriptor: {e}")))?;
    store.set_tag(&tag, &desc)?;
    Ok(PullReport {
        reference: src.to_string(),
        digest,
        tag,
        blobs_fetched: fetched,
        blobs_present: present,
        bytes: total,
        seconds: began.elapsed().as_secs_f64(),
        retries: super::retry::count(),
    })
}
