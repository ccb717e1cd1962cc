//! Parallel layer compression whose output depends only on the input, with reuse of
//! compressed chunks.
//!
//! The input is cut into chunks that are compressed independently on several threads and
//! concatenated in order. For gzip, as pigz does, each chunk is raw deflate ending with a
//! sync flush (so it ends on a byte boundary), all inside one standard gzip member (an
//! empty final block and a combined CRC-32 close it). For zstd each chunk is a frame of its
//! own; a sequence of frames is a valid zstd stream. Chunk
//! boundaries are *content-defined* (a gear rolling hash, as in FastCDC): they depend only
//! on the bytes, so 1 thread or 64 give the same output, and after an edit the boundaries
//! fall back into step, so the chunks that did not change are byte-for-byte the chunks of
//! the previous build.
//!
//! That is what makes a one-file rebuild cheap: every layer gets a chunk index (chunk
//! BLAKE3 → where its compressed bytes sit in the blob), and a new layer copies a chunk's
//! compressed bytes from an older blob instead of compressing it again; it also expects
//! the chunk that followed each reused one last time, and when the next bytes hash to it,
//! cuts there without searching (identical bytes cut identically). Memory stays
//! bounded: at most `2 × threads` chunks of at most [`MAX_CHUNK`] bytes are in flight.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Compression, FlushCompress, Status};
use serde::{Deserialize, Serialize};

use crate::store::{BlobRanges, Midstate, Sha256Resumable};

/// Where a [`ChunkedWriter`]'s compressed stream goes. A sink that hashes what it is given
/// says how far it got after each chunk: with the uncompressed stream's state, that is a
/// [`Boundary`] a later layer with the same first bytes can resume from.
pub trait Sink: Write + Send + 'static {
    /// The hash state of everything written, if this sink hashes.
    fn midstate(&self) -> Option<Midstate> {
        None
    }
}

impl Sink for Vec<u8> {}

impl Sink for crate::store::BlobWriter {
    fn midstate(&self) -> Option<Midstate> {
        crate::store::BlobWriter::midstate(self)
    }
}

/// A point between two chunks of a finished stream, with everything needed to carry on
/// from it without the bytes before it: a rebuild whose first bytes are unchanged copies
/// the compressed bytes up to [`Boundary::blob`]'s length and starts both SHA-256s and the
/// CRC there, instead of reading, hashing and compressing the unchanged part again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boundary {
    /// Chunks before it.
    pub chunks: usize,
    /// CRC-32 of the uncompressed bytes before it.
    pub crc: u32,
    /// SHA-256 state after the uncompressed bytes before it (the diff_id's); its `len` is
    /// the uncompressed offset.
    pub tar: Midstate,
    /// SHA-256 state after the compressed bytes before it (the blob digest's), header
    /// included; its `len` is the offset in the blob.
    pub blob: Midstate,
}

/// Where a resumed stream starts: an earlier stream's boundary and its chunks before it.
#[derive(Debug, Clone)]
pub struct Start {
    /// The boundary (its blob bytes are already in the sink).
    pub boundary: Boundary,
    /// The earlier stream's chunks before it.
    pub chunks: Vec<ChunkEntry>,
}

/// The smallest chunk cut by content (gzip's; see [`Cuts`]).
pub const MIN_CHUNK: usize = 256 << 10;
/// A cut is forced at this size.
pub const MAX_CHUNK: usize = 4 << 20;

/// Where a codec's chunks are cut: not before `min` bytes, then where the gear hash has
/// the bits of `mask` clear. A stream resumes only from an index whose cuts are the same
/// (`id`): the chunks before the point must be those a full build would cut.
#[derive(Debug, Clone, Copy)]
struct Cuts {
    id: u32,
    min: usize,
    mask: u64,
}

/// Which rules `codec`'s chunks are cut by: a layer's bytes depend on them, so step cache
/// keys name them.
pub fn cut_rules(codec: Codec) -> u32 {
    Cuts::of(codec).id
}

impl Cuts {
    fn of(codec: Codec) -> Cuts {
        match codec {
            // 512 KiB on average. Deflate looks back 32 KiB only, so smaller chunks cost
            // little (0.3% on a Python tree), and a one-file rebuild compresses again,
            // on average, half a chunk.
            Codec::Gzip => Cuts {
                id: 1,
                min: MIN_CHUNK,
                mask: 0xFFFF_C000_0000_0000,
            },
            // 1.5 MiB on average: zstd's matches reach across chunks of this size, and
            // 512 KiB ones cost 4% on the same tree.
            Codec::Zstd => Cuts {
                id: 0,
                min: 512 << 10,
                mask: 0xFFFF_F000_0000_0000,
            },
        }
    }
}

/// An error of the compression pipeline or of the writer behind it (the blob's disk),
/// marked so that a caller does not blame the input it was reading.
#[derive(Debug)]
pub struct OutputError(pub io::Error);

impl std::fmt::Display for OutputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for OutputError {}

/// Marks `e` as an [`OutputError`] (once).
fn output(e: io::Error) -> io::Error {
    if e.get_ref().is_some_and(|r| r.is::<OutputError>()) {
        return e;
    }
    io::Error::new(e.kind(), OutputError(e))
}

/// Bytes taken into a chunk's buffer between searches for a cut.
const SCAN_STEP: usize = 256 << 10;

/// The gear hash after `window` (64 bytes): a byte's contribution is shifted out 64 bytes
/// later, so the hash at any position depends on the 64 bytes ending there and nothing
/// before them.
fn gear_over(window: &[u8]) -> u64 {
    window
        .iter()
        .fold(0u64, |h, &b| (h << 1).wrapping_add(GEAR[b as usize]))
}

/// The first cut in `buf[from..to]`: the end of the first byte `j` whose gear hash (over
/// `buf[j - 63..=j]`) has its top bits clear, as `j + 1`. Needs `from >= 64`.
fn find_cut_serial(buf: &[u8], from: usize, to: usize, mask: u64) -> Option<usize> {
    let mut h = gear_over(&buf[from - 64..from]);
    for (j, &b) in buf[from..to].iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        if h & mask == 0 {
            return Some(from + j + 1);
        }
    }
    None
}

