//! Copying an image between repositories or registries, digest-preserving: the manifest's
//! raw bytes are sent as they were fetched (never re-serialised), and only the blobs the
//! destination lacks move — mounted when source and destination share a registry,
//! otherwise streamed from one to the other without touching the disk. An index is copied
//! with every manifest it lists. Promotion stands on this.

use std::time::Instant;

use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use serde::Serialize;

use super::pull::fetch_manifest;
use super::push::{BlobAction, BlobReport, PARALLEL, blob_exists, manifest_blobs};
use super::{Client, Reference, RegistryError, pull_scope, push_scope, retry};
use crate::store::Digest;

/// The outcome of a copy.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Source.
    pub source: String,
    /// Destination.
    pub destination: String,
    /// The digest, the same on both sides.
    pub digest: Digest,
    /// Each blob and what happened to it.
    pub blobs: Vec<BlobReport>,
    /// Blob bytes streamed between registries.
    pub bytes_copied: u64,
    /// Nothing but HEADs was sent.
    pub dry_run: bool,
    /// Wall time.
    pub seconds: f64,
    /// Requests retried in this process (each also printed on stderr).
    pub retries: u64,
}

fn same_registry(a: &Client, b: &Client) -> bool {
    a.registry() == b.registry()
}

/// Streams one blob from `src` to `dst` (GET piped into a monolithic PUT).
async fn stream_blob(
    src: &Client,
    src_repo: &str,
    dst: &Client,
    dst_repo: &str,
    digest: &Digest,
    size: u64,
) -> Result<(), RegistryError> {
    let get_url = src.url(&format!("{src_repo}/blobs/{digest}"));
    let post_url = dst.url(&format!("{dst_repo}/blobs/uploads/"));
    let attempts = 6;
    for attempt in 1..=attempts {
        let resp = dst
            .send(&push_scope(dst_repo), &|| {
                Ok(dst.http().post(&post_url).header(CONTENT_LENGTH, "0"))
            })
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(dst.fail(resp, dst_repo, "an upload").await);
        }
        let mut put = super::push::location_of(dst, &resp)?;
        put.query_pairs_mut().append_pair("digest", digest.as_str());
        let body = src
            .send(&pull_scope(src_repo), &|| Ok(src.http().get(&get_url)))
            .await?;
        if !body.status().is_success() {
            return Err(src.fail(body, src_repo, &format!("blob {digest}")).await);
        }
        // The body is a one-shot stream, so this PUT is not retried inside `send`: a
        // failure starts the whole blob again with a new upload. A source that stalls
        // ends the stream (and so the PUT) with an error.
        let stream = super::bounds::watched(body.bytes_stream(), src.low_speed());
        let auth = dst.authorization_for(&push_scope(dst_repo), &put).await?;
        let mut req = dst
            .http()
            .put(put)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size);
        if let Some(auth) = auth {
            req = req.header(reqwest::header::AUTHORIZATION, auth);
        }
        let result = req.body(reqwest::Body::wrap_stream(stream)).send().await;
        let (why, wait) = match result {
            Ok(r) if r.status() == StatusCode::CREATED => return Ok(()),
            Ok(r) if attempt == attempts => {
                return Err(dst.fail(r, dst_repo, &format!("upload of {digest}")).await);
            }
            Err(e) if attempt == attempts => return Err(dst.transport_error(&e)),
            // The same policy as every other request: Retry-After, else backoff.
            Ok(r) => (r.status().to_string(), retry::wait_for(Some(&r), attempt)),
            Err(e) => (dst.transport_error(&e).to_string(), retry::backoff(attempt)),
        };
        retry::retry(retry::Retry {
            registry: dst.registry().to_string(),
            what: format!("the copy of {}", digest.short()),
            attempt,
            of: attempts,
            wait,
            why,
        })
        .await;
    }
    unreachable!("the loop returns on its last attempt")
}

/// Copies the manifest `reference` (tag or digest) of `src_repo` into `dst_repo` under
/// `dst_reference`, blobs first. Returns the manifest's digest and the blob reports.
#[derive(Clone, Copy)]
struct Side<'a> {
    client: &'a Client,
    repo: &'a str,
}

