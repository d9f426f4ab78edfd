//! Live migration of Veil guests between hosts.
//!
//! - [`protocol`]: framing, messages, limits and the order both sides must keep.
//! - [`sender`]: pre-copy of a running guest, plain or SEV, over any byte stream.
//! - [`receiver`]: accepting a guest, filling a new VM's memory, and running it only once the
//!   source has let go.
//!
//! - [`snapshot`]: a paused VM saved into a directory, and VMs restored from it.
//! - [`duplex`]: writes that stop when the peer speaks, so a failing target is heard at once.
//! - [`recovery`]: a source left in doubt by a lost Complete asks the target, and resumes the
//!   guest only if the target has discarded it for good.
//! - [`monitor`]: progress and cancel for a migration under way.
//! - [`transport`]: UNIX sockets, TCP with mutual TLS ([`tls`]), and plain TCP only when
//!   explicitly insecure.

mod data_streams;
pub mod duplex;
mod holes;
pub mod monitor;
mod page_bits;
mod page_writer;
pub mod protocol;
pub mod receiver;
pub mod recovery;
pub mod sender;
mod sender_streams;
pub mod snapshot;
pub mod tls;
pub mod transport;

/// An error and its causes on one line: the reason that travels to the peer, and what both
/// sides print.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
