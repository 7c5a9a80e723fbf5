//! The payload the Python agent speaks: a JSON object and a binary blob.
//!
//! ```text
//! offset  size      field
//!      0     4      json_len, u32 little-endian
//!      4  json_len  UTF-8 JSON object (the request or reply fields)
//!      …     rest   blob (stdin, stdout+stderr, file bytes), may be empty
//! ```
//! Decodable with Python's `struct` and `json` alone.

use crate::WireError;

pub fn encode(json: &[u8], blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + json.len() + blob.len());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(json);
    out.extend_from_slice(blob);
    out
}

/// Splits a payload into its JSON and blob parts.
pub fn split(payload: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let Some(len) = payload.get(..4) else {
        return Err(WireError::BadPayload(
            "message shorter than its length field".into(),
        ));
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let rest = &payload[4..];
    if len > rest.len() {
        return Err(WireError::BadPayload(format!(
            "JSON length {len} past the end of a {} byte message",
            payload.len()
        )));
    }
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bounds() {
        let p = encode(br#"{"op":"exec"}"#, b"stdin");
        assert_eq!(split(&p), Ok((&br#"{"op":"exec"}"#[..], &b"stdin"[..])));
        assert!(split(&[1, 0]).is_err());
        assert!(split(&[9, 0, 0, 0, b'{']).is_err());
    }
}
