//! Taking a snapshot of a running VM: pause the machine, write its memory and state into a
//! directory under temporary names, rename them into place, then resume (or stop) the guest.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use veil_hypervisor::memory::PAGE_SIZE;
use veil_hypervisor::paravirt::Migratability;
use veil_hypervisor::{RunState, RunningVm};
use veil_sev::firmware::{Firmware, Handle, PacketMut};
use veil_sev::policy::GuestPolicy;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::diff::{self, DiffBase, DiffFile, DIFF_FILE};
use super::file::{self, FileKind};
use super::{SnapshotError, MEMORY_FILE, PRIVATE_PAGES_FILE, STATE_FILE};
use crate::protocol::frame::encode_frame;
use crate::protocol::{
    ChunkEncoder, Features, Hello, Message, MessageType, SevPlatform, SevShape, SevStart, State,
    PROTOCOL_VERSION,
};

/// An SEV guest's firmware context, and the platform its snapshot is for.
pub struct SnapshotSev<'f> {
    pub firmware: &'f mut dyn Firmware,
    pub guest: Handle,
    pub policy: GuestPolicy,
    pub platform: SevPlatform,
    /// The platform that may restore the snapshot (its private pages are encrypted for it
    /// alone); `None`: this platform, with its own chain.
    pub target_chain: Option<sev::certs::sev::Chain>,
}

/// What to do with the guest once its snapshot is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSnapshot {
    /// Let it run on (if it was running).
    #[default]
    Resume,
    /// Stop the VM: the snapshot is the guest from now on.
    Stop,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    /// Bytes of guest RAM (the memory file's size).
    pub memory_bytes: u64,
    /// Pages written into the memory file (the others are holes that read as zero).
    pub pages_written: u64,
    /// Pages that went through the SEV firmware, into the private-pages file.
    pub private_pages: u64,
    /// How long the guest was paused.
    pub paused: Duration,
    /// From the request to the renamed files.
    pub total: Duration,
    /// For a diff: the snapshot it goes on top of.
    pub diff_of: Option<PathBuf>,
    /// For a diff: the pages dirtied since its parent, which it holds (zero ones as holes).
    /// For a live snapshot: the pages the guest wrote while the others were written, written
    /// again in the pause.
    pub dirty_pages: u64,
    /// What a later diff of this VM can be taken against: this snapshot, if the guest runs
    /// on and its writes are being logged from here.
    pub base: Option<DiffBase>,
}

/// Which pages a snapshot writes, and when.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SavePages<'b> {
    /// Every page, with the guest paused.
    #[default]
    All,
    /// Every page while the guest runs, then, paused, the pages it wrote meanwhile: the pause
    /// lasts as long as those take, not the whole of RAM. Plain guests only.
    Live,
    /// Only the pages written since `base`, a snapshot of this VM, on top of it (see
    /// [`diff`]). Plain guests only.
    DiffOf(&'b DiffBase),
}

