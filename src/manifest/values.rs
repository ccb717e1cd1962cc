//! Typed values that appear in `berth.toml` and environment files.
//!
//! Each type parses strictly from its string form (`FromStr`), prints back in a canonical
//! form (`Display`), and serialises as that canonical string so a resolved configuration
//! round-trips. Parse errors are short, lower-case sentences; the decoder attaches the span.

pub use crate::names::{valid_dns_label, valid_object_name, valid_path_component};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// Implements `Serialize` as the value's `Display` form.
macro_rules! serialize_as_display {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}

/// A transport protocol for a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A published port: `8080`, `8080:80`, `127.0.0.1:8080:80/udp`, `[::1]:8080:80`.
///
/// A single number publishes the same port on the host and in the container: a deploy
/// needs a predictable address, so berth does not pick a random host port as Docker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// Host address to bind; `None` binds every address.
    pub host_ip: Option<IpAddr>,
    /// Port on the host.
    pub published: u16,
    /// Port inside the container.
    pub container: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not a port number"));
    }
    match s.parse::<u32>() {
        Ok(0) => Err("port 0 cannot be published".into()),
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(format!("port {s} is out of range (1-65535)")),
    }
}

impl FromStr for PortMapping {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, protocol) = match s.rsplit_once('/') {
            Some((rest, "tcp")) => (rest, Protocol::Tcp),
            Some((rest, "udp")) => (rest, Protocol::Udp),
            Some((_, p)) => return Err(format!("unknown protocol `{p}` (expected tcp or udp)")),
            None => (s, Protocol::Tcp),
        };
        // An IPv6 host address is bracketed: `[::1]:8080:80`.
        let (host_ip, ports) = if let Some(stripped) = rest.strip_prefix('[') {
            let (ip, after) = stripped
                .split_once("]:")
                .ok_or_else(|| format!("`{s}` has an unterminated IPv6 address"))?;
            let ip = ip
                .parse::<IpAddr>()
                .map_err(|_| format!("`{ip}` is not an IP address"))?;
            (Some(ip), after)
        } else {
            match rest.matches(':').count() {
                0 | 1 => (None, rest),
                2 => {
                    let (ip, after) = rest.split_once(':').expect("two colons");
                    let ip = ip
                        .parse::<IpAddr>()
                        .map_err(|_| format!("`{ip}` is not an IP address"))?;
                    (Some(ip), after)
                }
                _ => {
                    return Err(format!(
                        "`{s}` is not a port mapping (expected [IP:]HOST:CONTAINER[/udp])"
                    ));
                }
            }
        };
        let (published, container) = match ports.split_once(':') {
            Some((h, c)) => (parse_port(h)?, parse_port(c)?),
            None if host_ip.is_some() => {
                return Err(format!("`{s}` names an address but no container port"));
            }
            None => {
                let p = parse_port(ports)?;
                (p, p)
            }
        };
        Ok(PortMapping {
            host_ip,
            published,
            container,
            protocol,
        })
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(f, "{}:{}", self.published, self.container)?;
        if self.protocol == Protocol::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

/// A container port with its protocol, as in `expose = [9090, "53/udp"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExposedPort {
    /// The port number.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

impl FromStr for ExposedPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, protocol) = match s.split_once('/') {
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some((_, p)) => return Err(format!("unknown protocol `{p}` (expected tcp or udp)")),
            None => (s, Protocol::Tcp),
        };
        Ok(ExposedPort {
            port: parse_port(port)?,
            protocol,
        })
    }
}

