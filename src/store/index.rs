//! `index.json`: the store's tags. Each tag is a manifest descriptor annotated with
//! `org.opencontainers.image.ref.name = "name:tag"`, which is what `skopeo … oci:STORE:name:tag`
//! looks up.

use std::collections::HashMap;

use oci_spec::image::{Descriptor, ImageIndex};

use super::{Digest, Result, Store, StoreError};

/// The index of an empty store.
pub const EMPTY_INDEX: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
/// The annotation that names a tag.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A tag and the manifest it points at.
#[derive(Debug, Clone)]
pub struct Tag {
    /// `name:tag`.
    pub name: String,
    /// The manifest descriptor.
    pub descriptor: Descriptor,
}

impl Tag {
    /// The manifest digest.
    pub fn digest(&self) -> Digest {
        Digest::try_from(self.descriptor.digest()).expect("the store writes sha256 digests")
    }
}

/// Checks `name[:tag]` with the distribution spec's grammar (a repository of at most 255
/// characters, optionally after a registry host; a tag of at most 128) and adds `:latest`
/// when the tag is missing, as Docker does. `.`, `..` and `sha256:…` are not names.
pub fn normalize_tag(s: &str) -> Result<String> {
    // `name@sha256:…`: a digest reference, kept under that name (a pull by digest).
    if let Some((name, digest)) = s.split_once('@') {
        return match digest.parse::<Digest>() {
            Ok(d) if crate::names::valid_repository(name) && name != "sha256" => {
                Ok(format!("{name}@{d}"))
            }
            _ => Err(StoreError::BadTag(s.to_string())),
        };
    }
    let (name, tag) = match s.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (s, "latest"),
    };
    if crate::names::valid_repository(name) && crate::names::valid_tag(tag) && name != "sha256" {
        Ok(format!("{name}:{tag}"))
    } else {
        Err(StoreError::BadTag(s.to_string()))
    }
}

impl Store {
    /// Reads `index.json`.
    pub fn read_index(&self) -> Result<ImageIndex> {
        let path = self.root().join("index.json");
        let bytes = std::fs::read(&path).map_err(StoreError::io("cannot read", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::BadDocument {
            what: "index",
            digest: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Every tag, sorted by name.
    pub fn tags(&self) -> Result<Vec<Tag>> {
        let index = self.read_index()?;
        let mut tags: Vec<Tag> = index
            .manifests()
            .iter()
            .filter_map(|d| {
                let name = d.annotations().as_ref()?.get(REF_NAME)?.clone();
                Some(Tag {
                    name,
                    descriptor: d.clone(),
                })
            })
            .collect();
        tags.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tags)
    }

    /// Points `name` at a manifest (replacing where it pointed before).
    pub fn set_tag(&self, name: &str, manifest: &Descriptor) -> Result<()> {
        let name = normalize_tag(name)?;
        // `repo@sha256:…` names exactly that manifest and nothing else.
        if let Some((_, digest)) = name.split_once('@')
            && digest != manifest.digest().to_string()
        {
            return Err(StoreError::BadTag(format!(
                "{name} (a name with a digest must be the image's own digest, {})",
                manifest.digest()
            )));
        }
        let mut d = manifest.clone();
        let mut ann = d.annotations().clone().unwrap_or_default();
        ann.insert(REF_NAME.to_string(), name.clone());
        d.set_annotations(Some(ann));
        self.update_index(|manifests| {
            manifests.retain(|m| ref_name(m) != Some(&name));
            manifests.push(d);
        })
    }

    /// Removes a tag; returns false when there was none.
    pub fn remove_tag(&self, name: &str) -> Result<bool> {
        let name = normalize_tag(name)?;
        let mut found = false;
        self.update_index(|manifests| {
            let before = manifests.len();
            manifests.retain(|m| ref_name(m) != Some(&name));
            found = manifests.len() != before;
        })?;
        Ok(found)
    }

    /// Read-modify-write of the index's manifest list, under the store lock, written
    /// atomically with entries sorted by name so the file is stable.
    fn update_index(&self, f: impl FnOnce(&mut Vec<Descriptor>)) -> Result<()> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let mut manifests = index.manifests().clone();
        f(&mut manifests);
        manifests.sort_by(|a, b| {
            ref_name(a)
                .cmp(&ref_name(b))
                .then_with(|| a.digest().to_string().cmp(&b.digest().to_string()))
        });
        index.set_manifests(manifests);
        let bytes = canonical_json(&index)?;
        self.write_atomic(&self.root().join("index.json"), &bytes)
    }
}

fn ref_name(d: &Descriptor) -> Option<&String> {
    d.annotations()
        .as_ref()
        .and_then(|a: &HashMap<String, String>| a.get(REF_NAME))
}

/// Serialises with object keys sorted (oci-spec keeps some maps in `HashMap`s, whose order
/// changes run to run): the same document always has the same bytes, so the same digest.
pub fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let v = serde_json::to_value(value).map_err(|e| StoreError::BadDocument {
        what: "document",
        digest: String::new(),
        message: e.to_string(),
    })?;
    Ok(serde_json::to_vec(&v).expect("a JSON value serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_normalize_like_docker() {
        assert_eq!(normalize_tag("hello").unwrap(), "hello:latest");
        assert_eq!(normalize_tag("hello:dev").unwrap(), "hello:dev");
        assert_eq!(
            normalize_tag("127.0.0.1:5000/a/b").unwrap(),
            "127.0.0.1:5000/a/b:latest"
        );
        assert_eq!(
            normalize_tag("127.0.0.1:5000/a/b:1.0").unwrap(),
            "127.0.0.1:5000/a/b:1.0"
        );
        let long = format!("{}:1", "n".repeat(300));
        // Regression: `..` passed as a host-like first component, `.` and 300-character
        // names were accepted.
        for bad in [
            "",
            "Hello",
            "a:",
            "a:-x",
            "sha256:abcd",
            "a//b",
            "a:b c",
            "..",
            ".",
            "../x",
            "x/..",
            "a/./b",
            &long,
        ] {
            assert!(normalize_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_are_set_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (d1, n1) = store.put_blob(b"{}").unwrap();
        let desc = Descriptor::new(oci_spec::image::MediaType::ImageManifest, n1, d1.to_oci());
        store.set_tag("b", &desc).unwrap();
        store.set_tag("a:1", &desc).unwrap();
        store.set_tag("a:1", &desc).unwrap();
        let names: Vec<_> = store.tags().unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["a:1", "b:latest"]);
        assert!(store.remove_tag("b").unwrap());
        assert!(!store.remove_tag("b").unwrap());
        assert_eq!(store.tags().unwrap().len(), 1);
    }
}