/// Writes a snapshot of `vm` into `dir` (created if missing; it must not hold one already),
/// then resumes or stops the guest as `after` says; `pages` says which pages go and when. On
/// any failure the guest runs on as before and `dir` holds no part of a snapshot. A snapshot
/// after which the guest runs on turns dirty logging on, and its report's `base` is what a
/// diff can be taken against.
pub fn snapshot(
    vm: &RunningVm,
    dir: &Path,
    after: AfterSnapshot,
    sev: Option<SnapshotSev<'_>>,
    pages: SavePages<'_>,
) -> Result<SnapshotReport, SnapshotError> {
    let started = Instant::now();
    if vm.paravirt().page_states().is_some() != sev.is_some() {
        return Err(SnapshotError::Sev);
    }
    if sev.as_ref().is_some_and(|s| s.policy.has(GuestPolicy::ES)) {
        return Err(SnapshotError::SevEs);
    }
    match pages {
        SavePages::DiffOf(_) if sev.is_some() => return Err(SnapshotError::DiffSev),
        SavePages::Live if sev.is_some() => return Err(SnapshotError::LiveSev),
        _ => {}
    }
    if let SavePages::DiffOf(base) = pages {
        // Only the migration thread takes the log besides snapshots, and it does not run
        // while a snapshot is taken: what holds now holds at the pause.
        if base.dirty_log_epoch != vm.ram().dirty_log_epoch() {
            return Err(SnapshotError::DiffBaseStale {
                base: base.dir.clone(),
            });
        }
    }
    check_may_be_saved(vm)?;
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for name in [STATE_FILE, MEMORY_FILE, PRIVATE_PAGES_FILE, DIFF_FILE] {
        if dir.join(name).exists() {
            return Err(SnapshotError::Exists {
                path: dir.join(name),
            });
        }
    }
    let was_running = vm.run_state() == RunState::Running;
    let mut partial = Partial::new(dir);
    let memory = match pages {
        SavePages::All => MemoryPlan::All,
        SavePages::Live => MemoryPlan::Precopied(precopy(vm, &mut partial)?),
        SavePages::DiffOf(base) => MemoryPlan::DiffOf(base),
    };
    let paused = Instant::now();
    if vm.pause() != RunState::Paused {
        return Err(SnapshotError::GuestStopped);
    }
    // An SEV guest's snapshots are never diffs: its writes need not be logged.
    let may_diff_later = sev.is_none() && after == AfterSnapshot::Resume;
    let result = write_all(vm, &mut partial, sev, after, memory);
    let paused_for = paused.elapsed();
    match result {
        Ok(mut report) => {
            if may_diff_later {
                report.base = log_writes_from_here(vm, dir);
            }
            match after {
                AfterSnapshot::Stop => vm.stop(),
                AfterSnapshot::Resume if was_running => {
                    vm.resume();
                }
                AfterSnapshot::Resume => {}
            }
            report.dir = dir.to_owned();
            report.paused = paused_for;
            report.total = started.elapsed();
            Ok(report)
        }
        Err(e) => {
            drop(partial);
            if was_running {
                vm.resume();
            }
            Err(e)
        }
    }
}

/// Turns the dirty log on and empties it while the guest is still paused, so that a later
/// diff finds every write since this snapshot in it. A failure costs only the diff: the
/// snapshot stands, and the next one must be full.
fn log_writes_from_here(vm: &RunningVm, dir: &Path) -> Option<DiffBase> {
    let base = start_logging(vm).and_then(|()| {
        // Lexically, without resolving links: a later diff names its parent by this path.
        let dir = std::path::absolute(dir).map_err(|source| SnapshotError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(DiffBase {
            state_digest: diff::state_digest(&dir)?,
            dir,
            dirty_log_epoch: vm.ram().dirty_log_epoch(),
        })
    });
    match base {
        Ok(base) => Some(base),
        Err(e) => {
            tracing::warn!(
                "the next snapshot of this guest cannot be a diff: {}",
                crate::error_chain(&e)
            );
            None
        }
    }
}

/// Turns KVM's dirty log on and empties it (and the VMM's own record of its writes): from
/// here on it holds every page written.
fn start_logging(vm: &RunningVm) -> Result<(), SnapshotError> {
    let (ram, fd) = (vm.ram(), vm.fd());
    ram.set_dirty_logging(fd, true)?;
    ram.take_dirty_pages(fd)?;
    Ok(())
}

/// Calls `each` with the memory file's page index and the contents of every page written
/// since the log was last taken, and takes it again. The memory file is guest RAM region
/// after region.
fn each_dirty_page(
    vm: &RunningVm,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let memory = vm.memory();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut file_page = 0u64;
    for (region, dirty) in memory.iter().zip(vm.ram().take_dirty_pages(vm.fd())?) {
        for at in dirty.dirty_addresses() {
            memory.read_slice(&mut page, at)?;
            each(
                file_page + (at.0 - region.start_addr().0) / PAGE_SIZE,
                &page,
            )?;
        }
        file_page += region.len() / PAGE_SIZE;
    }
    Ok(())
}

/// A snapshot is refused for a guest that may not leave this VM, for the migration's reasons:
/// its policy forbids sending (NOSEND), it asked never to be migrated, it is not ready.
fn check_may_be_saved(vm: &RunningVm) -> Result<(), SnapshotError> {
    let describe = |reasons: &[veil_hypervisor::paravirt::Blocker]| {
        let parts: Vec<String> = reasons.iter().map(|r| r.reason.to_string()).collect();
        parts.join("; ")
    };
    match vm.paravirt().migratability() {
        Migratability::Migratable => Ok(()),
        Migratability::PermanentlyBlocked { reasons } => {
            Err(SnapshotError::PermanentlyBlocked(describe(&reasons)))
        }
        Migratability::TemporarilyBlocked { reasons } => {
            Err(SnapshotError::TemporarilyBlocked(describe(&reasons)))
        }
    }
}

/// Files under their temporary names, removed unless [`Partial::commit`] renamed them.
struct Partial {
    dir: PathBuf,
    written: Vec<&'static str>,
    committed: bool,
}

impl Partial {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            written: Vec::new(),
            committed: false,
        }
    }

    fn temp_path(&mut self, name: &'static str) -> PathBuf {
        self.written.push(name);
        self.dir.join(format!(".{name}.partial"))
    }

    /// Renames every file into place, the state last: a directory with a state file holds a
    /// whole snapshot.
    fn commit(&mut self) -> Result<(), SnapshotError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { path, source }
        };
        let mut names = self.written.clone();
        names.sort_by_key(|n| *n == STATE_FILE);
        for (i, name) in names.iter().enumerate() {
            let from = self.dir.join(format!(".{name}.partial"));
            if let Err(e) = std::fs::rename(&from, self.dir.join(name)) {
                // No part of a snapshot may stay: what was renamed already goes too.
                for done in &names[..i] {
                    let _ = std::fs::remove_file(self.dir.join(done));
                }
                return Err(io(&from)(e));
            }
        }
        self.committed = true;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            for name in &self.written {
                let _ = std::fs::remove_file(self.dir.join(format!(".{name}.partial")));
            }
        }
    }
}

