//! The per-link codec: bytes in, frames out, and back.
//!
//! Between two Rust nodes a link may compress payloads with lz4 (flag
//! [`flags::LZ4`]); the frame handed to the router is always plain, so
//! compression is a property of one link, never of a frame's route.

use crate::{decode, flags, Decoded, Frame, WireError, FRAME_PAYLOAD_BYTES_MAX, HEADER_BYTES};

/// Payloads smaller than this are never worth compressing.
pub const COMPRESS_BYTES_MIN: usize = 1024;
/// Bytes read from a link at a time by the IO shells.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Encodes frames for one link.
#[derive(Clone, Copy, Debug)]
pub struct Encoder {
    compress: bool,
}

impl Encoder {
    /// `compress` only for links whose peer is a Rust node.
    pub fn new(compress: bool) -> Self {
        Encoder { compress }
    }

    pub fn encode(&self, frame: &Frame, out: &mut Vec<u8>) {
        if self.compress
            && frame.flags & flags::LZ4 == 0
            && frame.payload.len() >= COMPRESS_BYTES_MIN
        {
            let packed = lz4_flex::compress_prepend_size(&frame.payload);
            if packed.len() < frame.payload.len() {
                let f = Frame {
                    flags: frame.flags | flags::LZ4,
                    payload: packed,
                    ..frame.clone()
                };
                f.encode(out);
                return;
            }
        }
        frame.encode(out);
    }
}

/// Decodes the byte stream of one link into frames.
///
/// Its buffer never holds more than one frame plus one read
/// ([`FRAME_PAYLOAD_BYTES_MAX`] + [`HEADER_BYTES`] + [`READ_CHUNK_BYTES`]).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Adds bytes read from the link. Call [`Decoder::next_frame`] until it
    /// returns `Ok(None)` before pushing more.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, if any. An error means the link must close.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match decode(&self.buf)? {
            Decoded::NeedMore(_) => Ok(None),
            Decoded::Frame(mut frame, used) => {
                self.buf.drain(..used);
                if frame.flags & flags::LZ4 != 0 {
                    frame.payload = decompress(&frame.payload)?;
                    frame.flags &= !flags::LZ4;
                }
                Ok(Some(frame))
            }
        }
    }
}

fn decompress(packed: &[u8]) -> Result<Vec<u8>, WireError> {
    let Some(size) = packed.get(..4) else {
        return Err(WireError::BadCompression("missing size".into()));
    };
    let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
    if size > FRAME_PAYLOAD_BYTES_MAX {
        return Err(WireError::TooLarge(size));
    }
    lz4_flex::block::decompress(&packed[4..], size)
        .map_err(|e| WireError::BadCompression(e.to_string()))
}

/// The largest buffer a [`Decoder`] can hold.
pub const DECODER_BYTES_MAX: usize = HEADER_BYTES + FRAME_PAYLOAD_BYTES_MAX + READ_CHUNK_BYTES;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Kind, NodeId, StreamId};

    fn frame(payload: Vec<u8>) -> Frame {
        Frame::new(Kind::Data, NodeId(3), NodeId(0), StreamId(1), payload)
    }

    #[test]
    fn compressed_link_roundtrips_and_shrinks() {
        let f = frame(vec![b'a'; 100_000]);
        let mut wire = Vec::new();
        Encoder::new(true).encode(&f, &mut wire);
        assert!(wire.len() < 2_000);
        let mut d = Decoder::new();
        d.push(&wire);
        assert_eq!(d.next_frame(), Ok(Some(f)));
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn byte_at_a_time_yields_the_same_frames() {
        let frames = [
            frame(b"x".to_vec()),
            frame(vec![7; 5000]),
            frame(Vec::new()),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            Encoder::new(true).encode(f, &mut wire);
        }
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in wire {
            d.push(&[b]);
            while let Some(f) = d.next_frame().expect("valid") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn lying_decompressed_size_is_refused() {
        let mut payload = (u32::MAX).to_le_bytes().to_vec();
        payload.extend_from_slice(b"junk");
        let mut f = frame(payload);
        f.flags = flags::LZ4;
        let mut d = Decoder::new();
        d.push(&f.to_bytes());
        assert!(matches!(d.next_frame(), Err(WireError::TooLarge(_))));
    }
}
