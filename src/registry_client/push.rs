//! Pushing an image: every blob the registry lacks, then the manifest — its raw bytes from
//! the store, so the digest in the registry is the digest berth computed.
//!
//! Per blob: HEAD, and if present nothing more. Else a cross-repository mount when berth
//! knows the registry has the blob in another repository. Else an upload: one PUT for
//! blobs up to 32 MiB, PATCH chunks for larger ones; after a broken chunk berth asks the
//! registry where the upload stands and continues from there (or, when the registry has
//! dropped the session, as distribution does, starts the blob again in a new one). Blobs go in parallel (four
//! at a time), each digest once. The manifest goes last, only after every blob is
//! confirmed, so a failed push never leaves a tag pointing at missing blobs.

use std::io::{Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Instant;

use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use serde::Serialize;

use super::{Client, Reference, RegistryError, push_scope};
use crate::store::{Digest, Store};

/// Hears about bytes moved for a blob: its digest, its size, and how many more bytes went.
pub type BytesProgress = std::sync::Arc<dyn Fn(&Digest, u64, u64) + Send + Sync>;

/// Largest blob sent in one PUT.
pub const MONOLITHIC_MAX: u64 = 32 << 20;
/// Size of a PATCH chunk: what a push killed midway may have to send again (registries
/// such as ECR want chunks of at least 5 MiB).
pub const CHUNK: u64 = 8 << 20;
/// Blobs in flight at once.
pub const PARALLEL: usize = 4;

/// What happens to one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "action")]
pub enum BlobAction {
    /// The registry has it.
    Present,
    /// Mounted from another repository of the registry.
    Mount {
        /// The repository it came from.
        from: String,
    },
    /// Uploaded.
    Upload,
}

/// One blob of a push.
#[derive(Debug, Clone, Serialize)]
pub struct BlobReport {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// What was (or, in a dry run, would be) done.
    #[serde(flatten)]
    pub action: BlobAction,
}

/// The outcome of a push.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// Where it went.
    pub reference: String,
    /// The manifest's digest.
    pub digest: Digest,
    /// Each blob.
    pub blobs: Vec<BlobReport>,
    /// Blob bytes sent.
    pub bytes_sent: u64,
    /// Whether anything was sent beyond HEADs.
    pub dry_run: bool,
    /// Wall time.
    pub seconds: f64,
    /// Requests retried in this process (each also printed on stderr).
    pub retries: u64,
}

/// What the store remembers about which repositories of a registry hold a blob, for
/// cross-repository mounts: `berth/registries/<registry>/<digest hex>` lists them.
pub struct BlobLocations {
    dir: PathBuf,
}

impl BlobLocations {
    /// The records of `registry` in `store`.
    pub fn new(store: &Store, registry: &str) -> BlobLocations {
        BlobLocations {
            dir: store
                .state_dir()
                .join("registries")
                .join(registry.replace(['/', ':'], "_")),
        }
    }

    /// Repositories known to hold `digest`.
    pub fn repositories(&self, digest: &Digest) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(digest.hex()))
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Remembers that `repository` holds `digest`.
    pub fn record(&self, digest: &Digest, repository: &str) {
        let mut repos = self.repositories(digest);
        if repos.iter().any(|r| r == repository) {
            return;
        }
        repos.push(repository.to_string());
        let _ = std::fs::create_dir_all(&self.dir);
        let _ = std::fs::write(self.dir.join(digest.hex()), repos.join("\n") + "\n");
    }
}

/// Whether the repository has the blob.
pub async fn blob_exists(
    client: &Client,
    repository: &str,
    digest: &Digest,
) -> Result<bool, RegistryError> {
    let url = client.url(&format!("{repository}/blobs/{digest}"));
    let resp = client
        .send(&push_scope(repository), &|| Ok(client.http().head(&url)))
        .await?;
    match resp.status() {
        s if s.is_success() => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => Err(client
            .fail(resp, repository, &format!("blob {digest}"))
            .await),
    }
}

/// An absolute upload URL from a `Location` header (which may be relative).
pub fn location_of(
    client: &Client,
    resp: &reqwest::Response,
) -> Result<reqwest::Url, RegistryError> {
    location(client, resp)
}

fn location(client: &Client, resp: &reqwest::Response) -> Result<reqwest::Url, RegistryError> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| RegistryError::Protocol("the registry sent no upload location".into()))?;
    reqwest::Url::parse(&client.url(""))
        .and_then(|base| base.join(loc))
        .map_err(|e| RegistryError::Protocol(format!("bad upload location {loc:?}: {e}")))
}

