//! A second copy of each small write, as a QUIC datagram, and a lane's
//! incoming bytes taken once from whichever path brings them first.
//!
//! On a lossy link a lost packet costs its stream a round trip or more
//! (loss detection, then the resend), and a task waits for its slowest
//! host. So a lane's write (its deflated bytes) that fits in one datagram
//! is also sent as one, a moment after the stream's packet has gone (a
//! datagram queued with the stream's bytes would share their packet, and
//! their fate). The copy names its stream and its offset in it; the
//! receiver inflates each lane's bytes once, in order, from either path
//! ([`Inflow::take`]). A copy past bytes not yet taken (an earlier write
//! still missing) is dropped: the stream brings it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_core::LinkId;
use arbor_wire::link::{Decoder, READ_CHUNK_BYTES};
use tokio::sync::mpsc;

use crate::LinkEvent;

/// How long after a write's stream bytes its copy is queued: long enough
/// for the connection to send the stream's packet first.
pub(super) const DELAY: Duration = Duration::from_millis(2);
/// A datagram's header: the stream's index and the copy's offset in it.
const HEADER_BYTES: usize = 16;
/// Datagrams queued to send, and received but not yet read, at most.
pub(super) const SEND_BUFFER_BYTES: usize = 64 << 10;
pub(super) const RECV_BUFFER_BYTES: usize = 256 << 10;
/// Lanes a connection keeps a state for (a live lane's: its inflater);
/// past that its copies stop (quinn bounds the streams open at once, not
/// over a connection's life).
const LANES_KEPT_MAX: usize = 4 * super::LANES as usize;

/// The datagram copy of the stream bytes `bytes`, at `offset` in the
/// stream with index `stream`. None if it would not fit in `max` (the
/// connection's datagram size, if it takes datagrams).
pub(super) fn copy(stream: u64, offset: u64, bytes: &[u8], max: Option<usize>) -> Option<Vec<u8>> {
    if bytes.len() + HEADER_BYTES > max? {
        return None;
    }
    let mut d = Vec::with_capacity(HEADER_BYTES + bytes.len());
    d.extend_from_slice(&stream.to_le_bytes());
    d.extend_from_slice(&offset.to_le_bytes());
    d.extend_from_slice(bytes);
    Some(d)
}

/// A datagram's stream index, offset and bytes.
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

/// Of `len` bytes at offset `start`, those to take when a lane has taken
/// `taken`: none if earlier bytes are missing or all were taken already.
fn fresh(taken: u64, start: u64, len: usize) -> Option<Range<usize>> {
    let skip = usize::try_from(taken.checked_sub(start)?).ok()?;
    (skip < len).then_some(skip..len)
}

/// One lane's incoming bytes: how many were taken, and the inflater and
/// frame decoder they went through (while its stream is open).
#[derive(Default)]
pub(super) struct Inflow {
    taken: u64,
    open: Option<Box<Inflater>>,
    ended: bool,
}

struct Inflater {
    z: flate2::Decompress,
    dec: Decoder,
    plain: Vec<u8>,
}

impl Inflow {
    /// Takes what is new in `bytes` (at `start` in the lane's stream):
    /// inflates it and hands its frames on. Ok(false) once the node is
    /// gone; Err why the lane's bytes are malformed.
    pub(super) async fn take(
        &mut self,
        start: u64,
        bytes: &[u8],
        inbox: &mpsc::Sender<LinkEvent>,
        link: LinkId,
    ) -> Result<bool, String> {
        let Some(new) = fresh(self.taken, start, bytes.len()).filter(|_| !self.ended) else {
            return Ok(true);
        };
        self.taken = start + bytes.len() as u64;
        let st = self.open.get_or_insert_with(|| {
            Box::new(Inflater {
                z: flate2::Decompress::new(false),
                dec: Decoder::new(),
                plain: Vec::with_capacity(READ_CHUNK_BYTES),
            })
        });
        // Inflated a bounded piece at a time, its frames handed on before
        // the next: the decoder holds at most a frame and a piece.
        let mut input = &bytes[new];
        loop {
            st.plain.clear();
            let before = st.z.total_in();
            st.z.decompress_vec(input, &mut st.plain, flate2::FlushDecompress::Sync)
                .map_err(|e| format!("bad deflate stream: {e}"))?;
            let used = (st.z.total_in() - before) as usize;
            if used == 0 && st.plain.is_empty() && !input.is_empty() {
                return Err("the deflate stream ended".into());
            }
            input = &input[used..];
            st.dec.push(&st.plain);
            if !crate::hand_on(&mut st.dec, inbox, link).await? {
                return Ok(false);
            }
            if input.is_empty() && st.plain.len() < st.plain.capacity() {
                return Ok(true);
            }
        }
    }

