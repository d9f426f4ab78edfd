//! What a console carries through a migration: the input the guest has not taken yet. The
//! queues travel with the transport's state; the host end is the restoring side's own.

use serde::{Deserialize, Serialize};

use super::{Console, ConsoleError};
use crate::host_console::{ConsoleIo, INPUT_CAPACITY};
use crate::persist::Persist;

/// A console's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Host input not yet in the guest's receive buffers, oldest first.
    pub pending_input: Vec<u8>,
}

impl Persist for Console {
    type State = ConsoleState;
    /// The host end on the restoring side.
    type ConstructorArgs = ConsoleIo;
    type Error = ConsoleError;

    fn save(&self) -> ConsoleState {
        ConsoleState {
            pending_input: self.pending.to_vec(),
        }
    }

    fn restore(io: ConsoleIo, state: &ConsoleState) -> Result<Self, ConsoleError> {
        let len = state.pending_input.len();
        if len > INPUT_CAPACITY {
            return Err(ConsoleError::PendingTooLong { len });
        }
        let mut console = Self::new(io)?;
        console.pending.push(&state.pending_input);
        Ok(console)
    }
}
