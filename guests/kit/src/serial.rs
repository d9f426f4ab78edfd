//! Output on COM1.
//!
//! Bytes go straight to the transmit register without polling the line status: every port
//! access is a VM exit (~19 us on the project's hosts) and the VMM's UART never backs up.

use crate::arch::outb;
use veil_guest_abi::COM1_PORT;

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
