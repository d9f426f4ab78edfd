//! Control-API request lines, as the server parses them. A line that parses as a request
//! serialises back to one that parses the same; none panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil::api::Request;

fuzz_target!(|line: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<Request>(line) {
        let text = serde_json::to_vec(&request).expect("a request serialises");
        let again: Request = serde_json::from_slice(&text).expect("and parses back");
        assert_eq!(again, request);
    }
});
