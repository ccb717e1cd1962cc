//! Images in the store: resolving a reference to a manifest, reading manifests and configs,
//! and writing new ones with canonical (sorted-key) JSON so equal images have equal digests.

use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageManifest, ImageManifestBuilder, MediaType,
};
use serde_json::{Map, Value};

use super::index::{canonical_json, normalize_tag};
use super::{DiffId, Digest, Result, Store, StoreError};

/// Keys of the config's `config` object that oci-spec models; anything else (Docker's
/// `Healthcheck`, `Shell`, `OnBuild`, …) is kept in [`ImageConfig::extra`].
const MODELLED: &[&str] = &[
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
];

/// An image configuration: the OCI fields plus the extensions Docker puts in `config`.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// The OCI image configuration.
    pub oci: ImageConfiguration,
    /// Other keys of the `config` object (e.g. `Healthcheck`, `Shell`), preserved.
    pub extra: Map<String, Value>,
}

impl ImageConfig {
    /// The health check the image declares (Docker's HEALTHCHECK), run with its shell.
    pub fn health_check(&self) -> Option<crate::runtime::health::Check> {
        let shell: Vec<String> = self
            .extra
            .get("Shell")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        crate::runtime::health::Check::from_image(&Value::Object(self.extra.clone()), &shell)
    }

