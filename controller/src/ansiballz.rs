//! The zip inside an AnsiballZ script (`zip_data='<base64>'`): where it is,
//! the key it is cached under, and its members. Read off the zip's central
//! directory, walked once by [`entries`]; nothing is decompressed.

use sha2::{Digest, Sha256};

/// Literals shorter than this are sent inline.
pub const ZIP_LITERAL_BYTES_MIN: usize = 4096;

/// Where an AnsiballZ script's zip literal is, if it has one: an argument
/// of its wrapper's call (`zip_data='…',`, ansible-core 2.19 and later) or
/// assigned in its wrapper (`    ZIPDATA = '…'`, 2.17 and 2.18).
pub fn zip_span(script: &[u8]) -> Option<(usize, usize)> {
    const FORMS: [(&[u8], &[u8]); 2] = [(b"\nzip_data='", b"',\n"), (b"\n    ZIPDATA = '", b"'\n")];
    find(script, b"_ansiballz_main(")?;
    FORMS.iter().find_map(|(mark, end)| {
        // The span keeps the quotes, as the literal is written.
        let start = find(script, mark)? + mark.len() - 1;
        let stop = start + 1 + find(&script[start + 1..], end)? + 1;
        (stop - start >= ZIP_LITERAL_BYTES_MIN).then_some((start, stop))
    })
}

/// The key a module's zip is cached under: a hash of its members' names,
/// CRC-32s and sizes. AnsiballZ zips of the same module differ between runs
/// only by their timestamps, so the key stays the same across runs. If the
/// literal is not a zip that can be read so, the SHA-256 of the literal.
pub fn zip_key(literal: &[u8]) -> String {
    let digest = decode_literal(literal).and_then(|zip| {
        let mut h = Sha256::new();
        for e in entries(&zip)? {
            h.update((e.name.len() as u32).to_le_bytes());
            h.update(e.name);
            h.update(e.crc.to_le_bytes());
            h.update(e.size.to_le_bytes());
        }
        Some(h.finalize())
    });
    match digest {
        Some(d) => format!("z1-{}", hex(&d)),
        None => hex(&Sha256::digest(literal)),
    }
}

/// One member of a zip, its bytes as stored (compressed).
pub struct ZipMember {
    pub name: String,
    pub method: u16,
    pub crc: u32,
    pub size: u32,
    pub data: Vec<u8>,
    /// Content key: a hash of how it is stored and what it holds.
    pub key: String,
}

/// The members of a zip literal, or None if it is not a plain zip this can
/// read (zip64, encryption and multi-disk zips are left whole).
pub fn zip_members(literal: &[u8]) -> Option<Vec<ZipMember>> {
    let zip = decode_literal(literal)?;
    let mut out = Vec::new();
    for e in entries(&zip)? {
        if e.flags & 0x1 != 0 || e.csize == u32::MAX || e.size == u32::MAX || e.local == u32::MAX {
            return None;
        }
        let local = e.local as usize;
        if u32_at(&zip, local)? != 0x0403_4b50 {
            return None;
        }
        let data_at = local
            + 30
            + usize::from(u16_at(&zip, local + 26)?)
            + usize::from(u16_at(&zip, local + 28)?);
        let data = zip.get(data_at..data_at + e.csize as usize)?.to_vec();
        let mut h = Sha256::new();
        h.update(e.method.to_le_bytes());
        h.update(e.crc.to_le_bytes());
        h.update(e.size.to_le_bytes());
        h.update(&data);
        out.push(ZipMember {
            name: String::from_utf8(e.name.to_vec()).ok()?,
            method: e.method,
            crc: e.crc,
            size: e.size,
            data,
            key: hex(&h.finalize()[..16]),
        });
    }
    Some(out)
}

/// A central directory record.
struct Entry<'a> {
    name: &'a [u8],
    flags: u16,
    method: u16,
    crc: u32,
    csize: u32,
    size: u32,
    local: u32,
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

/// The records of a zip's central directory, or None if it has none that
/// can be read.
fn entries(zip: &[u8]) -> Option<Vec<Entry<'_>>> {
    // The end of central directory record: 22 bytes, then a comment of
    // at most 64 KiB.
    let lowest = zip.len().saturating_sub(22 + 0xFFFF);
    let end = (lowest..=zip.len().checked_sub(22)?)
        .rev()
        .find(|&i| u32_at(zip, i) == Some(0x0605_4b50))?;
    let count = usize::from(u16_at(zip, end + 10)?);
    let mut at = u32_at(zip, end + 16)? as usize;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        if u32_at(zip, at)? != 0x0201_4b50 {
            return None;
        }
        let name_len = usize::from(u16_at(zip, at + 28)?);
        let extra_len = usize::from(u16_at(zip, at + 30)?);
        let comment_len = usize::from(u16_at(zip, at + 32)?);
        out.push(Entry {
            name: zip.get(at + 46..at + 46 + name_len)?,
            flags: u16_at(zip, at + 8)?,
            method: u16_at(zip, at + 10)?,
            crc: u32_at(zip, at + 16)?,
            csize: u32_at(zip, at + 20)?,
            size: u32_at(zip, at + 24)?,
            local: u32_at(zip, at + 42)?,
        });
        at += 46 + name_len + extra_len + comment_len;
    }
    Some(out)
}

