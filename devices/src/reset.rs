//! The two ways a PC guest asks to be reset: the reset control register at 0xcf9 (Linux
//! `reboot=pci`) and the i8042 keyboard controller's pulse-reset command (Linux's default).

use crate::BusDevice;

/// Bit 2 of the reset control register: reset the CPU.
const RST_CPU: u8 = 1 << 2;
/// i8042 command: pulse output line 0, which is wired to CPU reset.
const I8042_CMD_RESET: u8 = 0xfe;

/// Calls back when the guest requests a reset.
pub struct ResetPort {
    kind: ResetKind,
    on_reset: Box<dyn Fn() + Send>,
}

#[derive(Debug, Clone, Copy)]
enum ResetKind {
    ControlRegister,
    KeyboardController,
}

impl ResetPort {
    /// The reset control register (port 0xcf9, one byte).
    pub fn control_register(on_reset: impl Fn() + Send + 'static) -> Self {
        Self {
            kind: ResetKind::ControlRegister,
            on_reset: Box::new(on_reset),
        }
    }

    /// The i8042 command/status port (0x64, one byte): only the reset command does anything.
    pub fn keyboard_controller(on_reset: impl Fn() + Send + 'static) -> Self {
        Self {
            kind: ResetKind::KeyboardController,
            on_reset: Box::new(on_reset),
        }
    }
}

impl BusDevice for ResetPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // i8042 status: both buffers empty, so a driver waiting to send never spins.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let reset = offset == 0
            && match self.kind {
                ResetKind::ControlRegister => value & RST_CPU != 0,
                ResetKind::KeyboardController => value == I8042_CMD_RESET,
            };
        if reset {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn only_reset_commands_reset() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let mut cf9 = ResetPort::control_register(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        cf9.write(0, &[0x2]);
        cf9.write(0, &[0x6]);
        let c = count.clone();
        let mut kbd = ResetPort::keyboard_controller(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        kbd.write(0, &[0xd1]);
        kbd.write(0, &[0xfe]);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
