//! Bounds on what a layer may make a reader do, for everything that streams layers (the
//! runtime's unpack, `diff`): most entries, most uncompressed bytes, and a free-space
//! reserve on the filesystem being written, so a decompression bomb (a few kilobytes of
//! zstd that expand to gigabytes) stops with a clear error before the disk is full.
//!
//! Defaults can be changed per process: `BERTH_LAYER_MAX_ENTRIES` (a count),
//! `BERTH_LAYER_MAX_BYTES` (a size: `64G`, `512M`, bytes) and `BERTH_DISK_RESERVE` (a size
//! or a percentage of the filesystem, `0` to turn it off).

use std::io;
use std::os::fd::AsFd;

/// Limits on one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Most entries a layer may have.
    pub max_entries: u64,
    /// Most uncompressed bytes a layer's tar stream may have.
    pub max_bytes: u64,
    /// Free space to leave on the filesystem written to.
    pub reserve: Reserve,
}

/// Free space an unpack must leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// The smaller of 1 GiB and 5% of the filesystem (the default).
    Default,
    /// This many bytes.
    Bytes(u64),
    /// This percentage of the filesystem's size.
    Percent(u8),
}

impl Default for LayerLimits {
    fn default() -> Self {
        LayerLimits {
            max_entries: 2_000_000,
            max_bytes: 256 << 30,
            reserve: Reserve::Default,
        }
    }
}

/// A value of one of the variables could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value} is not {expected}")]
pub struct LimitsError {
    /// The variable.
    pub var: &'static str,
    /// Its value.
    pub value: String,
    /// What it should be.
    pub expected: &'static str,
}

/// Parses `64G`, `512M`, `10k`, `4096` (binary units; a trailing `B`/`iB` is allowed).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 10),
        'm' | 'M' => (&t[..t.len() - 1], 20),
        'g' | 'G' => (&t[..t.len() - 1], 30),
        't' | 'T' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl LayerLimits {
    /// The defaults with this process's `BERTH_LAYER_*` and `BERTH_DISK_RESERVE` applied.
    pub fn configured() -> Result<LayerLimits, LimitsError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<LayerLimits, LimitsError> {
        let mut l = LayerLimits::default();
        let bad = |var, value: &str, expected| LimitsError {
            var,
            value: value.to_string(),
            expected,
        };
        if let Some(v) = get("BERTH_LAYER_MAX_ENTRIES") {
            l.max_entries = v
                .trim()
                .parse()
                .map_err(|_| bad("BERTH_LAYER_MAX_ENTRIES", &v, "a count"))?;
        }
        if let Some(v) = get("BERTH_LAYER_MAX_BYTES") {
            l.max_bytes = parse_size(&v)
                .ok_or_else(|| bad("BERTH_LAYER_MAX_BYTES", &v, "a size (e.g. 64G)"))?;
        }
        if let Some(v) = get("BERTH_DISK_RESERVE") {
            l.reserve = match v.trim().strip_suffix('%') {
                Some(p) => Reserve::Percent(
                    p.trim()
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= 90)
                        .ok_or_else(|| bad("BERTH_DISK_RESERVE", &v, "a size or 0-90%"))?,
                ),
                None => Reserve::Bytes(
                    parse_size(&v)
                        .ok_or_else(|| bad("BERTH_DISK_RESERVE", &v, "a size or 0-90%"))?,
                ),
            };
        }
        Ok(l)
    }

    /// The reserve in bytes on a filesystem of `total` bytes.
    pub fn reserve_bytes(&self, total: u64) -> u64 {
        match self.reserve {
            Reserve::Default => (1u64 << 30).min(total / 20),
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => total / 100 * u64::from(p),
        }
    }
}

/// Free inodes on the filesystem of `fd`, and how many it has (0 where it does not count
/// them).
pub fn free_inodes(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::fstatvfs(fd).map_err(io::Error::from)?;
    Ok((st.files_available() as u64, st.files() as u64))
}

/// Free space on the filesystem of `fd`, and its size, in bytes (what an unprivileged
/// writer can use: `f_bavail`).
pub fn free_space(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::fstatvfs(fd).map_err(io::Error::from)?;
    let unit = st.fragment_size().max(1);
    Ok((
        (st.blocks_available() as u64).saturating_mul(unit),
        (st.blocks() as u64).saturating_mul(unit),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_variables_parse() {
        assert_eq!(parse_size("64G"), Some(64 << 30));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let l = LayerLimits::from_vars(vars(&[
            ("BERTH_LAYER_MAX_BYTES", "1G"),
            ("BERTH_DISK_RESERVE", "10%"),
        ]))
        .unwrap();
        assert_eq!((l.max_bytes, l.reserve), (1 << 30, Reserve::Percent(10)));
        assert_eq!(l.reserve_bytes(1000), 100);
        assert_eq!(LayerLimits::default().reserve_bytes(10 << 30), 512 << 20);
        assert_eq!(LayerLimits::default().reserve_bytes(100 << 30), 1 << 30);
        let e = LayerLimits::from_vars(vars(&[("BERTH_DISK_RESERVE", "lots")])).unwrap_err();
        assert_eq!(e.var, "BERTH_DISK_RESERVE");
    }
}