    /// Its stream ended (every byte taken): the inflater goes, the count
    /// stays for late copies.
    pub(super) fn end(&mut self) {
        self.open = None;
        self.ended = true;
    }
}

type Lane = Arc<tokio::sync::Mutex<Inflow>>;

/// Each lane's [`Inflow`], shared by the lane's stream reader and the
/// connection's datagram reader; held while bytes are taken, so the two
/// keep the lane's order. A lane's state outlives its stream while copies
/// may come (a late copy must find its bytes taken already).
#[derive(Clone, Default)]
pub(super) struct Lanes(Arc<Mutex<Kept>>);

#[derive(Default)]
struct Kept {
    lanes: HashMap<u64, Lane>,
    /// Too many lanes: copies are dropped from now on.
    off: bool,
}

impl Lanes {
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lane on stream `index`, for its stream's reader.
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

    /// The lane for a copy on stream `index`; none once copies are off.
    pub(super) fn datagram(&self, index: u64) -> Option<Lane> {
        let mut k = self.kept();
        if k.off {
            return None;
        }
        let lane = k.lanes.entry(index).or_default().clone();
        k.off = k.lanes.len() > LANES_KEPT_MAX;
        Some(lane)
    }

    /// The lane's stream ended; once copies are off, its state goes too.
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
        let d = copy(7, 42, b"bytes", Some(100)).expect("fits");
        assert_eq!(parse(&d).expect("parses"), (7, 42, &b"bytes"[..]));
        assert!(copy(7, 42, &[0; 85], Some(100)).is_none());
        assert!(copy(7, 42, &[0; 84], Some(100)).is_some());
        assert!(
            copy(7, 42, b"x", None).is_none(),
            "no datagrams on this link"
        );
        assert!(parse(&[0; 15]).is_err());
    }

    #[test]
    fn only_bytes_not_taken_yet_are_and_never_past_a_gap() {
        // 30 bytes were taken; a copy of 20 at 20: its last 10 are new.
        assert_eq!(fresh(30, 20, 20), Some(10..20));
        // A copy that came first.
        assert_eq!(fresh(0, 0, 20), Some(0..20));
        // The stream brought all of it already.
        assert_eq!(fresh(40, 20, 20), None);
        // Bytes 30..35 are still missing: these must wait for the stream.
        assert_eq!(fresh(30, 35, 20), None);
    }

    #[test]
    fn lanes_are_bounded_and_copies_stop_past_the_bound() {
        let l = Lanes::default();
        for i in 0..=LANES_KEPT_MAX as u64 {
            assert!(l.datagram(i).is_some(), "copies on while under the bound");
        }
        assert!(l.datagram(0).is_none(), "past it, copies are dropped");
        // A lane a copy reached keeps its state for its stream...
        let early = l.kept().lanes.get(&5).expect("kept").clone();
        assert!(Arc::ptr_eq(&early, &l.stream(5)));
        // ...and a stream no copy reached gets a fresh one, not kept.
        let late = l.stream(1 << 40);
        assert!(!Arc::ptr_eq(&late, &l.stream(1 << 40)));
        l.end(5);
        assert_eq!(l.kept().lanes.len(), LANES_KEPT_MAX);
    }

    #[test]
    fn a_lanes_state_outlives_its_stream_while_copies_may_come() {
        let l = Lanes::default();
        let lane = l.stream(2);
        l.end(2);
        let copy = l.datagram(2).expect("copies on");
        assert!(Arc::ptr_eq(&lane, &copy), "a late copy finds the state");
    }

    #[tokio::test]
    async fn an_ended_lane_takes_nothing_more_and_frees_its_inflater() {
        let (tx, _rx) = mpsc::channel(4);
        let mut inflow = Inflow::default();
        assert!(inflow.take(0, &[], &tx, LinkId(0)).await.expect("nothing"));
        inflow.end();
        assert!(inflow.open.is_none());
        // Garbage past the end is not even inflated.
        assert!(inflow
            .take(0, b"garbage", &tx, LinkId(0))
            .await
            .expect("ignored"));
        assert!(inflow.open.is_none());
    }
}
