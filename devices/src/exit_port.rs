//! A port through which a guest stops the VM with a status (see `veil_guest_abi::EXIT_PORT`).

use crate::BusDevice;

/// Calls back with the status byte the guest wrote.
pub struct ExitPort {
    on_exit: Box<dyn Fn(u8) + Send>,
}

impl ExitPort {
    /// Ports the device occupies (one, like QEMU's `isa-debug-exit,iosize=1`).
    pub const LEN: u64 = 1;

    /// A port that reports the guest's status to `on_exit`.
    pub fn new(on_exit: impl Fn(u8) + Send + 'static) -> Self {
        Self {
            on_exit: Box::new(on_exit),
        }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(&status) = data.first() {
                (self.on_exit)(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reports_the_low_byte_written_at_offset_zero() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut port = ExitPort::new(move |s| sink.lock().unwrap().push(s));
        port.write(0, &[3, 0, 0, 0]);
        port.write(1, &[9]);
        assert_eq!(*seen.lock().unwrap(), vec![3]);
    }
}
