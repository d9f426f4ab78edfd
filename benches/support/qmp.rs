//! A QMP client (JSON lines on a UNIX socket), for the benches that drive QEMU.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Proc;

/// How long QEMU has to serve its QMP socket after it was started.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP connection, out of negotiation mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects once `qemu` serves the socket at `path`, reads the greeting and leaves
    /// negotiation mode. A QEMU that exits first is the error, with its log. Each answer
    /// has `reply_timeout` to arrive.
    pub fn connect(path: &Path, qemu: &mut Proc, reply_timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let stream = loop {
            qemu.check_alive()?;
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    return Err(format!(
                        "QMP {}: {e}; QEMU log: {}",
                        path.display(),
                        qemu.stderr_tail()
                    ))
                }
            }
        };
        stream
            .set_read_timeout(Some(reply_timeout))
            .map_err(|e| format!("QMP socket: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        qmp.read()?;
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value (events in between are skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let mut answer = self.read()?;
            if let Some(error) = answer.get("error") {
                return Err(format!("QMP {command} failed: {error}"));
            }
            if let Some(value) = answer.get_mut("return") {
                return Ok(value.take());
            }
        }
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QEMU closed its QMP socket".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP sent `{line}`: {e}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }
}
