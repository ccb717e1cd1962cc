//! Parallel gzip with output that does not depend on the number of threads.
//!
//! As pigz does: the input is cut into fixed-size blocks, each block is raw-deflated on its
//! own (ending with a sync flush, so it ends on a byte boundary), and the compressed blocks
//! are concatenated, in order, inside one standard gzip member whose CRC-32 is the
//! combination of the blocks' CRCs. Block boundaries depend only on the input, so 1 thread
//! or 64 produce the same bytes. Memory is bounded: at most `2 × threads` blocks in flight.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Compression, FlushCompress, Status};

/// Uncompressed bytes per block.
pub const BLOCK: usize = 1 << 20;

/// gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown (as Go writes).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

struct Done {
    index: u64,
    compressed: Vec<u8>,
    crc: crc32fast::Hasher,
}

type Job = (u64, Vec<u8>, bool);

struct Pool {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<io::Result<Done>>,
    workers: Vec<JoinHandle<()>>,
}

/// A gzip writer that compresses blocks on several threads.
pub struct ParallelGzWriter<W: Write> {
    /// `None` only after `finish` has handed it back.
    inner: Option<W>,
    level: u32,
    threads: usize,
    buf: Vec<u8>,
    next_index: u64,
    next_to_write: u64,
    pending: BTreeMap<u64, Done>,
    crc: crc32fast::Hasher,
    pool: Option<Pool>,
}

/// Compresses one block: raw deflate, sync-flushed, or finished when it is the last.
fn compress_block(data: &[u8], level: u32, last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() + data.len() / 16 + 64);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = c.total_in() as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(4096));
        }
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == data.len();
        let room_left = out.capacity() > out.len();
        match status {
            Status::StreamEnd => return Ok(out),
            Status::Ok | Status::BufError if all_in && room_left && !last => return Ok(out),
            Status::Ok | Status::BufError => continue,
        }
    }
}

impl<W: Write> ParallelGzWriter<W> {
    /// A writer at compression `level` (0-9) using up to `threads` threads.
    pub fn new(mut inner: W, level: u32, threads: usize) -> io::Result<Self> {
        inner.write_all(&HEADER)?;
        Ok(ParallelGzWriter {
            inner: Some(inner),
            level: level.min(9),
            threads: threads.max(1),
            buf: Vec::with_capacity(BLOCK),
            next_index: 0,
            next_to_write: 0,
            pending: BTreeMap::new(),
            crc: crc32fast::Hasher::new(),
            pool: None,
        })
    }

    fn out(&mut self) -> &mut W {
        self.inner.as_mut().expect("not finished")
    }

    fn pool(&mut self) -> &mut Pool {
        let (threads, level) = (self.threads, self.level);
        self.pool.get_or_insert_with(|| {
            let (jobs_tx, jobs_rx) = sync_channel::<Job>(threads);
            let (done_tx, done_rx) = sync_channel(threads * 2);
            let jobs_rx = Arc::new(Mutex::new(jobs_rx));
            let workers = (0..threads)
                .map(|_| {
                    let rx = Arc::clone(&jobs_rx);
                    let tx = done_tx.clone();
                    std::thread::spawn(move || {
                        loop {
                            let job = rx.lock().expect("job queue").recv();
                            let Ok((index, data, last)) = job else { return };
                            let result = compress_block(&data, level, last).map(|compressed| {
                                let mut crc = crc32fast::Hasher::new();
                                crc.update(&data);
                                Done {
                                    index,
                                    compressed,
                                    crc,
                                }
                            });
                            if tx.send(result).is_err() {
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

    /// Writes finished blocks that are next in order.
    fn drain_ready(&mut self) -> io::Result<()> {
        while let Some(done) = self.pending.remove(&self.next_to_write) {
            self.out().write_all(&done.compressed)?;
            self.crc.combine(&done.crc);
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

    fn submit(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(
            &mut self.buf,
            if last {
                Vec::new()
            } else {
                Vec::with_capacity(BLOCK)
            },
        );
        let index = self.next_index;
        self.next_index += 1;
        if self.threads == 1 || (last && index == 0) {
            // One thread, or a small stream that fits one block: no pool needed.
            let compressed = compress_block(&data, self.level, last)?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(&data);
            self.pending.insert(
                index,
                Done {
                    index,
                    compressed,
                    crc,
                },
            );
            return self.drain_ready();
        }
        let in_flight_max = (self.threads * 2) as u64;
        while self.next_index - 1 - self.next_to_write >= in_flight_max {
            self.receive_one()?;
        }
        let jobs = self.pool().jobs.as_ref().expect("pool open").clone();
        jobs.send((index, data, last))
            .map_err(|_| io::Error::other("the compression pool stopped"))
    }

    /// Compresses what is left, writes the gzip trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        while self.next_to_write < self.next_index {
            self.receive_one()?;
        }
        let total = self.crc.total_len();
        let crc = std::mem::take(&mut self.crc).finalize();
        self.out().write_all(&crc.to_le_bytes())?;
        self.out().write_all(&(total as u32).to_le_bytes())?;
        if let Some(mut pool) = self.pool.take() {
            drop(pool.jobs.take());
            for w in pool.workers.drain(..) {
                let _ = w.join();
            }
        }
        let mut inner = self.inner.take().expect("finish runs once");
        inner.flush()?;
        Ok(inner)
    }
}

impl<W: Write> Write for ParallelGzWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            let take = (BLOCK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == BLOCK {
                self.submit(false)?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGzWriter<W> {
    fn drop(&mut self) {
        // Closing the job queue ends the workers; the result queue holds every block that
        // can be in flight, so none of them blocks on the way out.
        if let Some(mut pool) = self.pool.take() {
            drop(pool.jobs.take());
            for w in pool.workers.drain(..) {
                let _ = w.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: a counter rendered as text with a pseudo-random mix.
        let mut x: u64 = 0x9e3779b97f4a7c15;
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

    fn gz(data: &[u8], threads: usize) -> Vec<u8> {
        let mut w = ParallelGzWriter::new(Vec::new(), 6, threads).unwrap();
        // Uneven writes, to cross block boundaries mid-write.
        for chunk in data.chunks(77_777) {
            w.write_all(chunk).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn output_is_valid_gzip_and_independent_of_threads() {
        for len in [0, 1, 1000, BLOCK, BLOCK + 1, 3 * BLOCK + 12345] {
            let data = sample(len);
            let one = gz(&data, 1);
            assert_eq!(one, gz(&data, 2), "len {len}");
            assert_eq!(one, gz(&data, 7), "len {len}");
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&one[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "len {len}");
        }
    }

    #[test]
    fn dropping_an_unfinished_writer_stops_its_threads() {
        let mut w = ParallelGzWriter::new(Vec::new(), 1, 4).unwrap();
        w.write_all(&sample(5 * BLOCK)).unwrap();
        drop(w);
    }
}