/// [`find_cut_serial`], four times as wide: the range is split into four lanes hashed in
/// one loop. One lane is a chain of dependent shifts and adds (2 cycles a byte); four
/// independent chains keep the core busy. Each lane starts from the 64 bytes before it, so
/// the hashes, and the cut, are exactly the serial ones.
fn find_cut(buf: &[u8], from: usize, to: usize, mask: u64) -> Option<usize> {
    const LANES: usize = 4;
    if to <= from {
        return None;
    }
    let n = to - from;
    if n < LANES * 1024 {
        return find_cut_serial(buf, from, to, mask);
    }
    let lane = n / LANES;
    let start = |k: usize| from + k * lane;
    let hash = |k: usize| gear_over(&buf[start(k) - 64..start(k)]);
    let (mut h0, mut h1, mut h2, mut h3) = (hash(0), hash(1), hash(2), hash(3));
    let mut first = [usize::MAX; LANES];
    let lane_bytes = |k: usize| &buf[start(k)..start(k) + lane];
    let (l0, l1, l2, l3) = (lane_bytes(0), lane_bytes(1), lane_bytes(2), lane_bytes(3));
    for (i, (((&a, &b), &c), &d)) in l0.iter().zip(l1).zip(l2).zip(l3).enumerate() {
        h0 = (h0 << 1).wrapping_add(GEAR[a as usize]);
        h1 = (h1 << 1).wrapping_add(GEAR[b as usize]);
        h2 = (h2 << 1).wrapping_add(GEAR[c as usize]);
        h3 = (h3 << 1).wrapping_add(GEAR[d as usize]);
        if (h0 & mask == 0) | (h1 & mask == 0) | (h2 & mask == 0) | (h3 & mask == 0) {
            for (k, h) in [h0, h1, h2, h3].into_iter().enumerate() {
                if h & mask == 0 && first[k] == usize::MAX {
                    first[k] = i;
                }
            }
            if first[0] != usize::MAX {
                break; // Nothing can come before lane 0's first cut.
            }
        }
    }
    if let Some(k) = first.iter().position(|&i| i != usize::MAX) {
        return Some(start(k) + first[k] + 1);
    }
    // What the four lanes left over (fewer than four bytes).
    find_cut_serial(buf, start(LANES), to, mask)
}

/// gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown (as Go writes).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// An empty final deflate block (fixed Huffman, BFINAL set).
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// The gear table: 256 pseudo-random words from splitmix64 (fixed forever: changing it
/// changes every layer digest).
static GEAR: [u64; 256] = {
    let mut g = [0u64; 256];
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0;
    while i < 256 {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        g[i] = z ^ (z >> 31);
        i += 1;
    }
    g
};

/// Where one chunk's compressed bytes sit in a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// BLAKE3 of the uncompressed chunk, hex. (An internal identity: only ever compared with
    /// other chunk hashes. OCI digests stay sha256.)
    pub hash: String,
    /// Uncompressed length.
    pub len: u64,
    /// Offset of the compressed bytes in the blob.
    pub offset: u64,
    /// Length of the compressed bytes.
    pub compressed_len: u64,
    /// BLAKE3 of the compressed bytes, hex: a later layer that takes them over checks them
    /// against it. (Indexes written before it was kept lack it; their chunks are not
    /// taken over.)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub compressed_hash: String,
}

impl ChunkEntry {
    /// [`ChunkEntry::compressed_hash`] as bytes, when there is one.
    fn compressed_key(&self) -> Option<[u8; 32]> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(&self.compressed_hash, &mut key)
            .ok()
            .map(|()| key)
    }
}

/// The bytes of a blob before `boundary` as consecutive pieces with their BLAKE3s (the
/// gzip header, then each chunk's compressed bytes), for checking them cheaply before they
/// are taken over; `None` when the index cannot say (an older index, or one whose chunks
/// do not lie end to end up to the boundary).
pub fn prefix_pieces(index: &ChunkIndex, boundary: &Boundary) -> Option<Vec<(u64, [u8; 32])>> {
    let header: &[u8] = if index.codec == Codec::Gzip {
        &HEADER
    } else {
        &[]
    };
    let mut pieces = vec![(header.len() as u64, *blake3::hash(header).as_bytes())];
    let mut at = header.len() as u64;
    for c in index.chunks.get(..boundary.chunks)? {
        if c.offset != at {
            return None;
        }
        pieces.push((c.compressed_len, c.compressed_key()?));
        at += c.compressed_len;
    }
    (at == boundary.blob.len).then_some(pieces)
}

/// A chunk compression format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Raw deflate chunks in one gzip member.
    #[default]
    Gzip,
    /// One zstd frame per chunk.
    Zstd,
}

/// The chunks of one compressed blob, and how they were compressed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChunkIndex {
    /// Format.
    #[serde(default)]
    pub codec: Codec,
    /// Compression level.
    pub level: u32,
    /// How chunks were cut (see [`Cuts`]; 0 before gzip's were made smaller).
    #[serde(default)]
    pub cuts: u32,
    /// Chunks in order.
    pub chunks: Vec<ChunkEntry>,
    /// Points between chunks a later stream may resume from (see [`Boundary`]), with what
    /// the writer of the stream knows of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume: Vec<ResumePoint>,
    /// BLAKE3 of `resume` as JSON: points whose file was damaged are not used.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resume_sum: String,
}

impl ChunkIndex {
    /// A later stream compressed as `codec` at `level` may resume from this one's points.
    pub fn resumable_as(&self, codec: Codec, level: u32) -> bool {
        self.codec == codec && self.level == level && self.cuts == Cuts::of(codec).id
    }

    /// The checksum [`ChunkIndex::resume_sum`] holds for these points.
    pub fn resume_checksum(points: &[ResumePoint]) -> String {
        let json = serde_json::to_vec(points).expect("resume points serialise");
        blake3::hash(&json).to_hex().to_string()
    }
}

/// A [`Boundary`] of a layer and the tar entries before it (see `layer.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// The boundary.
    #[serde(flatten)]
    pub boundary: Boundary,
    /// The entry it lies in, by position.
    pub entry: usize,
    /// How far into that entry (header included) it lies.
    pub entry_offset: u64,
    /// The fingerprint of the entries up to and including that one, hex.
    pub entries: String,
}

/// Where a chunk's compressed bytes are: (blob, offset, length, their BLAKE3).
type StoredChunk = (Arc<BlobRanges>, u64, u64, [u8; 32]);