/// How the memory is written once the guest is paused.
enum MemoryPlan<'b> {
    All,
    /// A live snapshot's first pass is done.
    Precopied(Precopied),
    DiffOf(&'b DiffBase),
}

/// The memory file of a live snapshot, every page written while the guest ran, its writes
/// since logged.
struct Precopied {
    file: File,
    path: PathBuf,
    pages_written: u64,
}

/// The first pass of a live snapshot: the log turned on and emptied, then every page written
/// while the guest runs. A page it writes meanwhile may be torn in the file; it is in the log
/// and written again in the pause.
fn precopy(vm: &RunningVm, partial: &mut Partial) -> Result<Precopied, SnapshotError> {
    let written = start_logging(vm).and_then(|()| {
        let (file, path) = create_memory_file(vm, partial)?;
        let mut report = SnapshotReport::default();
        write_every_page(vm, &file, &path, None, partial, &mut report)?;
        // Made durable now, while the guest runs: the pause then syncs only its pages.
        file.sync_data().map_err(|source| SnapshotError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Precopied {
            file,
            path,
            pages_written: report.pages_written,
        })
    });
    if written.is_err() {
        // Nothing relies on the log now: the take above ended any diff's base.
        let _ = vm.ram().set_dirty_logging(vm.fd(), false);
    }
    written
}

impl Precopied {
    /// The second pass, the guest paused: every page it wrote during the first is written
    /// again whole (zeros too: the first pass may have left data there). Returns the file.
    fn finish(
        self,
        vm: &RunningVm,
        report: &mut SnapshotReport,
    ) -> Result<(File, PathBuf), SnapshotError> {
        each_dirty_page(vm, |index, page| {
            report.dirty_pages += 1;
            self.file
                .write_all_at(page, index * PAGE_SIZE)
                .map_err(|source| SnapshotError::Io {
                    path: self.path.clone(),
                    source,
                })
        })?;
        report.pages_written += self.pages_written;
        Ok((self.file, self.path))
    }
}

/// The memory file under its temporary name, of the guest's RAM size and all holes.
fn create_memory_file(
    vm: &RunningVm,
    partial: &mut Partial,
) -> Result<(File, PathBuf), SnapshotError> {
    let path = partial.temp_path(MEMORY_FILE);
    let io = |source| SnapshotError::Io {
        path: path.clone(),
        source,
    };
    let file = File::create(&path).map_err(io)?;
    file.set_len(vm.ram().size()).map_err(io)?;
    Ok((file, path))
}

