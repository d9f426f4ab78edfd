//! Output on COM1, and polled input.
//!
//! Bytes go straight to the transmit register without polling the line status: every port
//! access is a VM exit (~19 us on the project's hosts) and the VMM's UART never backs up.
//! Input is the 16550's: LSR's data-ready bit, then the receive buffer register (DLAB is
//! never set, so offset 0 reads RBR). Interrupts stay off, so the kit polls.

use crate::arch::{self, outb};
use veil_guest_abi::COM1_PORT;

/// The line status register (16550: offset 5).
const UART_LSR: u16 = 5;
/// LSR bit 0, DR: a received byte waits in RBR.
const UART_LSR_DR: u8 = 1;

/// The next byte COM1 received, or `None` if none came before TSC `deadline`.
pub fn read_byte(deadline: u64) -> Option<u8> {
    loop {
        if arch::inb(COM1_PORT + UART_LSR) & UART_LSR_DR != 0 {
            return Some(arch::inb(COM1_PORT));
        }
        if arch::rdtsc() > deadline {
            return None;
        }
        arch::pause();
    }
}

/// Writes `byte` so that any byte reads back unambiguously on a line: printable ASCII as it
/// is, `\\`, `\n`, `\r`, `\t`, and `\xNN` for everything else.
pub fn write_escaped(byte: u8) {
    let hex = b"0123456789abcdef";
    match byte {
        b'\\' => write_str("\\\\"),
        b'\n' => write_str("\\n"),
        b'\r' => write_str("\\r"),
        b'\t' => write_str("\\t"),
        b' '..=b'~' => outb(COM1_PORT, byte),
        _ => write_bytes(&[
            b'\\',
            b'x',
            hex[usize::from(byte >> 4)],
            hex[usize::from(byte & 0xf)],
        ]),
    }
}

/// Writes raw bytes.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        outb(COM1_PORT, b);
    }
}

/// Writes a string.
pub fn write_str(s: &str) {
    write_bytes(s.as_bytes());
}

/// Writes `n` in decimal.
pub fn write_dec(mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    write_bytes(&buf[i..]);
}

/// Writes `n` as `0x` and lowercase hex digits, without leading zeros.
pub fn write_hex(mut n: u64) {
    let mut buf = [0u8; 18];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    i -= 2;
    buf[i] = b'0';
    buf[i + 1] = b'x';
    write_bytes(&buf[i..]);
}

/// Starts an error line: `veil-kit: error: `. The caller writes the details, then calls
/// [`end_error`].
pub fn begin_error() {
    write_str("veil-kit: error: ");
}

/// Ends an error line and exits with status 2.
pub fn end_error() -> ! {
    write_str("\n");
    crate::arch::exit(crate::EXIT_ERROR)
}
