//! Content digests. A layer has two: its [`Digest`] (of the compressed bytes, which name the
//! blob) and its [`DiffId`] (of the uncompressed tar, which the image config lists). They are
//! distinct types so one can never be passed where the other is meant.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A sha256 content digest, `sha256:<64 hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of finished hasher state.
    pub fn from_hasher(h: Sha256) -> Self {
        Digest(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex characters, as Docker shows ids.
    pub fn short(&self) -> &str {
        &self.0[7..19]
    }

    /// As an oci-spec digest.
    pub fn to_oci(&self) -> oci_spec::image::Digest {
        self.0
            .parse()
            .expect("a valid sha256 digest is a valid OCI digest")
    }
}

/// A string that is not a sha256 digest.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a sha256 digest (expected sha256: and 64 lower-case hex characters)")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(Digest(s.to_string()))
        } else {
            Err(BadDigest(s.to_string()))
        }
    }
}

impl TryFrom<&oci_spec::image::Digest> for Digest {
    type Error = BadDigest;

    fn try_from(d: &oci_spec::image::Digest) -> Result<Self, Self::Error> {
        d.to_string().parse()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The digest of a layer's uncompressed tar stream, as listed in `rootfs.diff_ids`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DiffId(pub Digest);

impl fmt::Display for DiffId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for DiffId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiffId({})", self.0)
    }
}

/// The SHA-256 initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// A SHA-256 computation that can be saved part way and carried on later: the state words
/// after the whole 64-byte blocks seen so far, and the bytes of the block not yet full.
/// A layer saves one at each chunk boundary, so a rebuild whose first bytes did not change
/// starts hashing where they end (the sha2 crate's own hasher cannot be saved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Midstate {
    /// The eight state words.
    pub state: [u32; 8],
    /// Bytes hashed in all.
    pub len: u64,
    /// The `len % 64` bytes after the last whole block, hex.
    pub tail: String,
}

/// A resumable SHA-256 hasher (see [`Midstate`]), as fast as the sha2 crate's (it uses the
/// same block function, with the CPU's SHA extensions where it has them).
#[derive(Clone)]
pub struct Sha256Resumable {
    state: [u32; 8],
    len: u64,
    block: [u8; 64],
}

impl Default for Sha256Resumable {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256Resumable {
    /// A fresh hasher.
    pub fn new() -> Self {
        Sha256Resumable {
            state: SHA256_IV,
            len: 0,
            block: [0; 64],
        }
    }

    /// Carries on from a saved state; `None` when the state is inconsistent.
    pub fn resume(m: &Midstate) -> Option<Self> {
        let tail = hex::decode(&m.tail).ok()?;
        if tail.len() as u64 != m.len % 64 {
            return None;
        }
        let mut block = [0; 64];
        block[..tail.len()].copy_from_slice(&tail);
        Some(Sha256Resumable {
            state: m.state,
            len: m.len,
            block,
        })
    }

    /// The state to carry on from later.
    pub fn midstate(&self) -> Midstate {
        Midstate {
            state: self.state,
            len: self.len,
            tail: hex::encode(&self.block[..(self.len % 64) as usize]),
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before anything was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn compress(&mut self, blocks: &[u8]) {
        use sha2::digest::consts::U64;
        use sha2::digest::generic_array::GenericArray;
        debug_assert_eq!(blocks.len() % 64, 0);
        // SAFETY: `GenericArray<u8, U64>` is `#[repr(transparent)]` over `[u8; 64]` (size
        // 64, alignment 1), so `blocks.len() / 64` of them fit exactly in `blocks`.
        let blocks: &[GenericArray<u8, U64>] =
            unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), blocks.len() / 64) };
        sha2::compress256(&mut self.state, blocks);
    }

    /// Hashes `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        let have = (self.len % 64) as usize;
        self.len += data.len() as u64;
        if have > 0 {
            let take = (64 - have).min(data.len());
            self.block[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            if have + take < 64 {
                return;
            }
            let block = self.block;
            self.compress(&block);
        }
        let whole = data.len() - data.len() % 64;
        if whole > 0 {
            self.compress(&data[..whole]);
        }
        let rest = &data[whole..];
        self.block[..rest.len()].copy_from_slice(rest);
    }

    /// The digest of everything hashed.
    pub fn finish(mut self) -> Digest {
        let bits = self.len.wrapping_mul(8);
        let have = (self.len % 64) as usize;
        let mut pad = [0u8; 128];
        pad[..have].copy_from_slice(&self.block[..have]);
        pad[have] = 0x80;
        let total = if have < 56 { 64 } else { 128 };
        pad[total - 8..total].copy_from_slice(&bits.to_be_bytes());
        self.compress(&pad[..total]);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        Digest(format!("sha256:{}", hex::encode(out)))
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256Resumable,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256Resumable::new(),
        }
    }

    /// Wraps `inner`, which already holds the bytes `hasher` has hashed.
    pub fn resumed(inner: W, hasher: Sha256Resumable) -> Self {
        HashingWriter { inner, hasher }
    }

    /// The inner writer: what is written to it directly is not hashed.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The hash state of everything written so far.
    pub fn midstate(&self) -> Midstate {
        self.hasher.midstate()
    }

    /// The inner writer, the digest and the byte count of everything written.
    pub fn finish(self) -> (W, Digest, u64) {
        let count = self.hasher.len();
        (self.inner, self.hasher.finish(), count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The digest and byte count of everything read so far.
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_hasher(self.hasher), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_hash_is_the_hash_of_the_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for cut in [0, 1, 55, 56, 63, 64, 65, 127, 128, 4_000, 9_999, 10_000] {
            let mut a = Sha256Resumable::new();
            // Uneven pieces, so every partial-block path runs.
            for piece in data[..cut].chunks(37) {
                a.update(piece);
            }
            let saved = serde_json::to_string(&a.midstate()).unwrap();
            let mut b = Sha256Resumable::resume(&serde_json::from_str(&saved).unwrap()).unwrap();
            b.update(&data[cut..]);
            assert_eq!(b.finish(), Digest::of(&data), "cut at {cut}");
        }
        for n in [0, 1, 55, 56, 64, 119, 120] {
            let mut h = Sha256Resumable::new();
            h.update(&data[..n]);
            assert_eq!(h.finish(), Digest::of(&data[..n]), "{n} bytes");
        }
        let bad = Midstate {
            state: [0; 8],
            len: 3,
            tail: "00".into(),
        };
        assert!(Sha256Resumable::resume(&bad).is_none());
    }

    #[test]
    fn digests_parse_strictly_and_hash_correctly() {
        let d = Digest::of(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.short(), "e3b0c44298fc");
        assert_eq!(d.as_str().parse::<Digest>().unwrap(), d);
        for bad in [
            "sha256:abc",
            "sha512:e3b0",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
        let upper = d.as_str().to_uppercase().replace("SHA256", "sha256");
        assert!(upper.parse::<Digest>().is_err());
    }

    #[test]
    fn hashing_writer_and_reader_agree() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello world").unwrap();
        let (buf, d, n) = w.finish();
        let mut r = HashingReader::new(&buf[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(r.finish(), (d.clone(), n));
        assert_eq!(d, Digest::of(b"hello world"));
    }
}
