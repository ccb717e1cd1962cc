//! The grammars of every name berth accepts from a user, a file or a request: image
//! references as the OCI distribution spec writes them, DNS labels (apps, environments,
//! services), deployments, and object names (containers, volumes, networks). One place, so
//! the CLI, the manifest, the store and the agent's API agree on what is a name, and no
//! name can carry `/`, `..`, a NUL byte or an unbounded length into a path.
//!
//! This module imports nothing of berth's: every other module may use it.

/// Longest repository name (host and path), as the distribution spec and Docker limit it.
pub const MAX_REPOSITORY: usize = 255;
/// Longest tag.
pub const MAX_TAG: usize = 128;
/// Longest container, volume or network name.
pub const MAX_OBJECT: usize = 128;
/// Longest DNS label (app, environment, service).
pub const MAX_LABEL: usize = 63;

/// A repository path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !alnum_lower(b[0]) || !alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or any number of `-`.
        let start = i;
        while i < b.len() && !alnum_lower(b[i]) {
            i += 1;
        }
        match &c[start..i] {
            "." | "_" | "__" => {}
            run if run.bytes().all(|x| x == b'-') => {}
            _ => return false,
        }
    }
    true
}

fn alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

/// A registry host: DNS components (`[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?`) joined by
/// `.`, or a bracketed IPv6 address, with an optional numeric port.
pub fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, tail)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match tail {
                    "" => return true,
                    t => ("", t.strip_prefix(':').unwrap_or("x")),
                }
            }
            None => return false,
        },
        None => match d.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => (d, ""),
        },
    };
    let port_ok = port.is_empty()
        || (port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0));
    let host_ok = host.is_empty() && d.starts_with('[')
        || (!host.is_empty()
            && host.split('.').all(|c| {
                let b = c.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
            }));
    port_ok && host_ok
}

/// Splits `name` (no tag, no digest) into its registry host, if the first component is
/// one (it has a `.` or a `:`, or is `localhost`, and a path follows), and its path.
pub fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

/// A repository name with an optional registry host: `[domain/]component(/component)*`,
/// at most 255 characters.
pub fn valid_repository(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_REPOSITORY {
        return false;
    }
    let (domain, path) = split_domain(name);
    domain.is_none_or(valid_domain) && path.split('/').all(valid_path_component)
}

/// A DNS label: lower-case letters, digits and `-`, starting with a letter, not ending
/// with `-`, at most 63 characters. Apps, environments and services are named so.
pub fn valid_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A deployment, `app-environment`: two DNS labels joined by `-` (which is itself a DNS
/// label character, so the pair is checked as one string of at most 127 characters).
pub fn valid_deployment(s: &str) -> bool {
    let b = s.as_bytes();
    s.contains('-')
        && b.len() <= 2 * MAX_LABEL + 1
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A container, volume or network name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 128
/// characters (Docker's grammar, bounded).
pub fn valid_object_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_OBJECT
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_components_follow_the_distribution_grammar() {
        for ok in [
            "a", "hello", "a.b", "a_b", "a__b", "a-b", "a---b", "0x", "a.b_c-d",
        ] {
            assert!(valid_path_component(ok), "{ok}");
        }
        for bad in [
            "", ".", "..", "-a", "a-", "a..b", "a___b", "a._b", "A", "a/b", "a\0b", "a b",
        ] {
            assert!(!valid_path_component(bad), "{bad:?}");
        }
    }

    #[test]
    fn repositories_are_bounded_and_hosts_checked() {
        for ok in [
            "base",
            "team/app",
            "127.0.0.1:5000/hello",
            "localhost/x",
            "[::1]:5000/x",
            "registry.example.com/a/b",
        ] {
            assert!(valid_repository(ok), "{ok}");
        }
        let long = "a".repeat(MAX_REPOSITORY + 1);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/x",
            "x/",
            "a//b",
            "host:port/x",
            "[zz]/x",
            &long,
            "Upper",
            "a\0b",
        ] {
            assert!(!valid_repository(bad), "{bad:?}");
        }
        assert!(valid_repository(&"a".repeat(MAX_REPOSITORY)));
    }

    #[test]
    fn tags_labels_deployments_and_objects() {
        assert!(valid_tag("1.2_rc-3") && valid_tag("_x") && !valid_tag(".x") && !valid_tag(""));
        assert!(!valid_tag(&"t".repeat(129)) && valid_tag(&"t".repeat(128)));
        assert!(valid_dns_label("web-1") && !valid_dns_label("1web") && !valid_dns_label("w-"));
        assert!(valid_deployment("hello-uat") && valid_deployment("my-app-prod-2"));
        for bad in ["hello", "../../x", "/tmp/x", "a-b\0", "A-b", "a-", "-a"] {
            assert!(!valid_deployment(bad), "{bad:?}");
        }
        assert!(!valid_deployment(&format!("a-{}", "b".repeat(10_000))));
        assert!(valid_object_name("web_1.a-b") && !valid_object_name(".x"));
        assert!(!valid_object_name(&"n".repeat(MAX_OBJECT + 1)));
    }
}
