//! The webhook's AdmissionReview handler, bytes in, response out: any body is answered or
//! refused with an error, never a panic, and an answer always encodes as JSON, the same whether
//! written directly or through `Serialize`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use servicekeel_webhook::admission::review;
use servicekeel_webhook::config::Config;
use servicekeel_webhook::view::NoCluster;

fuzz_target!(|data: &[u8]| {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    let config = CONFIG.get_or_init(Config::default);
    if let Ok(reviewed) = review(data, config, &NoCluster) {
        let serialized = serde_json::to_value(&reviewed.answer).expect("the answer encodes");
        let written: serde_json::Value =
            serde_json::from_slice(&reviewed.answer.to_json()).expect("the answer is JSON");
        assert_eq!(written, serialized);
    }
});
