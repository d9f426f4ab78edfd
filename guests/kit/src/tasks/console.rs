//! The console tasks: `con-write` and `con-echo` on virtio-console's port 0, and
//! `serial-echo` on COM1's receive side.

use crate::cmdline::{ConsoleOp, MmioDevice, Text};
use crate::serial::{write_dec, write_escaped, write_str};
use crate::virtio::console::{Console, TX_BUFFER_SIZE};
use crate::virtio::{Error, PEER_TIMEOUT_TSC};
use crate::{arch, EXIT_CHECK_FAILED};

/// Runs `op` on the `dev`-th transport, `device`.
pub fn run(op: &ConsoleOp, dev: u64, device: &MmioDevice) {
    let task = match op {
        ConsoleOp::Write(_) => "con-write",
        ConsoleOp::Echo { .. } => "con-echo",
    };
    let mut console = Console::open(device.base, device.size)
        .unwrap_or_else(|e| super::device_error(task, dev, device, e));
    let result = match *op {
        ConsoleOp::Write(ref text) => write(&mut console, dev, text),
        ConsoleOp::Echo { count } => echo(&mut console, dev, count),
    };
    if let Err(e) = result {
        super::device_failed(task, dev, e);
    }
}

fn write(console: &mut Console, dev: u64, text: &Text) -> Result<(), Error> {
    let bytes = text.as_bytes();
    let buffer = console.transmit_buffer();
    const _: () = assert!(crate::cmdline::TEXT_MAX < TX_BUFFER_SIZE);
    // SAFETY: the text and its newline fit in DMA buffer 1 (asserted above), which no device
    // is using: the console is the only device up and its transmitq is idle.
    unsafe {
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), buffer, bytes.len());
        buffer.add(bytes.len()).write_volatile(b'\n');
    }
    let len = bytes.len() as u32 + 1;
    console.transmit(buffer, len)?;
    write_str("con-write ok: dev ");
    write_dec(dev);
    write_str(": ");
    write_dec(len.into());
    write_str(" bytes\n");
    Ok(())
}

/// Reads `count` bytes as the device delivers them and sends each buffer back from where it
/// landed (the receive buffer is the transmit buffer: nothing is copied), then prints them.
fn echo(console: &mut Console, dev: u64, count: u64) -> Result<(), Error> {
    let mut got = 0u64;
    write_str("con-echo: ");
    while got < count {
        let deadline = arch::rdtsc() + PEER_TIMEOUT_TSC;
        let Some((id, len)) = console.receive(deadline)? else {
            write_str("\ncon-echo FAILED: dev ");
            write_dec(dev);
            write_str(": no input after ");
            write_dec(got);
            write_str(" of ");
            write_dec(count);
            write_str(" bytes (timed out)\n");
            arch::exit(EXIT_CHECK_FAILED);
        };
        let take = u64::from(len).min(count - got) as usize;
        let buffer = console.rx_buffer(id);
        if take > 0 {
            console.transmit(buffer, take as u32)?;
        }
        for i in 0..take {
            // SAFETY: the device wrote `len >= take` bytes of this receive buffer and is done
            // with it (it is neither on the receive queue nor in flight on transmitq).
            write_escaped(unsafe { buffer.add(i).read_volatile() });
        }
        console.repost(id);
        got += take as u64;
    }
    write_str("\n");
    Ok(())
}

/// Reads `count` bytes from COM1 and prints them as `serial-echo: <bytes>`.
pub fn serial_echo(count: u64) {
    write_str("serial-echo: ");
    for got in 0..count {
        let Some(byte) = crate::serial::read_byte(arch::rdtsc() + PEER_TIMEOUT_TSC) else {
            write_str("\nserial-echo FAILED: no input after ");
            write_dec(got);
            write_str(" of ");
            write_dec(count);
            write_str(" bytes (timed out)\n");
            arch::exit(EXIT_CHECK_FAILED);
        };
        write_escaped(byte);
    }
    write_str("\n");
}