impl fmt::Display for ExposedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// A size in bytes: `256M`, `1G`, `512k`, `1048576`. Units are binary (k = 1024), as in
/// Docker's `--memory`; `MiB`, `MB` and `m` all mean 2^20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(digits_end);
        if num.is_empty() {
            return Err(format!("`{s}` is not a size (expected e.g. 256M or 1G)"));
        }
        let shift = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => {
                return Err(format!(
                    "unknown size unit `{unit}` in `{s}` (expected b, k, M, G or T)"
                ));
            }
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is too large a size"))?;
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large a size"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "k")];
        for (shift, unit) in UNITS {
            let size = 1u64 << shift;
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A duration with a unit: `500ms`, `2s`, `10m`, `1h`, `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a duration (expected e.g. 500ms, 2s, 10m or 1h30m)");
        if s.is_empty() {
            return Err(bad());
        }
        let mut total_ms: u128 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let n: u128 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let factor = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "" => return Err(format!("`{s}` needs a unit, e.g. `{s}s`")),
                u => {
                    return Err(format!(
                        "unknown duration unit `{u}` in `{s}` (use ms, s, m or h)"
                    ));
                }
            };
            rest = &rest[unit_len..];
            total_ms = total_ms
                .checked_add(n.checked_mul(factor).ok_or_else(bad)?)
                .ok_or_else(bad)?;
        }
        let ms = u64::try_from(total_ms).map_err(|_| bad())?;
        Ok(Duration::from_millis(ms))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

/// A CPU allowance in thousandths of a CPU: `0.5`, `2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cpus {
    /// Thousandths of one CPU (500 = half a CPU).
    pub millis: u32,
}

impl Cpus {
    /// Builds a CPU allowance from a fractional count, refusing zero, negatives, NaN and
    /// anything finer than a thousandth.
    pub fn from_f64(v: f64) -> Result<Self, String> {
        if !v.is_finite() || v <= 0.0 {
            return Err(format!("cpus must be a positive number, not {v}"));
        }
        if v > 4096.0 {
            return Err(format!("{v} cpus is more than any machine has"));
        }
        let millis = (v * 1000.0).round();
        if millis < 1.0 {
            return Err(format!("{v} cpus is below the smallest allowance (0.001)"));
        }
        Ok(Cpus {
            millis: millis as u32,
        })
    }
}

impl FromStr for Cpus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v: f64 = s
            .parse()
            .map_err(|_| format!("`{s}` is not a number of cpus (expected e.g. 0.5 or 2)"))?;
        Cpus::from_f64(v)
    }
}

impl fmt::Display for Cpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.millis / 1000;
        let frac = self.millis % 1000;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let s = format!("{whole}.{frac:03}");
            f.write_str(s.trim_end_matches('0'))
        }
    }
}

impl Serialize for Cpus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(f64::from(self.millis) / 1000.0)
    }
}

/// How a registry is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (written `http://`).
    Http,
    /// HTTPS (written `https://`, or no scheme for a non-local host).
    Https,
    /// No scheme written: HTTPS, except plain HTTP for `localhost` and `127.0.0.1`.
    Default,
}

/// True for a hostname that Docker treats as a registry host in the first path component.
fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// A repository in a registry: `http://127.0.0.1:5000/hello`, `ghcr.io/acme/hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRepo {
    /// How to reach the registry.
    pub scheme: Scheme,
    /// Host and optional port, e.g. `127.0.0.1:5000`.
    pub host: String,
    /// Repository path inside the registry, e.g. `acme/hello`.
    pub repository: String,
}

impl FromStr for RegistryRepo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if s.contains("://") {
            return Err(format!(
                "`{s}` has an unsupported scheme (use http:// or https://)"
            ));
        } else {
            (Scheme::Default, s)
        };
        let rest = rest.trim_end_matches('/');
        let (host, repository) = rest.split_once('/').ok_or_else(|| {
            format!("`{s}` names no repository (expected e.g. 127.0.0.1:5000/hello)")
        })?;
        if host.is_empty() || (scheme == Scheme::Default && !looks_like_host(host)) {
            return Err(format!(
                "`{s}` does not start with a registry host (expected e.g. ghcr.io/acme/hello)"
            ));
        }
        if let Some((_, port)) = host.rsplit_once(':')
            && !host.ends_with(']')
            && port.parse::<u16>().is_err()
        {
            return Err(format!("`{port}` in `{s}` is not a port number"));
        }
        if repository.contains('@') {
            return Err(format!(
                "`{s}` names an image digest; a registry entry names a repository only"
            ));
        }
        if let Some(last) = repository.rsplit('/').next()
            && let Some((_, tag)) = last.split_once(':')
        {
            return Err(format!(
                "`{s}` has a tag `{tag}`; a registry entry names a repository only"
            ));
        }
        if let Some(bad) = repository.split('/').find(|c| !valid_path_component(c)) {
            return Err(format!(
                "`{bad}` is not a valid repository name component \
                 (lower-case letters, digits and . _ - separators)"
            ));
        }
        Ok(RegistryRepo {
            scheme,
            host: host.to_string(),
            repository: repository.to_string(),
        })
    }
}

