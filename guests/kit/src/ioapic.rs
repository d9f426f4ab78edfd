//! Routing a device's interrupt line to this vCPU's local APIC without ever taking the
//! interrupt: the vector is left pending in the LAPIC's IRR, which a polled driver reads to
//! prove the device raised its interrupt (interrupts cannot be delivered on the project's
//! hosts; HOST-NOTES). Interrupts stay disabled throughout (the kit never executes `sti`).

use crate::paging;
use crate::smp::{lapic_read, lapic_write, LAPIC_SVR, SVR_APIC_ENABLE};

/// The first IOAPIC, GSIs 0..=23 (the PC default; KVM's in-kernel IOAPIC under Veil).
const IOAPIC_BASE: u64 = 0xfec0_0000;
/// QEMU microvm's second IOAPIC, right above the first, for GSIs 24..=47 (its
/// `IO_APIC_SECONDARY_ADDRESS` and `IO_APIC_SECONDARY_IRQBASE`), where it wires its
/// virtio-mmio transports when ACPI is on.
const IOAPIC_STRIDE: u64 = 0x1_0000;
const PINS_PER_IOAPIC: u64 = 24;
/// How many IOAPICs the kit knows.
const IOAPICS: u64 = 2;

// IOAPIC registers (82093AA datasheet §3.0): an index, then the data window.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPICVER: u32 = 0x01;
/// Redirection table entry `pin`: two registers, low at `0x10 + 2 * pin`.
const IOREDTBL: u32 = 0x10;
/// Entry bit 16: masked. Clear bits 8..15 mean fixed delivery, physical destination, active
/// high, edge-triggered: one message per rising edge, so a line that stays high (virtio-mmio
/// until InterruptACK) does not need the EOI an interrupt never taken cannot send.
const REDIR_MASKED: u32 = 1 << 16;

/// The LAPIC's Interrupt Request Register: 8 registers of 32 vectors, 16 bytes apart
/// (Intel SDM vol. 3, 11.8.4).
const LAPIC_IRR: u64 = 0x200;

/// One IOAPIC input.
pub struct Line {
    base: u64,
    pin: u32,
}

impl Line {
    /// The IOAPIC pin of `gsi`, or `None` beyond the IOAPICs the kit knows or when nothing
    /// answers at that IOAPIC (its version register reads all ones, or the pin is past its
    /// last redirection entry).
    pub fn for_gsi(gsi: u64) -> Option<Line> {
        if gsi >= IOAPICS * PINS_PER_IOAPIC {
            return None;
        }
        let base = IOAPIC_BASE + gsi / PINS_PER_IOAPIC * IOAPIC_STRIDE;
        paging::map_mmio(base, IOWIN + 4);
        let line = Line {
            base,
            pin: (gsi % PINS_PER_IOAPIC) as u32,
        };
        let version = line.read(IOAPICVER);
        let last_entry = (version >> 16) & 0xff;
        (version != u32::MAX && line.pin <= last_entry).then_some(line)
    }

    fn read(&self, reg: u32) -> u32 {
        // SAFETY: the IOAPIC's registers, mapped uncached by `for_gsi`; selecting and reading
        // a register touches no memory the compiler knows.
        unsafe {
            ((self.base + IOREGSEL) as *mut u32).write_volatile(reg);
            ((self.base + IOWIN) as *const u32).read_volatile()
        }
    }

    fn write(&self, reg: u32, value: u32) {
        // SAFETY: as in `read`.
        unsafe {
            ((self.base + IOREGSEL) as *mut u32).write_volatile(reg);
            ((self.base + IOWIN) as *mut u32).write_volatile(value);
        }
    }

    /// Sends the line's rising edges as `vector` to the LAPIC `apic_id` (software-enabled
    /// first: a disabled LAPIC accepts no fixed interrupts).
    pub fn route(&self, vector: u8, apic_id: u8) {
        lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | SVR_APIC_ENABLE | 0xff);
        let entry = IOREDTBL + 2 * self.pin;
        self.write(entry, REDIR_MASKED);
        self.write(entry + 1, u32::from(apic_id) << 24);
        self.write(entry, u32::from(vector));
    }

    /// Masks the line again.
    pub fn mask(&self) {
        self.write(IOREDTBL + 2 * self.pin, REDIR_MASKED);
    }
}

/// Whether `vector` is pending in this vCPU's IRR.
pub fn irr_pending(vector: u8) -> bool {
    let reg = LAPIC_IRR + 0x10 * u64::from(vector / 32);
    lapic_read(reg) & (1 << (vector % 32)) != 0
}
