//! The framing of `berth exec --env` on an upgraded agent connection: each frame is a kind
//! byte, a big-endian u32 length and that many bytes. Towards the agent: stdin data, stdin
//! closed, a terminal's new size. Back: stdout and stderr data, then the exit code (or an
//! error) last. A frame above [`MAX`] ends the stream as broken.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side sends or accepts.
pub const MAX: usize = 1 << 20;

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// The command's stdin is closed.
    StdinClosed,
    /// The terminal is now this many rows and columns.
    Resize(u16, u16),
    /// Bytes of its stdout (or of its terminal).
    Stdout(Vec<u8>),
    /// Bytes of its stderr.
    Stderr(Vec<u8>),
    /// It exited with this code (the last frame).
    Exit(i32),
    /// It could not run (the last frame).
    Error(String),
}

impl Frame {
    fn kind_and_payload(&self) -> (u8, Vec<u8>) {
        match self {
            Frame::Stdin(b) => (0, b.clone()),
            Frame::StdinClosed => (1, Vec::new()),
            Frame::Resize(r, c) => (2, [r.to_be_bytes(), c.to_be_bytes()].concat()),
            Frame::Stdout(b) => (3, b.clone()),
            Frame::Stderr(b) => (4, b.clone()),
            Frame::Exit(code) => (5, code.to_be_bytes().to_vec()),
            Frame::Error(m) => (6, m.as_bytes().to_vec()),
        }
    }
}

/// Writes one frame.
pub async fn write(w: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> std::io::Result<()> {
    let (kind, payload) = frame.kind_and_payload();
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(&payload);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame; `None` at the end of the stream.
pub async fn read(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX {
        return Err(std::io::Error::other(format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    let bad = || std::io::Error::other("a malformed frame");
    Ok(Some(match head[0] {
        0 => Frame::Stdin(payload),
        1 => Frame::StdinClosed,
        2 if len == 4 => Frame::Resize(
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        ),
        3 => Frame::Stdout(payload),
        4 => Frame::Stderr(payload),
        5 if len == 4 => Frame::Exit(i32::from_be_bytes([
            payload[0], payload[1], payload[2], payload[3],
        ])),
        6 => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
        _ => return Err(bad()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused() {
        let frames = [
            Frame::Stdin(b"ls\n".to_vec()),
            Frame::StdinClosed,
            Frame::Resize(40, 120),
            Frame::Stdout(b"out".to_vec()),
            Frame::Stderr(Vec::new()),
            Frame::Exit(-3),
            Frame::Error("no such replica".into()),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write(&mut buf, f).await.unwrap();
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(read(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert_eq!(read(&mut r).await.unwrap(), None);
        let mut huge = vec![3u8];
        huge.extend_from_slice(&((MAX as u32) + 1).to_be_bytes());
        assert!(read(&mut &huge[..]).await.is_err());
        assert!(
            read(&mut &[2u8, 0, 0, 0, 1, 9][..]).await.is_err(),
            "a short resize"
        );
    }
}