impl fmt::Display for RegistryRepo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Http => f.write_str("http://")?,
            Scheme::Https => f.write_str("https://")?,
            Scheme::Default => {}
        }
        write!(f, "{}/{}", self.host, self.repository)
    }
}

/// An image reference as written in `[image] from`: `scratch`, a local tag (`base:1`),
/// a digest or digest prefix (`sha256:ab12…`), or a registry reference
/// (`127.0.0.1:5000/base:1`, `ghcr.io/acme/base@sha256:…`). The store and registry
/// client resolve it; here it is only checked for shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef(String);

impl ImageRef {
    /// The reference as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for the empty base image.
    pub fn is_scratch(&self) -> bool {
        self.0 == "scratch"
    }
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        !hex.is_empty()
            && hex.len() <= 64
            && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    })
}

impl FromStr for ImageRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "scratch" || valid_digest(s) {
            return Ok(ImageRef(s.to_string()));
        }
        if s.starts_with("sha256:") {
            return Err(format!(
                "`{s}` is not a sha256 digest (expected lower-case hex)"
            ));
        }
        let name = match s.split_once('@') {
            Some((n, d)) if valid_digest(d) && d.len() == 71 => n,
            Some((_, d)) => return Err(format!("`{d}` is not a full sha256 digest")),
            None => s,
        };
        let mut components: Vec<&str> = name.split('/').collect();
        let last = components.pop().unwrap_or_default();
        let (last, tag) = match last.split_once(':') {
            Some((l, t)) => (l, Some(t)),
            None => (last, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(format!("`{tag}` is not a valid tag"));
        }
        let path_start = usize::from(components.first().is_some_and(|c| looks_like_host(c)));
        let path = components[path_start..].iter().copied().chain([last]);
        for c in path {
            if !valid_path_component(c) {
                return Err(format!(
                    "`{s}` is not an image reference: `{c}` must be lower-case letters, \
                     digits and . _ - separators"
                ));
            }
        }
        Ok(ImageRef(s.to_string()))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an environment's host is: this machine (`local`) or a berth agent URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostUrl {
    /// This machine, without a separate agent process.
    Local,
    /// A berth agent, e.g. `https://198.18.0.12:7443`.
    Agent {
        /// True for `https://`.
        tls: bool,
        /// Host name or address (IPv6 in brackets).
        host: String,
        /// TCP port of the agent.
        port: u16,
    },
}

/// The agent's port when a host URL names none.
pub const DEFAULT_AGENT_PORT: u16 = 7443;

impl FromStr for HostUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "local" {
            return Ok(HostUrl::Local);
        }
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "`{s}` is not a host (expected `local` or an agent URL such as \
                 https://198.18.0.12:7443)"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!(
                "`{s}` has a path; a host URL is scheme://host:port"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (ip, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("`{s}` has an unterminated IPv6 address"))?;
            ip.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("`{ip}` is not an IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None if after.is_empty() => DEFAULT_AGENT_PORT,
                None => return Err(format!("`{s}` is not a host URL")),
            };
            (format!("[{ip}]"), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p)?),
                None => (rest.to_string(), DEFAULT_AGENT_PORT),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
        if !host_ok {
            return Err(format!("`{host}` is not a host name or address"));
        }
        Ok(HostUrl::Agent { tls, host, port })
    }
}

impl fmt::Display for HostUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostUrl::Local => f.write_str("local"),
            HostUrl::Agent { tls, host, port } => {
                let scheme = if *tls { "https" } else { "http" };
                write!(f, "{scheme}://{host}:{port}")
            }
        }
    }
}

/// The source side of a volume mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A named volume kept in the store; survives every deploy and rollback.
    Named(String),
    /// A bind mount of an absolute host path.
    Bind(String),
}

