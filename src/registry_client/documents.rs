//! Small documents in a registry — manifests, image configs, release records — read into
//! memory (with a size cap) and written whole, and the referrers of a manifest: the OCI
//! 1.1 referrers API where the registry has it, else the referrers tag scheme
//! (`sha256-<hex>` holding an index of the manifests that name it as their `subject`).

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use serde_json::{Value, json};

use super::bounds::{DOCUMENT_DEADLINE, MAX_MANIFEST, read_bounded};
use super::push::{blob_exists, location_of};
use super::{Client, RegistryError, pull_scope, push_scope};
use crate::store::Digest;

/// The OCI image index media type.
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The OCI image manifest media type.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Names the manifest `digest` (already in `repository`) `tag` too: its exact bytes put
/// again under the tag.
pub async fn tag_manifest(
    client: &Client,
    repository: &str,
    digest: &Digest,
    tag: &str,
) -> Result<(), RegistryError> {
    let (bytes, _, _) =
        super::pull::fetch_manifest(client, repository, digest.as_str(), Some(digest)).await?;
    let media = super::push::manifest_media_type(&bytes);
    put_manifest(client, repository, tag, &media, &bytes).await?;
    Ok(())
}

/// Reads a blob of at most `max` bytes, verified against its digest.
pub async fn get_blob(
    client: &Client,
    repository: &str,
    digest: &Digest,
    max: u64,
) -> Result<Vec<u8>, RegistryError> {
    let url = client.url(&format!("{repository}/blobs/{digest}"));
    let resp = client
        .send(&pull_scope(repository), &|| {
            Ok(client.http().get(&url).timeout(DOCUMENT_DEADLINE))
        })
        .await?;
    if !resp.status().is_success() {
        return Err(client
            .fail(resp, repository, &format!("blob {digest}"))
            .await);
    }
    let bytes = read_bounded(resp, max, &format!("blob {digest} in {repository}")).await?;
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(RegistryError::DigestMismatch {
            what: format!("blob {repository}@{digest}"),
            expected: digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(bytes.to_vec())
}

/// Uploads `bytes` as one blob (unless the repository has it already); its digest.
pub async fn put_blob(
    client: &Client,
    repository: &str,
    bytes: &[u8],
) -> Result<Digest, RegistryError> {
    let digest = Digest::of(bytes);
    if blob_exists(client, repository, &digest).await? {
        return Ok(digest);
    }
    let url = client.url(&format!("{repository}/blobs/uploads/"));
    let resp = client
        .send(&push_scope(repository), &|| {
            Ok(client.http().post(&url).header(CONTENT_LENGTH, "0"))
        })
        .await?;
    if resp.status() != StatusCode::ACCEPTED {
        return Err(client.fail(resp, repository, "an upload").await);
    }
    let mut put = location_of(client, &resp)?;
    put.query_pairs_mut().append_pair("digest", digest.as_str());
    let resp = client
        .send(&push_scope(repository), &|| {
            Ok(client
                .http()
                .put(put.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(bytes.to_vec()))
        })
        .await?;
    if resp.status() != StatusCode::CREATED {
        return Err(client
            .fail(resp, repository, &format!("blob {digest}"))
            .await);
    }
    Ok(digest)
}

/// Stores `bytes` as a manifest under `reference` (a tag or its digest); its digest, as
/// the registry confirms it.
pub async fn put_manifest(
    client: &Client,
    repository: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<Digest, RegistryError> {
    let digest = Digest::of(bytes);
    let url = client.url(&format!("{repository}/manifests/{reference}"));
    let resp = client
        .send(&push_scope(repository), &|| {
            Ok(client
                .http()
                .put(&url)
                .header(CONTENT_TYPE, media_type)
                .body(bytes.to_vec()))
        })
        .await?;
    if resp.status() != StatusCode::CREATED {
        return Err(client
            .fail(resp, repository, &format!("manifest {reference}"))
            .await);
    }
    if let Some(d) = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|h| h.to_str().ok())
        && d != digest.as_str()
    {
        return Err(RegistryError::DigestMismatch {
            what: format!("manifest {repository}:{reference} as stored by the registry"),
            expected: digest.to_string(),
            actual: d.to_string(),
        });
    }
    Ok(digest)
}

/// The manifest under `reference`, if there is one: raw bytes and digest.
pub async fn get_manifest(
    client: &Client,
    repository: &str,
    reference: &str,
) -> Result<Option<(Vec<u8>, Digest)>, RegistryError> {
    match super::pull::fetch_manifest(client, repository, reference, None).await {
        Ok((bytes, _, digest)) => Ok(Some((bytes, digest))),
        Err(RegistryError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The referrers tag of a manifest digest (`sha256-<hex>`).
pub fn referrers_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// The descriptors of the manifests whose `subject` is `subject`, or `None` when the
/// registry has no referrers API.
async fn referrers_api(
    client: &Client,
    repository: &str,
    subject: &Digest,
) -> Result<Option<Vec<Value>>, RegistryError> {
    let url = client.url(&format!("{repository}/referrers/{subject}"));
    let resp = client
        .send(&pull_scope(repository), &|| {
            Ok(client
                .http()
                .get(&url)
                .header(ACCEPT, INDEX)
                .timeout(DOCUMENT_DEADLINE))
        })
        .await?;
    let is_index = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|t| t.starts_with(INDEX));
    if resp.status() != StatusCode::OK || !is_index {
        return Ok(None);
    }
    let what = format!("the referrers of {subject}");
    let bytes = read_bounded(resp, MAX_MANIFEST, &what).await?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| RegistryError::Protocol(format!("{what}: {e}")))?;
    Ok(Some(v["manifests"].as_array().cloned().unwrap_or_default()))
}

/// The descriptors listed under the referrers tag of `subject` (none if there is none).
async fn tag_referrers(
    client: &Client,
    repository: &str,
    subject: &Digest,
) -> Result<Vec<Value>, RegistryError> {
    Ok(
        match get_manifest(client, repository, &referrers_tag(subject)).await? {
            Some((bytes, _)) => serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["manifests"].as_array().cloned())
                .unwrap_or_default(),
            None => Vec::new(),
        },
    )
}

/// Records that `referrer` (a manifest just stored, whose `subject` is `subject`) refers
/// to it. A registry with the referrers API indexed it when it was stored; otherwise the
/// descriptor is added to the index under the referrers tag.
pub async fn add_referrer(
    client: &Client,
    repository: &str,
    subject: &Digest,
    referrer: Value,
) -> Result<(), RegistryError> {
    if referrers_api(client, repository, subject).await?.is_some() {
        return Ok(());
    }
    let tag = referrers_tag(subject);
    // Read, add, write: the tag scheme has no compare-and-swap, so two writers attaching
    // to the same image at the same moment can lose one entry (the OCI spec says as much).
    let mut manifests = tag_referrers(client, repository, subject).await?;
    if manifests.iter().any(|m| m["digest"] == referrer["digest"]) {
        return Ok(());
    }
    manifests.push(referrer);
    let index = json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": manifests });
    let bytes = serde_json::to_vec(&index).expect("an index serialises");
    put_manifest(client, repository, &tag, INDEX, &bytes).await?;
    Ok(())
}
