//! Live migration of Veil guests between hosts.
//!
//! So far: the wire protocol ([`protocol`]) — framing, messages, limits and the order both
//! sides must keep — as pure code without I/O policy. The transport (TLS, UNIX, TCP), the
//! pre-copy sender and the receiver that applies what arrives come next; see
//! `docs/migration.md`.

pub mod protocol;
