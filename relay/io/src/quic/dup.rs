//! A second copy of each small write, as a QUIC datagram.
//!
//! On a lossy link a lost packet costs its stream a round trip or more
//! (loss detection, then the resend), and a task waits for its slowest
//! host. So a lane's write that fits in one datagram is also sent as one,
//! a moment after the stream's packet has gone (a datagram queued with the
//! stream's bytes would share their packet, and their fate). Whichever
//! copy comes first is handed on; the other is dropped.
//!
//! Frames keep their lane's order: a lane's frames are numbered from 0 in
//! the order written (both ends count them), a datagram names its stream
//! and the number of its first frame, and each lane remembers how many of
//! its frames were handed on. A datagram whose first frame is past that
//! (an earlier write is still missing) is dropped: the stream brings it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long after a write's stream bytes its copy is queued: long enough
/// for the connection to send the stream's packet first.
pub(super) const DELAY: Duration = Duration::from_millis(2);
/// A datagram's header: the stream's index and its first frame's number.
pub(super) const HEADER_BYTES: usize = 16;
/// Datagrams queued to send, and received but not yet read, at most.
pub(super) const SEND_BUFFER_BYTES: usize = 64 << 10;
pub(super) const RECV_BUFFER_BYTES: usize = 256 << 10;
/// Streams whose counts a connection keeps; past that its copies stop
/// (quinn bounds the streams open at once, not over a connection's life).
const LANES_KEPT_MAX: usize = 4 * super::LANES as usize;

/// The datagram copy of a write: `frames` (whole encoded frames), the
/// first numbered `first`, on the stream with index `stream`. None if it
/// would not fit in `max` (the connection's datagram size, if any).
pub(super) fn copy(stream: u64, first: u64, frames: &[u8], max: Option<usize>) -> Option<Vec<u8>> {
    if frames.len() + HEADER_BYTES > max? {
        return None;
    }
    let mut d = Vec::with_capacity(HEADER_BYTES + frames.len());
    d.extend_from_slice(&stream.to_le_bytes());
    d.extend_from_slice(&first.to_le_bytes());
    d.extend_from_slice(frames);
    Some(d)
}

/// A datagram's stream index, first frame number and frames.
pub(super) fn parse(d: &[u8]) -> Result<(u64, u64, &[u8]), String> {
    if d.len() < HEADER_BYTES {
        return Err(format!("a datagram of {} bytes", d.len()));
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[i..i + 8]);
        u64::from_le_bytes(b)
    };
    Ok((word(0), word(8), &d[HEADER_BYTES..]))
}

/// Of a datagram's `count` frames, the first numbered `first`, those to
/// hand on when `handed` of its lane's were: none if an earlier frame is
/// missing or all were handed on already.
pub(super) fn fresh(handed: u64, first: u64, count: u64) -> Option<Range<u64>> {
    let skip = handed.checked_sub(first)?;
    (skip < count).then_some(skip..count)
}

/// How many frames each lane has handed on, shared by the lane's stream
/// reader and the connection's datagram reader. A lane's count is held
/// while its frames are handed on, so the two keep its order. A lane's
/// count outlives its stream while copies may come (a late copy must find
/// the frames it holds handed on already).
#[derive(Clone, Default)]
pub(super) struct Handed(Arc<Mutex<Kept>>);

#[derive(Default)]
struct Kept {
    lanes: HashMap<u64, Lane>,
    /// Too many streams: copies are dropped from now on.
    off: bool,
}

pub(super) type Lane = Arc<tokio::sync::Mutex<u64>>;

impl Handed {
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The count of the lane on stream `index`, for its stream's reader.
    pub(super) fn stream(&self, index: u64) -> Lane {
        let mut k = self.kept();
        if let Some(lane) = k.lanes.get(&index) {
            return lane.clone();
        }
        let lane = Lane::default();
        if !k.off {
            k.lanes.insert(index, lane.clone());
            k.off = k.lanes.len() > LANES_KEPT_MAX;
        }
        lane
    }

    /// The count for a copy on stream `index`; none once copies are off.
    pub(super) fn datagram(&self, index: u64) -> Option<Lane> {
        let mut k = self.kept();
        if k.off {
            return None;
        }
        let lane = k.lanes.entry(index).or_default().clone();
        k.off = k.lanes.len() > LANES_KEPT_MAX;
        Some(lane)
    }

    /// The lane's stream ended; its count goes once no copy can come.
    pub(super) fn end(&self, index: u64) {
        let mut k = self.kept();
        if k.off {
            k.lanes.remove(&index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_round_trips_and_one_too_big_is_not_made() {
        let d = copy(7, 42, b"frames", Some(100)).expect("fits");
        assert_eq!(parse(&d).expect("parses"), (7, 42, &b"frames"[..]));
        assert!(copy(7, 42, &[0; 85], Some(100)).is_none());
        assert!(copy(7, 42, &[0; 84], Some(100)).is_some());
        assert!(
            copy(7, 42, b"x", None).is_none(),
            "no datagrams on this link"
        );
        assert!(parse(&[0; 15]).is_err());
    }

    #[test]
    fn only_the_frames_not_handed_on_yet_are_and_never_past_a_gap() {
        // The stream handed on 3 frames; a datagram with frames 2..5.
        assert_eq!(fresh(3, 2, 3), Some(1..3));
        // It came first.
        assert_eq!(fresh(0, 0, 2), Some(0..2));
        // The stream brought all of it already.
        assert_eq!(fresh(5, 2, 3), None);
        // Frame 3 is still missing: frames 4.. must wait for the stream.
        assert_eq!(fresh(3, 4, 2), None);
    }

    #[test]
    fn counts_are_bounded_and_copies_stop_past_the_bound() {
        let h = Handed::default();
        for i in 0..=LANES_KEPT_MAX as u64 {
            assert!(h.datagram(i).is_some(), "copies on while under the bound");
        }
        assert!(h.datagram(0).is_none(), "past it, copies are dropped");
        // A lane a copy reached keeps its count for its stream...
        let early = h.kept().lanes.get(&5).expect("kept").clone();
        assert!(Arc::ptr_eq(&early, &h.stream(5)));
        // ...and a stream no copy reached gets a fresh one, not kept.
        let late = h.stream(1 << 40);
        assert!(!Arc::ptr_eq(&late, &h.stream(1 << 40)));
        h.end(5);
        assert_eq!(h.kept().lanes.len(), LANES_KEPT_MAX);
    }

    #[test]
    fn a_count_outlives_its_stream_while_copies_may_come() {
        let h = Handed::default();
        let lane = h.stream(2);
        h.end(2);
        let copy = h.datagram(2).expect("copies on");
        assert!(Arc::ptr_eq(&lane, &copy), "a late copy finds the count");
    }
}
