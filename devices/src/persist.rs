//! The save/restore contract devices follow, after Firecracker's `Persist`.
//!
//! A device's saved state is plain data that serde can carry in the migration State message;
//! what cannot travel (files, eventfds, guest memory) comes from the restoring side as
//! constructor arguments. Restore checks the state against those arguments, since a peer's
//! state is as untrusted as a guest's registers.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Saving a device's state and building a device again from it.
pub trait Persist: Sized {
    /// What travels.
    type State: Serialize + DeserializeOwned;
    /// What the restoring side supplies.
    type ConstructorArgs;
    /// Why a state cannot be restored.
    type Error: std::error::Error;

    /// The device's state; call it only while the device is quiesced.
    fn save(&self) -> Self::State;

    /// A device in `state`, built from `args`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