/// A volume mount: `data:/var/lib/hello`, `/srv/static:/www:ro`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// Named volume or host path.
    pub source: VolumeSource,
    /// Absolute path inside the container.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl FromStr for VolumeMount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, read_only) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            [_, _, opt] => {
                return Err(format!("unknown volume option `{opt}` (expected ro or rw)"));
            }
            _ => {
                return Err(format!(
                    "`{s}` is not a volume (expected NAME:/path or /host/path:/path[:ro])"
                ));
            }
        };
        if !target.starts_with('/') {
            return Err(format!("the container path `{target}` must be absolute"));
        }
        if target.split('/').any(|c| c == "..") {
            return Err(format!(
                "the container path `{target}` must not contain `..`"
            ));
        }
        let source = if source.starts_with('/') {
            if source.split('/').any(|c| c == "..") {
                return Err(format!("the host path `{source}` must not contain `..`"));
            }
            VolumeSource::Bind(source.to_string())
        } else if valid_object_name(source) {
            VolumeSource::Named(source.to_string())
        } else {
            return Err(format!(
                "`{source}` is neither a volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*) nor an \
                 absolute host path"
            ));
        };
        Ok(VolumeMount {
            source,
            target: target.to_string(),
            read_only,
        })
    }
}

impl fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            VolumeSource::Named(n) | VolumeSource::Bind(n) => write!(f, "{n}:{}", self.target)?,
        }
        if self.read_only {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}

/// When a stopped container is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Never.
    No,
    /// After a non-zero exit, at most `max_retries` times when given.
    OnFailure {
        /// Limit on restarts; `None` is unlimited.
        max_retries: Option<u32>,
    },
    /// Always, until stopped by a command.
    Always,
    /// Always, unless it was stopped by a command (survives host reboots differently).
    UnlessStopped,
}

impl FromStr for RestartPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "no" => Ok(RestartPolicy::No),
            "always" => Ok(RestartPolicy::Always),
            "unless-stopped" => Ok(RestartPolicy::UnlessStopped),
            "on-failure" => Ok(RestartPolicy::OnFailure { max_retries: None }),
            _ => match s.strip_prefix("on-failure:") {
                Some(n) => n
                    .parse()
                    .map(|n| RestartPolicy::OnFailure {
                        max_retries: Some(n),
                    })
                    .map_err(|_| format!("`{n}` is not a retry count")),
                None => Err(format!(
                    "`{s}` is not a restart policy (expected no, on-failure[:N], always or \
                     unless-stopped)"
                )),
            },
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartPolicy::No => f.write_str("no"),
            RestartPolicy::Always => f.write_str("always"),
            RestartPolicy::UnlessStopped => f.write_str("unless-stopped"),
            RestartPolicy::OnFailure { max_retries: None } => f.write_str("on-failure"),
            RestartPolicy::OnFailure {
                max_retries: Some(n),
            } => write!(f, "on-failure:{n}"),
        }
    }
}

/// Linux signal names and numbers (x86_64 and aarch64 agree on these).
const SIGNALS: [(&str, i32); 31] = [
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGILL", 4),
    ("SIGTRAP", 5),
    ("SIGABRT", 6),
    ("SIGBUS", 7),
    ("SIGFPE", 8),
    ("SIGKILL", 9),
    ("SIGUSR1", 10),
    ("SIGSEGV", 11),
    ("SIGUSR2", 12),
    ("SIGPIPE", 13),
    ("SIGALRM", 14),
    ("SIGTERM", 15),
    ("SIGSTKFLT", 16),
    ("SIGCHLD", 17),
    ("SIGCONT", 18),
    ("SIGSTOP", 19),
    ("SIGTSTP", 20),
    ("SIGTTIN", 21),
    ("SIGTTOU", 22),
    ("SIGURG", 23),
    ("SIGXCPU", 24),
    ("SIGXFSZ", 25),
    ("SIGVTALRM", 26),
    ("SIGPROF", 27),
    ("SIGWINCH", 28),
    ("SIGIO", 29),
    ("SIGPWR", 30),
    ("SIGSYS", 31),
];

/// A signal by name (`SIGTERM`, `TERM`, `sigquit`) or number (`15`, `SIGRTMIN+3` is not
/// accepted), as Docker's `STOPSIGNAL` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

