//! One writer among the webhook's replicas: a `coordination.k8s.io` Lease held by the replica
//! that renews it. Others take over once it has not been renewed for the lease duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

pub const LEASE_NAME: &str = "servicekeel-webhook";
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(2);

/// Whether this replica currently holds the lease.
#[derive(Debug, Clone, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Contends for the Lease `name` in `namespace` as `identity` until `shutdown`, then releases
/// it if held, so another replica takes over at once rather than after the lease duration.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    leadership: Leadership,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    loop {
        let leading = match acquire_or_renew(&api, &name, &identity).await {
            Ok(leading) => leading,
            Err(error) => {
                tracing::warn!(%error, "cannot update the leader lease");
                false
            }
        };
        if leading != leadership.0.swap(leading, Ordering::SeqCst) {
            tracing::info!(identity, leading, "leadership changed");
        }
        tokio::select! {
            _ = tokio::time::sleep(RENEW_EVERY) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    if leadership.0.swap(false, Ordering::SeqCst) {
        match release(&api, &name, &identity).await {
            Ok(()) => tracing::info!(identity, "leadership released"),
            Err(error) => tracing::warn!(%error, "cannot release the leader lease"),
        }
    }
}

/// Gives the lease up if `identity` still holds it.
async fn release(api: &Api<Lease>, name: &str, identity: &str) -> kube::Result<()> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(());
    }
    spec.holder_identity = None;
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn acquire_or_renew(api: &Api<Lease>, name: &str, identity: &str) -> kube::Result<bool> {
    let now = Timestamp::now();
    let duration = LEASE_DURATION.as_secs() as i32;
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.into()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let held_by_me = spec.holder_identity.as_deref() == Some(identity);
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(renewed)), Some(seconds)) => {
            now > *renewed + SignedDuration::from_secs(i64::from(seconds))
        }
        _ => true,
    };
    if !held_by_me && !expired && spec.holder_identity.is_some() {
        return Ok(false);
    }
    if !held_by_me {
        spec.holder_identity = Some(identity.into());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(duration);
    // The resourceVersion makes this a compare-and-swap: of two contenders, one wins.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
