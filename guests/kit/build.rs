//! Links the kit as a static ELF at 1 MiB with its own linker script (no libc, no PIE).

use std::env;
use std::path::PathBuf;

fn main() {
    let dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");

    // The 32-bit entry stub uses absolute addresses, so position-independent code would be
    // silently wrong; catch a build that lost the flags instead of producing a broken guest.
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !flags
        .split('\x1f')
        .any(|f| f == "relocation-model=static" || f == "-Crelocation-model=static")
    {
        eprintln!(
            "veil-kit must be built with `-C relocation-model=static` (and SSE3+/AVX off): \
             build it through the veil-guests crate, or run cargo from guests/kit so that \
             guests/kit/.cargo/config.toml applies"
        );
        std::process::exit(1);
    }

    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
}
