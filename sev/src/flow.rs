//! The SEV command sequences as types, so an out-of-order sequence does not compile:
//! [`Launch`] goes `Started -> Measured -> finish`, a [`Sender`] can only send between
//! SEND_START and SEND_FINISH (and cancels itself if dropped unfinished), and a [`Receiver`]
//! only receives between RECEIVE_START and RECEIVE_FINISH. Like the `sev` crate's `Launcher`.

use crate::firmware::{
    Firmware, FirmwareError, GuestBytes, Handle, LaunchMeasurement, Packet, PacketMut, PacketRef,
    SendStart,
};
use crate::policy::GuestPolicy;

/// A launch after LAUNCH_START: data may be measured.
pub struct Started;

/// A launch after LAUNCH_MEASURE: a secret may be injected, then the launch finished.
pub struct Measured(LaunchMeasurement);

/// A guest being launched.
pub struct Launch<'f, S> {
    firmware: &'f mut dyn Firmware,
    handle: Handle,
    state: S,
}

impl<'f> Launch<'f, Started> {
    /// LAUNCH_START, with the owner's session or a firmware-made one.
    pub fn start(
        firmware: &'f mut dyn Firmware,
        policy: GuestPolicy,
        owner: Option<&sev::launch::sev::Start>,
    ) -> Result<Self, FirmwareError> {
        let handle = firmware.launch_start(policy, owner)?;
        Ok(Self {
            firmware,
            handle,
            state: Started,
        })
    }

    /// LAUNCH_UPDATE_DATA on guest RAM in place.
    pub fn update_data(&mut self, data: &GuestBytes<'_>) -> Result<(), FirmwareError> {
        self.firmware.launch_update_data(self.handle, data)
    }

    /// LAUNCH_MEASURE.
    pub fn measure(self) -> Result<Launch<'f, Measured>, FirmwareError> {
        let measurement = self.firmware.launch_measure(self.handle)?;
        Ok(Launch {
            firmware: self.firmware,
            handle: self.handle,
            state: Measured(measurement),
        })
    }
}

impl Launch<'_, Measured> {
    /// The measurement, for the owner.
    pub fn measurement(&self) -> LaunchMeasurement {
        self.state.0
    }

    /// LAUNCH_SECRET into `dest`.
    pub fn inject_secret(
        &mut self,
        secret: &Packet,
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        self.firmware.launch_secret(self.handle, secret, dest)
    }

    /// LAUNCH_FINISH: the guest may run.
    pub fn finish(self) -> Result<Handle, FirmwareError> {
        self.firmware.launch_finish(self.handle)?;
        Ok(self.handle)
    }
}

/// A guest being sent: between SEND_START and SEND_FINISH or SEND_CANCEL.
pub struct Sender<'f> {
    firmware: &'f mut dyn Firmware,
    handle: Handle,
    done: bool,
}

impl<'f> Sender<'f> {
    /// SEND_START towards the platform whose chain is `target`; the [`SendStart`] goes to it.
    pub fn start(
        firmware: &'f mut dyn Firmware,
        guest: Handle,
        target: &sev::certs::sev::Chain,
    ) -> Result<(Self, SendStart), FirmwareError> {
        let start = firmware.send_start(guest, target)?;
        Ok((
            Self {
                firmware,
                handle: guest,
                done: false,
            },
            start,
        ))
    }

    /// SEND_UPDATE_DATA of one guest page (or part of one), in place in guest RAM.
    pub fn update_data(&mut self, page: &GuestBytes<'_>) -> Result<Packet, FirmwareError> {
        self.firmware.send_update_data(self.handle, page)
    }

    /// SEND_UPDATE_DATA into `out` (a chunk being built, say), whose payload is as long as
    /// `page`.
    pub fn update_data_into(
        &mut self,
        page: &GuestBytes<'_>,
        out: PacketMut<'_>,
    ) -> Result<(), FirmwareError> {
        self.firmware.send_update_data_into(self.handle, page, out)
    }

    /// SEND_FINISH: the guest now lives on the target.
    pub fn finish(mut self) -> Result<(), FirmwareError> {
        self.done = true;
        self.firmware.send_finish(self.handle)
    }

    /// SEND_CANCEL: the guest keeps running here.
    pub fn cancel(mut self) -> Result<(), FirmwareError> {
        self.done = true;
        self.firmware.send_cancel(self.handle)
    }
}

impl Drop for Sender<'_> {
    /// A send abandoned by an error or a panic is cancelled, so the guest can run and be sent
    /// again.
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.firmware.send_cancel(self.handle) {
                tracing::warn!("SEND_CANCEL after an abandoned send failed: {e}");
            }
        }
    }
}

/// A guest being received: between RECEIVE_START and RECEIVE_FINISH.
pub struct Receiver<'f> {
    firmware: &'f mut dyn Firmware,
    handle: Handle,
}

impl<'f> Receiver<'f> {
    /// RECEIVE_START with what the source's SEND_START produced.
    pub fn start(firmware: &'f mut dyn Firmware, start: &SendStart) -> Result<Self, FirmwareError> {
        let handle = firmware.receive_start(start)?;
        Ok(Self { firmware, handle })
    }

    /// RECEIVE_UPDATE_DATA into `dest`; nothing is written when the packet does not verify.
    pub fn update_data(
        &mut self,
        packet: PacketRef<'_>,
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        self.firmware.receive_update_data(self.handle, packet, dest)
    }

    /// RECEIVE_FINISH: the guest may run here.
    pub fn finish(self) -> Result<Handle, FirmwareError> {
        self.firmware.receive_finish(self.handle)?;
        Ok(self.handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulated::firmware::EmulatedFirmware;
    use crate::emulated::identity::PlatformIdentity;

    #[test]
    fn an_abandoned_send_is_cancelled_and_the_guest_can_be_sent_again() {
        let ram = crate::guest_memory::test_ram::TestRam::new();
        let page = |gpa| ram.at(gpa, 4096);
        let mut source = EmulatedFirmware::new(PlatformIdentity::generate().unwrap());
        source.register_ram(&ram.all()).unwrap();
        let target = PlatformIdentity::generate().unwrap().export_chain();
        let mut launch = Launch::start(&mut source, GuestPolicy(0), None).unwrap();
        launch.update_data(&page(0)).unwrap();
        let guest = launch.measure().unwrap().finish().unwrap();
        {
            let (mut sender, _) = Sender::start(&mut source, guest, &target).unwrap();
            sender.update_data(&page(0)).unwrap();
            // Dropped here without finish: as if the migration failed.
        }
        let (sender, _) = Sender::start(&mut source, guest, &target).unwrap();
        sender.finish().unwrap();
    }
}
