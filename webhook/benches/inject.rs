//! The webhook's own time for a typical pod review: the pure `inject` function alone, and the
//! whole `review` path (decode the AdmissionReview, inject, encode the answer). The baseline in
//! the same run is decoding and re-encoding the same review without injecting, so the figures
//! read as "what injection adds".

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;
use servicekeel_webhook::admission::review;
use servicekeel_webhook::config::Config;
use servicekeel_webhook::inject::{Target, inject};
use servicekeel_webhook::pod::PodFacts;
use servicekeel_webhook::view::NoCluster;

/// The allocator the webhook binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn fixture() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/review-create-pod.json"
    );
    std::fs::read(path).expect("review fixture")
}

fn benches(c: &mut Criterion) {
    let body = fixture();
    let config = Config::from_yaml("clusterName: cluster-a").expect("config");
    let value: Value = serde_json::from_slice(&body).expect("fixture is JSON");
    let pod: PodFacts = serde_json::from_value(value["request"]["object"].clone()).expect("a pod");
    let target = Target::new("shop");

    c.bench_function("baseline: decode + encode the review", |b| {
        b.iter(|| {
            let decoded: Value = serde_json::from_slice(black_box(&body)).expect("decodes");
            black_box(serde_json::to_vec(&decoded).expect("encodes"))
        })
    });
    c.bench_function("inject (pure)", |b| {
        b.iter(|| black_box(inject(black_box(&pod), &target, &config)))
    });
    c.bench_function("review (decode + inject + encode)", |b| {
        b.iter(|| {
            let reviewed = review(black_box(&body), &config, &NoCluster).expect("reviews");
            black_box(serde_json::to_vec(&reviewed.answer).expect("encodes"))
        })
    });
}

criterion_group!(inject_benches, benches);
criterion_main!(inject_benches);
