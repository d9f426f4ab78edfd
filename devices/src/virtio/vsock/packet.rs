//! The vsock packet header as typed values, and the constants it carries (virtio 1.2 §5.10.6).
//!
//! ```text
//!  0        8        16       20       24    28     30   32      36         40       44
//!  src_cid  dst_cid  src_port dst_port len   type   op   flags   buf_alloc  fwd_cnt
//!  le64     le64     le32     le32     le32  le16   le16 le32    le32       le32
//! ```
//!
//! `virtio-vsock` finds the header and data in a descriptor chain; this module turns the
//! guest's raw numbers into [`Op`] and [`ConnKey`] once, at the boundary.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

/// Bytes in a packet header (virtio 1.2 §5.10.6, `struct virtio_vsock_hdr`).
pub const HEADER_LEN: usize = PKT_HEADER_SIZE;

/// The host's CID: where every packet from the guest goes (virtio 1.2 §5.10.4).
pub const VMADDR_CID_HOST: u64 = 2;

/// Stream sockets, the only type this device serves (virtio 1.2 §5.10.6).
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;

/// The peer will receive no more data (virtio 1.2 §5.10.6.5).
pub const VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: u32 = 1;
/// The peer will send no more data (virtio 1.2 §5.10.6.5).
pub const VIRTIO_VSOCK_SHUTDOWN_F_SEND: u32 = 2;
/// Both directions closed.
pub const VIRTIO_VSOCK_SHUTDOWN_F_BOTH: u32 =
    VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | VIRTIO_VSOCK_SHUTDOWN_F_SEND;

/// The event-queue event telling the driver that every connection is gone
/// (virtio 1.2 §5.10.6.6).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet operation (virtio 1.2 §5.10.6, `VIRTIO_VSOCK_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `VIRTIO_VSOCK_OP_REQUEST` (1): open a connection.
    Request,
    /// `VIRTIO_VSOCK_OP_RESPONSE` (2): accept it.
    Response,
    /// `VIRTIO_VSOCK_OP_RST` (3): the connection is gone, or never was.
    Rst,
    /// `VIRTIO_VSOCK_OP_SHUTDOWN` (4): one or both directions closed.
    Shutdown,
    /// `VIRTIO_VSOCK_OP_RW` (5): data.
    Rw,
    /// `VIRTIO_VSOCK_OP_CREDIT_UPDATE` (6): here is my buffer space.
    CreditUpdate,
    /// `VIRTIO_VSOCK_OP_CREDIT_REQUEST` (7): tell me your buffer space.
    CreditRequest,
}

impl Op {
    /// The operation a raw `op` field names, if any.
    pub fn from_raw(op: u16) -> Option<Self> {
        Some(match op {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }

    /// The raw `op` field.
    pub fn raw(self) -> u16 {
        match self {
            Self::Request => 1,
            Self::Response => 2,
            Self::Rst => 3,
            Self::Shutdown => 4,
            Self::Rw => 5,
            Self::CreditUpdate => 6,
            Self::CreditRequest => 7,
        }
    }
}

/// One connection: the host's port and the guest's (the CIDs are fixed per device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// The port on the host side (CID 2).
    pub host_port: u32,
    /// The port on the guest side.
    pub guest_port: u32,
}

/// A packet header, field for field, in host byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The header as it lies in guest memory.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The header as the guest reads it.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header `virtio-vsock` parsed from a chain.
    pub fn of<B: BitmapSlice>(packet: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: packet.src_cid(),
            dst_cid: packet.dst_cid(),
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            len: packet.len(),
            type_: packet.type_(),
            op: packet.op(),
            flags: packet.flags(),
            buf_alloc: packet.buf_alloc(),
            fwd_cnt: packet.fwd_cnt(),
        }
    }

    /// The connection a packet from the guest belongs to.
    pub fn guest_key(&self) -> ConnKey {
        ConnKey {
            host_port: self.dst_port,
            guest_port: self.src_port,
        }
    }

    /// A packet from the host to the guest on `key`, with no credit information yet.
    pub fn to_guest(guest_cid: u64, key: ConnKey, op: Op) -> Self {
        Self {
            src_cid: VMADDR_CID_HOST,
            dst_cid: guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op: op.raw(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_its_layout() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1111_2222,
            dst_port: 1234,
            len: 5,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op: Op::Rw.raw(),
            flags: VIRTIO_VSOCK_SHUTDOWN_F_BOTH,
            buf_alloc: 0x0004_0000,
            fwd_cnt: 0xffff_fffe,
        };
        let bytes = h.to_bytes();
        assert_eq!(bytes[0], 0x08, "little-endian");
        assert_eq!(&bytes[30..32], &[5, 0]);
        assert_eq!(Header::from_bytes(&bytes), h);
    }

    #[test]
    fn ops_round_trip_and_unknown_ones_are_none() {
        for raw in 1..=7 {
            assert_eq!(Op::from_raw(raw).map(Op::raw), Some(raw));
        }
        assert_eq!(Op::from_raw(0), None);
        assert_eq!(Op::from_raw(8), None);
    }
}
