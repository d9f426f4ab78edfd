//! Builds the guest kit (`guests/kit`) with a nested `cargo build --release` and leaves the ELF
//! in `OUT_DIR/veil-kit` for `src/lib.rs` to embed.
//!
//! The kit is a freestanding x86-64 PVH kernel with its own rustc flags, so it cannot be an
//! ordinary dependency: it is its own workspace, built for the host target (the only one
//! installed) with the flags below, into a target directory inside `OUT_DIR` so the nested
//! cargo never waits for the outer build's lock. Whatever the outer build inherited (its
//! RUSTFLAGS, target directory, profile overrides, clippy wrapper) is removed first.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The kit's target: the host's, built freestanding (no libc, static, linked at 1 MiB).
const KIT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// rustc flags for the kit. Keep in sync with `guests/kit/.cargo/config.toml`, which serves
/// builds by hand and explains the choices: static relocation for the 32-bit entry stub, and
/// no SSE or AVX at all because KVM's instruction emulator (which runs every guest on the
/// project's hosts) fails on SSE arithmetic.
const KIT_RUSTFLAGS: &[&str] = &[
    "-C",
    "relocation-model=static",
    "-C",
    "target-cpu=x86-64",
    "-C",
    "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2,-avx512f,-fma,-f16c,-popcnt",
];

/// Inherited variables that would change how the nested cargo builds the kit.
fn is_inherited_build_setting(name: &str) -> bool {
    matches!(
        name,
        "RUSTFLAGS" | "CARGO_ENCODED_RUSTFLAGS" | "CARGO_TARGET_DIR" | "RUSTC_WORKSPACE_WRAPPER"
    ) || name.starts_with("CARGO_BUILD_")
        || name.starts_with("CARGO_PROFILE_")
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kit_dir = manifest_dir.join("kit");
    let abi_dir = manifest_dir.join("abi");

    // Not the whole of guests/kit: a hand build leaves guests/kit/target there.
    for path in [
        kit_dir.join("Cargo.toml"),
        kit_dir.join("Cargo.lock"),
        kit_dir.join("build.rs"),
        kit_dir.join("link.ld"),
        kit_dir.join(".cargo").join("config.toml"),
        kit_dir.join("src"),
        abi_dir.join("Cargo.toml"),
        abi_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let target_dir = out_dir.join("kit-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(&cargo);
    command
        // From the kit's folder, as a hand build would be (its .cargo/config.toml applies,
        // though CARGO_ENCODED_RUSTFLAGS below takes precedence over its flags).
        .current_dir(&kit_dir)
        .args([
            "build",
            "--release",
            "--offline",
            "--target",
            KIT_TARGET,
            "--manifest-path",
        ])
        .arg(kit_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (name, _) in env::vars_os() {
        if name.to_str().is_some_and(is_inherited_build_setting) {
            command.env_remove(&name);
        }
    }
    command.env("CARGO_ENCODED_RUSTFLAGS", KIT_RUSTFLAGS.join("\x1f"));

    let output = command.output().unwrap_or_else(|err| {
        fail(&format!(
            "could not run {} to build the guest kit: {err}",
            Path::new(&cargo).display()
        ))
    });
    if !output.status.success() {
        report(&output);
        fail(&format!(
            "building the guest kit failed ({}); its cargo output is above. To reproduce: \
             cd {} && cargo build --release",
            output.status,
            kit_dir.display()
        ));
    }

    let built = target_dir.join(KIT_TARGET).join("release").join("veil-kit");
    let dest = out_dir.join("veil-kit");
    if let Err(err) = std::fs::copy(&built, &dest) {
        report(&output);
        fail(&format!(
            "the guest kit build succeeded but {} cannot be copied: {err}",
            built.display()
        ));
    }
}

/// Passes the nested build's output on; cargo shows a failed build script's stderr.
fn report(output: &Output) {
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
}

fn fail(message: &str) -> ! {
    eprintln!("error: veil-guests: {message}");
    std::process::exit(1)
}
