//! Builds the relay, static, and hands it to the controller to embed.
//!
//! musl (x86_64-unknown-linux-musl) when that target is installed; else
//! glibc with `-C target-feature=+crt-static`. `ARBOR_RELAY_BIN` names a
//! prebuilt relay instead. The relay is built by a nested cargo in its own
//! target directory, with the size-oriented `relay` profile.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const MUSL: &str = "x86_64-unknown-linux-musl";
const GNU: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let dest = out.join("arbor-relay");
    println!("cargo:rerun-if-env-changed=ARBOR_RELAY_BIN");
    if let Ok(prebuilt) = env::var("ARBOR_RELAY_BIN") {
        println!("cargo:rerun-if-changed={prebuilt}");
        std::fs::copy(&prebuilt, &dest).expect("copy ARBOR_RELAY_BIN");
        println!("cargo:rustc-env=ARBOR_RELAY_BUILD=prebuilt");
        return;
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("..");
    for p in [
        "relay/src",
        "relay/Cargo.toml",
        "relay/core/src",
        "relay/core/Cargo.toml",
        "relay/wire/src",
        "relay/wire/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let target = if has_target(MUSL) { MUSL } else { GNU };
    let target_dir = out.join("relay-target");
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
    if target == GNU {
        cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static");
    }
    let status = cmd.status().expect("run cargo for the relay");
    assert!(status.success(), "building arbor-relay for {target} failed");
    let built = target_dir.join(target).join("relay").join("arbor-relay");
    std::fs::copy(&built, &dest).expect("copy the relay");
    let kind = if target == MUSL {
        "musl static"
    } else {
        "glibc static (musl target not installed)"
    };
    println!("cargo:rustc-env=ARBOR_RELAY_BUILD={kind}");
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