async fn copy_manifest(
    from: Side<'_>,
    to: Side<'_>,
    reference: &str,
    expect: Option<&Digest>,
    dst_reference: &str,
    dry_run: bool,
) -> Result<(Digest, Vec<(BlobReport, u64)>), RegistryError> {
    let (src, src_repo, dst, dst_repo) = (from.client, from.repo, to.client, to.repo);
    let (bytes, media, digest) = fetch_manifest(src, src_repo, reference, expect).await?;
    let mut reports = Vec::new();
    let is_index = media.contains("image.index") || media.contains("manifest.list");
    if is_index {
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Protocol(format!("an index that is not JSON: {e}")))?;
        for m in v["manifests"].as_array().into_iter().flatten() {
            let child: Digest = m["digest"]
                .as_str()
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| RegistryError::Protocol("an index entry without a digest".into()))?;
            let (_, r) = Box::pin(copy_manifest(
                from,
                to,
                child.as_str(),
                Some(&child),
                child.as_str(),
                dry_run,
            ))
            .await?;
            reports.extend(r);
        }
    } else {
        let blobs = manifest_blobs(&bytes)?;
        let results: Vec<Result<(BlobReport, u64), RegistryError>> =
            futures_util::stream::iter(blobs)
                .map(|(d, size)| async move {
                    let report = |action| BlobReport {
                        digest: d.clone(),
                        size,
                        action,
                    };
                    let same = same_registry(src, dst);
                    // Within one registry a mount is one request whether or not the
                    // destination has the blob: no HEAD first.
                    if same && !dry_run && super::push::mount(dst, dst_repo, &d, src_repo).await? {
                        return Ok((
                            report(BlobAction::Mount {
                                from: src_repo.to_string(),
                            }),
                            0,
                        ));
                    }
                    if blob_exists(dst, dst_repo, &d).await? {
                        return Ok((report(BlobAction::Present), 0));
                    }
                    if same && dry_run {
                        return Ok((
                            report(BlobAction::Mount {
                                from: src_repo.to_string(),
                            }),
                            0,
                        ));
                    }
                    if !dry_run {
                        stream_blob(src, src_repo, dst, dst_repo, &d, size).await?;
                    }
                    Ok((report(BlobAction::Upload), if dry_run { 0 } else { size }))
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
        for r in results {
            reports.push(r?);
        }
    }
    if !dry_run {
        let url = dst.url(&format!("{dst_repo}/manifests/{dst_reference}"));
        let resp = dst
            .send(&push_scope(dst_repo), &|| {
                Ok(dst
                    .http()
                    .put(&url)
                    .header(CONTENT_TYPE, media.as_str())
                    .body(bytes.clone()))
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(dst.fail(resp, dst_repo, "the manifest").await);
        }
        // Read it back: the destination must hold exactly the source's bytes.
        let (_, _, stored) = fetch_manifest(dst, dst_repo, dst_reference, None).await?;
        if stored != digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest copied to {dst_repo}:{dst_reference}"),
                expected: digest.to_string(),
                actual: stored.to_string(),
            });
        }
    }
    Ok((digest, reports))
}

/// Copies `from` to `to`. `to` without a tag gets `from`'s tag (or its digest).
pub async fn copy(
    src: &Client,
    dst: &Client,
    from: &Reference,
    to: &Reference,
    dry_run: bool,
) -> Result<CopyReport, RegistryError> {
    let began = Instant::now();
    let dst_reference = match (&to.tag, &to.digest, &from.tag) {
        (Some(t), _, _) => t.clone(),
        (None, Some(d), _) => d.to_string(),
        (None, None, Some(t)) => t.clone(),
        (None, None, None) => from.manifest_ref(),
    };
    if let Some(want) = &to.digest {
        let (_, _, have) = fetch_manifest(
            src,
            &from.repository,
            &from.manifest_ref(),
            from.digest.as_ref(),
        )
        .await?;
        if *want != have {
            return Err(RegistryError::DigestMismatch {
                what: format!("copy of {from} to {to}"),
                expected: want.to_string(),
                actual: have.to_string(),
            });
        }
    }
    let (digest, results) = copy_manifest(
        Side {
            client: src,
            repo: &from.repository,
        },
        Side {
            client: dst,
            repo: &to.repository,
        },
        &from.manifest_ref(),
        from.digest.as_ref(),
        &dst_reference,
        dry_run,
    )
    .await?;
    if let Some(want) = &to.digest
        && *want != digest
    {
        return Err(RegistryError::DigestMismatch {
            what: format!("copy to {to}"),
            expected: want.to_string(),
            actual: digest.to_string(),
        });
    }
    let bytes_copied = results.iter().map(|(_, n)| n).sum();
    Ok(CopyReport {
        source: from.to_string(),
        destination: to.with_tag(&dst_reference).to_string(),
        digest,
        blobs: results.into_iter().map(|(r, _)| r).collect(),
        bytes_copied,
        dry_run,
        seconds: began.elapsed().as_secs_f64(),
        retries: super::retry::count(),
    })
}
