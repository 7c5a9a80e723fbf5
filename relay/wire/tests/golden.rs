//! The golden frames in `tests/golden/` decode to exactly the fields their
//! manifest names, re-encode to the same bytes, and the malformed ones fail
//! with the named error. The Python agent's tests read the same files.

use std::path::PathBuf;

use arbor_wire::{decode, Decoded, Frame, Kind, NodeId, StreamId, WireError};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn golden_frames_match_their_manifest() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("frames.json")).expect("manifest"))
            .expect("json");
    let cases = manifest["frames"].as_array().expect("frames");
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let bytes =
            std::fs::read(golden_dir().join(case["file"].as_str().expect("file"))).expect("bin");
        let got = decode(&bytes);
        if case["valid"].as_bool() == Some(true) {
            let field = |k: &str| case[k].as_u64().expect(k) as u32;
            let expected = Frame {
                kind: Kind::from_u8(field("kind") as u8).expect("kind"),
                flags: field("flags") as u8,
                dst: NodeId(field("dst")),
                src: NodeId(field("src")),
                stream: StreamId(field("stream")),
                payload: hex(case["payload_hex"].as_str().expect("payload")),
            };
            assert_eq!(
                got,
                Ok(Decoded::Frame(expected.clone(), bytes.len())),
                "{name}"
            );
            assert_eq!(
                expected.to_bytes(),
                bytes,
                "{name} re-encodes to the same bytes"
            );
        } else {
            let err = got.expect_err(name);
            let variant = format!("{err:?}");
            let want = case["error"].as_str().expect("error");
            assert!(
                variant.starts_with(want),
                "{name}: got {variant}, want {want}"
            );
            assert!(!matches!(err, WireError::BadPayload(_)), "{name}");
        }
    }
}
