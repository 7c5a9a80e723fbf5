//! arbor's wire protocol: the one frame format every hop speaks.
//!
//! Only this crate knows the byte layout. Relays route on the fixed header
//! and never decode a payload addressed to another node.
//!
//! # Layout
//! - [`Frame`]: header fields and payload; [`Frame::encode`] and [`decode`].
//! - [`link`]: the per-link codec (optional lz4 for Rust-to-Rust links).
//! - [`control`]: postcard payloads between the controller and relays.
//! - [`msg`]: the JSON-plus-blob payload that the Python agent speaks.
//!
//! Golden frames in `tests/golden/` are decoded by both the Rust tests and
//! the Python agent's tests, so the two implementations cannot drift.

pub mod control;
pub mod link;
pub mod msg;

use std::fmt;

/// Header bytes before the payload.
pub const HEADER_BYTES: usize = 20;
/// Largest payload a frame may carry. Larger data is streamed as
/// [`Kind::Data`] frames of at most [`CHUNK_BYTES`].
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 1 << 20;
/// Payload size used when streaming files and other large data.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// First byte of every frame.
pub const MAGIC: u8 = 0xA7;
/// Protocol version, second byte of every frame.
pub const VERSION: u8 = 1;

/// A node of the tree: 0 is the controller; the controller assigns the rest.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId(pub u32);

impl NodeId {
    pub const CONTROLLER: NodeId = NodeId(0);
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A request or stream, chosen by the node that opens it; unique per
/// (source, stream) pair.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct StreamId(pub u32);

/// What a frame is. Relays act on the route kinds and forward the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A request; the payload's encoding depends on the destination
    /// (postcard [`control`] for relays and the controller, [`msg`] for agents).
    Request = 1,
    /// The reply to the request with the same stream id.
    Reply = 2,
    /// A chunk of a stream (file contents), in order.
    Data = 3,
    /// The end of a stream.
    End = 4,
    /// `src` has joined the tree below the link it came from.
    RouteAdd = 5,
    /// `src` has left the tree; the payload is a UTF-8 reason.
    RouteDel = 6,
    /// The frame sent to `src` on `stream` could not be delivered; UTF-8 reason.
    Undeliverable = 7,
    /// Liveness probe and its answer.
    Ping = 8,
    Pong = 9,
    /// Flow control for the stream `stream` that `dst` sends to `src`: the
    /// payload is a u64 (little-endian), how many bytes of the stream's data
    /// `src` has consumed in all. The sender keeps at most its window beyond
    /// that in flight.
    Credit = 10,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Request,
            2 => Kind::Reply,
            3 => Kind::Data,
            4 => Kind::End,
            5 => Kind::RouteAdd,
            6 => Kind::RouteDel,
            7 => Kind::Undeliverable,
            8 => Kind::Ping,
            9 => Kind::Pong,
            10 => Kind::Credit,
            _ => return None,
        })
    }
}

/// Header flags.
pub mod flags {
    /// The payload is lz4-compressed (block format, size-prepended). Only
    /// ever set on a link between two Rust nodes, never toward an agent.
    pub const LZ4: u8 = 0x01;
    /// Every flag this version knows.
    pub const KNOWN: u8 = LZ4;
}

/// One frame.
///
/// ```text
/// offset  size  field
///      0     1  magic    0xA7
///      1     1  version  1
///      2     1  kind     Kind as u8
///      3     1  flags    bit 0: payload lz4-compressed (link-local)
///      4     4  dst      NodeId, u32 little-endian
///      8     4  src      NodeId, u32 little-endian
///     12     4  stream   StreamId, u32 little-endian
///     16     4  len      payload bytes, u32 little-endian, <= FRAME_PAYLOAD_BYTES_MAX
///     20   len  payload
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub flags: u8,
    pub dst: NodeId,
    pub src: NodeId,
    pub stream: StreamId,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    // Payload bytes may hold secrets; only their length is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &self.kind)
            .field("flags", &self.flags)
            .field("dst", &self.dst)
            .field("src", &self.src)
            .field("stream", &self.stream)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Why bytes are not a frame. Any of these closes the link.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic byte {0:#04x} (not an arbor frame, or the stream lost sync)")]
    BadMagic(u8),
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("payload of {0} bytes exceeds the {max} byte limit", max = FRAME_PAYLOAD_BYTES_MAX)]
    TooLarge(usize),
    #[error("lz4 payload does not decompress: {0}")]
    BadCompression(String),
    #[error("payload does not decode: {0}")]
    BadPayload(String),
}

/// The result of looking at the front of a byte buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame, and how many bytes it took.
    Frame(Frame, usize),
    /// Not enough bytes yet; at least this many are needed in total.
    NeedMore(usize),
}