enum Started {
    Mounted,
    Session(reqwest::Url),
}

/// Starts an upload, as a mount from `from` when given.
async fn start_upload(
    client: &Client,
    repository: &str,
    digest: &Digest,
    from: Option<&str>,
) -> Result<Started, RegistryError> {
    let mut url = client.url(&format!("{repository}/blobs/uploads/"));
    let mut scope = push_scope(repository);
    if let Some(f) = from {
        url = format!("{url}?mount={digest}&from={f}");
        scope = format!("{scope} repository:{f}:pull");
    }
    let resp = client
        .send(&scope, &|| {
            Ok(client.http().post(&url).header(CONTENT_LENGTH, "0"))
        })
        .await?;
    match resp.status() {
        StatusCode::CREATED if from.is_some() => Ok(Started::Mounted),
        StatusCode::ACCEPTED => Ok(Started::Session(location(client, &resp)?)),
        _ => Err(client.fail(resp, repository, "an upload").await),
    }
}

/// Mounts `digest` from `from` into `repository`; false when the registry would not (it
/// opened an upload instead, which is left to expire).
pub async fn mount(
    client: &Client,
    repository: &str,
    digest: &Digest,
    from: &str,
) -> Result<bool, RegistryError> {
    Ok(matches!(
        start_upload(client, repository, digest, Some(from)).await?,
        Started::Mounted
    ))
}

fn with_digest(url: &reqwest::Url, digest: &Digest) -> reqwest::Url {
    let mut u = url.clone();
    u.query_pairs_mut().append_pair("digest", digest.as_str());
    u
}

/// A body of `len` bytes of the blob from `offset`, read from the file as it is sent,
/// reporting what went to `progress`.
fn file_body(
    path: &std::path::Path,
    offset: u64,
    len: u64,
    progress: Option<(&BytesProgress, &Digest, u64)>,
) -> Result<reqwest::Body, RegistryError> {
    let mut f = std::fs::File::open(path).map_err(|source| RegistryError::Io {
        what: format!("open {}", path.display()),
        source,
    })?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|source| RegistryError::Io {
            what: format!("seek {}", path.display()),
            source,
        })?;
    let file = tokio::fs::File::from_std(f);
    let stream = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(file, len),
        256 * 1024,
    );
    let Some((p, digest, size)) = progress else {
        return Ok(reqwest::Body::wrap_stream(stream));
    };
    let (p, digest) = (p.clone(), digest.clone());
    Ok(reqwest::Body::wrap_stream(stream.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            p(&digest, size, bytes.len() as u64);
        }
    })))
}

/// Where the registry has an upload at: the next offset to send.
async fn upload_offset(
    client: &Client,
    repository: &str,
    url: &reqwest::Url,
) -> Result<(u64, reqwest::Url), RegistryError> {
    let resp = client
        .send(&push_scope(repository), &|| {
            Ok(client.http().get(url.clone()))
        })
        .await?;
    if resp.status() != StatusCode::NO_CONTENT {
        return Err(client.fail(resp, repository, "an upload's status").await);
    }
    let next = resp
        .headers()
        .get(RANGE)
        .and_then(|h| h.to_str().ok())
        .and_then(|r| r.rsplit_once('-'))
        .and_then(|(_, end)| end.parse::<u64>().ok())
        .map_or(0, |end| end + 1);
    let loc = location(client, &resp).unwrap_or_else(|_| url.clone());
    Ok((next, loc))
}

/// An upload session kept in the store while a large blob goes up in chunks, so a push
/// killed halfway continues from the registry's offset (`GET` on the session, then `PATCH`
/// from there) instead of from zero.
#[derive(serde::Serialize, serde::Deserialize)]
struct UploadRecord {
    location: String,
    offset: u64,
}

impl UploadRecord {
    fn path(
        store: &Store,
        registry: &str,
        repository: &str,
        digest: &Digest,
    ) -> std::path::PathBuf {
        let key = Digest::of(format!("{registry}/{repository}/{digest}").as_bytes());
        store
            .state_dir()
            .join("ingest")
            .join("uploads")
            .join(format!("{}.json", key.hex()))
    }

    fn read(path: &std::path::Path) -> Option<(reqwest::Url, u64)> {
        let r: UploadRecord = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        Some((r.location.parse().ok()?, r.offset))
    }