/// Compressed chunks that may be copied instead of compressed, by the BLAKE3 of their
/// uncompressed bytes.
#[derive(Default, Clone)]
pub struct ReusableChunks {
    map: HashMap<[u8; 32], StoredChunk>,
    /// Chunk → the chunk that followed it (hash, length), where that one was not the last
    /// of its layer: a rebuild's likely next chunk.
    next: HashMap<[u8; 32], ([u8; 32], usize)>,
}

impl ReusableChunks {
    /// Adds the chunks of a blob compressed with `codec` at `level` (others are ignored).
    pub fn add(&mut self, blob: BlobRanges, index: &ChunkIndex, codec: Codec, level: u32) {
        if index.level != level || index.codec != codec {
            return;
        }
        let blob = Arc::new(blob);
        let key = |c: &ChunkEntry| {
            let mut key = [0u8; 32];
            hex::decode_to_slice(&c.hash, &mut key).ok().map(|()| key)
        };
        for c in &index.chunks {
            if let (Some(key), Some(compressed)) = (key(c), c.compressed_key()) {
                self.map
                    .entry(key)
                    .or_insert_with(|| (Arc::clone(&blob), c.offset, c.compressed_len, compressed));
            }
        }
        // A last chunk was cut by the end of its stream, not by its content: never predicted.
        // Nor are chunks cut by other rules: a full build would not cut where they end.
        let inner = if index.cuts == Cuts::of(codec).id {
            index.chunks.len().saturating_sub(1)
        } else {
            0
        };
        for pair in index.chunks[..inner].windows(2) {
            let len = pair[1].len as usize;
            if let (Some(a), Some(b), MIN_CHUNK..=MAX_CHUNK) = (key(&pair[0]), key(&pair[1]), len) {
                self.next.entry(a).or_insert((b, len));
            }
        }
    }

    /// Number of chunks offered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is offered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

struct Done {
    index: u64,
    data: Vec<u8>,
    compressed: Vec<u8>,
    /// BLAKE3 of `compressed`.
    compressed_hash: [u8; 32],
    crc: crc32fast::Hasher,
    hash: [u8; 32],
    reused: bool,
}

/// What the output thread hands back.
struct Output<W> {
    inner: W,
    index: ChunkIndex,
    crc: crc32fast::Hasher,
    uncompressed: Sha256Resumable,
    stats: GzStats,
    /// The boundary after each chunk written (where the sink hashes).
    boundaries: Vec<Boundary>,
}

/// The output thread: receives finished chunks in order, hashes the uncompressed bytes
/// (the layer's diff_id), writes the compressed bytes and records where each chunk went.
fn output_thread<W: Sink>(
    mut inner: W,
    codec: Codec,
    level: u32,
    start: Option<Start>,
    rx: Receiver<Done>,
) -> io::Result<Output<W>> {
    let (mut written, crc, tar_state, chunks) = match start {
        Some(s) => {
            let tar = Sha256Resumable::resume(&s.boundary.tar)
                .ok_or_else(|| io::Error::other("a resume point's hash state is inconsistent"))?;
            let crc = crc32fast::Hasher::new_with_initial_len(s.boundary.crc, s.boundary.tar.len);
            (s.boundary.blob.len, crc, tar, s.chunks)
        }
        None => {
            let header: &[u8] = if codec == Codec::Gzip { &HEADER } else { &[] };
            inner.write_all(header)?;
            let (crc, tar) = (crc32fast::Hasher::new(), Sha256Resumable::new());
            (header.len() as u64, crc, tar, Vec::new())
        }
    };
    // The diff_id is hashed on a thread of its own: with the blob's digest and the writes
    // on this one, neither SHA-256 pass waits for the other. It hands back its state after
    // each chunk.
    let (to_hasher, hasher_rx) = sync_channel::<Vec<u8>>(2);
    let hasher = std::thread::spawn(move || {
        let mut h = tar_state;
        let mut states = Vec::new();
        for data in hasher_rx {
            h.update(&data);
            states.push(h.midstate());
        }
        (h, states)
    });
    let before = chunks.len();
    let mut out = Output {
        index: ChunkIndex {
            codec,
            level,
            cuts: Cuts::of(codec).id,
            chunks,
            resume: Vec::new(),
            resume_sum: String::new(),
        },
        crc,
        uncompressed: Sha256Resumable::new(),
        stats: GzStats::default(),
        boundaries: Vec::new(),
        inner,
    };
    let mut blob_states = Vec::new();
    let mut result = Ok(());
    for done in rx {
        if let Err(e) = out.inner.write_all(&done.compressed) {
            result = Err(e);
            break;
        }
        out.crc.combine(&done.crc);
        if let Some(m) = out.inner.midstate() {
            blob_states.push((m, out.crc.clone().finalize()));
        }
        out.index.chunks.push(ChunkEntry {
            hash: hex::encode(done.hash),
            len: done.data.len() as u64,
            offset: written,
            compressed_len: done.compressed.len() as u64,
            compressed_hash: hex::encode(done.compressed_hash),
        });
        written += done.compressed.len() as u64;
        out.stats.chunks += 1;
        out.stats.reused += usize::from(done.reused);
        if to_hasher.send(done.data).is_err() {
            result = Err(io::Error::other("the diff_id thread stopped"));
            break;
        }
    }
    drop(to_hasher);
    let (uncompressed, tar_states) = hasher
        .join()
        .map_err(|_| io::Error::other("the diff_id thread panicked"))?;
    out.uncompressed = uncompressed;
    if blob_states.len() == tar_states.len() {
        out.boundaries = blob_states
            .into_iter()
            .zip(tar_states)
            .enumerate()
            .map(|(i, ((blob, crc), tar))| Boundary {
                chunks: before + i + 1,
                crc,
                tar,
                blob,
            })
            .collect();
    }
    result.map(|()| out)
}

/// A chunk for the pool: its number, its bytes and, when known, its hash.
type Job = (u64, Vec<u8>, Option<[u8; 32]>);

struct Pool {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<io::Result<Done>>,
    workers: Vec<JoinHandle<()>>,
}

/// Statistics of a finished stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct GzStats {
    /// Chunks written.
    pub chunks: usize,
    /// Chunks copied from an earlier blob.
    pub reused: usize,
    /// Chunks whose end was predicted from an earlier layer's chunk order (no cut search).
    pub predicted: usize,
}

