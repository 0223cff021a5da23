//! The webhook's own time for a typical pod review: the pure `inject` function alone, and the
//! whole `review` path (decode the AdmissionReview, inject, encode the answer). The baseline in
//! the same run decodes the whole review into generic JSON and encodes it again, the least a
//! webhook that read the whole object would do. The typical review is a replica's, as the
//! apiserver sends it (its own uid and token volume's name), whose service annotation the
//! webhook has seen before; the first pod of a workload is measured too.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::Value;
use servicekeel_webhook::admission::review;
use servicekeel_webhook::config::Config;
use servicekeel_webhook::fixtures::{first_pod, replica};
use servicekeel_webhook::inject::{Target, inject};
use servicekeel_webhook::metrics::Outcome;
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
    // Replicas' reviews as the apiserver sends them: each with its own uid and token volume.
    let replicas: Vec<Vec<u8>> = (0..1024)
        .map(|n| replica(&body, n).expect("the fixture's pod has a token volume"))
        .collect();
    let mut next = 0;
    c.bench_function("review (decode + inject + encode)", |b| {
        b.iter(|| {
            next = (next + 1) % replicas.len();
            let reviewed =
                review(black_box(&replicas[next]), &config, &NoCluster).expect("reviews");
            black_box(reviewed.answer.to_json())
        })
    });
    // The same with an imported-services list never seen before (one more service, named anew
    // in each review), so neither its parse nor its patch is remembered: the first pod of a
    // workload.
    let mut unseen = 0u64;
    c.bench_function("review, annotation not seen before", |b| {
        b.iter_batched(
            || {
                unseen += 1;
                first_pod(&body, unseen).expect("the fixture imports services in YAML")
            },
            |body| {
                let reviewed = review(&body, &config, &NoCluster).expect("reviews");
                assert_eq!(reviewed.outcome, Outcome::Patched, "the new list is valid");
                black_box(reviewed.answer.to_json())
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(inject_benches, benches);
criterion_main!(inject_benches);