impl FromStr for Signal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(n) = s.parse::<i32>() {
            return if (1..=64).contains(&n) {
                Ok(Signal(n))
            } else {
                Err(format!("signal {n} is out of range (1-64)"))
            };
        }
        let upper = s.to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        SIGNALS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, num)| Signal(*num))
            .ok_or_else(|| format!("`{s}` is not a signal name (e.g. SIGTERM, SIGQUIT)"))
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match SIGNALS.iter().find(|(_, n)| *n == self.0) {
            Some((name, _)) => f.write_str(name),
            None => write!(f, "{}", self.0),
        }
    }
}

serialize_as_display!(
    PortMapping,
    ExposedPort,
    ByteSize,
    Duration,
    RegistryRepo,
    ImageRef,
    HostUrl,
    VolumeMount,
    RestartPolicy,
    Signal
);

/// True for a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(s: &str) -> PortMapping {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn ports_parse_in_every_documented_form() {
        assert_eq!(port("8080").to_string(), "8080:8080");
        assert_eq!(port("8080:80").to_string(), "8080:80");
        let p = port("127.0.0.1:8080:80/udp");
        assert_eq!(p.host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(
            (p.published, p.container, p.protocol),
            (8080, 80, Protocol::Udp)
        );
        assert_eq!(p.to_string(), "127.0.0.1:8080:80/udp");
        assert_eq!(port("[::1]:8080:80").to_string(), "[::1]:8080:80");
        assert_eq!(port("53:53/tcp").to_string(), "53:53");
    }

    #[test]
    fn bad_ports_are_refused() {
        for bad in [
            "",
            "0",
            "65536",
            "80:",
            ":80",
            "x:80",
            "8080:80/sctp",
            "1.2.3:80:80",
            "a:b:c:d",
            "127.0.0.1:80",
            "-1",
            "80 ",
        ] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn sizes_are_binary_and_round_trip() {
        assert_eq!("256M".parse::<ByteSize>().unwrap().0, 256 << 20);
        assert_eq!("1G".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("512k".parse::<ByteSize>().unwrap().0, 512 << 10);
        assert_eq!("64MiB".parse::<ByteSize>().unwrap().0, 64 << 20);
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        for s in ["256M", "1G", "1000", "3k", "5T"] {
            assert_eq!(s.parse::<ByteSize>().unwrap().to_string(), s);
        }
        for bad in [
            "",
            "M",
            "1.5G",
            "12X",
            "-1M",
            "99999999999999999999",
            "20000000T",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn durations_need_units_and_round_trip() {
        assert_eq!(
            "500ms".parse::<Duration>().unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!("2s".parse::<Duration>().unwrap(), Duration::from_secs(2));
        assert_eq!("10m".parse::<Duration>().unwrap(), Duration::from_secs(600));
        assert_eq!(
            "1h30m".parse::<Duration>().unwrap(),
            Duration::from_secs(5400)
        );
        for s in ["500ms", "2s", "10m", "1h30m", "1m5s250ms", "0s"] {
            assert_eq!(s.parse::<Duration>().unwrap().to_string(), s);
        }
        let err = "5".parse::<Duration>().unwrap_err();
        assert!(err.contains("needs a unit"), "{err}");
        for bad in ["", "s", "1d", "1.5s", "-1s", "1 s", "1sm"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn cpus_are_positive_thousandths() {
        assert_eq!("0.5".parse::<Cpus>().unwrap().millis, 500);
        assert_eq!("2".parse::<Cpus>().unwrap().to_string(), "2");
        assert_eq!("1.25".parse::<Cpus>().unwrap().to_string(), "1.25");
        for bad in ["0", "-1", "nan", "inf", "0.0001", "x", "100000"] {
            assert!(bad.parse::<Cpus>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn registry_repositories_need_a_host_and_no_tag() {
        let r: RegistryRepo = "http://127.0.0.1:5000/hello".parse().unwrap();
        assert_eq!(
            (r.scheme, r.host.as_str(), r.repository.as_str()),
            (Scheme::Http, "127.0.0.1:5000", "hello")
        );
        let r: RegistryRepo = "ghcr.io/acme/hello".parse().unwrap();
        assert_eq!(
            (r.scheme, r.repository.as_str()),
            (Scheme::Default, "acme/hello")
        );
        assert_eq!(r.to_string(), "ghcr.io/acme/hello");
        for bad in [
            "hello",
            "acme/hello",
            "ghcr.io/acme/hello:1",
            "ghcr.io",
            "ftp://x.io/a",
            "ghcr.io/Acme/hello",
            "localhost:x/a",
            "ghcr.io/a@sha256:00",
        ] {
            assert!(bad.parse::<RegistryRepo>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn image_references_are_checked_for_shape() {
        for ok in [
            "scratch",
            "base:1",
            "hello",
            "127.0.0.1:5000/hello:1",
            "ghcr.io/acme/base@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:abc123",
            "localhost/a/b_c:v1.0-rc",
        ] {
            assert!(ok.parse::<ImageRef>().is_ok(), "{ok:?} refused");
        }
        for bad in [
            "",
            "Base:1",
            "base:",
            "base:-x",
            "sha256:XYZ",
            "a@sha256:12",
            "a//b",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn host_urls() {
        assert_eq!("local".parse::<HostUrl>().unwrap(), HostUrl::Local);
        assert_eq!(
            "https://198.18.0.12:7443"
                .parse::<HostUrl>()
                .unwrap()
                .to_string(),
            "https://198.18.0.12:7443"
        );
        assert_eq!(
            "http://agent.example"
                .parse::<HostUrl>()
                .unwrap()
                .to_string(),
            "http://agent.example:7443"
        );
        assert_eq!(
            "https://[fd00::1]:9000"
                .parse::<HostUrl>()
                .unwrap()
                .to_string(),
            "https://[fd00::1]:9000"
        );
        for bad in [
            "localhost",
            "198.18.0.12:7443",
            "https://",
            "https://h:0",
            "https://h/x",
            "ssh://h",
        ] {
            assert!(bad.parse::<HostUrl>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn volumes() {
        let v: VolumeMount = "data:/var/lib/hello".parse().unwrap();
        assert_eq!(v.source, VolumeSource::Named("data".into()));
        let v: VolumeMount = "/srv/www:/www:ro".parse().unwrap();
        assert_eq!(
            (v.source, v.read_only),
            (VolumeSource::Bind("/srv/www".into()), true)
        );
        for bad in [
            "data",
            "data:rel",
            "data:/x:rx",
            "../x:/y",
            "/a/../b:/y",
            "da ta:/x",
            "d:/a/../b",
        ] {
            assert!(bad.parse::<VolumeMount>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn restart_policies_and_signals() {
        for s in [
            "no",
            "always",
            "unless-stopped",
            "on-failure",
            "on-failure:5",
        ] {
            assert_eq!(s.parse::<RestartPolicy>().unwrap().to_string(), s);
        }
        assert!("sometimes".parse::<RestartPolicy>().is_err());
        assert!("on-failure:x".parse::<RestartPolicy>().is_err());
        assert_eq!("TERM".parse::<Signal>().unwrap(), Signal(15));
        assert_eq!("sigquit".parse::<Signal>().unwrap().to_string(), "SIGQUIT");
        assert_eq!("9".parse::<Signal>().unwrap().to_string(), "SIGKILL");
        assert!("SIGFOO".parse::<Signal>().is_err());
        assert!("0".parse::<Signal>().is_err());
    }

    #[test]
    fn names() {
        assert!(valid_dns_label("hello-web2"));
        assert!(!valid_dns_label("Hello") && !valid_dns_label("2x") && !valid_dns_label("a-"));
        assert!(valid_env_name("LOG_LEVEL") && valid_env_name("_x1"));
        assert!(!valid_env_name("1X") && !valid_env_name("A-B") && !valid_env_name(""));
    }
}

/// A certificate's SHA-256 fingerprint: 32 bytes as hex, with or without colons (as
/// `berth agent --init-tls` and `openssl x509 -fingerprint -sha256` print it), optionally
/// prefixed with `sha256:` / `SHA256:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl FromStr for Fingerprint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("SHA-256:"))
            .unwrap_or(t)
            .trim();
        let hex: String = t.chars().filter(|c| *c != ':').collect();
        let bytes = ::hex::decode(&hex)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                format!("`{s}` is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
            })?;
        Ok(Fingerprint(bytes))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|b| format!("{b:02X}")).collect();
        f.write_str(&parts.join(":"))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