/// The zip inside a literal (base64 in quotes).
fn decode_literal(literal: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let inner = literal
        .strip_prefix(b"'")
        .and_then(|l| l.strip_suffix(b"'"))
        .or_else(|| {
            literal
                .strip_prefix(b"\"")
                .and_then(|l| l.strip_suffix(b"\""))
        })?;
    base64::engine::general_purpose::STANDARD.decode(inner).ok()
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Lower-case hex of `d`.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zip of stored members, each (name, data), written with `time` as
    /// every member's DOS time: what Python's zipfile writes, in small.
    fn zip_of(members: &[(&str, &[u8])], time: u16) -> Vec<u8> {
        fn crc32(d: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in d {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        (c >> 1) ^ 0xEDB8_8320
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let (mut out, mut central) = (Vec::new(), Vec::new());
        for (name, data) in members {
            let offset = out.len() as u32;
            let crc = crc32(data);
            let len = data.len() as u32;
            let mut head = vec![];
            head.extend(0x0403_4b50u32.to_le_bytes());
            head.extend([20, 0, 0, 0, 0, 0]);
            head.extend(time.to_le_bytes());
            head.extend(0x5521u16.to_le_bytes());
            head.extend(crc.to_le_bytes());
            head.extend(len.to_le_bytes());
            head.extend(len.to_le_bytes());
            head.extend((name.len() as u16).to_le_bytes());
            head.extend(0u16.to_le_bytes());
            out.extend(&head);
            out.extend(name.as_bytes());
            out.extend(*data);
            central.extend(0x0201_4b50u32.to_le_bytes());
            central.extend([20, 0, 20, 0, 0, 0, 0, 0]);
            central.extend(time.to_le_bytes());
            central.extend(0x5521u16.to_le_bytes());
            central.extend(crc.to_le_bytes());
            central.extend(len.to_le_bytes());
            central.extend(len.to_le_bytes());
            central.extend((name.len() as u16).to_le_bytes());
            central.extend([0u8; 12]);
            central.extend(offset.to_le_bytes());
            central.extend(name.as_bytes());
        }
        let (cd_at, cd_len) = (out.len() as u32, central.len() as u32);
        out.extend(&central);
        out.extend(0x0605_4b50u32.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((members.len() as u16).to_le_bytes());
        out.extend((members.len() as u16).to_le_bytes());
        out.extend(cd_len.to_le_bytes());
        out.extend(cd_at.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    fn literal(zip: &[u8]) -> Vec<u8> {
        use base64::Engine;
        format!(
            "'{}'",
            base64::engine::general_purpose::STANDARD.encode(zip)
        )
        .into_bytes()
    }

    #[test]
    fn zip_key_ignores_timestamps_but_not_content() {
        let members: &[(&str, &[u8])] =
            &[("ansible/__init__.py", b"x = 1\n"), ("m.py", b"print(1)\n")];
        let a = literal(&zip_of(members, 0x6000));
        let b = literal(&zip_of(members, 0x6123));
        assert_ne!(a, b, "the literals differ, as between runs");
        assert_eq!(zip_key(&a), zip_key(&b));
        assert!(zip_key(&a).starts_with("z1-"));
        let other = literal(&zip_of(
            &[("ansible/__init__.py", b"x = 2\n"), ("m.py", b"print(1)\n")],
            0x6000,
        ));
        assert_ne!(zip_key(&a), zip_key(&other));
        let renamed = literal(&zip_of(
            &[("ansible/__init__.py", b"x = 1\n"), ("n.py", b"print(1)\n")],
            0x6000,
        ));
        assert_ne!(zip_key(&a), zip_key(&renamed));
        // Deflated zips written by Python's zipfile an hour and a half apart.
        let py_a = b"'UEsDBBQAAAAIAABQdV2Hj6fgCQAAAFAAAAATAAAAYW5zaWJsZS9fX2luaXRfXy5weauwNeSqoCIGAFBLAwQUAAAACAAAUHVd3U4WbBMAAACMAAAAFwAAAGFuc2libGUvbW9kdWxlcy9waW5nLnB5KyjKzCvRUC/Iz0tX1+QqGFAeAFBLAQIUAxQAAAAIAABQdV2Hj6fgCQAAAFAAAAATAAAAAAAAAAAAAACAAQAAAABhbnNpYmxlL19faW5pdF9fLnB5UEsBAhQDFAAAAAgAAFB1Xd1OFmwTAAAAjAAAABcAAAAAAAAAAAAAAIABOgAAAGFuc2libGUvbW9kdWxlcy9waW5nLnB5UEsFBgAAAAACAAIAhgAAAIIAAAAAAA=='";
        let py_b = b"'UEsDBBQAAAAIAMFbdV2Hj6fgCQAAAFAAAAATAAAAYW5zaWJsZS9fX2luaXRfXy5weauwNeSqoCIGAFBLAwQUAAAACADBW3Vd3U4WbBMAAACMAAAAFwAAAGFuc2libGUvbW9kdWxlcy9waW5nLnB5KyjKzCvRUC/Iz0tX1+QqGFAeAFBLAQIUAxQAAAAIAMFbdV2Hj6fgCQAAAFAAAAATAAAAAAAAAAAAAACAAQAAAABhbnNpYmxlL19faW5pdF9fLnB5UEsBAhQDFAAAAAgAwVt1Xd1OFmwTAAAAjAAAABcAAAAAAAAAAAAAAIABOgAAAGFuc2libGUvbW9kdWxlcy9waW5nLnB5UEsFBgAAAAACAAIAhgAAAIIAAAAAAA=='";
        assert_ne!(&py_a[..], &py_b[..]);
        assert!(zip_key(py_a).starts_with("z1-"));
        assert_eq!(zip_key(py_a), zip_key(py_b));
        // Not a zip: the literal's own hash.
        assert_eq!(zip_key(b"'bm90IGEgemlw'").len(), 64);
        assert_eq!(zip_key(b"garbage").len(), 64);
    }

    #[test]
    fn zip_members_are_read_with_content_keys() {
        // Python's zipfile, deflated: two members.
        let py = b"'UEsDBBQAAAAIAABQdV2Hj6fgCQAAAFAAAAATAAAAYW5zaWJsZS9fX2luaXRfXy5weauwNeSqoCIGAFBLAwQUAAAACAAAUHVd3U4WbBMAAACMAAAAFwAAAGFuc2libGUvbW9kdWxlcy9waW5nLnB5KyjKzCvRUC/Iz0tX1+QqGFAeAFBLAQIUAxQAAAAIAABQdV2Hj6fgCQAAAFAAAAATAAAAAAAAAAAAAACAAQAAAABhbnNpYmxlL19faW5pdF9fLnB5UEsBAhQDFAAAAAgAAFB1Xd1OFmwTAAAAjAAAABcAAAAAAAAAAAAAAIABOgAAAGFuc2libGUvbW9kdWxlcy9waW5nLnB5UEsFBgAAAAACAAIAhgAAAIIAAAAAAA=='";
        let m = zip_members(py).expect("members");
        let names: Vec<&str> = m.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["ansible/__init__.py", "ansible/modules/ping.py"]);
        assert!(m.iter().all(|x| x.method == 8 && x.key.len() == 32));
        assert_eq!((m[0].size, m[0].data.len()), (0x50, 9));
        assert_ne!(m[0].key, m[1].key);
        // The same content in a zip written at another time: the same keys.
        let later = b"'UEsDBBQAAAAIAMFbdV2Hj6fgCQAAAFAAAAATAAAAYW5zaWJsZS9fX2luaXRfXy5weauwNeSqoCIGAFBLAwQUAAAACADBW3Vd3U4WbBMAAACMAAAAFwAAAGFuc2libGUvbW9kdWxlcy9waW5nLnB5KyjKzCvRUC/Iz0tX1+QqGFAeAFBLAQIUAxQAAAAIAMFbdV2Hj6fgCQAAAFAAAAATAAAAAAAAAAAAAACAAQAAAABhbnNpYmxlL19faW5pdF9fLnB5UEsBAhQDFAAAAAgAwVt1Xd1OFmwTAAAAjAAAABcAAAAAAAAAAAAAAIABOgAAAGFuc2libGUvbW9kdWxlcy9waW5nLnB5UEsFBgAAAAACAAIAhgAAAIIAAAAAAA=='";
        let k: Vec<String> = zip_members(later)
            .expect("members")
            .into_iter()
            .map(|x| x.key)
            .collect();
        assert_eq!(k, m.iter().map(|x| x.key.clone()).collect::<Vec<_>>());
        assert!(zip_members(b"'bm90IGEgemlw'").is_none());
        assert!(zip_members(b"garbage").is_none());
    }

    #[test]
    fn zip_literal_is_found_only_in_ansiballz_scripts() {
        let zip = "A".repeat(ZIP_LITERAL_BYTES_MIN);
        let script = format!(
            "def _ansiballz_main(): pass\n_ansiballz_main(\nparams='{{}}',\nzip_data='{zip}',\n)\n"
        );
        let (a, b) = zip_span(script.as_bytes()).expect("found");
        assert_eq!(&script[a..b], format!("'{zip}'"));
        assert_eq!(zip_span(b"echo zip_data='x',\n"), None);
        let small = "def _ansiballz_main(): pass\nzip_data='AAAA',\n";
        assert_eq!(zip_span(small.as_bytes()), None);
        // ansible-core 2.17 and 2.18: assigned in the wrapper.
        let old = format!(
            "def _ansiballz_main():\n    import os\n    ZIPDATA = '{zip}'\n\n    def x(): pass\n"
        );
        let (a, b) = zip_span(old.as_bytes()).expect("found");
        assert_eq!(&old[a..b], format!("'{zip}'"));
    }
}
