//! What a vsock device carries through a migration: its CID. Connections do not travel:
//! the restored device owes the guest a TRANSPORT_RESET event (as Firecracker's does after a
//! snapshot), sent as soon as the driver's event queue has a buffer, and host programs
//! connect again on the target.
//!
//! The target listens at the socket path when it restores: on a filesystem both ends see,
//! the source hands the path over first with [`Vsock::release_socket`], or the target is
//! given a path of its own.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Vsock, VsockConfig, VsockError};
use crate::persist::Persist;

/// A vsock device's saved state; the queues travel with the transport's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID, which the guest has in its configuration space.
    pub guest_cid: u64,
}

/// Where the restoring side listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockRestoreArgs {
    /// The UNIX socket on this host (the source's path, or one mapped to it).
    pub uds_path: PathBuf,
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockRestoreArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    fn restore(args: VsockRestoreArgs, state: &VsockState) -> Result<Self, VsockError> {
        let mut vsock = Self::new(VsockConfig::new(state.guest_cid, args.uds_path))?;
        vsock.transport_reset_pending = true;
        Ok(vsock)
    }
}
