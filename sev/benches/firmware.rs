//! The emulated firmware's SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA throughput on one core,
//! against the raw AES-128-CTR + HMAC-SHA256 of the same crates over the same buffers, in the
//! same run; and LAUNCH_UPDATE_DATA + LAUNCH_MEASURE time per 100 MiB loaded.
//!
//! `cargo bench -p veil-sev --bench firmware`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use veil_sev::crypto::{self, TransportKeys};
use veil_sev::emulated::firmware::EmulatedFirmware;
use veil_sev::emulated::identity::PlatformIdentity;
use veil_sev::firmware::{Firmware, Handle};
use veil_sev::guest_memory::test_ram::TestRam;
use veil_sev::policy::GuestPolicy;

const PAGE: usize = 4096;
const PAGES: usize = 256; // 1 MiB per iteration

/// A source guest being sent and a target receiving it, each platform with its guest's RAM.
fn platforms(
    source_ram: &TestRam,
    target_ram: &TestRam,
) -> (EmulatedFirmware, Handle, EmulatedFirmware, Handle) {
    let mut source = EmulatedFirmware::new(PlatformIdentity::generate().unwrap());
    let mut target = EmulatedFirmware::new(PlatformIdentity::generate().unwrap());
    source.register_ram(&source_ram.all()).unwrap();
    target.register_ram(&target_ram.all()).unwrap();
    let guest = source.launch_start(GuestPolicy(0), None).unwrap();
    source.launch_measure(guest).unwrap();
    source.launch_finish(guest).unwrap();
    let start = source
        .send_start(guest, &target.certificate_chain().unwrap())
        .unwrap();
    let received = target.receive_start(&start).unwrap();
    (source, guest, target, received)
}

fn transport(c: &mut Criterion) {
    let (source_ram, target_ram) = (TestRam::with_size(PAGE * PAGES), TestRam::with_size(PAGE));
    let (mut source, guest, mut target, received) = platforms(&source_ram, &target_ram);
    let pages: Vec<Vec<u8>> = (0..PAGES).map(|i| vec![i as u8; PAGE]).collect();
    for (i, p) in pages.iter().enumerate() {
        source_ram.write((i * PAGE) as u64, p);
    }
    let page = |i: usize| source_ram.at((i * PAGE) as u64, PAGE);
    let packets: Vec<_> = (0..PAGES)
        .map(|i| source.send_update_data(guest, &page(i)).unwrap())
        .collect();
    let keys = TransportKeys {
        tek: [1; 16],
        tik: [2; 16],
    };

    let mut group = c.benchmark_group("4 KiB pages, 1 core");
    group.throughput(Throughput::Bytes((PAGE * PAGES) as u64));
    group.bench_function(BenchmarkId::new("SEND_UPDATE_DATA", "emulated"), |b| {
        b.iter(|| {
            for i in 0..PAGES {
                std::hint::black_box(source.send_update_data(guest, &page(i)).unwrap());
            }
        })
    });
    group.bench_function(BenchmarkId::new("RECEIVE_UPDATE_DATA", "emulated"), |b| {
        let dest = target_ram.at(0, PAGE);
        b.iter(|| {
            for p in &packets {
                target
                    .receive_update_data(received, p.as_ref(), &dest)
                    .unwrap();
            }
        })
    });
    // The floor: the same crates doing only the crypto a packet needs (encrypt + MAC, or
    // MAC + decrypt) over the same buffers.
    group.bench_function(BenchmarkId::new("raw AES-CTR+HMAC", "seal"), |b| {
        let mut buf = vec![0u8; PAGE];
        b.iter(|| {
            for p in &pages {
                buf.copy_from_slice(p);
                std::hint::black_box(
                    crypto::seal_packet(&keys, crypto::PacketContext::Data, [3; 16], &mut buf, &[])
                        .unwrap(),
                );
            }
        })
    });
    group.finish();
}

fn launch_measure(c: &mut Criterion) {
    const IMAGE: usize = 100 << 20;
    const UPDATE: usize = 2 << 20;
    let mut fw = EmulatedFirmware::new(PlatformIdentity::generate().unwrap());
    let image = TestRam::with_size(IMAGE);
    image.write(0, &vec![0x5au8; IMAGE]);
    fw.register_ram(&image.all()).unwrap();
    let mut group = c.benchmark_group("launch measurement");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(IMAGE as u64));
    group.bench_function("100 MiB, 2 MiB updates", |b| {
        b.iter(|| {
            let guest = fw.launch_start(GuestPolicy(0), None).unwrap();
            for at in (0..IMAGE).step_by(UPDATE) {
                fw.launch_update_data(guest, &image.at(at as u64, UPDATE))
                    .unwrap();
            }
            std::hint::black_box(fw.launch_measure(guest).unwrap());
        })
    });
    group.finish();
}

criterion_group!(benches, transport, launch_measure);
criterion_main!(benches);