    fn write(path: &std::path::Path, location: &reqwest::Url, offset: u64) {
        let record = UploadRecord {
            location: location.to_string(),
            offset,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(
            &tmp,
            serde_json::to_vec(&record).expect("a record serialises"),
        )
        .is_ok()
        {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// Uploads one blob from the store, into `session` from its offset; returns the bytes
/// sent. Large blobs go in chunks, each recorded in `record` until the blob is complete.
#[allow(clippy::too_many_arguments)]
async fn upload(
    client: &Client,
    store: &Store,
    repository: &str,
    digest: &Digest,
    size: u64,
    session: (reqwest::Url, u64),
    record: &std::path::Path,
    progress: Option<&BytesProgress>,
) -> Result<u64, RegistryError> {
    let (session, start_offset) = session;
    let progress = progress.map(|p| (p, digest, size));
    let path = store.blob_path(digest);
    let scope = push_scope(repository);
    let mut sent = 0u64;
    if size <= MONOLITHIC_MAX {
        let mut url = session;
        for attempt in 0..3 {
            let put = with_digest(&url, digest);
            let resp = client
                .send(&scope, &|| {
                    Ok(client
                        .http()
                        .put(put.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_LENGTH, size)
                        .body(file_body(&path, 0, size, progress)?))
                })
                .await;
            sent += size;
            match resp {
                Ok(r) if r.status() == StatusCode::CREATED => return Ok(sent),
                Ok(r) if attempt == 2 => {
                    return Err(client
                        .fail(r, repository, &format!("upload of {digest}"))
                        .await);
                }
                Err(e) if attempt == 2 => return Err(e),
                // A broken body may have left part of it in the session: start a new one.
                _ => match start_upload(client, repository, digest, None).await? {
                    Started::Session(u) => url = u,
                    Started::Mounted => return Ok(sent),
                },
            }
        }
        unreachable!("the loop returns on its last attempt");
    }
    let mut url = session;
    let mut offset = start_offset;
    let mut resumes = 0;
    while offset < size {
        let n = CHUNK.min(size - offset);
        let (start, patch) = (offset, url.clone());
        let resp = client
            .send(&scope, &|| {
                Ok(client
                    .http()
                    .patch(patch.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_RANGE, format!("{start}-{}", start + n - 1))
                    .header(CONTENT_LENGTH, n)
                    .body(file_body(&path, start, n, progress)?))
            })
            .await;
        sent += n;
        match resp {
            Ok(r) if r.status() == StatusCode::ACCEPTED => {
                url = location(client, &r)?;
                offset += n;
                UploadRecord::write(record, &url, offset);
            }
            other => {
                // Broken or refused (416 after a partial chunk): ask where it stands.
                resumes += 1;
                if resumes > 10 {
                    return match other {
                        Ok(r) => Err(client
                            .fail(r, repository, &format!("upload of {digest}"))
                            .await),
                        Err(e) => Err(e),
                    };
                }
                match upload_offset(client, repository, &url).await {
                    Ok((next, loc)) => {
                        offset = next;
                        url = loc;
                    }
                    // The registry dropped the session (distribution does when a chunk
                    // breaks): start over in a new one.
                    Err(RegistryError::NotFound { .. }) => {
                        match start_upload(client, repository, digest, None).await? {
                            Started::Session(u) => url = u,
                            Started::Mounted => return Ok(sent),
                        }
                        offset = 0;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    let put = with_digest(&url, digest);
    let resp = client
        .send(&scope, &|| {
            Ok(client.http().put(put.clone()).header(CONTENT_LENGTH, "0"))
        })
        .await?;
    if resp.status() != StatusCode::CREATED {
        return Err(client
            .fail(resp, repository, &format!("upload of {digest}"))
            .await);
    }
    let _ = std::fs::remove_file(record);
    Ok(sent)
}

/// The blobs of a manifest: config first, then layers, each digest once.
pub fn manifest_blobs(manifest: &[u8]) -> Result<Vec<(Digest, u64)>, RegistryError> {
    let v: serde_json::Value = serde_json::from_slice(manifest)
        .map_err(|e| RegistryError::Protocol(format!("a manifest that is not JSON: {e}")))?;
    let mut out: Vec<(Digest, u64)> = Vec::new();
    let descs = std::iter::once(&v["config"]).chain(v["layers"].as_array().into_iter().flatten());
    for d in descs {
        let digest: Digest = d["digest"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                RegistryError::Protocol("a manifest descriptor without a digest".into())
            })?;
        // A size is required (OCI image spec): it bounds what a pull will download.
        let size = d["size"].as_u64().ok_or_else(|| {
            RegistryError::Protocol(format!("the manifest's descriptor of {digest} has no size"))
        })?;
        if !out.iter().any(|(x, _)| *x == digest) {
            out.push((digest, size));
        }
    }
    Ok(out)
}

/// The media type of a manifest (its `mediaType`, else OCI's).
pub fn manifest_media_type(manifest: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(manifest)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_string))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into())
}

/// Pushes the image whose manifest is `manifest_digest` to `dst`. With `dry_run`, only
/// HEADs are sent and the report says what would happen. `on_blob` hears about each blob
/// as it is settled.
pub async fn push(
    client: &Client,
    store: &Store,
    manifest_digest: &Digest,
    dst: &Reference,
    dry_run: bool,
    on_blob: &(dyn Fn(&BlobReport) + Sync),
    progress: Option<BytesProgress>,
) -> Result<PushReport, RegistryError> {
    let began = Instant::now();
    let manifest = store.read_blob(manifest_digest)?;
    let blobs = manifest_blobs(&manifest)?;
    let known = BlobLocations::new(store, client.registry());
    let repo = dst.repository.as_str();
    let results: Vec<Result<(BlobReport, u64), RegistryError>> = futures_util::stream::iter(
        blobs.iter().cloned(),
    )
    .map(|(digest, size)| {
        let known = &known;
        let progress = &progress;
        async move {
            let report = |action| BlobReport {
                digest: digest.clone(),
                size,
                action,
            };
            if blob_exists(client, repo, &digest).await? {
                let r = report(BlobAction::Present);
                on_blob(&r);
                known.record(&digest, repo);
                return Ok((r, 0));
            }
            let from = known.repositories(&digest).into_iter().find(|r| r != repo);
            if dry_run {
                let r = report(match from {
                    Some(from) => BlobAction::Mount { from },
                    None => BlobAction::Upload,
                });
                on_blob(&r);
                return Ok((r, 0));
            }
            if !store.has_blob(&digest) {
                return Err(RegistryError::Protocol(format!(
                    "blob {digest} is not in the local store (was it pulled without its layers?)"
                )));
            }
            // An upload a killed push left halfway continues where the registry has it.
            let record = UploadRecord::path(store, client.registry(), repo, &digest);
            let resumed = match UploadRecord::read(&record) {
                Some((location, _)) if size > MONOLITHIC_MAX => {
                    upload_offset(client, repo, &location)
                        .await
                        .ok()
                        .filter(|(next, _)| *next <= size)
                }
                _ => None,
            };
            let (action, sent) = match resumed {
                Some((offset, url)) => {
                    let sent = upload(
                        client,
                        store,
                        repo,
                        &digest,
                        size,
                        (url, offset),
                        &record,
                        progress.as_ref(),
                    )
                    .await?;
                    (BlobAction::Upload, sent)
                }
                None => match start_upload(client, repo, &digest, from.as_deref()).await? {
                    Started::Mounted => (
                        BlobAction::Mount {
                            from: from.expect("only mounts answer 201"),
                        },
                        0,
                    ),
                    Started::Session(url) => (
                        BlobAction::Upload,
                        upload(
                            client,
                            store,
                            repo,
                            &digest,
                            size,
                            (url, 0),
                            &record,
                            progress.as_ref(),
                        )
                        .await?,
                    ),
                },
            };
            known.record(&digest, repo);
            let r = report(action);
            on_blob(&r);
            Ok((r, sent))
        }
    })
    .buffer_unordered(PARALLEL)
    .collect()
    .await;
    let mut reports = Vec::new();
    let mut bytes_sent = 0;
    for r in results {
        let (report, sent) = r?;
        bytes_sent += sent;
        reports.push(report);
    }
    reports.sort_by_key(|r| blobs.iter().position(|(d, _)| *d == r.digest));
    if !dry_run {
        let reference = dst.manifest_ref();
        let url = client.url(&format!("{repo}/manifests/{reference}"));
        let media = manifest_media_type(&manifest);
        let resp = client
            .send(&push_scope(repo), &|| {
                Ok(client
                    .http()
                    .put(&url)
                    .header(CONTENT_TYPE, media.as_str())
                    .body(manifest.clone()))
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(client.fail(resp, repo, "the manifest").await);
        }
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|h| h.to_str().ok())
            && d != manifest_digest.as_str()
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest {dst} as stored by the registry"),
                expected: manifest_digest.to_string(),
                actual: d.to_string(),
            });
        }
    }
    Ok(PushReport {
        reference: dst.to_string(),
        digest: manifest_digest.clone(),
        blobs: reports,
        bytes_sent,
        dry_run,
        seconds: began.elapsed().as_secs_f64(),
        retries: super::retry::count(),
    })
}
