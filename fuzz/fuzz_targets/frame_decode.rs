//! Migration frames as a receiver reads them off the stream: any bytes. A frame that reads is
//! within its type's limit; one that decodes re-encodes to a frame that decodes the same; the
//! reader never holds much more than the bytes it was given, whatever the headers claim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_migration::protocol::frame::FIRST_READ_BYTES;
use veil_migration::protocol::{read_frame, write_frame, FrameReader};

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    let mut reader = FrameReader::new();
    // Several frames in a row, as on a real stream, through one reused buffer.
    for _ in 0..8 {
        let read = match reader.read(&mut stream) {
            Ok(raw) => {
                assert!(raw.payload.len() as u64 <= raw.header.kind.max_payload());
                if let Ok(frame) = raw.decode() {
                    let mut wire = Vec::new();
                    write_frame(&mut wire, &frame.message).expect("a decoded message encodes");
                    let again = read_frame(&mut wire.as_slice()).expect("its frame decodes");
                    assert_eq!(again.message, frame.message);
                }
                true
            }
            Err(_) => false,
        };
        assert!(
            reader.capacity() <= 2 * data.len().max(FIRST_READ_BYTES),
            "{} bytes held for {} bytes of input",
            reader.capacity(),
            data.len()
        );
        if !read {
            break;
        }
    }
});
