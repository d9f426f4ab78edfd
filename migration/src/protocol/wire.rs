//! Little-endian fields in and out of payloads: a cursor that never reads past its slice.

use super::messages::MessageError;

/// Reads fields from a payload, front to back.
#[derive(Clone)]
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    #[cfg(test)]
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// The next `n` bytes, or `Truncated` naming `field`.
    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MessageError> {
        let (head, tail) = self
            .bytes
            .split_at_checked(n)
            .ok_or(MessageError::Truncated { field })?;
        self.bytes = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<&'a [u8; N], MessageError> {
        self.take(N, field)?
            .try_into()
            .map_err(|_| MessageError::Truncated { field })
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, MessageError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, MessageError> {
        Ok(u16::from_le_bytes(*self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, MessageError> {
        Ok(u32::from_le_bytes(*self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(*self.array(field)?))
    }

    /// A flag byte that must be 0 or 1.
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, MessageError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(MessageError::InvalidValue {
                field,
                value: value.into(),
            }),
        }
    }

    /// A count that must not exceed `limit`, checked before anything is allocated for it.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<usize, MessageError> {
        let count = self.u32(what)?;
        match usize::try_from(count) {
            Ok(n) if n <= limit => Ok(n),
            _ => Err(MessageError::TooMany {
                what,
                count: count.into(),
                limit: limit as u64,
            }),
        }
    }

    /// `u32 length | bytes`, the length checked against `limit` and what is left.
    pub(crate) fn bytes(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<&'a [u8], MessageError> {
        let len = self.u32(what)?;
        match usize::try_from(len) {
            Ok(n) if n <= limit => self.take(n, what),
            _ => Err(MessageError::TooLong {
                what,
                len: len.into(),
                limit: limit as u64,
            }),
        }
    }

    /// `u32 length | UTF-8`, at most `limit` bytes.
    pub(crate) fn text(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<String, MessageError> {
        utf8(self.bytes(what, limit)?, what)
    }

    /// The payload must end here.
    pub(crate) fn finish(self) -> Result<(), MessageError> {
        match self.bytes.len() {
            0 => Ok(()),
            count => Err(MessageError::TrailingBytes { count }),
        }
    }
}

pub(crate) fn utf8(bytes: &[u8], field: &'static str) -> Result<String, MessageError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|source| MessageError::NotUtf8 { field, source })
}

pub(crate) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// `u32 length | bytes`; the caller has checked the length against the field's limit.
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_never_reads_past_its_slice() {
        let mut c = Cursor::new(&[1, 2, 3]);
        assert_eq!(c.u16("a").unwrap(), 0x0201);
        assert!(matches!(
            c.u32("b"),
            Err(MessageError::Truncated { field: "b" })
        ));
        assert_eq!(c.remaining(), 1);
        assert!(matches!(
            c.finish(),
            Err(MessageError::TrailingBytes { count: 1 })
        ));
    }

    #[test]
    fn counts_and_lengths_are_checked_before_use() {
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            Cursor::new(&huge).count("pages", 10),
            Err(MessageError::TooMany { count, .. }) if count == u64::from(u32::MAX)
        ));
        assert!(matches!(
            Cursor::new(&huge).bytes("chain", 10),
            Err(MessageError::TooLong { .. })
        ));
        // A length within the limit but beyond the payload is a truncation.
        let mut short = 5u32.to_le_bytes().to_vec();
        short.extend_from_slice(b"ab");
        assert!(matches!(
            Cursor::new(&short).bytes("chain", 10),
            Err(MessageError::Truncated { field: "chain" })
        ));
        assert!(matches!(
            Cursor::new(&[2]).bool("flag"),
            Err(MessageError::InvalidValue { value: 2, .. })
        ));
    }
}
