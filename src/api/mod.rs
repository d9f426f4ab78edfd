//! The control API: JSON lines over a UNIX socket.
//!
//! One request per line, one response per line:
//!
//! ```text
//! -> {"command":"status"}
//! <- {"ok":true,"result":{"state":"running","vcpus":1,...}}
//! -> {"command":"frobnicate"}
//! <- {"ok":false,"error":"Malformed request: unknown variant `frobnicate`, ..."}
//! ```
//!
//! Commands: `status`, `pause`, `resume`, `shutdown`. See `docs/api.md`.

mod client;
mod protocol;
mod server;
mod status;

pub use client::{ApiClient, ClientError};
pub use protocol::{MigrationTarget, Request, Response};
pub use server::{ApiServer, BoundApi, ServerError};
pub use status::{PageStateSummary, SevStatus, VmStatus};
