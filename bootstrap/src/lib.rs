//! Everything sent to a host before it speaks arbor's protocol, and the
//! exact command lines that start it.
//!
//! - `stage0.sh`: POSIX sh, loads the relay binary into an in-RAM file
//!   (memfd) and runs it; no python needed, nothing written to disk.
//! - `agent/first_stage.py`: given to `python3 -c`, reads the compressed
//!   agent from stdin and runs it from memory.
//! - `agent/arbor_agent/`: the agent itself (standard library only), a
//!   package bundled with `agent/bundle_loader.py` into one source
//!   ([`agent_source`]) that imports it from memory.

use std::sync::OnceLock;

use base64::Engine;
use flate2::{write::ZlibEncoder, Compression};

use arbor_wire::NodeId;

pub const STAGE0_SH: &str = include_str!("../stage0.sh");
pub const FIRST_STAGE_PY: &str = include_str!("../agent/first_stage.py");
/// The agent package's modules, by import name.
pub const AGENT_MODULES: &[(&str, &str)] = &[
    (
        "arbor_agent",
        include_str!("../agent/arbor_agent/__init__.py"),
    ),
    (
        "arbor_agent.agent",
        include_str!("../agent/arbor_agent/agent.py"),
    ),
    (
        "arbor_agent.become",
        include_str!("../agent/arbor_agent/become.py"),
    ),
    (
        "arbor_agent.bounds",
        include_str!("../agent/arbor_agent/bounds.py"),
    ),
    (
        "arbor_agent.execute",
        include_str!("../agent/arbor_agent/execute.py"),
    ),
    (
        "arbor_agent.files",
        include_str!("../agent/arbor_agent/files.py"),
    ),
    (
        "arbor_agent.forwards",
        include_str!("../agent/arbor_agent/forwards.py"),
    ),
    (
        "arbor_agent.jobs",
        include_str!("../agent/arbor_agent/jobs.py"),
    ),
    (
        "arbor_agent.link",
        include_str!("../agent/arbor_agent/link.py"),
    ),
    (
        "arbor_agent.modules",
        include_str!("../agent/arbor_agent/modules.py"),
    ),
    (
        "arbor_agent.pipes",
        include_str!("../agent/arbor_agent/pipes.py"),
    ),
    (
        "arbor_agent.transfer",
        include_str!("../agent/arbor_agent/transfer.py"),
    ),
    (
        "arbor_agent.wire",
        include_str!("../agent/arbor_agent/wire.py"),
    ),
];
const BUNDLE_LOADER_PY: &str = include_str!("../agent/bundle_loader.py");

/// The agent as one Python source: the package's modules as `_SOURCES`,
/// each a raw triple-quoted string (so its text goes as it is: no module
/// may hold three single quotes or end in a backslash, which a test
/// checks), then the loader that imports them from memory and runs the
/// agent. Computed once.
pub fn agent_source() -> &'static str {
    static SOURCE: OnceLock<String> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let mut out = String::from("_SOURCES = {\n");
        for (name, source) in AGENT_MODULES {
            out.push_str(&format!("{name:?}: r'''{source}''',\n"));
        }
        out.push_str("}\n");
        out.push_str(BUNDLE_LOADER_PY);
        out
    })
}

/// Quotes `s` for a POSIX shell: the result is one word, taken literally.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The agent's code as sent: zlib-compressed, computed once.
pub fn agent_payload() -> &'static [u8] {
    static PAYLOAD: OnceLock<Vec<u8>> = OnceLock::new();
    PAYLOAD.get_or_init(|| {
        use std::io::Write;
        let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
        // Writing to a Vec cannot fail.
        let _ = z.write_all(agent_source().as_bytes());
        z.finish().unwrap_or_default()
    })
}

/// The remote command (one string, as ssh sends it to the login shell) that
/// starts an agent with `python`; its stdin must then carry
/// [`agent_preamble`] before any frame. The same command, wrapped by a become
/// plugin, starts a nested agent under another account.
pub fn agent_command(python: &str) -> String {
    let stage = base64::engine::general_purpose::STANDARD.encode(FIRST_STAGE_PY);
    let boot = format!("import base64;exec(base64.b64decode('{stage}'))");
    format!("{} -c {}", sh_quote(python), sh_quote(&boot))
}

/// [`agent_command`] as an ssh session runs it: in a shell that says how
/// the agent ended when it did not end cleanly (killed, or exited with an
/// error), so the hop's failure names the cause. Not for become: the
/// nested agent must be the become command's own child.
pub fn agent_ssh_command(python: &str) -> String {
    let inner = format!(
        "{}; s=$?; if [ $s -gt 128 ]; then echo \"arbor: the agent was killed by signal \
         $((s - 128))\" >&2; elif [ $s -ne 0 ]; then echo \"arbor: the agent exited with \
         status $s\" >&2; fi; exit $s",
        agent_command(python)
    );
    format!("exec /bin/sh -c {}", sh_quote(&inner))
}

/// Where an agent's preamble starts: the first stage skips anything before
/// it (a password line a become command did not read).
pub const AGENT_MARKER: &[u8] = b"\0arbor\0";

/// What an agent's stdin carries first: [`AGENT_MARKER`], its node id and
/// the payload's length (little-endian u32 each), then [`agent_payload`].
pub fn agent_preamble(node: NodeId) -> Vec<u8> {
    let payload = agent_payload();
    let mut out = agent_preamble_header(node, payload.len());
    out.extend_from_slice(payload);
    out
}

/// [`agent_preamble`] without the payload of `len` bytes that follows it.
pub fn agent_preamble_header(node: NodeId, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(AGENT_MARKER.len() + 8 + len);
    out.extend_from_slice(AGENT_MARKER);
    out.extend_from_slice(&node.0.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out
}

/// The remote command that starts a relay for `node`; its stdin must then
/// carry exactly `binary_len` bytes of the relay binary built for
/// `machine` (`x86_64`, `aarch64`) before any frame. A host of another
/// machine asks for its own first (see stage0.sh and `arbor_io::stage0`).
pub fn relay_command(node: NodeId, binary_len: usize, machine: &str) -> String {
    format!(
        "exec /bin/sh -c {} arbor-stage0 {} {} {}",
        sh_quote(STAGE0_SH),
        binary_len,
        node.0,
        sh_quote(machine)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_a_shell() {
        for s in ["plain", "two words", "it's", "$(rm -rf /)", "", "a'b'c"] {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("printf %s {}", sh_quote(s)))
                .output()
                .expect("sh");
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }

    #[test]
    fn agent_payload_decompresses_to_the_agent() {
        use std::io::Read;
        let mut z = flate2::read::ZlibDecoder::new(agent_payload());
        let mut s = String::new();
        z.read_to_string(&mut s).expect("zlib");
        assert_eq!(s, agent_source());
        assert!(agent_payload().len() < agent_source().len() / 2);
    }

    #[test]
    fn the_bundle_holds_every_module_of_the_package() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/arbor_agent");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("the agent package")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".py"))
            .map(|n| match n.trim_end_matches(".py") {
                "__init__" => "arbor_agent".to_string(),
                m => format!("arbor_agent.{m}"),
            })
            .collect();
        on_disk.sort();
        let bundled: Vec<&str> = AGENT_MODULES.iter().map(|(n, _)| *n).collect();
        assert_eq!(on_disk, bundled);
        for (name, source) in AGENT_MODULES {
            assert!(!source.contains("'''"), "{name} holds three single quotes");
            assert!(!source.ends_with('\\'), "{name} ends in a backslash");
        }
    }
}
