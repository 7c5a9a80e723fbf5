//! The relays this binary carries, one per machine (static builds, see
//! build.rs), and which one a host gets.
//!
//! A relay's stage-0 is sent the relay for the machine guessed for its
//! host (the one that host had before in this run, else this controller's
//! own); a host of another machine skips those bytes and asks for its own
//! (`ARBOR-STAGE0 MACHINE m`, see bootstrap/stage0.sh).

use std::borrow::Cow;

/// A relay binary and how it was built.
pub struct Relay {
    pub machine: &'static str,
    pub bytes: &'static [u8],
    pub build: &'static str,
}

static CARRIED: [Relay; 2] = [
    Relay {
        machine: "x86_64",
        bytes: include_bytes!(concat!(env!("OUT_DIR"), "/arbor-relay-x86_64")),
        build: env!("ARBOR_RELAY_BUILD_X86_64"),
    },
    Relay {
        machine: "aarch64",
        bytes: include_bytes!(concat!(env!("OUT_DIR"), "/arbor-relay-aarch64")),
        build: env!("ARBOR_RELAY_BUILD_AARCH64"),
    },
];

/// Every relay, carried or not (an empty one was not built).
pub fn all() -> &'static [Relay] {
    &CARRIED
}

/// The relay for `machine` (as `uname -m` names it), if carried.
pub fn for_machine(machine: &str) -> Option<&'static Relay> {
    let m = match machine {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        m => m,
    };
    CARRIED
        .iter()
        .find(|r| r.machine == m && !r.bytes.is_empty())
}

/// The relay a host of unknown machine is sent first: this controller's
/// own machine's, else the first carried.
pub fn default_relay() -> &'static Relay {
    for_machine(std::env::consts::ARCH)
        .or_else(|| CARRIED.iter().find(|r| !r.bytes.is_empty()))
        .expect("arbor carries at least one relay")
}

/// The relay to send a host whose machine was last `machine` (if known).
pub fn guess(machine: Option<&str>) -> &'static Relay {
    machine.and_then(for_machine).unwrap_or_else(default_relay)
}

/// What a stage-0 that asked for `machine` is sent, or why nothing is.
pub fn answer(machine: &str) -> Result<Cow<'static, [u8]>, String> {
    for_machine(machine)
        .map(|r| Cow::Borrowed(r.bytes))
        .ok_or_else(|| {
            let carried: Vec<&str> = CARRIED
                .iter()
                .filter(|r| !r.bytes.is_empty())
                .map(|r| r.machine)
                .collect();
            format!(
                "its machine is {machine}; this arbor carries relays for {}",
                carried.join(" and ")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_build_carries_relays_for_both_machines() {
        // deploy/setup installs both musl targets; a build without one
        // says so in `arbor version`, and this test fails.
        for m in ["x86_64", "aarch64"] {
            let r = for_machine(m).unwrap_or_else(|| panic!("no {m} relay carried"));
            assert!(r.bytes.len() > 100_000, "{m}: {} bytes", r.bytes.len());
            assert_eq!(&r.bytes[..4], b"\x7fELF");
        }
        // e_machine: 62 is x86-64, 183 is AArch64.
        let machine = |b: &[u8]| u16::from_le_bytes([b[18], b[19]]);
        assert_eq!(machine(for_machine("x86_64").expect("x86_64").bytes), 62);
        assert_eq!(machine(for_machine("arm64").expect("aarch64").bytes), 183);
    }

    #[test]
    fn an_unknown_machine_is_refused_by_name() {
        let why = answer("riscv64").expect_err("no riscv64 relay");
        assert!(why.contains("riscv64") && why.contains("x86_64"), "{why}");
        assert!(answer("amd64").is_ok());
    }
}