/// A writer that compresses content-defined chunks on several threads.
pub struct ChunkedWriter<W: Sink> {
    codec: Codec,
    level: u32,
    threads: usize,
    reuse: Arc<ReusableChunks>,
    buf: Vec<u8>,
    /// `buf[..scanned]` holds no cut.
    scanned: usize,
    /// The chunk expected next (hash, length), from the reused layers' chunk order.
    expect: Option<([u8; 32], usize)>,
    /// Set by `finish`: the stream's end, not content, cuts what is left.
    ending: bool,
    /// Chunks cut where [`ChunkedWriter::expect`] said.
    predicted: usize,
    next_index: u64,
    next_to_write: u64,
    pending: BTreeMap<u64, Done>,
    pool: Option<Pool>,
    /// Chunks in order go here; `None` once `finish` has closed it.
    output: Option<SyncSender<Done>>,
    output_thread: Option<JoinHandle<io::Result<Output<W>>>>,
    /// Bytes written (the uncompressed offset, counting a resumed stream's first bytes).
    written: u64,
}

/// What [`ChunkedWriter::finish`] returns.
pub struct Finished<W> {
    /// The inner writer, with the whole gzip stream written.
    pub inner: W,
    /// Where each chunk's compressed bytes are.
    pub index: ChunkIndex,
    /// sha256 of the uncompressed stream.
    pub uncompressed_digest: crate::store::Digest,
    /// Length of the uncompressed stream.
    pub uncompressed_len: u64,
    /// Chunk counts.
    pub stats: GzStats,
    /// The boundary after each chunk but the last (empty when the sink does not hash).
    pub boundaries: Vec<Boundary>,
}

/// True when a chunk looks incompressible: its order-0 entropy is above 7.9 bits per byte,
/// as for data that is already compressed (jars, archives, images). Such a chunk is stored
/// rather than deflated: deflate would spend its full cost to save almost nothing. A pure
/// function of the bytes, so the output stays deterministic.
///
/// Every 8th byte is counted: at least 8192 samples, whose estimate of a uniform source's
/// entropy falls short by about 0.02 bits, well clear of the threshold. Counting every
/// byte cost 7% of a cold build's CPU.
fn incompressible(data: &[u8]) -> bool {
    if data.len() < 64 << 10 {
        return false;
    }
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for &b in data.iter().step_by(8) {
        counts[b as usize] += 1;
        n += 1;
    }
    let n = f64::from(n);
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    entropy > 7.9
}

/// Compresses one chunk: a zstd frame, or raw deflate ending in a sync flush (stored
/// blocks for chunks that look incompressible).
fn compress_chunk(data: &[u8], codec: Codec, level: u32) -> io::Result<Vec<u8>> {
    if codec == Codec::Zstd {
        return zstd::bulk::compress(data, level as i32);
    }
    let level = if level > 0 && incompressible(data) {
        0
    } else {
        level
    };
    thread_local! {
        // One deflate state per level and thread, reset between chunks (a reset state is
        // a fresh one, so the bytes do not change): allocating and clearing a new one for
        // every chunk was measurable.
        static STATES: std::cell::RefCell<HashMap<u32, Compress>> =
            std::cell::RefCell::new(HashMap::new());
    }
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        let c = states
            .entry(level)
            .or_insert_with(|| Compress::new(Compression::new(level), false));
        c.reset();
        let mut out = Vec::with_capacity(data.len() / 2 + 1024);
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(64 << 10));
            }
            let consumed = c.total_in() as usize;
            let status = c
                .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
                .map_err(io::Error::other)?;
            let done = c.total_in() as usize == data.len() && out.len() < out.capacity();
            match status {
                Status::Ok | Status::BufError if done => return Ok(out),
                Status::Ok | Status::BufError => continue,
                Status::StreamEnd => return Ok(out),
            }
        }
    })
}

/// Hashes a chunk and either copies its compressed bytes from an earlier blob or compresses
/// it. Bytes copied must have the BLAKE3 they had when written: a damaged earlier blob, or
/// one that can no longer be read, costs a compression, not a broken layer.
fn process(
    index: u64,
    data: Vec<u8>,
    hash: Option<[u8; 32]>,
    codec: Codec,
    level: u32,
    reuse: &ReusableChunks,
) -> io::Result<Done> {
    let hash = hash.unwrap_or_else(|| blake3::hash(&data).into());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&data);
    let copied = reuse.map.get(&hash).and_then(|(file, offset, len, want)| {
        let mut buf = Vec::new();
        file.read_into(*offset, *len as usize, &mut buf).ok()?;
        (blake3::hash(&buf).as_bytes() == want).then_some((buf, *want))
    });
    let (compressed, compressed_hash, reused) = match copied {
        Some((buf, h)) => (buf, h, true),
        None => {
            let buf = compress_chunk(&data, codec, level)?;
            let h = blake3::hash(&buf).into();
            (buf, h, false)
        }
    };
    Ok(Done {
        index,
        data,
        compressed,
        compressed_hash,
        crc,
        hash,
        reused,
    })
}

impl<W: Sink> ChunkedWriter<W> {
    /// A writer for `codec` at compression `level` (gzip 0-9, zstd 1-19) using up to
    /// `threads` threads, copying chunks found in `reuse`.
    pub fn new(
        inner: W,
        codec: Codec,
        level: u32,
        threads: usize,
        reuse: ReusableChunks,
    ) -> io::Result<Self> {
        Self::resume(inner, codec, level, threads, reuse, None)
    }

    /// [`ChunkedWriter::new`], carrying on from `start`: `inner` already holds the
    /// compressed bytes before its boundary (and hashed them, or holds their hash state),
    /// and what is written next follows the boundary's uncompressed bytes.
    pub fn resume(
        inner: W,
        codec: Codec,
        level: u32,
        threads: usize,
        reuse: ReusableChunks,
        start: Option<Start>,
    ) -> io::Result<Self> {
        let level = match codec {
            Codec::Gzip => level.min(9),
            Codec::Zstd => level.clamp(1, 19),
        };
        // The chunk that followed the last one before the boundary is likely next.
        let expect = start
            .as_ref()
            .and_then(|s| s.chunks.last())
            .and_then(|c| {
                let mut key = [0u8; 32];
                hex::decode_to_slice(&c.hash, &mut key).ok().map(|()| key)
            })
            .and_then(|h| reuse.next.get(&h).copied());
        let written = start.as_ref().map_or(0, |s| s.boundary.tar.len);
        let (tx, rx) = sync_channel(2);
        let output_thread =
            std::thread::spawn(move || output_thread(inner, codec, level, start, rx));
        Ok(ChunkedWriter {
            written,
            codec,
            level,
            threads: threads.max(1),
            reuse: Arc::new(reuse),
            buf: Vec::with_capacity(MIN_CHUNK * 2),
            scanned: 0,
            expect,
            ending: false,
            predicted: 0,
            next_index: 0,
            next_to_write: 0,
            pending: BTreeMap::new(),
            pool: None,
            output: Some(tx),
            output_thread: Some(output_thread),
        })
    }

