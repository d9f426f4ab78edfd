//! `veil ctl`: one request to a running VMM, its answer printed for people or as JSON.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use veil::api::{ApiClient, Request};

use crate::cli::{CtlArgs, CtlCommand};

/// The VMM answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("The VMM refused the request: {0}")]
struct Refused(String);

pub fn run(args: CtlArgs) -> Result<ExitCode, Box<dyn Error>> {
    let request = match &args.command {
        CtlCommand::Status => Request::Status,
        CtlCommand::Pause => Request::Pause,
        CtlCommand::Resume => Request::Resume,
        CtlCommand::Shutdown => Request::Shutdown,
        CtlCommand::Migrate {
            to,
            downtime_ms,
            insecure,
            wait_ready,
            sev_trust_chain,
        } => Request::Migrate {
            to: to.clone(),
            downtime_ms: Some(*downtime_ms),
            insecure: *insecure,
            wait_ready_ms: wait_ready.map(|d| d.as_millis() as u64),
            // Read by the VMM, which may run elsewhere in the filesystem: make it absolute.
            sev_trust_chain: sev_trust_chain.as_ref().map(|p| {
                std::path::absolute(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string()
            }),
        },
        CtlCommand::MigrateCancel => Request::MigrateCancel,
    };
    let response = ApiClient::connect(&args.api_socket)?.request(&request)?;
    if !response.ok {
        return Err(Box::new(Refused(response.error.unwrap_or_default())));
    }
    let result = response.result.unwrap_or(Value::Null);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else if matches!(args.command, CtlCommand::Status) {
        print_status(&result);
    } else if matches!(args.command, CtlCommand::Migrate { .. }) {
        println!(
            "migrated to {} in {:.0} ms (downtime {:.1} ms): {} bytes, {} dirty passes, {} pages sent ({} zero, {} re-sent)",
            result["to"].as_str().unwrap_or("?"),
            result["total_ms"].as_f64().unwrap_or(0.0),
            result["downtime_ms"].as_f64().unwrap_or(0.0),
            result["bytes"],
            result["passes"],
            result["pages_sent"],
            result["zero_pages"],
            result["pages_resent"]
        );
    } else if matches!(args.command, CtlCommand::MigrateCancel) {
        println!("cancelling the migration");
    } else {
        println!("{}", result["state"].as_str().unwrap_or("done"));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &Value) {
    println!("state              {}", s["state"].as_str().unwrap_or("?"));
    println!("vCPUs              {}", s["vcpus"]);
    let mib = s["memory_bytes"].as_u64().unwrap_or(0) >> 20;
    match s["memory_file"].as_str() {
        Some(file) => println!("memory             {mib} MiB, backed by {file}"),
        None => println!("memory             {mib} MiB"),
    }
    let m = &s["migratability"];
    match m["state"].as_str() {
        Some("migratable") => println!("migration          allowed"),
        Some(kind) => {
            let label = if kind == "permanently-blocked" {
                "permanently blocked"
            } else {
                "temporarily blocked"
            };
            for (i, b) in m["reasons"].as_array().into_iter().flatten().enumerate() {
                let head = if i == 0 {
                    format!("migration          {label}:")
                } else {
                    " ".repeat(19) + " and"
                };
                println!(
                    "{head} {} since {}{}",
                    b["message"].as_str().unwrap_or("?"),
                    since(&b["since"]),
                    vcpu(&b["vcpu"])
                );
            }
        }
        None => {}
    }
    println!(
        "migration control  {:#x}",
        s["migration_control"].as_u64().unwrap_or(0)
    );
    if let Some(sev) = s["sev"].as_object() {
        let memory = if sev["confidential"].as_bool() == Some(true) {
            "encrypted"
        } else {
            "NOT encrypted (emulated platform: no confidentiality)"
        };
        println!(
            "SEV                {} platform, policy {:#x}, memory {memory}",
            sev["platform"].as_str().unwrap_or("?"),
            sev["policy"].as_u64().unwrap_or(0)
        );
        println!(
            "launch measurement {}",
            sev["measurement"].as_str().unwrap_or("?")
        );
    }
    let m = &s["migration"];
    match m["phase"].as_str() {
        Some("idle") | None => {}
        Some(phase) => println!(
            "migration progress {phase}: {} bytes, {} pages sent, {} left, {} dirty passes{}",
            m["bytes_sent"],
            m["pages_sent"],
            m["pages_left"],
            m["passes"],
            m["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ),
    }
    match s["page_states"].as_object() {
        None => {
            println!("page states        none (memory is not encrypted: every page is plain data)")
        }
        Some(p) => {
            let ranges: Vec<String> = p["shared_ranges"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    format!(
                        "{:#x}..{:#x}",
                        r[0].as_u64().unwrap_or(0),
                        r[1].as_u64().unwrap_or(0)
                    )
                })
                .collect();
            println!(
                "page states        {} shared pages in {} runs{}{}",
                p["shared_pages"],
                p["shared_runs"],
                if ranges.is_empty() { "" } else { ": " },
                ranges.join(", ")
            );
        }
    }
}

fn since(t: &Value) -> String {
    let secs = t.as_f64().unwrap_or(0.0);
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0));
    let ago = SystemTime::now().duration_since(at).unwrap_or_default();
    format!(
        "{} ({:.1} s ago)",
        humantime::format_rfc3339_seconds(at),
        ago.as_secs_f64()
    )
}

fn vcpu(v: &Value) -> String {
    v.as_u64()
        .map(|n| format!(", vCPU {n}"))
        .unwrap_or_default()
}
