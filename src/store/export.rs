//! `berth export`: an image as an OCI archive (an OCI layout in a tar, what `skopeo copy
//! oci-archive:` reads) or a Docker archive (what `docker load` and `podman load` read:
//! `manifest.json`, the config, and uncompressed `layer.tar`s). Blobs are streamed from the
//! store; entries have fixed times, so the same image exports to the same bytes.

use std::io::{self, Write};

use serde_json::json;

use super::{Result, Store, StoreError, StoredImage};

/// Archive formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// An OCI image layout in a tar.
    Oci,
    /// Docker's `docker save` format.
    Docker,
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_size(size);
    h
}

fn dir_header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_size(0);
    h
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::Io {
        what: "cannot write the archive",
        path: "output".into(),
        source: e,
    }
}

impl Store {
    /// Writes `image` (named `name`, e.g. `hello:1`) as an archive to `out`.
    pub fn export(
        &self,
        image: &StoredImage,
        name: Option<&str>,
        format: ExportFormat,
        out: impl Write,
    ) -> Result<()> {
        let mut tar = tar::Builder::new(out);
        match format {
            ExportFormat::Oci => self.export_oci(image, name, &mut tar)?,
            ExportFormat::Docker => self.export_docker(image, name, &mut tar)?,
        }
        tar.into_inner().map_err(io_err)?.flush().map_err(io_err)
    }

    fn export_oci<W: Write>(
        &self,
        image: &StoredImage,
        name: Option<&str>,
        tar: &mut tar::Builder<W>,
    ) -> Result<()> {
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        tar.append_data(&mut header(layout.len() as u64), "oci-layout", &layout[..])
            .map_err(io_err)?;
        let mut desc = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image.digest, "size": image.size});
        if let Some(n) = name {
            desc["annotations"] = json!({ super::index::REF_NAME: n });
        }
        let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]})).expect("json");
        tar.append_data(&mut header(index.len() as u64), "index.json", &index[..])
            .map_err(io_err)?;
        for d in ["blobs/", "blobs/sha256/"] {
            tar.append_data(&mut dir_header(), d, io::empty())
                .map_err(io_err)?;
        }
        let mut blobs = vec![image.digest.clone(), image.config_digest.clone()];
        blobs.extend(image.layers().into_iter().map(|(d, _)| d));
        blobs.dedup();
        for d in blobs {
            let size = self.blob_size(&d)?;
            tar.append_data(
                &mut header(size),
                format!("blobs/sha256/{}", d.hex()),
                self.open_blob(&d)?,
            )
            .map_err(io_err)?;
        }
        Ok(())
    }

    fn export_docker<W: Write>(
        &self,
        image: &StoredImage,
        name: Option<&str>,
        tar: &mut tar::Builder<W>,
    ) -> Result<()> {
        let config_name = format!("{}.json", image.config_digest.hex());
        let config = self.read_blob(&image.config_digest)?;
        tar.append_data(&mut header(config.len() as u64), &config_name, &config[..])
            .map_err(io_err)?;
        let diff_ids = image.config.diff_ids()?;
        let mut layer_names = Vec::new();
        let tmp_dir = self.state_dir().join("tmp");
        std::fs::create_dir_all(&tmp_dir).map_err(StoreError::io("cannot create", &tmp_dir))?;
        for ((digest, desc), diff_id) in image.layers().into_iter().zip(&diff_ids) {
            let dir = diff_id.0.hex().to_string();
            // Docker archives hold uncompressed layers; the size must be known before the
            // entry, so each layer is decompressed to a temporary file first.
            let mut tmp = tempfile::tempfile_in(&tmp_dir)
                .map_err(StoreError::io("cannot create a temp file in", &tmp_dir))?;
            let mut src = self.open_layer(&digest, desc.media_type().as_ref())?;
            let size = io::copy(&mut src, &mut tmp).map_err(io_err)?;
            io::Seek::rewind(&mut tmp).map_err(io_err)?;
            tar.append_data(&mut dir_header(), format!("{dir}/"), io::empty())
                .map_err(io_err)?;
            tar.append_data(&mut header(size), format!("{dir}/layer.tar"), tmp)
                .map_err(io_err)?;
            layer_names.push(format!("{dir}/layer.tar"));
        }
        let tags: Vec<&str> = name.into_iter().collect();
        let manifest = serde_json::to_vec(
            &json!([{ "Config": config_name, "RepoTags": tags, "Layers": layer_names }]),
        )
        .expect("json");
        tar.append_data(
            &mut header(manifest.len() as u64),
            "manifest.json",
            &manifest[..],
        )
        .map_err(io_err)?;
        Ok(())
    }
}