    /// The output thread's error, once it has stopped.
    fn output_error(&mut self) -> io::Error {
        drop(self.output.take());
        match self.output_thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            _ => io::Error::other("the layer output thread stopped"),
        }
    }

    fn pool(&mut self) -> &mut Pool {
        let (threads, codec, level) = (self.threads, self.codec, self.level);
        let reuse = Arc::clone(&self.reuse);
        self.pool.get_or_insert_with(|| {
            let (jobs_tx, jobs_rx) = sync_channel::<Job>(threads);
            let (done_tx, done_rx) = sync_channel(threads * 2);
            let jobs_rx = Arc::new(Mutex::new(jobs_rx));
            let workers = (0..threads)
                .map(|_| {
                    let rx = Arc::clone(&jobs_rx);
                    let tx = done_tx.clone();
                    let reuse = Arc::clone(&reuse);
                    std::thread::spawn(move || {
                        loop {
                            let job = rx.lock().expect("job queue").recv();
                            let Ok((index, data, hash)) = job else { return };
                            let done = process(index, data, hash, codec, level, &reuse);
                            if tx.send(done).is_err() {
                                return;
                            }
                        }
                    })
                })
                .collect();
            Pool {
                jobs: Some(jobs_tx),
                done: done_rx,
                workers,
            }
        })
    }

    /// Hands finished chunks that are next in order to the output thread.
    fn drain_ready(&mut self) -> io::Result<()> {
        while let Some(done) = self.pending.remove(&self.next_to_write) {
            let sent = self.output.as_ref().expect("open until finish").send(done);
            if sent.is_err() {
                return Err(self.output_error());
            }
            self.next_to_write += 1;
        }
        Ok(())
    }

    fn receive_one(&mut self) -> io::Result<()> {
        let done = self
            .pool()
            .done
            .recv()
            .map_err(|_| io::Error::other("a compression thread died"))??;
        self.pending.insert(done.index, done);
        self.drain_ready()
    }

    /// Submits `buf[..at]` as a chunk (with its hash, when known); the rest starts the next
    /// one, which is expected to be the chunk that followed this one last time.
    fn submit_at(&mut self, at: usize, hash: Option<[u8; 32]>) -> io::Result<()> {
        let mut next = Vec::with_capacity(MIN_CHUNK * 2);
        next.extend_from_slice(&self.buf[at..]);
        self.buf.truncate(at);
        self.scanned = 0;
        let hash = match hash {
            None if !self.reuse.next.is_empty() && !self.ending => {
                Some(blake3::hash(&self.buf).into())
            }
            hash => hash,
        };
        self.expect = hash.and_then(|h| self.reuse.next.get(&h).copied());
        self.submit_buffer(next, hash)
    }

    /// Submits `buf` as a chunk and carries on with `next`.
    fn submit_buffer(&mut self, next: Vec<u8>, hash: Option<[u8; 32]>) -> io::Result<()> {
        let data = std::mem::replace(&mut self.buf, next);
        let index = self.next_index;
        self.next_index += 1;
        if self.threads == 1 {
            let done = process(index, data, hash, self.codec, self.level, &self.reuse)?;
            self.pending.insert(index, done);
            return self.drain_ready();
        }
        while self.next_index - 1 - self.next_to_write >= (self.threads * 2) as u64 {
            self.receive_one()?;
        }
        let jobs = self.pool().jobs.as_ref().expect("pool open").clone();
        jobs.send((index, data, hash))
            .map_err(|_| io::Error::other("the compression pool stopped"))
    }

    /// Compresses what is left, writes the final block and trailer, and returns the inner
    /// writer with the blob's chunk index and the uncompressed stream's digest. Errors are
    /// [`OutputError`]s.
    pub fn finish(self) -> io::Result<Finished<W>> {
        self.finish_output().map_err(output)
    }

    fn finish_output(mut self) -> io::Result<Finished<W>> {
        // A chunk that was expected but ended early: the content decides its cuts.
        self.ending = true;
        if self.expect.take().is_some() {
            self.cut_and_submit()?;
        }
        if !self.buf.is_empty() {
            if self.threads > 1 && self.next_index == 0 {
                // A stream of one chunk: no pool needed.
                let data = std::mem::take(&mut self.buf);
                let done = process(0, data, None, self.codec, self.level, &self.reuse)?;
                self.next_index = 1;
                self.pending.insert(0, done);
                self.drain_ready()?;
            } else {
                self.submit_buffer(Vec::new(), None)?;
            }
        }
        while self.next_to_write < self.next_index {
            self.receive_one()?;
        }
        if let Some(mut pool) = self.pool.take() {
            drop(pool.jobs.take());
            for w in pool.workers.drain(..) {
                let _ = w.join();
            }
        }
        drop(self.output.take());
        let joined = self.output_thread.take().expect("finish runs once").join();
        let mut out =
            joined.map_err(|_| io::Error::other("the layer output thread panicked"))??;
        let total = out.crc.total_len();
        match self.codec {
            Codec::Gzip => {
                out.inner.write_all(&FINAL_BLOCK)?;
                out.inner.write_all(&out.crc.finalize().to_le_bytes())?;
                out.inner.write_all(&(total as u32).to_le_bytes())?;
            }
            Codec::Zstd if total == 0 => {
                // An empty stream is still one (empty) frame.
                out.inner
                    .write_all(&zstd::bulk::compress(&[], self.level as i32)?)?;
            }
            Codec::Zstd => {}
        }
        out.inner.flush()?;
        let mut boundaries = out.boundaries;
        boundaries.pop(); // The end of the stream: nothing follows it.
        Ok(Finished {
            inner: out.inner,
            index: out.index,
            uncompressed_digest: out.uncompressed.finish(),
            uncompressed_len: total,
            stats: GzStats {
                predicted: self.predicted,
                ..out.stats
            },
            boundaries,
        })
    }
}

