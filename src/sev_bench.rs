//! How fast this host's SEV firmware moves private pages: SEND_UPDATE_DATA and
//! RECEIVE_UPDATE_DATA timed one page at a time, as a migration issues them.
//!
//! The PSP's rate is the real limit of SEV migration (every private page goes through it twice,
//! once per host) and AMD publishes none, so `veil sev bench-transport` measures it: it launches
//! a throwaway SEV guest (a context with its own RAM, no vCPUs: plain SEV needs none to be
//! launched, sent or received), sends each of its pages with SEND_UPDATE_DATA to a second
//! context on the same platform, and receives them there with RECEIVE_UPDATE_DATA into that
//! context's RAM. On hardware each context is a KVM VM of its own.

use std::time::{Duration, Instant};

use serde::Serialize;
use veil_sev::firmware::{FirmwareError, GuestBytes};
use veil_sev::flow::{Launch, Receiver, Sender};
use veil_sev::guest_memory::test_ram::TestRam;
use veil_sev::guest_memory::PAGE_SIZE;
use veil_sev::policy::GuestPolicy;

use crate::sev_launch::{open_platform, SevLaunchError, SevPlatform};

/// The most pages one run sends (1 GiB of guest RAM, held twice in host memory).
pub const MAX_PAGES: usize = 1 << 18;

/// Errors timing the transport commands.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("Cannot open the SEV platform")]
    Platform(#[from] SevLaunchError),
    #[error("The SEV firmware failed during the benchmark")]
    Firmware(#[from] FirmwareError),
    #[error("Give 1 to {MAX_PAGES} pages, not {0}")]
    Pages(usize),
    #[error("Page {gfn:#x} arrived different from what was sent")]
    Corrupted { gfn: usize },
}

/// One command's timing.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub pages: usize,
    pub seconds: f64,
    pub pages_per_second: f64,
    pub mib_per_second: f64,
}

impl Rate {
    fn new(pages: usize, took: Duration) -> Self {
        let seconds = took.as_secs_f64().max(1e-9);
        let pages_per_second = pages as f64 / seconds;
        Self {
            pages,
            seconds,
            pages_per_second,
            mib_per_second: pages_per_second * PAGE_SIZE as f64 / f64::from(1 << 20),
        }
    }
}

/// What `veil sev bench-transport` reports.
#[derive(Debug, Clone, Serialize)]
pub struct TransportBench {
    /// `false` for the emulated platform: its rate is Veil's software crypto, not a PSP's.
    pub confidential: bool,
    pub api_major: u8,
    pub api_minor: u8,
    pub build: u8,
    pub send_update_data: Rate,
    pub receive_update_data: Rate,
    /// Whether the received pages were compared with the sent ones (only possible where the
    /// platform leaves them in plaintext: the emulated one).
    pub compared: bool,
}

/// Sends `pages` pages of a throwaway guest through `platform` and receives them again.
pub fn transport(platform: &SevPlatform, pages: usize) -> Result<TransportBench, BenchError> {
    if pages == 0 || pages > MAX_PAGES {
        return Err(BenchError::Pages(pages));
    }
    let mut source = open_platform(platform)?;
    let mut target = open_platform(platform)?;
    let status = source.platform_status()?;
    let chain = target.certificate_chain()?;
    let size = pages * PAGE_SIZE as usize;
    let (sent, arrived) = (TestRam::with_size(size), TestRam::with_size(size));
    for gfn in 0..pages {
        sent.write(gfn as u64 * PAGE_SIZE, &(gfn as u64).to_le_bytes());
    }
    source.register_ram(&sent.all())?;
    target.register_ram(&arrived.all())?;

    let mut launch = Launch::start(source.as_mut(), GuestPolicy(GuestPolicy::NODBG), None)?;
    launch.update_data(&page(&sent, 0))?;
    let guest = launch.measure()?.finish()?;

    let (mut sender, start) = Sender::start(source.as_mut(), guest, &chain)?;
    let began = Instant::now();
    let packets = (0..pages)
        .map(|gfn| sender.update_data(&page(&sent, gfn)))
        .collect::<Result<Vec<_>, _>>()?;
    let send = Rate::new(pages, began.elapsed());
    sender.finish()?;

    let mut receiver = Receiver::start(target.as_mut(), &start)?;
    let began = Instant::now();
    for (gfn, packet) in packets.iter().enumerate() {
        receiver.update_data(packet.as_ref(), &page(&arrived, gfn))?;
    }
    let receive = Rate::new(pages, began.elapsed());
    receiver.finish()?;

    let compared = !status.confidential;
    if compared {
        if let Some(gfn) = (0..pages).find(|&gfn| {
            let at = gfn as u64 * PAGE_SIZE;
            sent.read(at, PAGE_SIZE as usize) != arrived.read(at, PAGE_SIZE as usize)
        }) {
            return Err(BenchError::Corrupted { gfn });
        }
    }
    Ok(TransportBench {
        confidential: status.confidential,
        api_major: status.api_major,
        api_minor: status.api_minor,
        build: status.build,
        send_update_data: send,
        receive_update_data: receive,
        compared,
    })
}

/// Page `gfn` of `ram`.
fn page(ram: &TestRam, gfn: usize) -> GuestBytes<'_> {
    ram.at(gfn as u64 * PAGE_SIZE, PAGE_SIZE as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emulated_platform_moves_every_page_intact_and_reports_both_rates() {
        let dir = std::env::temp_dir().join(format!("veil-bench-{}", std::process::id()));
        let platform = SevPlatform::Emulated {
            state_dir: dir.clone(),
        };
        let bench = transport(&platform, 32).unwrap();
        assert!(!bench.confidential && bench.compared);
        assert_eq!(bench.send_update_data.pages, 32);
        assert!(bench.receive_update_data.pages_per_second > 0.0);
        assert!(matches!(transport(&platform, 0), Err(BenchError::Pages(0))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
