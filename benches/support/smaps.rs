//! A process's mappings as `/proc/PID/smaps` lists them, for telling guest RAM apart from what
//! the VMM itself keeps resident.

/// One mapping's size and resident memory, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub size_kib: u64,
    pub rss_kib: u64,
}

/// Every mapping of process `pid`, in address order.
pub fn mappings(pid: u32) -> Result<Vec<Mapping>, String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("cannot read /proc/{pid}/smaps: {e}"))?;
    Ok(parse(&smaps))
}

/// The `Size:` and `Rss:` lines of smaps text; each `Size:` opens a mapping.
fn parse(smaps: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let kib = |f: Option<&str>| f.and_then(|k| k.parse::<u64>().ok()).unwrap_or(0);
        match fields.next() {
            Some("Size:") => mappings.push(Mapping {
                size_kib: kib(fields.next()),
                rss_kib: 0,
            }),
            Some("Rss:") => {
                if let Some(m) = mappings.last_mut() {
                    m.rss_kib = kib(fields.next());
                }
            }
            _ => {}
        }
    }
    mappings
}
