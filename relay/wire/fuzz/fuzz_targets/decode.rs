//! Fuzz the frame decoder, the link codec (lz4) and the payload decoders.
#![no_main]

use arbor_wire::link::{Decoder, DECODER_BYTES_MAX};
use arbor_wire::{control, decode, msg, Decoded, FRAME_PAYLOAD_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Frame(f, used)) = decode(data) {
        assert!(used <= data.len());
        assert!(f.payload.len() <= FRAME_PAYLOAD_BYTES_MAX);
    }
    let mut d = Decoder::new();
    for chunk in data.chunks(97) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    let _ = control::decode::<control::Request>(&f.payload);
                    let _ = control::decode::<control::Reply>(&f.payload);
                    let _ = msg::split(&f.payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= DECODER_BYTES_MAX);
    }
});
