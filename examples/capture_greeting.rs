//! Runs the kit's greeting guest as a library user would, capturing its serial output in a
//! `String`.
//!
//! `cargo run --example capture_greeting`

fn main() -> Result<(), veil::Error> {
    let output = veil::CapturedOutput::new();
    let vm = veil::VmBuilder::new()
        .kernel(veil_guests::kit_elf_path())
        .cmdline("greet")
        .memory_bytes(32 << 20)
        .serial_writer(output.clone())
        .start()?;
    let stop = vm.wait();
    let greeting: String = output.text();
    println!("guest said: {}", greeting.trim_end());
    println!("guest stopped: {stop}");
    Ok(())
}