fn write_all(
    vm: &RunningVm,
    partial: &mut Partial,
    sev: Option<SnapshotSev<'_>>,
    after: AfterSnapshot,
    memory: MemoryPlan<'_>,
) -> Result<SnapshotReport, SnapshotError> {
    let mut report = SnapshotReport::default();
    let sev_shape = sev.as_ref().map(|s| SevShape {
        policy: s.policy,
        platform: s.platform,
    });
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        features: Features::ZERO_PAGES,
        vm: crate::sender::shape_of(vm, sev_shape).map_err(Box::new)?,
    });
    let mut state = encode_frame(&hello)?;

    // SEND_START towards the chosen platform: private pages are encrypted for it alone.
    let mut send = match sev {
        Some(source) => {
            let chain = match source.target_chain {
                Some(chain) => chain,
                None => source.firmware.certificate_chain()?,
            };
            let (send, start) =
                veil_sev::flow::Sender::start(source.firmware, source.guest, &chain)?;
            let mut pdh = Vec::new();
            sev::parser::Encoder::encode(&start.pdh, &mut pdh, ())
                .map_err(|_| SnapshotError::Pdh)?;
            state.extend(encode_frame(&Message::SevStart(SevStart {
                policy: start.policy,
                pdh,
                session: start.session,
            }))?);
            Some(send)
        }
        None => None,
    };

    report.memory_bytes = vm.ram().size();
    let (memory_file, memory_path) = match memory {
        // Written while the guest ran; what it wrote meanwhile is written again now.
        MemoryPlan::Precopied(first_pass) => first_pass.finish(vm, &mut report)?,
        MemoryPlan::DiffOf(base) => {
            let (file, path) = create_memory_file(vm, partial)?;
            let diff = write_dirty_pages(vm, &file, &path, base, &mut report)?;
            diff::write(&partial.temp_path(DIFF_FILE), &diff)?;
            report.diff_of = Some(base.dir.clone());
            (file, path)
        }
        MemoryPlan::All => {
            let (file, path) = create_memory_file(vm, partial)?;
            write_every_page(vm, &file, &path, send.as_mut(), partial, &mut report)?;
            (file, path)
        }
    };
    memory_file.sync_all().map_err(|source| SnapshotError::Io {
        path: memory_path.clone(),
        source,
    })?;

    let saved = vm.snapshot()?;
    let bytes = serde_json::to_vec(&saved)?;
    state.extend(encode_frame(&Message::State(State { bytes }))?);
    let path = partial.temp_path(STATE_FILE);
    file::write(&path, FileKind::State, &state)?;
    partial.commit()?;
    if let Some(send) = send {
        match after {
            // The snapshot holds the guest now; its context here is done.
            AfterSnapshot::Stop => send.finish()?,
            // The guest goes on here: SEND_CANCEL gives its context back.
            AfterSnapshot::Resume => send.cancel()?,
        }
    }
    Ok(report)
}

/// A diff's memory: the pages dirtied since `base` (KVM's log and the VMM's own writes),
/// written where they are not zero, and the diff file's record of every one of them.
fn write_dirty_pages(
    vm: &RunningVm,
    memory_file: &File,
    memory_path: &Path,
    base: &DiffBase,
    report: &mut SnapshotReport,
) -> Result<DiffFile, SnapshotError> {
    let total_pages = report.memory_bytes / PAGE_SIZE;
    let mut pages = vec![0u64; total_pages.div_ceil(64) as usize];
    each_dirty_page(vm, |index, page| {
        pages[(index / 64) as usize] |= 1 << (index % 64);
        report.dirty_pages += 1;
        if page.iter().any(|&b| b != 0) {
            report.pages_written += 1;
        }
        write_nonzero_pages(memory_file, memory_path, index * PAGE_SIZE, page)
    })?;
    Ok(DiffFile {
        parent: base.dir.clone(),
        parent_digest: base.state_digest,
        pages,
    })
}

