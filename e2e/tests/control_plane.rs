//! The webhook through a real kube-apiserver. One local control plane (etcd, kube-apiserver,
//! the real webhook binary registered from `manifests/`) serves every test; each test works in
//! its own namespace. The apiserver decides what an AdmissionReview looks like, applies the
//! patch and validates the resulting pod, so what is checked here is what a cluster stores.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ObjectMeta, PostParams};
use libtest_mimic::Arguments;
use serde_json::{Value, json};
use servicekeel_e2e::cluster::LocalCluster;
use servicekeel_e2e::harness::{self, Test};
use servicekeel_e2e::paths;
use servicekeel_e2e::process::Lifetime;
use servicekeel_e2e::webhook::is_injected;
use servicekeel_webhook::config::Config;
use servicekeel_webhook::offline::inject_documents;
use tokio::sync::RwLock;

#[path = "control_plane/admission.rs"]
mod admission;
#[path = "control_plane/certificates.rs"]
mod certificates;
#[path = "control_plane/common.rs"]
mod common;
#[path = "control_plane/exports.rs"]
mod exports;
#[path = "control_plane/router.rs"]
mod router;

use admission::*;
use certificates::*;
use common::*;
use exports::*;
use router::*;

struct Shared {
    cluster: RwLock<LocalCluster>,
    client: kube::Client,
    kubeconfig: PathBuf,
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    harness::init_logging();
    let tests: Vec<Test<Shared>> = vec![
        (
            "injected_pods_are_stored_as_offline_injection_predicts",
            |s| Box::pin(golden_pods_are_stored_as_predicted(s)),
        ),
        (
            "injected_workload_templates_pass_apiserver_validation",
            |s| Box::pin(golden_workloads_validate(s)),
        ),
        ("pods_outside_scope_are_stored_untouched", |s| {
            Box::pin(pods_outside_scope_are_untouched(s))
        }),
        ("invalid_annotation_is_refused_naming_the_field", |s| {
            Box::pin(invalid_annotation_is_refused(s))
        }),
        ("kubectl_apply_stores_the_injected_pod", |s| {
            Box::pin(kubectl_apply_injects(s))
        }),
        ("server_side_dry_run_injects_without_storing", |s| {
            Box::pin(server_side_dry_run(s))
        }),
        (
            "webhook_outage_fails_closed_only_where_injection_is_on",
            |s| Box::pin(webhook_outage(s)),
        ),
        ("exports_are_computed_at_admission", |s| {
            Box::pin(exports_at_admission(s))
        }),
        ("exports_follow_services_and_labels_after_admission", |s| {
            Box::pin(exports_follow_changes(s))
        }),
        ("namespace_defaults_merge_between_pod_and_cluster", |s| {
            Box::pin(namespace_defaults(s))
        }),
        ("webhook_permissions_are_no_broader_than_needed", |s| {
            Box::pin(permissions(s))
        }),
        (
            "managed_certificate_rotates_under_load_and_ca_bundle_heals",
            |s| Box::pin(certificate_rotation(s)),
        ),
        ("one_replica_leads_and_hands_over_on_shutdown", |s| {
            Box::pin(leader_election(s))
        }),
        ("replicas_racing_for_the_certificate_agree_on_one", |s| {
            Box::pin(certificate_race(s))
        }),
        ("router_follows_exporting_pods_through_the_api", |s| {
            Box::pin(router_follows_exporting_pods(s))
        }),
    ];
    if let Some(listed) = harness::list_only(&args, &tests) {
        return listed.exit_code();
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = paths::run_dir("servicekeel-e2e");
    let started = runtime.block_on(async {
        let cluster = LocalCluster::start(&dir, Lifetime::TiedToThisProcess).await?;
        let client = cluster.client().await?;
        Ok::<_, anyhow::Error>((cluster, client))
    });
    let (cluster, client) = match started {
        Ok(started) => started,
        Err(error) => {
            eprintln!("cannot start the local control plane: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared {
        kubeconfig: cluster.kubeconfig().to_owned(),
        cluster: RwLock::new(cluster),
        client,
    });
    let conclusion = harness::run(&args, tests, &shared, runtime.handle(), |_| String::new());
    // Stop the control plane before the runtime goes, then remove its files.
    drop(shared);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    conclusion.exit_code()
}