impl<W: Sink> ChunkedWriter<W> {
    /// Bytes written so far: the uncompressed offset of the next byte (a resumed stream
    /// counts the bytes before its boundary).
    pub fn position(&self) -> u64 {
        self.written
    }

    /// How many bytes the buffer takes before the next search for a cut. Small steps keep
    /// the bytes after a cut, which move to the next chunk's buffer, few.
    fn step(&self) -> usize {
        (MAX_CHUNK - self.buf.len()).min(SCAN_STEP)
    }

    /// Cuts off and submits the chunks whose end lies in the buffer. Its errors are the
    /// pipeline's, marked as [`OutputError`]s.
    fn cut_buffered(&mut self) -> io::Result<()> {
        self.cut_and_submit().map_err(output)
    }

    fn cut_and_submit(&mut self) -> io::Result<()> {
        loop {
            let len = self.buf.len();
            if let Some((want, at)) = self.expect {
                // A rebuild: the chunk that followed the last one in an earlier layer is
                // likely next. Identical bytes cut identically (a cut depends only on the
                // chunk's own bytes), so a matching hash stands in for the search.
                if len < at {
                    return Ok(());
                }
                self.expect = None;
                let hash: [u8; 32] = blake3::hash(&self.buf[..at]).into();
                if hash == want {
                    self.predicted += 1;
                    self.submit_at(at, Some(hash))?;
                    continue;
                }
            }
            let cuts = Cuts::of(self.codec);
            let from = self.scanned.max(cuts.min);
            match find_cut(&self.buf, from, len, cuts.mask) {
                Some(at) => self.submit_at(at, None)?,
                None if len == MAX_CHUNK => self.submit_at(MAX_CHUNK, None)?,
                None => {
                    self.scanned = len;
                    return Ok(());
                }
            }
        }
    }

    /// Writes up to `n` bytes read from `reader`, read straight into the chunk buffer (no
    /// intermediate copy); returns how many there were (fewer than `n` only if the reader
    /// ended). The reader's errors come back as they are, the pipeline's as
    /// [`OutputError`]s.
    pub fn write_from(&mut self, reader: &mut impl io::Read, n: u64) -> io::Result<u64> {
        let mut left = n;
        while left > 0 {
            let take = (self.step() as u64).min(left);
            self.buf.reserve(take as usize);
            let mut limited = io::Read::take(&mut *reader, take);
            let got = io::Read::read_to_end(&mut limited, &mut self.buf)?;
            if got == 0 {
                break;
            }
            self.written += got as u64;
            left -= got as u64;
            self.cut_buffered()?;
        }
        Ok(n - left)
    }
}

