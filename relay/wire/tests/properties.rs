//! Property tests (run in CI): the decoder never panics, never claims more
//! than it was given, never allocates past the frame bound, and valid frames
//! round-trip through every split of the byte stream.

use arbor_wire::link::{Decoder, Encoder, DECODER_BYTES_MAX};
use arbor_wire::{
    decode, Decoded, Frame, Kind, NodeId, StreamId, FRAME_PAYLOAD_BYTES_MAX, HEADER_BYTES,
};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = Kind> {
    (1u8..=10).prop_map(|k| Kind::from_u8(k).expect("known kind"))
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        kind(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..3000),
    )
        .prop_map(|(k, d, s, st, p)| Frame::new(k, NodeId(d), NodeId(s), StreamId(st), p))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        match decode(&bytes) {
            Ok(Decoded::Frame(f, used)) => {
                prop_assert!(used <= bytes.len());
                prop_assert!(f.payload.len() <= FRAME_PAYLOAD_BYTES_MAX);
            }
            Ok(Decoded::NeedMore(n)) => {
                prop_assert!(n > bytes.len() && n <= HEADER_BYTES + FRAME_PAYLOAD_BYTES_MAX);
            }
            Err(_) => {}
        }
        let mut d = Decoder::new();
        d.push(&bytes);
        while let Ok(Some(f)) = d.next_frame() {
            prop_assert!(f.payload.len() <= FRAME_PAYLOAD_BYTES_MAX);
        }
        prop_assert!(d.buffered() <= DECODER_BYTES_MAX);
    }

    #[test]
    fn mutated_frames_never_panic(f in frame(), at in any::<prop::sample::Index>(), byte in any::<u8>(),
                                  compress in any::<bool>()) {
        let mut wire = Vec::new();
        Encoder::new(compress).encode(&f, &mut wire);
        let i = at.index(wire.len());
        wire[i] = byte;
        let mut d = Decoder::new();
        d.push(&wire);
        while let Ok(Some(g)) = d.next_frame() {
            prop_assert!(g.payload.len() <= FRAME_PAYLOAD_BYTES_MAX);
        }
    }

    #[test]
    fn frames_roundtrip_across_any_split(frames in prop::collection::vec(frame(), 1..6),
                                         cut in any::<prop::sample::Index>(), compress in any::<bool>()) {
        let mut wire = Vec::new();
        let enc = Encoder::new(compress);
        for f in &frames {
            enc.encode(f, &mut wire);
        }
        let cut = cut.index(wire.len() + 1);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for part in [&wire[..cut], &wire[cut..]] {
            d.push(part);
            while let Some(f) = d.next_frame().expect("valid stream") {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
    }
}
