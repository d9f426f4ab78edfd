//! The SEV certificate chain a migration source decodes from a target's HelloReply and
//! verifies, and the PDH a target decodes from a source's SevStart: any bytes. What decodes
//! re-encodes to bytes that decode the same; a chain is trusted only if its ARK is one of the
//! trusted roots and its signatures hold.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sev::certs::sev::{ca, sev::Certificate, Chain};
use sev::parser::{Decoder, Encoder};
use veil_sev::emulated::identity::{amd_arks, verify_chain, PlatformIdentity};

fn trusted() -> &'static Vec<ca::Certificate> {
    static ARKS: OnceLock<Vec<ca::Certificate>> = OnceLock::new();
    ARKS.get_or_init(|| {
        let mut arks = amd_arks().unwrap();
        arks.push(PlatformIdentity::generate().unwrap().ark().clone());
        arks
    })
}

fn encoded<T: Encoder<()>>(value: &T) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    value.encode(&mut bytes, ()).ok().map(|()| bytes)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(chain) = Chain::decode(&mut &data[..], ()) {
        if let Some(bytes) = encoded(&chain) {
            let again = Chain::decode(&mut bytes.as_slice(), ()).expect("re-encoded chain decodes");
            assert_eq!(encoded(&again).as_deref(), Some(bytes.as_slice()));
        }
        if verify_chain(&chain, trusted()).is_ok() {
            let ark = encoded(&chain.ca.ark).expect("a trusted ARK encodes");
            assert!(trusted()
                .iter()
                .any(|root| encoded(root).as_ref() == Some(&ark)));
        }
    }
    if let Ok(pdh) = Certificate::decode(&mut &data[..], ()) {
        if let Some(bytes) = encoded(&pdh) {
            let again =
                Certificate::decode(&mut bytes.as_slice(), ()).expect("re-encoded PDH decodes");
            assert_eq!(encoded(&again).as_deref(), Some(bytes.as_slice()));
        }
    }
});
