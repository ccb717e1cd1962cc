//! Provenance labels from git: the commit, the remote the source came from, and whether the
//! work tree had uncommitted changes.

use std::path::Path;

/// `org.opencontainers.image.revision`.
pub const REVISION: &str = "org.opencontainers.image.revision";
/// `org.opencontainers.image.source`.
pub const SOURCE: &str = "org.opencontainers.image.source";
/// Whether the work tree differed from the commit (tracked or untracked files).
pub const DIRTY: &str = "dev.berth.git.dirty";

/// What git says of the checkout a build's source is in.
#[derive(Debug, Default)]
pub struct Provenance {
    /// Labels for the image; none when `dir` is not in a git repository or it has no
    /// commit. The source is the `origin` remote when it is a network URL (a path on this
    /// machine says nothing to anyone else, and would make two clones build different
    /// digests).
    pub labels: Vec<(String, String)>,
    /// The commit's time when the work tree is the commit (a dirty tree has no single
    /// date that describes it).
    pub clean_commit_time: Option<u64>,
}

/// The provenance of the checkout containing `dir` (one look at its status).
pub fn of(dir: &Path) -> Provenance {
    let Ok(repo) = git2::Repository::discover(dir) else {
        return Provenance::default();
    };
    let Ok(commit) = repo.head().and_then(|h| h.peel_to_commit()) else {
        return Provenance::default();
    };
    let mut labels = vec![(REVISION.to_string(), commit.id().to_string())];
    if let Ok(remote) = repo.find_remote("origin")
        && let Some(url) = remote.url()
        && (url.contains("://") || url.contains('@'))
        && !url.starts_with("file://")
    {
        labels.push((SOURCE.to_string(), strip_credentials(url)));
    }
    let clean = is_clean(&repo);
    labels.push((DIRTY.to_string(), (!clean).to_string()));
    Provenance {
        labels,
        clean_commit_time: clean
            .then(|| u64::try_from(commit.time().seconds()).ok())
            .flatten(),
    }
}

/// True when the work tree is the commit: no tracked file changed and no untracked file
/// (a build may copy it; a clone of the commit would not have it). Ignored files are not
/// looked at: they are usually what builds produce (`target/`, `node_modules/`).
fn is_clean(repo: &git2::Repository) -> bool {
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(false)
        .include_ignored(false);
    repo.statuses(Some(&mut opts))
        .map(|s| s.is_empty())
        .unwrap_or(false)
}

/// Drops `user:password@` from an https URL so credentials never reach an image.
fn strip_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if rest.contains('@') && scheme.starts_with("http") => {
            let after = rest.split_once('@').map_or(rest, |(_, a)| a);
            format!("{scheme}://{after}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_labels() {
        assert_eq!(
            strip_credentials("https://user:tok@git.example.com/a.git"),
            "https://git.example.com/a.git"
        );
        assert_eq!(
            strip_credentials("git@github.com:a/b.git"),
            "git@github.com:a/b.git"
        );
    }
}
