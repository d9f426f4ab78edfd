//! Where virtio-mmio devices sit: one 4 KiB window each from 0xd000_0000 upwards in the 32-bit
//! MMIO hole, IRQs from 5 upwards on the IOAPIC, told to the guest on its command line as Linux's
//! `virtio_mmio.device=` parameter (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES,
//! drivers/virtio/virtio_mmio.c) reads them. docs/guest-abi.md has the layout.

use veil_devices::virtio::mmio::MMIO_WINDOW_LEN;

/// The first device's window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The first device's IRQ (GSI); 0-4 are the PIT, keyboard, cascade and COM2/COM1.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The IOAPIC's last pin: KVM's default routing maps GSIs 0-23 to it.
pub const IOAPIC_LAST_PIN: u32 = 23;
/// How many virtio devices fit: one IRQ each, not shared.
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_LAST_PIN - VIRTIO_FIRST_IRQ + 1) as usize;

// The windows lie in the 32-bit MMIO hole, below the IOAPIC.
const _: () = assert!(VIRTIO_MMIO_START >= crate::layout::MMIO32_START);

/// One device's place in the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSlot {
    /// Guest-physical address of its register window.
    pub base: u64,
    /// Its IRQ (GSI).
    pub irq: u32,
}

impl DeviceSlot {
    /// The slot of the `index`-th device, if there is room for it.
    pub fn nth(index: usize) -> Option<Self> {
        (index < MAX_VIRTIO_DEVICES).then(|| Self {
            base: VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_LEN,
            irq: VIRTIO_FIRST_IRQ + index as u32,
        })
    }

    /// `virtio_mmio.device=4K@0xd0000000:5`, the entry for the guest's command line.
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// The command-line entries for `count` devices, space-separated (empty for none).
pub fn cmdline_entries(count: usize) -> String {
    (0..count)
        .filter_map(DeviceSlot::nth)
        .map(|slot| slot.cmdline_entry())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_get_consecutive_windows_and_irqs_in_the_mmio_hole() {
        assert_eq!(
            DeviceSlot::nth(0),
            Some(DeviceSlot {
                base: 0xd000_0000,
                irq: 5
            })
        );
        assert_eq!(
            DeviceSlot::nth(2).unwrap().cmdline_entry(),
            "virtio_mmio.device=4K@0xd0002000:7"
        );
        assert_eq!(
            cmdline_entries(2),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(cmdline_entries(0), "");
        let last = DeviceSlot::nth(MAX_VIRTIO_DEVICES - 1).unwrap();
        assert_eq!(last.irq, IOAPIC_LAST_PIN);
        assert!(last.base + MMIO_WINDOW_LEN <= crate::layout::IOAPIC_START);
        assert_eq!(DeviceSlot::nth(MAX_VIRTIO_DEVICES), None);
    }
}
