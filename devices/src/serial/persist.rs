//! What the UART carries through a migration: its registers and receive FIFO, and the host
//! input still waiting beyond the FIFO. Its host end (output, input) is the target's own.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::{IrqTrigger, Serial, SerialError, SerialRegisters};
use crate::host_console::INPUT_CAPACITY;
use crate::persist::Persist;

/// The UART's saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub registers: SerialRegisters,
    /// Host bytes beyond the FIFO the guest had not read yet (at most 16 KiB).
    #[serde(default)]
    pub pending_input: Vec<u8>,
}

/// What the restoring side supplies: the interrupt line and where output goes.
pub struct SerialRestoreArgs {
    pub trigger: IrqTrigger,
    pub output: Box<dyn Write + Send>,
}

impl Persist for Serial {
    type State = SerialState;
    type ConstructorArgs = SerialRestoreArgs;
    type Error = SerialError;

    fn save(&self) -> SerialState {
        SerialState {
            registers: self.registers(),
            pending_input: self.pending.to_vec(),
        }
    }

    fn restore(args: SerialRestoreArgs, state: &SerialState) -> Result<Self, SerialError> {
        if state.pending_input.len() > INPUT_CAPACITY {
            return Err(SerialError::BadState(format!(
                "{} bytes of waiting input, more than the {INPUT_CAPACITY} a UART holds",
                state.pending_input.len()
            )));
        }
        let mut serial = Serial::with_registers(args.trigger, args.output, &state.registers)?;
        serial.pending.push(&state.pending_input);
        Ok(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn registers_and_waiting_input_survive_a_round_trip_and_an_oversized_state_is_refused() {
        let mut serial = Serial::new(IrqTrigger::new().unwrap(), Box::new(std::io::sink()));
        // The guest sets the scratch register; the host types more than the FIFO holds.
        serial.write(7, &[0x5a]);
        let typed: Vec<u8> = (0..100u8).collect();
        assert_eq!(serial.receive(&typed), typed.len());
        let state = serial.save();
        let json = serde_json::to_string(&state).unwrap();
        let state: SerialState = serde_json::from_str(&json).unwrap();
        let args = || SerialRestoreArgs {
            trigger: IrqTrigger::new().unwrap(),
            output: Box::new(std::io::sink()),
        };
        let mut restored = Serial::restore(args(), &state).unwrap();
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        // Every byte arrives, in order: the FIFO's first, then what waited beyond it.
        let mut got = Vec::new();
        for _ in 0..typed.len() {
            let mut lsr = [0u8];
            restored.read(5, &mut lsr);
            assert_ne!(lsr[0] & 1, 0, "data ready after {} bytes", got.len());
            let mut byte = [0u8];
            restored.read(0, &mut byte);
            got.push(byte[0]);
            restored.fill_fifo();
        }
        assert_eq!(got, typed);

        let oversized = SerialState {
            pending_input: vec![0; INPUT_CAPACITY + 1],
            ..state
        };
        assert!(Serial::restore(args(), &oversized).is_err());
    }
}
