//! Docker-style image references: `[scheme://]host[:port]/path[:tag][@sha256:…]`.

use std::fmt;
use std::str::FromStr;

use crate::store::Digest;

/// Docker Hub, as references name it.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed reference to an image in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub registry: String,
    /// The repository path (`library/alpine`, `team/app`).
    pub repository: String,
    /// The tag, if any.
    pub tag: Option<String>,
    /// The manifest digest, if any.
    pub digest: Option<Digest>,
    /// Plain HTTP: given as `http://`, or a loopback registry not given as `https://`.
    pub plain_http: bool,
    /// Written with `http://`: the user chose plain HTTP for this registry (a loopback
    /// registry is plain HTTP by default without it).
    pub named_http: bool,
}

use crate::names::{valid_domain, valid_path_component, valid_tag};

fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost" || name == "::1" || name.starts_with("127.")
}

impl FromStr for Reference {
    type Err = String;

    fn from_str(s: &str) -> Result<Reference, String> {
        let (scheme, rest) = match s.split_once("://") {
            Some(("http", r)) => (Some(false), r),
            Some(("https", r)) => (Some(true), r),
            Some((other, _)) => return Err(format!("unknown scheme `{other}://` in `{s}`")),
            None => (None, s),
        };
        let (name, digest) = match rest.split_once('@') {
            Some((n, d)) => (
                n,
                Some(
                    d.parse::<Digest>()
                        .map_err(|_| format!("`{d}` is not a sha256 digest"))?,
                ),
            ),
            None => (rest, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (name, None),
        };
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(format!("`{t}` is not a valid tag"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ if scheme.is_some() => {
                return Err(format!("`{s}` names no registry host"));
            }
            Some(_) => (DOCKER_HUB.to_string(), name.to_string()),
            None => (DOCKER_HUB.to_string(), format!("library/{name}")),
        };
        // Docker Hub under any of its names, and its official images under `library/`
        // (`docker.io/ubuntu` is `docker.io/library/ubuntu`), as Docker normalises them.
        let (registry, repository) = if matches!(
            registry.as_str(),
            "index.docker.io" | "registry-1.docker.io"
        ) || registry == DOCKER_HUB
        {
            let repository = if repository.contains('/') {
                repository
            } else {
                format!("library/{repository}")
            };
            (DOCKER_HUB.to_string(), repository)
        } else {
            (registry, repository)
        };
        if !repository.split('/').all(valid_path_component)
            || registry.len() + 1 + repository.len() > crate::names::MAX_REPOSITORY
        {
            return Err(format!(
                "`{repository}` is not a valid repository (lower-case path components of letters, digits and . _ -, at most 255 characters with the host)"
            ));
        }
        if !valid_domain(&registry) {
            return Err(format!("`{registry}` is not a valid registry host"));
        }
        let plain_http = match scheme {
            Some(https) => !https,
            None => is_loopback(&registry),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
            plain_http,
            named_http: scheme == Some(false),
        })
    }
}

impl Reference {
    /// The host the API is served from (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// `http(s)://host/v2/`.
    pub fn api_base(&self) -> String {
        format!(
            "{}://{}/v2/",
            if self.plain_http { "http" } else { "https" },
            self.api_host()
        )
    }

    /// What a manifest request names: the digest if given, else the tag (`latest` if none).
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same repository with another tag or digest.
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }

    /// The same repository, naming `digest` (and no tag).
    pub fn with_digest(&self, digest: &Digest) -> Reference {
        Reference {
            tag: None,
            digest: Some(digest.clone()),
            ..self.clone()
        }
    }

    /// `registry/repository:tag` as a local store tag; a digest-only reference is kept
    /// as `registry/repository@sha256:…` (what `images` lists and `run` finds).
    pub fn store_tag(&self) -> String {
        if let (None, Some(d)) = (&self.tag, &self.digest) {
            return format!("{}/{}@{d}", self.registry, self.repository);
        }
        format!(
            "{}/{}:{}",
            self.registry,
            self.repository,
            self.tag.as_deref().unwrap_or("latest")
        )
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_names_are_normalised() {
        for (raw, want) in [
            ("ubuntu", "docker.io/library/ubuntu"),
            ("docker.io/ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
            ("index.docker.io/ubuntu", "docker.io/library/ubuntu"),
            ("docker.io/library/ubuntu", "docker.io/library/ubuntu"),
            ("docker.io/bitnami/redis:7", "docker.io/bitnami/redis:7"),
            ("bitnami/redis", "docker.io/bitnami/redis"),
        ] {
            let r: Reference = raw.parse().unwrap();
            assert_eq!(r.to_string(), want, "{raw}");
            assert_eq!(r.api_host(), "registry-1.docker.io");
        }
    }

    #[test]
    fn references_parse_like_docker() {
        let r: Reference = "127.0.0.1:5000/team/app:1.2".parse().unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("1.2"));
        assert!(r.plain_http, "loopback registries are plain HTTP");
        assert_eq!(r.api_base(), "http://127.0.0.1:5000/v2/");

        let r: Reference = "alpine".parse().unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/alpine")
        );
        assert_eq!(r.manifest_ref(), "latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert!(!r.plain_http);

        let d = "sha256:".to_string() + &"a".repeat(64);
        let r: Reference = format!("ghcr.io/o/app@{d}").parse().unwrap();
        assert_eq!(r.manifest_ref(), d);
        assert_eq!(r.store_tag(), format!("ghcr.io/o/app@{d}"));
        assert_eq!(
            crate::store::normalize_tag(&r.store_tag()).unwrap(),
            format!("ghcr.io/o/app@{d}"),
            "the store keeps it under that name"
        );

        let r: Reference = "http://registry.lan:5000/app".parse().unwrap();
        assert!(r.plain_http);
        let r: Reference = "https://localhost:5000/app:x".parse().unwrap();
        assert!(!r.plain_http, "https:// overrides the loopback default");
        assert_eq!(r.to_string(), "localhost:5000/app:x");
        assert_eq!(r.store_tag(), "localhost:5000/app:x");

        for bad in [
            "Upper/case",
            "host:5000/a:b:c",
            "ftp://x/y",
            "a/b@sha256:zz",
            "x/:t",
            "host/a..b",
            "../x",
            "bad_host.com/x",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad}");
        }
    }
}
