//! Builds the relay, static, for each machine it can, and hands them to the
//! controller to embed.
//!
//! x86_64: musl (x86_64-unknown-linux-musl) when that target is installed;
//! else glibc with `-C target-feature=+crt-static`. aarch64: musl
//! (aarch64-unknown-linux-musl, linked by rust-lld: no C cross toolchain)
//! when that target is installed; else none, and the controller says so.
//! `ARBOR_RELAY_BIN` / `ARBOR_RELAY_BIN_AARCH64` name prebuilt relays
//! instead. Each is built by a nested cargo in its own target directory,
//! with the size-oriented `relay` profile.
//!
//! Each machine also gets the relay with QUIC (feature `quic`, for hosts
//! with `arbor_transport: quic`), where ring's C builds: the host's own
//! machine, and another where a C cross compiler for it is on PATH
//! (`aarch64-linux-musl-gcc` or Debian's `aarch64-linux-gnu-gcc`: ring's
//! C needs no libc, and lld links it with Rust's own musl)
//! (`ARBOR_RELAY_BIN_QUIC` / `ARBOR_RELAY_BIN_AARCH64_QUIC` name prebuilt
//! ones).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Machine {
    name: &'static str,
    prebuilt_env: &'static str,
    /// Targets to try in order, and the RUSTFLAGS each needs.
    targets: &'static [(&'static str, &'static str)],
}

const MACHINES: [Machine; 2] = [
    Machine {
        name: "x86_64",
        prebuilt_env: "ARBOR_RELAY_BIN",
        targets: &[
            ("x86_64-unknown-linux-musl", ""),
            ("x86_64-unknown-linux-gnu", "-Ctarget-feature=+crt-static"),
        ],
    },
    Machine {
        name: "aarch64",
        prebuilt_env: "ARBOR_RELAY_BIN_AARCH64",
        targets: &[("aarch64-unknown-linux-musl", "")],
    },
];

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("..");
    for p in [
        "relay/src",
        "relay/Cargo.toml",
        "relay/core/src",
        "relay/core/Cargo.toml",
        "relay/io/src",
        "relay/io/Cargo.toml",
        "relay/wire/src",
        "relay/wire/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for m in &MACHINES {
        let dest = out.join(format!("arbor-relay-{}", m.name));
        let build = relay_for(m, &root, &out, &dest, false);
        let var = format!("ARBOR_RELAY_BUILD_{}", m.name.to_uppercase());
        println!("cargo:rustc-env={var}={build}");
        let dest = out.join(format!("arbor-relay-quic-{}", m.name));
        let build = relay_for(m, &root, &out, &dest, true);
        let var = format!("ARBOR_RELAY_QUIC_BUILD_{}", m.name.to_uppercase());
        println!("cargo:rustc-env={var}={build}");
    }
}

/// Writes the relay for `m` (with QUIC if `quic`) to `dest` (empty if
/// none) and says how it was built.
fn relay_for(m: &Machine, root: &Path, out: &Path, dest: &Path, quic: bool) -> String {
    let prebuilt_env = if quic {
        format!("{}_QUIC", m.prebuilt_env)
    } else {
        m.prebuilt_env.to_string()
    };
    println!("cargo:rerun-if-env-changed={prebuilt_env}");
    if let Ok(prebuilt) = env::var(&prebuilt_env) {
        println!("cargo:rerun-if-changed={prebuilt}");
        std::fs::copy(&prebuilt, dest).expect("copy a prebuilt relay");
        return "prebuilt".into();
    }
    let Some(&(target, flags)) = m.targets.iter().find(|(t, _)| has_target(t)) else {
        std::fs::write(dest, b"").expect("write an empty relay");
        return format!("not built ({} not installed)", m.targets[0].0);
    };
    // ring compiles C for its target: the host's C compiler for its own
    // machine, a cross compiler for another (none: no QUIC relay for it).
    let cross_cc = if quic && !target.starts_with(env::consts::ARCH) {
        match cross_compiler(target) {
            Some(cc) => Some(cc),
            None => {
                std::fs::write(dest, b"").expect("write an empty relay");
                return format!("not built (ring needs a C compiler for {target})");
            }
        }
    } else {
        None
    };
    let target_dir = out.join(if quic {
        "relay-quic-target"
    } else {
        "relay-target"
    });
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "--offline",
        "-p",
        "arbor-relay",
        "--profile",
        "relay",
        "--target",
        target,
    ])
    .args(if quic {
        &["--features", "quic"][..]
    } else {
        &[][..]
    })
    .arg("--target-dir")
    .arg(&target_dir)
    .arg("--manifest-path")
    .arg(root.join("Cargo.toml"));
    for v in [
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(v);
    }
    if !flags.is_empty() {
        cmd.env("CARGO_ENCODED_RUSTFLAGS", flags);
    }
    if target.starts_with("aarch64") {
        // Rust's musl targets carry their own C runtime: lld links them.
        cmd.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER", "rust-lld");
    }
    if let Some(cc) = cross_cc {
        let t = target.replace('-', "_");
        cmd.env(format!("AR_{t}"), cc.replace("-gcc", "-ar"))
            .env(format!("CC_{t}"), cc);
    }
    let status = cmd.status().expect("run cargo for the relay");
    assert!(status.success(), "building arbor-relay for {target} failed");
    let built = target_dir.join(target).join("relay").join("arbor-relay");
    std::fs::copy(&built, dest).expect("copy the relay");
    if target.ends_with("musl") {
        "musl static".into()
    } else {
        "glibc static (musl target not installed)".into()
    }
}

/// A C compiler on PATH that builds for `target`'s machine.
fn cross_compiler(target: &str) -> Option<String> {
    let arch = target.split('-').next()?;
    let path = env::var_os("PATH")?;
    println!("cargo:rerun-if-env-changed=PATH");
    [
        format!("{arch}-linux-musl-gcc"),
        format!("{arch}-linux-gnu-gcc"),
    ]
    .into_iter()
    .find(|cc| env::split_paths(&path).any(|d| d.join(cc).is_file()))
}

fn has_target(target: &str) -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(target)
        .join("lib")
        .is_dir()
}