    /// Parses a config blob.
    pub fn parse(bytes: &[u8], digest: &str) -> Result<Self> {
        let bad = |e: serde_json::Error| StoreError::BadDocument {
            what: "image config",
            digest: digest.to_string(),
            message: e.to_string(),
        };
        let oci: ImageConfiguration = serde_json::from_slice(bytes).map_err(bad)?;
        let raw: Value = serde_json::from_slice(bytes).map_err(bad)?;
        let extra = raw
            .get("config")
            .and_then(Value::as_object)
            .map(|c| {
                c.iter()
                    .filter(|(k, _)| !MODELLED.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ImageConfig { oci, extra })
    }

    /// The canonical bytes of this config.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(&self.oci).expect("oci config serialises");
        if !self.extra.is_empty() {
            let obj = v.as_object_mut().expect("config is an object");
            let config = obj
                .entry("config")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(c) = config.as_object_mut() {
                c.extend(self.extra.clone());
            }
        }
        serde_json::to_vec(&v).expect("a JSON value serialises")
    }

    /// The layers' diff_ids, in order.
    pub fn diff_ids(&self) -> Result<Vec<DiffId>> {
        self.oci
            .rootfs()
            .diff_ids()
            .iter()
            .map(|d| {
                d.parse().map(DiffId).map_err(|e| StoreError::BadDocument {
                    what: "image config",
                    digest: String::new(),
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

/// An image read from the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// The manifest's digest: the image's identity.
    pub digest: Digest,
    /// The manifest's size in bytes.
    pub size: u64,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The config blob's digest.
    pub config_digest: Digest,
    /// The config.
    pub config: ImageConfig,
}

impl StoredImage {
    /// A descriptor of the manifest.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(MediaType::ImageManifest, self.size, self.digest.to_oci())
    }

    /// The layer descriptors with their digests parsed.
    pub fn layers(&self) -> Vec<(Digest, &Descriptor)> {
        self.manifest
            .layers()
            .iter()
            .map(|d| {
                (
                    Digest::try_from(d.digest()).expect("validated when loaded"),
                    d,
                )
            })
            .collect()
    }

    /// Total size: config plus compressed layers, as `docker images` counts it.
    pub fn total_size(&self) -> u64 {
        self.manifest.config().size() + self.manifest.layers().iter().map(|l| l.size()).sum::<u64>()
    }
}

impl Store {
    /// Resolves a reference to a manifest digest: a tag (`name[:tag]`), a full digest, or a
    /// unique prefix of a tagged image's digest (`sha256:ab12`, `ab12`), as Docker accepts.
    pub fn resolve(&self, reference: &str) -> Result<Digest> {
        let tags = self.tags()?;
        if let Ok(name) = normalize_tag(reference)
            && let Some(t) = tags.iter().find(|t| t.name == name)
        {
            return Ok(t.digest());
        }
        if let Ok(d) = reference.parse::<Digest>()
            && self.has_blob(&d)
        {
            return Ok(d);
        }
        // `name@sha256:…` (how `ps` shows a release's image, also shortened): the digest
        // (or its prefix) decides.
        if let Some((_, digest)) = reference.rsplit_once('@') {
            return self.resolve(digest).map_err(|e| match e {
                StoreError::UnknownImage(_) => StoreError::UnknownImage(reference.to_string()),
                e => e,
            });
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.len() >= 4 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut matches: Vec<Digest> = tags
                .iter()
                .map(|t| t.digest())
                .filter(|d| d.hex().starts_with(prefix))
                .collect();
            if matches.is_empty() {
                // An untagged image (a release's, a container's): any manifest here.
                let dir = self.root().join("blobs/sha256");
                matches = std::fs::read_dir(&dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.starts_with(prefix))
                    })
                    // Manifests are small: a layer is never read to find out.
                    .filter(|e| e.metadata().is_ok_and(|m| m.len() <= 4 << 20))
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter_map(|n| format!("sha256:{n}").parse::<Digest>().ok())
                    .filter(|d| self.image(d).is_ok())
                    .collect();
            }
            matches.sort();
            matches.dedup();
            match matches.len() {
                1 => return Ok(matches.remove(0)),
                0 => {}
                _ => {
                    return Err(StoreError::AmbiguousImage {
                        reference: reference.to_string(),
                        candidates: matches.iter().map(|d| d.short().to_string()).collect(),
                    });
                }
            }
        }
        Err(StoreError::UnknownImage(reference.to_string()))
    }

    /// Reads the image whose manifest has `digest`.
    pub fn image(&self, digest: &Digest) -> Result<StoredImage> {
        let bytes = self.read_blob(digest)?;
        let bad = |message: String| StoreError::BadDocument {
            what: "manifest",
            digest: digest.to_string(),
            message,
        };
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        for l in manifest.layers() {
            Digest::try_from(l.digest()).map_err(|e| bad(e.to_string()))?;
        }
        let config_digest =
            Digest::try_from(manifest.config().digest()).map_err(|e| bad(e.to_string()))?;
        let config = ImageConfig::parse(&self.read_blob(&config_digest)?, config_digest.as_str())?;
        Ok(StoredImage {
            digest: digest.clone(),
            size: bytes.len() as u64,
            manifest,
            config_digest,
            config,
        })
    }

    /// Whether the image `digest` is whole here: its manifest, config and every layer.
    pub fn has_image(&self, digest: &Digest) -> bool {
        self.image(digest).is_ok_and(|img| {
            self.has_blob(&img.config_digest) && img.layers().iter().all(|(d, _)| self.has_blob(d))
        })
    }

    /// Loads the image `reference` names (a tag, a digest or a unique digest prefix).
    pub fn load_image(&self, reference: &str) -> Result<StoredImage> {
        self.image(&self.resolve(reference)?)
    }

    /// Writes a config and a manifest over `layers` (which must already be stored) and
    /// returns the new image. Nothing is tagged.
    pub fn write_image(
        &self,
        config: &ImageConfig,
        layers: Vec<Descriptor>,
    ) -> Result<StoredImage> {
        let config_bytes = config.to_bytes();
        let (config_digest, config_size) = self.put_blob(&config_bytes)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_size,
                config_digest.to_oci(),
            ))
            .layers(layers)
            .build()
            .expect("every required manifest field is set");
        let bytes = canonical_json(&manifest)?;
        let (digest, size) = self.put_blob(&bytes)?;
        Ok(StoredImage {
            digest,
            size,
            manifest,
            config_digest,
            config: config.clone(),
        })
    }
}
