//! The API's messages.

use serde::{Deserialize, Serialize};
use veil_migration::transport::{Endpoint, Security, TransportError};

/// Longest request line the server reads; longer ones are refused without being buffered.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// VM state, vCPUs, memory, migratability and the page-state summary.
    Status,
    /// Park every vCPU.
    Pause,
    /// Let parked vCPUs run.
    Resume,
    /// Stop the VM; `veil run` then exits.
    Shutdown,
    /// Live-migrate the guest to a `veil receive` at `to` (`unix:PATH` or `tcp:HOST:PORT`);
    /// answers when it is done, with a report, or with the reason it failed.
    Migrate {
        #[serde(flatten)]
        target: MigrationTarget,
        #[serde(default)]
        downtime_ms: Option<u64>,
        /// Give up after this many seconds; the guest stays here.
        #[serde(default)]
        timeout_s: Option<u64>,
        /// Wait this long for a temporarily blocked guest instead of refusing at once.
        #[serde(default)]
        wait_ready_ms: Option<u64>,
        /// Connections to spread the pages over (at most 16); by default what fits the host.
        #[serde(default)]
        connections: Option<usize>,
        /// For an SEV guest: a certificate chain file (as `veil sev export-chain` writes)
        /// whose ARK is trusted as a target root, besides AMD's.
        #[serde(default)]
        sev_trust_chain: Option<String>,
    },
    /// Stop the migration under way; the guest keeps running here.
    MigrateCancel,
    /// Save the guest into the directory `to` (absolute; created if missing, and holding no
    /// snapshot yet), then resume it, or stop the VM with `stop`.
    Snapshot {
        to: String,
        #[serde(default)]
        stop: bool,
        /// Only the pages written since this VM's last snapshot, on top of it.
        #[serde(default)]
        diff: bool,
        /// Memory written while the guest runs; paused only for what it wrote meanwhile.
        #[serde(default)]
        live: bool,
        /// For an SEV guest: the certificate chain file (as `veil sev export-chain` writes) of
        /// the platform that is to restore it; by default this platform's own.
        #[serde(default)]
        sev_target_chain: Option<String>,
    },
    /// After a migration left in doubt (Complete sent, never confirmed): settle with the
    /// target at `to` where the guest runs. `run_on: "source"` resumes it here only if the
    /// target has discarded it for good; `"target"` has the target run it unless it was
    /// discarded, and this VMM then stops. By default "source", or "target" for an SEV guest
    /// (which cannot resume here after SEND_FINISH). Same transport options as `migrate`.
    MigrateRecover {
        #[serde(flatten)]
        target: MigrationTarget,
        #[serde(default)]
        run_on: Option<veil_migration::recovery::RunOn>,
    },
}

/// Where a migration goes and how the target is authenticated (the fields of `migrate` and
/// `migrate-recover`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationTarget {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    pub to: String,
    /// Allow plain TCP.
    #[serde(default)]
    pub insecure: bool,
    /// Mutual TLS: this host's certificate and key and the CA for the target (absolute
    /// paths, read by the VMM).
    #[serde(default)]
    pub tls: Option<veil_migration::tls::TlsFiles>,
    /// The name the target's certificate must carry, if not the host in `to`.
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

impl MigrationTarget {
    /// The endpoint and the security the transport needs.
    pub fn endpoint(self) -> Result<(Endpoint, Security), TransportError> {
        let endpoint = self.to.parse()?;
        let security = Security {
            tls: self.tls,
            insecure: self.insecure,
            server_name: self.tls_server_name,
        };
        Ok((endpoint, security))
    }
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn success(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn failure(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        for r in [
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::Shutdown,
        ] {
            let text = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
    }

    #[test]
    fn a_snapshot_request_needs_only_its_directory() {
        let r: Request = serde_json::from_str(r#"{"command":"snapshot","to":"/snaps/a"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                to: "/snaps/a".into(),
                stop: false,
                diff: false,
                live: false,
                sev_target_chain: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"snapshot"}"#).is_err());
    }

    #[test]
    fn malformed_requests_do_not_parse() {
        for bad in [
            "",
            "{}",
            r#"{"command":"frobnicate"}"#,
            r#"{"command":7}"#,
            "[1,2]",
            "\u{0}",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad:?}");
        }
    }
}