/// A full snapshot's memory: every non-zero page in the memory file, an SEV guest's private
/// pages through the firmware into the private-pages file.
fn write_every_page(
    vm: &RunningVm,
    memory_file: &File,
    memory_path: &Path,
    mut send: Option<&mut veil_sev::flow::Sender<'_>>,
    partial: &mut Partial,
    report: &mut SnapshotReport,
) -> Result<(), SnapshotError> {
    let mut private = Vec::new();
    let mut encoder = ChunkEncoder::new();
    let states = vm.paravirt().page_states();
    let memory = vm.memory();
    // Pages in blocks, written where they are not zero: the file stays sparse.
    const BLOCK: u64 = 2 << 20;
    let mut block = vec![0u8; BLOCK as usize];
    let mut file_offset = 0u64;
    for region in memory.iter() {
        let (base, len) = (region.start_addr().0, region.len());
        let mut done = 0;
        while done < len {
            let n = BLOCK.min(len - done);
            let buf = &mut block[..n as usize];
            memory.read_slice(buf, GuestAddress(base + done))?;
            for (i, page) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
                let gfn = (base + done) / PAGE_SIZE + i as u64;
                if states.as_ref().is_some_and(|map| map.is_private(gfn)) {
                    // Never in the clear: the firmware encrypts it in place in guest RAM, and
                    // the page is a hole in the memory file.
                    let at = GuestAddress(gfn * PAGE_SIZE);
                    let slice = memory.get_slice(at, PAGE_SIZE as usize)?;
                    let sender = send.as_mut().ok_or(SnapshotError::Sev)?;
                    let mut seal = |out: PacketMut<'_>| {
                        sender
                            .update_data_into(&slice, out)
                            .map_err(SnapshotError::from)
                    };
                    let len = slice.len();
                    if encoder.push_encrypted_page(gfn, len, &mut seal)?.is_none() {
                        if let Some(frame) = encoder.frame() {
                            frame.append_to(&mut private);
                        }
                        encoder.clear();
                        encoder
                            .push_encrypted_page(gfn, len, &mut seal)?
                            .ok_or(SnapshotError::Unexpected(MessageType::MemoryChunk))?;
                    }
                    report.private_pages += 1;
                    page.fill(0);
                } else if page.iter().any(|&b| b != 0) {
                    report.pages_written += 1;
                } else {
                    continue;
                }
            }
            write_nonzero_pages(memory_file, memory_path, file_offset + done, buf)?;
            done += n;
        }
        file_offset += len;
    }
    drop(states);
    if let Some(frame) = encoder.frame() {
        frame.append_to(&mut private);
    }
    if send.is_some() {
        let path = partial.temp_path(PRIVATE_PAGES_FILE);
        file::write(&path, FileKind::PrivatePages, &private)?;
    }
    Ok(())
}

/// Writes the runs of non-zero pages in `buf` (which starts at `offset` in the file).
fn write_nonzero_pages(
    file: &File,
    path: &Path,
    offset: u64,
    buf: &[u8],
) -> Result<(), SnapshotError> {
    let page = PAGE_SIZE as usize;
    let mut i = 0;
    while i < buf.len() {
        if buf[i..i + page].iter().all(|&b| b == 0) {
            i += page;
            continue;
        }
        let start = i;
        while i < buf.len() && buf[i..i + page].iter().any(|&b| b != 0) {
            i += page;
        }
        file.write_all_at(&buf[start..i], offset + start as u64)
            .map_err(|source| SnapshotError::Io {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("veil-partial-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_abandoned_snapshot_leaves_nothing_and_a_committed_one_its_files() {
        let abandoned = dir("abandoned");
        {
            let mut partial = Partial::new(&abandoned);
            std::fs::write(partial.temp_path(MEMORY_FILE), b"ram").unwrap();
            std::fs::write(partial.temp_path(STATE_FILE), b"state").unwrap();
            assert_eq!(names(&abandoned), [".memory.partial", ".state.partial"]);
        }
        assert!(names(&abandoned).is_empty());

        let committed = dir("committed");
        let mut partial = Partial::new(&committed);
        std::fs::write(partial.temp_path(STATE_FILE), b"state").unwrap();
        std::fs::write(partial.temp_path(MEMORY_FILE), b"ram").unwrap();
        partial.commit().unwrap();
        drop(partial);
        assert_eq!(names(&committed), ["memory", "state"]);
        assert_eq!(std::fs::read(committed.join(STATE_FILE)).unwrap(), b"state");

        // A rename that fails takes back the ones made before it.
        let failed = dir("failed");
        let mut partial = Partial::new(&failed);
        std::fs::write(partial.temp_path(MEMORY_FILE), b"ram").unwrap();
        let _ = partial.temp_path(STATE_FILE); // never written: its rename fails
        assert!(partial.commit().is_err());
        drop(partial);
        assert!(names(&failed).is_empty(), "{:?}", names(&failed));
        for d in [abandoned, committed, failed] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
