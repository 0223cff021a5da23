//! The service-list annotation parser (JSON and YAML): any text is parsed or refused with an
//! error, never a panic; what parses re-encodes to canonical JSON that parses to the same list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use servicekeel_api::ServiceList;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(list) = ServiceList::parse(text) {
        let canonical = list.to_canonical_json();
        let again = ServiceList::parse(&canonical).expect("canonical JSON parses");
        assert_eq!(again, list, "canonical JSON changed the list: {canonical}");
    }
});
