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
            target,
            downtime_ms,
            timeout_s,
            wait_ready,
            connections,
            sev_trust_chain,
            no_progress: _,
        } => Request::Migrate {
            target: target.request(),
            downtime_ms: Some(*downtime_ms),
            timeout_s: *timeout_s,
            wait_ready_ms: wait_ready.map(|d| d.as_millis() as u64),
            connections: connections.map(usize::from),
            // Read by the VMM, which may run elsewhere in the filesystem: make it absolute.
            sev_trust_chain: sev_trust_chain.as_ref().map(|p| {
                std::path::absolute(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string()
            }),
        },
        CtlCommand::MigrateCancel => Request::MigrateCancel,
        // Read and written by the VMM, which may run elsewhere in the filesystem.
        CtlCommand::Snapshot {
            to,
            stop,
            diff,
            live,
            sev_target_chain,
        } => Request::Snapshot {
            to: absolute(to),
            stop: *stop,
            diff: *diff,
            live: *live,
            sev_target_chain: sev_target_chain.as_ref().map(absolute),
        },
        CtlCommand::MigrateRecover { target, run_on } => Request::MigrateRecover {
            target: target.request(),
            run_on: *run_on,
        },
    };
    let mut client = ApiClient::connect(&args.api_socket)?;
    let progress = match &args.command {
        CtlCommand::Migrate { no_progress, .. } if !no_progress && !args.json => {
            crate::progress::MigrationBar::start(&args.api_socket)
        }
        _ => None,
    };
    // Ctrl-C on a migration cancels it (the guest stays here) rather than leaving it running
    // unwatched in the VMM.
    let cancel_on_signal = match &args.command {
        CtlCommand::Migrate { .. } => Some(CancelOnSignal::install(&args.api_socket)?),
        _ => None,
    };
    let response = client.request(&request);
    drop(cancel_on_signal);
    drop(progress);
    let response = response?;
    if !response.ok {
        return Err(Box::new(Refused(response.error.unwrap_or_default())));
    }
    let result = response.result.unwrap_or(Value::Null);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else if matches!(args.command, CtlCommand::Status) {
        print_status(&result);
    } else if matches!(args.command, CtlCommand::Migrate { .. }) {
        print_migration_report(&result);
    } else if matches!(args.command, CtlCommand::Snapshot { .. }) {
        print_snapshot_report(&result);
    } else if matches!(args.command, CtlCommand::MigrateCancel) {
        println!("cancelling the migration");
    } else if matches!(args.command, CtlCommand::MigrateRecover { .. }) {
        if result["runs_on"] == "target" {
            println!("the target runs the guest: this VMM stops");
        } else {
            println!("the target discarded the guest: it runs here again");
        }
    } else {
        println!("{}", result["state"].as_str().unwrap_or("done"));
    }
    Ok(ExitCode::SUCCESS)
}

fn absolute(path: &std::path::PathBuf) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.clone())
        .display()
        .to_string()
}

fn print_snapshot_report(r: &Value) {
    let ram = crate::progress::bytes(r["memory_bytes"].as_u64().unwrap_or(0) as f64);
    let dirty = r["dirty_pages"].as_u64().unwrap_or(0);
    let what = match (r["diff_of"].as_str(), r["live"].as_bool().unwrap_or(false)) {
        (Some(parent), _) => format!("a diff on top of {parent}, {dirty} pages dirtied since"),
        (None, true) => format!("{ram} of RAM written live, {dirty} pages again in the pause"),
        (None, false) => format!("{ram} of RAM"),
    };
    println!(
        "saved to {} in {:.0} ms (paused {:.1} ms): {what}, {} pages written, {} private pages through the SEV firmware{}",
        r["dir"].as_str().unwrap_or("?"),
        r["total_ms"].as_f64().unwrap_or(0.0),
        r["paused_ms"].as_f64().unwrap_or(0.0),
        r["pages_written"].as_u64().unwrap_or(0),
        r["private_pages"].as_u64().unwrap_or(0),
        if r["stopped"].as_bool().unwrap_or(false) {
            "; the VM stopped"
        } else {
            ""
        }
    );
}

/// Sends `migrate-cancel` when SIGINT or SIGTERM arrives, until dropped.
struct CancelOnSignal {
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CancelOnSignal {
    fn install(api_socket: &std::path::Path) -> Result<Self, Box<dyn Error>> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let socket = api_socket.to_path_buf();
        let thread = std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                eprintln!("veil: cancelling the migration; the guest stays here");
                let cancelled = ApiClient::connect(&socket)
                    .and_then(|mut c| c.request(&Request::MigrateCancel));
                if let Err(e) = cancelled {
                    eprintln!("veil: cannot cancel: {}", veil::error_chain(&e));
                }
            }
        });
        Ok(Self {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for CancelOnSignal {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn print_migration_report(r: &Value) {
    use std::io::Write;
    // The migration has happened either way: a closed stdout must not turn it into a panic.
    let mut out = std::io::stdout().lock();
    let number = |key: &str| r[key].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "migrated to {} over {} in {:.0} ms (downtime {:.1} ms)",
        r["to"].as_str().unwrap_or("?"),
        r["transport"].as_str().unwrap_or("?"),
        r["total_ms"].as_f64().unwrap_or(0.0),
        r["downtime_ms"].as_f64().unwrap_or(0.0),
    );
    let _ = writeln!(
        out,
        "  {} on the wire over {} {}, {} dirty passes after the first full one",
        crate::progress::bytes(number("bytes") as f64),
        number("connections"),
        if number("connections") == 1 {
            "connection"
        } else {
            "connections"
        },
        number("passes")
    );
    let _ = writeln!(
        out,
        "  {} pages sent: {} private through the SEV firmware, {} in the clear ({} of them zero); {} re-sent",
        number("pages_sent"),
        number("private_pages"),
        number("clear_pages"),
        number("zero_pages"),
        number("pages_resent")
    );
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
    for d in s["devices"].as_array().into_iter().flatten() {
        let backing = match (d["path"].as_str(), d["read_only"].as_bool()) {
            (Some(path), Some(true)) => format!(", {path} (read-only)"),
            (Some(path), _) => format!(", {path}"),
            _ => String::new(),
        };
        println!(
            "device             {} {} at {:#x} irq {}, driver status {:#x}, {} refused accesses{backing}",
            d["kind"].as_str().unwrap_or("?"),
            d["name"].as_str().unwrap_or("?"),
            d["mmio_base"].as_u64().unwrap_or(0),
            d["irq"],
            d["driver_status"].as_u64().unwrap_or(0),
            d["refused_accesses"],
        );
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
