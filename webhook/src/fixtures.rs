//! Reviews made from a real one as the apiserver would send them for other pods, for the
//! benchmarks and the tests (the `fixtures` feature); the webhook itself never calls them.

use crate::shape::{TOKEN_SUFFIX, TOKEN_VOLUME, is_token_volume};

/// `review` as the apiserver would send it for the `n`th other replica of its pod: another
/// uid, and another random end of the token volume's name wherever the name stands; `None`
/// when `review` is not a review of a pod with such a volume.
pub fn replica(review: &[u8], n: u64) -> Option<Vec<u8>> {
    /// The characters the apiserver's random names are made of.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let value: serde_json::Value = serde_json::from_slice(review).ok()?;
    let request = &value["request"];
    let uid = request["uid"].as_str()?;
    let volumes = request["object"]["spec"]["volumes"].as_array()?;
    let token = volumes
        .iter()
        .filter_map(|volume| volume["name"].as_str())
        .find(|name| is_token_volume(name))?;
    let suffix: String = (0..TOKEN_SUFFIX as u32)
        .map(|digit| {
            let base = ALPHABET.len() as u64;
            char::from(ALPHABET[(n / base.pow(digit) % base) as usize])
        })
        .collect();
    let text = std::str::from_utf8(review).ok()?;
    let replica = text
        .replace(
            &format!("\"{uid}\""),
            &format!(
                "\"{:08x}-0000-4000-8000-{:012x}\"",
                n >> 32,
                n & 0xffff_ffff
            ),
        )
        .replace(
            &format!("\"{token}\""),
            &format!("\"{TOKEN_VOLUME}{suffix}\""),
        );
    Some(replica.into_bytes())
}

/// `review` as the apiserver would send it for the first pod of the `n`th other workload like
/// its own: [`replica`]'s, importing one more service, named after `n`, so that neither its
/// annotation nor its pod is one seen before; `None` when `review` is not a review of a pod with
/// a token volume that imports services in YAML.
pub fn first_pod(review: &[u8], n: u64) -> Option<Vec<u8>> {
    const LIST: &str = r#""servicekeel.io/imported-services": "services:\n"#;
    let replica = String::from_utf8(replica(review, n)?).ok()?;
    let at = replica.find(LIST)? + LIST.len();
    let (before, after) = replica.split_at(at);
    Some(format!("{before}  - name: s{n}\\n    ports:\\n      - port: 1\\n{after}").into_bytes())
}
