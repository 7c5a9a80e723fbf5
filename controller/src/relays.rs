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
    /// Built with QUIC (for hosts with `arbor_transport: quic`).
    pub quic: bool,
    pub bytes: &'static [u8],
    pub build: &'static str,
}

static CARRIED: [Relay; 4] = [
    Relay {
        machine: "x86_64",
        quic: false,
        bytes: include_bytes!(concat!(env!("OUT_DIR"), "/arbor-relay-x86_64")),
        build: env!("ARBOR_RELAY_BUILD_X86_64"),
    },
    Relay {
        machine: "aarch64",
        quic: false,
        bytes: include_bytes!(concat!(env!("OUT_DIR"), "/arbor-relay-aarch64")),
        build: env!("ARBOR_RELAY_BUILD_AARCH64"),
    },
    Relay {
        machine: "x86_64",
        quic: true,
        bytes: include_bytes!(concat!(env!("OUT_DIR"), "/arbor-relay-quic-x86_64")),
        build: env!("ARBOR_RELAY_QUIC_BUILD_X86_64"),
    },
    Relay {
        machine: "aarch64",
        quic: true,
        bytes: include_bytes!(concat!(env!("OUT_DIR"), "/arbor-relay-quic-aarch64")),
        build: env!("ARBOR_RELAY_QUIC_BUILD_AARCH64"),
    },
];

/// Every relay, carried or not (an empty one was not built).
pub fn all() -> &'static [Relay] {
    &CARRIED
}

/// The relay for `machine` (as `uname -m` names it), if carried.
pub fn for_machine(machine: &str) -> Option<&'static Relay> {
    carried(machine, false)
}

/// The relay for `machine`, with QUIC if `quic` and one is carried for it
/// (else without: that hop stays on ssh).
pub fn carried(machine: &str, quic: bool) -> Option<&'static Relay> {
    let m = match machine {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        m => m,
    };
    let find = |q: bool| {
        CARRIED
            .iter()
            .find(|r| r.machine == m && r.quic == q && !r.bytes.is_empty())
    };
    if quic {
        find(true).or_else(|| find(false))
    } else {
        find(false)
    }
}

/// The relay a host of unknown machine is sent first: this controller's
/// own machine's, else the first carried.
pub fn default_relay(quic: bool) -> &'static Relay {
    carried(std::env::consts::ARCH, quic)
        .or_else(|| CARRIED.iter().find(|r| !r.quic && !r.bytes.is_empty()))
        .expect("arbor carries at least one relay")
}

/// The relay to send a host whose machine was last `machine` (if known).
pub fn guess(machine: Option<&str>, quic: bool) -> &'static Relay {
    machine
        .and_then(|m| carried(m, quic))
        .unwrap_or_else(|| default_relay(quic))
}

/// What a stage-0 that asked for `machine` is sent, or why nothing is.
pub fn answer(machine: &str, quic: bool) -> Result<Cow<'static, [u8]>, String> {
    carried(machine, quic)
        .map(|r| Cow::Borrowed(r.bytes))
        .ok_or_else(|| {
            let carried: Vec<&str> = CARRIED
                .iter()
                .filter(|r| !r.quic && !r.bytes.is_empty())
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
    fn the_quic_relay_is_carried_for_this_machine_and_never_sent_unasked() {
        let q = carried(std::env::consts::ARCH, true).expect("a relay");
        assert!(q.quic, "{}: {}", q.machine, q.build);
        assert_eq!(&q.bytes[..4], b"\x7fELF");
        assert!(!guess(None, false).quic);
        assert!(!carried("x86_64", false).expect("x86_64").quic);
        // aarch64 without its QUIC build: the plain relay (the hop stays
        // on ssh).
        if let Some(r) = carried("aarch64", true) {
            assert_eq!(r.machine, "aarch64");
        }
    }

    #[test]
    fn an_unknown_machine_is_refused_by_name() {
        let why = answer("riscv64", false).expect_err("no riscv64 relay");
        assert!(why.contains("riscv64") && why.contains("x86_64"), "{why}");
        assert!(answer("amd64", false).is_ok());
    }
}
