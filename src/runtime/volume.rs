//! Named volumes: directories under the store (`berth/volumes/<name>/_data`, as Docker lays
//! them out) created on first use and kept until `volume rm`, which refuses while any
//! container refers to the volume.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// A volume's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name.
    pub name: String,
    /// Where its data lives on the host.
    pub mountpoint: PathBuf,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// What went wrong with a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No such volume.
    #[error("no volume `{0}`")]
    NotFound(String),
    /// The name is not valid.
    #[error("`{0}` is not a valid volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")]
    BadName(String),
    /// Still referenced.
    #[error("volume {volume} is used by container {container}")]
    InUse {
        /// The volume.
        volume: String,
        /// A container referring to it.
        container: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file operation failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The volumes of a store.
pub struct Volumes {
    store: Store,
    dir: PathBuf,
}

impl Volumes {
    /// The volumes of `store`.
    pub fn new(store: &Store) -> Volumes {
        Volumes {
            store: store.clone(),
            dir: store.state_dir().join("volumes"),
        }
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("volume.json")
    }

    /// The volume `name`, created when missing; `true` when this call created it.
    pub fn ensure(&self, name: &str) -> Result<(VolumeRecord, bool), VolumeError> {
        if let Ok(v) = self.get(name) {
            return Ok((v, false));
        }
        if !crate::manifest::values::valid_object_name(name) {
            return Err(VolumeError::BadName(name.to_string()));
        }
        let _lock = self.store.lock()?;
        if let Ok(v) = self.get(name) {
            return Ok((v, false));
        }
        let data = self.dir.join(name).join("_data");
        std::fs::create_dir_all(&data).map_err(|source| VolumeError::Io {
            what: "create",
            path: data.clone(),
            source,
        })?;
        let rec = VolumeRecord {
            name: name.to_string(),
            mountpoint: data,
            created: super::container::now(),
        };
        let bytes = serde_json::to_vec_pretty(&rec).expect("record serialises");
        self.store.replace_file(&self.record_path(name), &bytes)?;
        Ok((rec, true))
    }

    /// The volume `name`.
    pub fn get(&self, name: &str) -> Result<VolumeRecord, VolumeError> {
        let bytes = std::fs::read(self.record_path(name))
            .map_err(|_| VolumeError::NotFound(name.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| VolumeError::Io {
            what: "parse",
            path: self.record_path(name),
            source: std::io::Error::other(e),
        })
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<VolumeRecord>, VolumeError> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            if let Some(name) = e.file_name().to_str()
                && let Ok(v) = self.get(name)
            {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes a volume and its data; `used_by` names a container that still refers to it.
    pub fn remove(&self, name: &str, used_by: Option<String>) -> Result<(), VolumeError> {
        self.get(name)?;
        if let Some(container) = used_by {
            return Err(VolumeError::InUse {
                volume: name.to_string(),
                container,
            });
        }
        let dir = self.dir.join(name);
        std::fs::remove_dir_all(&dir).map_err(|source| VolumeError::Io {
            what: "remove",
            path: dir,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_created_once_and_removed_only_when_unused() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let v = Volumes::new(&store);
        let (rec, created) = v.ensure("data").unwrap();
        assert!(created && rec.mountpoint.is_dir());
        std::fs::write(rec.mountpoint.join("f"), "x").unwrap();
        let (again, created) = v.ensure("data").unwrap();
        assert!(!created);
        assert_eq!(again, rec);
        assert!(matches!(v.ensure("../x"), Err(VolumeError::BadName(_))));
        assert_eq!(v.list().unwrap().len(), 1);
        assert!(matches!(
            v.remove("data", Some("web".into())),
            Err(VolumeError::InUse { .. })
        ));
        assert!(rec.mountpoint.join("f").exists());
        v.remove("data", None).unwrap();
        assert!(matches!(v.get("data"), Err(VolumeError::NotFound(_))));
    }
}
