//! The live progress bar of `veil ctl migrate`: it polls the VMM's status on a second API
//! connection while the migrate request waits on the first.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use veil::api::{ApiClient, Request};

const POLL: Duration = Duration::from_millis(200);

/// Draws until dropped.
pub struct MigrationBar {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MigrationBar {
    /// Starts drawing on stderr; `None` when stderr is not a terminal (logs stay clean).
    pub fn start(api_socket: &Path) -> Option<Self> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let mut client = ApiClient::connect(api_socket).ok()?;
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Acquire) {
                match client.request(&Request::Status) {
                    Ok(r) => show(&bar, &r.result.unwrap_or(Value::Null)["migration"]),
                    Err(_) => break,
                }
                std::thread::sleep(POLL);
            }
            bar.finish_and_clear();
        });
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MigrationBar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One frame of the bar from the status API's `migration` section.
fn show(bar: &ProgressBar, m: &Value) {
    let number = |key: &str| m[key].as_u64().unwrap_or(0);
    let float = |key: &str| m[key].as_f64().unwrap_or(0.0);
    let (sent, left) = (number("pages_sent"), number("pages_left"));
    bar.set_length(sent + left);
    bar.set_position(sent);
    bar.set_message(describe(
        m["phase"].as_str().unwrap_or("?"),
        number("passes"),
        number("bytes_sent"),
        left * 4096,
        float("rate"),
        float("dirty_rate"),
    ));
    bar.tick();
}

/// `pass 3 | sent 412 MiB | left 12 MiB | 580 MiB/s | dirtying 40 MiB/s | ETA 0.1 s`
fn describe(phase: &str, passes: u64, sent: u64, left: u64, rate: f64, dirty_rate: f64) -> String {
    let stage = match phase {
        "handshake" => "connecting".to_string(),
        "waiting-for-ready" => "waiting for the guest to become migratable".to_string(),
        "first-pass" => "first pass".to_string(),
        "dirty-passes" => format!("pass {}", passes + 1),
        "stop-and-copy" => "stop-and-copy (guest paused)".to_string(),
        other => other.to_string(),
    };
    let eta = if rate > 0.0 {
        format!("ETA {:.1} s", left as f64 / rate)
    } else {
        "ETA ?".to_string()
    };
    format!(
        "{stage} | sent {} | left {} | {}/s | dirtying {}/s | {eta}",
        bytes(sent as f64),
        bytes(left as f64),
        bytes(rate),
        bytes(dirty_rate),
    )
}

/// `4.4 MiB`: binary units, one decimal.
pub fn bytes(value: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = value.max(0.0);
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_where_the_migration_is() {
        assert_eq!(
            describe(
                "dirty-passes",
                2,
                3 << 20,
                1 << 20,
                2.0 * 1048576.0,
                512.0 * 1024.0
            ),
            "pass 3 | sent 3.0 MiB | left 1.0 MiB | 2.0 MiB/s | dirtying 512.0 KiB/s | ETA 0.5 s"
        );
        assert!(describe("first-pass", 0, 0, 10, 0.0, 0.0).ends_with("ETA ?"));
        assert_eq!(bytes(1023.0), "1023 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
    }
}