impl<W: Sink> Write for ChunkedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.written += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            let take = self.step().min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            self.cut_buffered()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Sink> Drop for ChunkedWriter<W> {
    fn drop(&mut self) {
        // Closing the job queue ends the workers; the result queue holds every chunk that
        // can be in flight, so none of them blocks on the way out. Closing the output queue
        // ends the output thread.
        if let Some(mut pool) = self.pool.take() {
            drop(pool.jobs.take());
            for w in pool.workers.drain(..) {
                let _ = w.join();
            }
        }
        drop(self.output.take());
        if let Some(t) = self.output_thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn sample(len: usize, seed: u64) -> Vec<u8> {
        let mut x: u64 = 0x9e3779b97f4a7c15 ^ seed;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    (x % 251) as u8
                } else {
                    b"berth layer "[i % 12]
                }
            })
            .collect()
    }

    fn gz(data: &[u8], threads: usize, reuse: ReusableChunks) -> (Vec<u8>, ChunkIndex, GzStats) {
        compress(Codec::Gzip, data, threads, reuse)
    }

    fn compress(
        codec: Codec,
        data: &[u8],
        threads: usize,
        reuse: ReusableChunks,
    ) -> (Vec<u8>, ChunkIndex, GzStats) {
        let mut w = ChunkedWriter::new(Vec::new(), codec, 1, threads, reuse).unwrap();
        for chunk in data.chunks(77_777) {
            w.write_all(chunk).unwrap();
        }
        let f = w.finish().unwrap();
        assert_eq!(f.uncompressed_digest, crate::store::Digest::of(data));
        assert_eq!(f.uncompressed_len, data.len() as u64);
        (f.inner, f.index, f.stats)
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut back)
            .unwrap();
        back
    }

    #[test]
    fn output_is_valid_gzip_and_independent_of_threads() {
        for len in [0, 1, 1000, MIN_CHUNK, MAX_CHUNK + 1, 9 * MIN_CHUNK + 12345] {
            let data = sample(len, 1);
            let (one, idx, _) = gz(&data, 1, ReusableChunks::default());
            assert_eq!(one, gz(&data, 2, ReusableChunks::default()).0, "len {len}");
            assert_eq!(one, gz(&data, 7, ReusableChunks::default()).0, "len {len}");
            assert_eq!(gunzip(&one), data, "len {len}");
            assert_eq!(idx.chunks.iter().map(|c| c.len).sum::<u64>(), len as u64);
            assert!(idx.chunks.iter().all(|c| c.len as usize <= MAX_CHUNK));
        }
    }

    #[test]
    fn an_edit_reuses_the_unchanged_chunks_and_gives_the_same_bytes_as_a_cold_run() {
        let old = sample(12 << 20, 2);
        let (old_gz, old_idx, _) = gz(&old, 2, ReusableChunks::default());
        assert!(old_idx.chunks.len() >= 6, "{} chunks", old_idx.chunks.len());
        // Insert a few bytes in the middle: boundaries after the edit fall back into step.
        let mut new = old.clone();
        new.splice(6 << 20..6 << 20, b"an edit".iter().copied());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.gz"), &old_gz).unwrap();
        let mut reuse = ReusableChunks::default();
        reuse.add(
            BlobRanges::open(&dir.path().join("old.gz")).unwrap(),
            &old_idx,
            Codec::Gzip,
            1,
        );
        let (warm, _, stats) = gz(&new, 2, reuse);
        let (cold, _, _) = gz(&new, 2, ReusableChunks::default());
        assert_eq!(warm, cold, "reuse never changes the output");
        assert_eq!(gunzip(&warm), new);
        assert!(
            stats.reused + 2 >= stats.chunks,
            "all but the edited chunks are reused: {stats:?}"
        );
        // A damaged earlier blob: the chunk with a flipped byte no longer has the BLAKE3
        // its index gives, so it is compressed again, not copied; the others still are.
        let mut damaged = old_gz.clone();
        let first = &old_idx.chunks[1];
        damaged[(first.offset + first.compressed_len / 2) as usize] ^= 0x10;
        std::fs::write(dir.path().join("old.gz"), &damaged).unwrap();
        let mut reuse = ReusableChunks::default();
        reuse.add(
            BlobRanges::open(&dir.path().join("old.gz")).unwrap(),
            &old_idx,
            Codec::Gzip,
            1,
        );
        let (warm, _, again) = gz(&new, 2, reuse);
        assert_eq!(warm, cold, "a damaged chunk never reaches the output");
        assert_eq!(
            again.reused + 1,
            stats.reused,
            "{again:?} against {stats:?}"
        );
        // An index from before compressed chunks were hashed offers nothing to copy.
        let mut older = old_idx.clone();
        older
            .chunks
            .iter_mut()
            .for_each(|c| c.compressed_hash.clear());
        let mut reuse = ReusableChunks::default();
        reuse.add(
            BlobRanges::open(&dir.path().join("old.gz")).unwrap(),
            &older,
            Codec::Gzip,
            1,
        );
        assert!(reuse.is_empty());
    }

    #[test]
    fn prefix_pieces_are_the_header_and_the_chunks_end_to_end() {
        let data = sample(6 << 20, 4);
        let (out, idx, _) = gz(&data, 2, ReusableChunks::default());
        let boundary = |chunks: usize| {
            let end = idx.chunks[chunks - 1].offset + idx.chunks[chunks - 1].compressed_len;
            let mut h = crate::store::Sha256Resumable::new();
            h.update(&out[..end as usize]);
            Boundary {
                chunks,
                crc: 0,
                tar: crate::store::Sha256Resumable::new().midstate(),
                blob: h.midstate(),
            }
        };
        let b = boundary(3);
        let pieces = prefix_pieces(&idx, &b).unwrap();
        assert_eq!(pieces.len(), 4);
        let mut at = 0usize;
        for (len, hash) in &pieces {
            let bytes = &out[at..at + *len as usize];
            assert_eq!(blake3::hash(bytes).as_bytes(), hash);
            at += *len as usize;
        }
        assert_eq!(at as u64, b.blob.len);
        // Not end to end, or lacking hashes: the caller falls back to SHA-256.
        let mut gap = idx.clone();
        gap.chunks[1].offset += 1;
        assert!(prefix_pieces(&gap, &b).is_none());
        let mut unhashed = idx.clone();
        unhashed.chunks[0].compressed_hash.clear();
        assert!(prefix_pieces(&unhashed, &b).is_none());
    }

    #[test]
    fn predicted_cuts_are_the_cuts_a_cold_run_makes() {
        let ends_of = |index: &ChunkIndex| -> Vec<usize> {
            let lens = index.chunks.iter().map(|c| c.len as usize);
            lens.scan(0, |end, len| {
                *end += len;
                Some(*end)
            })
            .collect()
        };
        // The old stream ends well inside what was a chunk of a longer one, so its last
        // chunk is long enough to look predictable; it must not be predicted.
        // Random bytes: stored rather than deflated, which keeps this test quick.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let longer: Vec<u8> = (0..14 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let (longer_gz, longer_idx, _) = gz(&longer, 2, ReusableChunks::default());
        let ends = ends_of(&longer_idx);
        let k = (5..ends.len())
            .find(|&k| ends[k] - ends[k - 1] > MIN_CHUNK + 200_000)
            .expect("a long chunk");
        let old = longer[..ends[k - 1] + MIN_CHUNK + 100_000].to_vec();
        let (old_gz, old_idx, _) = gz(&old, 2, ReusableChunks::default());
        let ends = ends_of(&old_idx);
        assert!(ends.len() >= 6, "{} chunks", ends.len());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.gz"), &old_gz).unwrap();
        let edited = |at: usize, f: &dyn Fn(&mut Vec<u8>, usize)| {
            let mut v = old.clone();
            f(&mut v, at);
            v
        };
        let flip = |v: &mut Vec<u8>, at: usize| v[at] ^= 0x55;
        let insert = |v: &mut Vec<u8>, at: usize| {
            v.splice(at..at, b"an insertion".iter().copied());
        };
        let variants = [
            ("unchanged", old.clone()),
            ("an edit in the middle", edited(ends[2] + 4321, &insert)),
            // The last byte of a predicted chunk: the hash check fails at its very end.
            ("the last byte of a chunk", edited(ends[2] - 1, &flip)),
            ("a chunk removed", {
                let mut v = old.clone();
                v.drain(ends[1]..ends[2]);
                v
            }),
            // The stream ends inside a chunk that was expected whole.
            (
                "cut short",
                old[..ends[3] + (ends[4] - ends[3]) / 2].to_vec(),
            ),
            ("more at the end", longer.clone()),
        ];
        for (what, new) in variants {
            let mut reuse = ReusableChunks::default();
            let blob = BlobRanges::open(&dir.path().join("old.gz")).unwrap();
            reuse.add(blob, &old_idx, Codec::Gzip, 1);
            let (warm, _, stats) = gz(&new, 2, reuse);
            let cold = match what {
                "unchanged" => old_gz.clone(),
                "more at the end" => longer_gz.clone(),
                _ => gz(&new, 2, ReusableChunks::default()).0,
            };
            assert!(warm == cold, "{what}: the same bytes as a cold run");
            assert_eq!(gunzip(&warm), new, "{what}");
            if what == "unchanged" {
                // Every chunk but the first (nothing before it) and the last (cut by the end).
                assert_eq!(stats.predicted, stats.chunks - 2, "{what}: {stats:?}");
            }
        }
    }

    #[test]
    fn zstd_output_is_a_valid_stream_of_frames_and_independent_of_threads() {
        for len in [0, 1000, 5 * MIN_CHUNK + 77] {
            let data = sample(len, 4);
            let (one, _, _) = compress(Codec::Zstd, &data, 1, ReusableChunks::default());
            assert_eq!(
                one,
                compress(Codec::Zstd, &data, 3, ReusableChunks::default()).0,
                "len {len}"
            );
            let mut back = Vec::new();
            zstd::stream::read::Decoder::new(&one[..])
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "len {len}");
        }
    }

    #[test]
    fn streams_resume_only_from_chunks_cut_as_they_would_cut_them() {
        let (_, index, _) = gz(&sample(3 << 20, 4), 2, ReusableChunks::default());
        assert_eq!(index.cuts, Cuts::of(Codec::Gzip).id);
        assert!(index.resumable_as(Codec::Gzip, index.level));
        assert!(!index.resumable_as(Codec::Gzip, index.level + 1));
        assert!(!index.resumable_as(Codec::Zstd, index.level));
        // An index from before gzip's chunks were made smaller: its points lie where a
        // full build would not cut now.
        let old = ChunkIndex { cuts: 0, ..index };
        assert!(!old.resumable_as(Codec::Gzip, old.level));
    }

    #[test]
    fn chunks_are_the_sizes_the_readme_gives() {
        // About 512 KiB for gzip, 1.5 MiB for zstd (the minimum plus 256 KiB or 1 MiB on
        // average), on bytes without structure.
        let data = sample(48 << 20, 11);
        for (codec, low, high) in [
            (Codec::Gzip, 400 << 10, 650 << 10),
            (Codec::Zstd, 1200 << 10, 1900 << 10),
        ] {
            let (_, index, _) = compress(codec, &data, 2, ReusableChunks::default());
            let mean = data.len() / index.chunks.len();
            assert!(
                (low..high).contains(&mean),
                "{codec:?}: {mean} bytes on average"
            );
        }
    }

    #[test]
    fn chunks_cut_by_other_rules_are_reused_but_not_followed() {
        let data = sample(6 << 20, 7);
        let (fresh_gz, fresh, _) = gz(&data, 2, ReusableChunks::default());
        let ends: Vec<usize> = fresh
            .chunks
            .iter()
            .scan(0, |at, c| {
                *at += c.len as usize;
                Some(*at)
            })
            .collect();
        assert!(ends.len() >= 4, "{} chunks", ends.len());
        // An older index of the same bytes: the same first chunk, then the next two as one
        // (cut by other rules), then the rest as one.
        let entry = |from: usize, to: usize| ChunkEntry {
            hash: blake3::hash(&data[from..to]).to_hex().to_string(),
            len: (to - from) as u64,
            offset: 0,
            compressed_len: 0,
            compressed_hash: String::new(),
        };
        let chunks = vec![
            entry(0, ends[0]),
            entry(ends[0], ends[2]),
            entry(ends[2], data.len()),
        ];
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.gz"), b"").unwrap();
        let warm = |cuts: u32| {
            let old = ChunkIndex {
                codec: Codec::Gzip,
                level: 1,
                cuts,
                chunks: chunks.clone(),
                ..Default::default()
            };
            let mut reuse = ReusableChunks::default();
            let blob = BlobRanges::open(&dir.path().join("old.gz")).unwrap();
            reuse.add(blob, &old, Codec::Gzip, 1);
            gz(&data, 2, reuse)
        };
        // Claimed to be cut by today's rules, its chunk order is followed (what makes a
        // rebuild skip the search), and the bytes come out cut as it was cut.
        let (followed, index, _) = warm(fresh.cuts);
        assert_eq!(index.chunks[1].len as usize, ends[2] - ends[0]);
        assert_ne!(followed, fresh_gz);
        // Cut by other rules: the stream is cut as a build without it cuts.
        let (own, index, _) = warm(0);
        assert_eq!(index.chunks.len(), fresh.chunks.len());
        assert!(
            own == fresh_gz,
            "the same bytes as a build without the old index"
        );
    }

    #[test]
    fn the_four_lane_cut_search_finds_the_serial_cut() {
        // Cuts are rare (one per 256 KiB or MiB past the minimum), so plant some: a 64-byte window
        // copied from a place where the serial search cut makes a cut wherever it goes.
        let mask = Cuts::of(Codec::Zstd).mask;
        let mut data = sample(24 << 20, 9);
        let cut = find_cut_serial(&data, 64, data.len(), mask).expect("24 MiB hold a cut");
        let window = data[cut - 64..cut].to_vec();
        for at in [100_000, 100_700, 3 << 20, (3 << 20) + 5, 9 << 20] {
            data[at - 64..at].copy_from_slice(&window);
        }
        let mut seed = 1u64;
        let mut next = |below: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % below
        };
        let mut ranges = vec![
            (64, data.len()),
            (64, 64),
            (100, 99),
            (64, 4160),
            (64, 4161),
        ];
        ranges.extend((0..300).map(|_| {
            let from = 64 + next(data.len() - 64);
            (from, from + next((data.len() - from).min(6 << 20) + 1))
        }));
        let mut found = 0;
        for (from, to) in ranges {
            for mask in [mask, Cuts::of(Codec::Gzip).mask] {
                let serial = find_cut_serial(&data, from, to.max(from), mask);
                assert_eq!(find_cut(&data, from, to, mask), serial, "{from}..{to}");
                found += usize::from(serial.is_some());
            }
        }
        assert!(found > 200, "the ranges hold cuts: {found}");
    }

    #[test]
    fn output_errors_are_marked_and_input_errors_are_not() {
        struct Full;
        impl Sink for Full {}
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        struct Broken;
        impl io::Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
        let marked = |e: &io::Error| e.get_ref().is_some_and(|r| r.is::<OutputError>());
        let mut w = ChunkedWriter::new(Full, Codec::Gzip, 1, 2, ReusableChunks::default()).unwrap();
        let e = w.write_from(&mut Broken, 10).unwrap_err();
        assert!(!marked(&e), "{e:?}");
        // The disk fills up: seen at a later write or at the end, marked either way.
        let data = sample(8 * MAX_CHUNK, 5);
        let e = match w.write_from(&mut &data[..], data.len() as u64) {
            Err(e) => e,
            Ok(_) => w.finish().err().expect("the full disk is noticed"),
        };
        assert!(marked(&e), "{e:?}");
        assert_eq!(e.raw_os_error(), None);
        assert!(e.to_string().contains("No space left"), "{e}");
    }

    #[test]
    fn dropping_an_unfinished_writer_stops_its_threads() {
        let mut w =
            ChunkedWriter::new(Vec::new(), Codec::Gzip, 1, 4, ReusableChunks::default()).unwrap();
        w.write_all(&sample(5 * MIN_CHUNK, 3)).unwrap();
        drop(w);
    }
}
