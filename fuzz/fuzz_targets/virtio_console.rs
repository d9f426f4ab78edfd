//! A virtio-console device behind the virtio-mmio transport, fed any guest memory (the layout
//! is in `common/virtio_rig.rs`): its receive queue and transmit queue chains as the input
//! writes them. Besides the rig's checks (private pages untouched, used rings well formed),
//! no receive buffer comes back used when the host sent nothing.
#![no_main]

#[path = "common/virtio_rig.rs"]
mod virtio_rig;

use std::io::Write;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use veil_devices::host_console::ConsoleIo;
use veil_devices::virtio::console::Console;
use virtio_rig::{Input, Rig};
use vm_memory::{Bytes, GuestAddress};

/// The host end: counts what the guest sent.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<usize>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        *self.0.lock().unwrap() += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let sink = Sink::default();
    let console = Console::new(ConsoleIo {
        output: Box::new(sink.clone()),
        input: None,
    })
    .unwrap();
    let mut rig = Rig::new(console, &input);
    for _ in 0..input.rounds {
        rig.round();
    }
    // With no host input the receive queue has nothing to give: no receive buffer may come
    // back used.
    if rig.active() {
        let used: u16 = rig
            .mem
            .read_obj(GuestAddress(virtio_rig::used_ring(0) + 2))
            .unwrap();
        assert_eq!(used, 0, "receive buffers used without input");
    }
});