impl Frame {
    pub fn new(kind: Kind, dst: NodeId, src: NodeId, stream: StreamId, payload: Vec<u8>) -> Self {
        Frame {
            kind,
            flags: 0,
            dst,
            src,
            stream,
            payload,
        }
    }

    /// Bytes this frame takes on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_BYTES + self.payload.len()
    }

    /// Appends the encoded frame to `out`.
    ///
    /// # Panics
    /// If the payload is over [`FRAME_PAYLOAD_BYTES_MAX`]: building such a
    /// frame is a programmer error, callers chunk large data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(
            self.payload.len() <= FRAME_PAYLOAD_BYTES_MAX,
            "frame payload of {} bytes over the limit",
            self.payload.len()
        );
        out.reserve(self.wire_len());
        out.extend_from_slice(&[MAGIC, VERSION, self.kind as u8, self.flags]);
        out.extend_from_slice(&self.dst.0.to_le_bytes());
        out.extend_from_slice(&self.src.0.to_le_bytes());
        out.extend_from_slice(&self.stream.0.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.wire_len());
        self.encode(&mut v);
        v
    }

    /// The reply header for this request: addressed back to its source.
    pub fn reply_to(&self, kind: Kind, payload: Vec<u8>) -> Frame {
        Frame::new(kind, self.src, self.dst, self.stream, payload)
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Decodes the frame at the front of `buf`. Checks the header before it
/// allocates, so a hostile length never allocates past the bound.
pub fn decode(buf: &[u8]) -> Result<Decoded, WireError> {
    if let Some(&m) = buf.first() {
        if m != MAGIC {
            return Err(WireError::BadMagic(m));
        }
    }
    if let Some(&v) = buf.get(1) {
        if v != VERSION {
            return Err(WireError::BadVersion(v));
        }
    }
    if buf.len() < HEADER_BYTES {
        return Ok(Decoded::NeedMore(HEADER_BYTES));
    }
    let kind = Kind::from_u8(buf[2]).ok_or(WireError::UnknownKind(buf[2]))?;
    let flags = buf[3];
    if flags & !flags::KNOWN != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    let len = u32_at(buf, 16) as usize;
    if len > FRAME_PAYLOAD_BYTES_MAX {
        return Err(WireError::TooLarge(len));
    }
    let total = HEADER_BYTES + len;
    if buf.len() < total {
        return Ok(Decoded::NeedMore(total));
    }
    let frame = Frame {
        kind,
        flags,
        dst: NodeId(u32_at(buf, 4)),
        src: NodeId(u32_at(buf, 8)),
        stream: StreamId(u32_at(buf, 12)),
        payload: buf[HEADER_BYTES..total].to_vec(),
    };
    Ok(Decoded::Frame(frame, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frame {
        Frame::new(
            Kind::Request,
            NodeId(7),
            NodeId(0),
            StreamId(42),
            b"hello".to_vec(),
        )
    }

    #[test]
    fn roundtrip() {
        let f = sample();
        let bytes = f.to_bytes();
        assert_eq!(bytes.len(), HEADER_BYTES + 5);
        assert_eq!(decode(&bytes), Ok(Decoded::Frame(f, bytes.len())));
    }

    #[test]
    fn partial_input_needs_more() {
        let bytes = sample().to_bytes();
        assert_eq!(decode(&[]), Ok(Decoded::NeedMore(HEADER_BYTES)));
        assert_eq!(decode(&bytes[..10]), Ok(Decoded::NeedMore(HEADER_BYTES)));
        assert_eq!(decode(&bytes[..22]), Ok(Decoded::NeedMore(25)));
    }

    #[test]
    fn malformed_headers_are_errors() {
        let mut b = sample().to_bytes();
        b[0] = b'{';
        assert_eq!(decode(&b), Err(WireError::BadMagic(b'{')));
        let mut b = sample().to_bytes();
        b[1] = 9;
        assert_eq!(decode(&b), Err(WireError::BadVersion(9)));
        let mut b = sample().to_bytes();
        b[2] = 0;
        assert_eq!(decode(&b), Err(WireError::UnknownKind(0)));
        let mut b = sample().to_bytes();
        b[3] = 0x80;
        assert_eq!(decode(&b), Err(WireError::UnknownFlags(0x80)));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut b = sample().to_bytes()[..HEADER_BYTES].to_vec();
        b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&b), Err(WireError::TooLarge(u32::MAX as usize)));
    }

    #[test]
    fn bad_magic_is_seen_in_the_first_byte() {
        assert_eq!(decode(b"S"), Err(WireError::BadMagic(b'S')));
    }
}
