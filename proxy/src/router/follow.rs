//! Following a kind of object on the API server: a kube-runtime reflector whose store is handed
//! to a callback after the first complete list and after every change (debounced), until
//! stopped. While the API server is unreachable the watcher retries with backoff and nothing is
//! handed on, so the last view stays in force.
//!
//! Every router follows objects of the whole cluster and its store keeps each for as long as it
//! lives, so each object is cut down to what the callback reads as it arrives (`keep`).

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::watch as signal;

/// Quiet time after a change before the callback runs.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Of an object's metadata, which object and which version of it this is (name, namespace, uid,
/// resourceVersion): what a `keep` leaves of an object it needs nothing else of.
pub fn identity(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    }
}

/// `keep` cuts each object down, in place, to what `changed` reads of it.
pub async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    keep: fn(&mut K),
    changed: impl Fn(&Store<K>) + Send,
    mut stop: signal::Receiver<bool>,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let watched = watcher(api, config).default_backoff().modify(keep);
    let mut events = reflector(writer, watched).boxed();
    let mut synced = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = crate::shutdown::stopped(&mut stop) => return,
        };
        let change = match event {
            None => return,
            Some(Err(error)) => {
                tracing::warn!(%error, what, "watch failed; retrying, the last view stays");
                false
            }
            Some(Ok(watcher::Event::InitDone)) => {
                if !synced {
                    tracing::info!(what, objects = store.len(), "watch synced");
                }
                synced = true;
                true
            }
            Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => synced,
            Some(Ok(_)) => false,
        };
        if !change {
            continue;
        }
        // Let a burst of events settle, taking what else arrives meanwhile.
        let settle = tokio::time::sleep(DEBOUNCE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                more = events.next() => if more.is_none() { return },
            }
        }
        changed(&store);
    }
}
