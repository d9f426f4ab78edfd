//! A virtio-vsock device behind the virtio-mmio transport, fed any guest memory (the layout
//! is in `common/virtio_rig.rs`: queue 0 receives, 1 transmits, 2 carries events): packet
//! headers, data and buffers as the input writes them, with a host program listening on
//! port 1024 so that requests there open real connections. Besides the rig's checks (private
//! pages untouched, used rings well formed), the device never holds more connections than
//! the guest made requests, nor beyond its documented limit.
#![no_main]

#[path = "common/virtio_rig.rs"]
mod virtio_rig;

use std::os::unix::net::UnixListener;

use libfuzzer_sys::fuzz_target;
use veil_devices::virtio::vsock::{Vsock, VsockConfig};
use virtio_rig::{Input, Rig};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let path = socket_path();
    let host = UnixListener::bind(format!("{}_1024", path.display())).unwrap();
    host.set_nonblocking(true).unwrap();
    let vsock = Vsock::new(VsockConfig::new(3, &path)).unwrap();
    let mut rig = Rig::new(vsock, &input);
    let mut accepted = Vec::new();
    for _ in 0..input.rounds {
        rig.round();
        while let Ok((stream, _)) = host.accept() {
            accepted.push(stream);
        }
        let connections = rig.device.lock().unwrap().connections();
        // At most one connection per transmit chain served so far.
        assert!(
            connections <= usize::from(input.size) * input.rounds,
            "{connections} connections"
        );
    }
    drop(rig);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(format!("{}_1024", path.display()));
});

fn socket_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "veil-fuzz-vsock-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}
