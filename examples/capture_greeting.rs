//! Runs the kit's greeting guest as a library user would, capturing its serial output in a
//! `String`.
//!
//! `cargo run --example capture_greeting`

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// A writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn main() -> Result<(), veil::Error> {
    let capture = Capture::default();
    let vm = veil::VmBuilder::new()
        .kernel(veil_guests::kit_elf_path())
        .cmdline("greet")
        .memory_bytes(32 << 20)
        .serial_writer(capture.clone())
        .start()?;
    let stop = vm.wait();
    let output = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    println!("guest said: {}", output.trim_end());
    println!("guest stopped: {stop}");
    Ok(())
}
