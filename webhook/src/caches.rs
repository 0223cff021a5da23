//! Watch-backed caches of Services and Namespaces (kube-runtime reflectors): admission reads
//! them without calling the API server. Until the Services cache has synced, exports are
//! reported unknown and pods are admitted without them; the reconciler fills them in later.
//!
//! The Services cache keeps of each Service what exports are computed from
//! ([`keep_selection`]).
//!
//! The Services reflector's events are handed to the reconciler ([`ServiceEvents`]) rather than
//! watched twice: a reflector updates its store before it yields the event, so a reconcile
//! triggered by a Service change always finds that change in the cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use servicekeel_api::{ServiceList, keys};

use crate::exports::keep_selection;
use crate::view::{ClusterView, labels_forbid_host_path, parse_namespace_defaults};

/// Every Service created, changed or deleted, after the cache has taken it in.
pub type ServiceEvents = BoxStream<'static, Result<Service, watcher::Error>>;

#[derive(Debug, Clone)]
pub struct Caches {
    services: Store<Service>,
    namespaces: Store<Namespace>,
    services_ready: Arc<AtomicBool>,
}

impl Caches {
    /// Starts the watches; they run (and retry with backoff) as long as the runtime does. The
    /// Services watch runs as long as the returned events are polled (by the reconciler).
    pub fn start(client: &Client) -> (Caches, ServiceEvents) {
        let (services, writer) = reflector::store();
        let events = reflector(
            writer,
            watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(keep_selection),
        )
        .touched_objects()
        .boxed();
        let namespaces = watch::<Namespace>(Api::all(client.clone()));
        let services_ready = Arc::new(AtomicBool::new(false));
        let (store, ready) = (services.clone(), services_ready.clone());
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                ready.store(true, Ordering::SeqCst);
                tracing::info!(services = store.len(), "Services cache synced");
            }
        });
        let caches = Caches {
            services,
            namespaces,
            services_ready,
        };
        (caches, events)
    }
}

fn watch<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(async move {
        let kind = K::kind(&()).into_owned();
        stream
            .for_each(|event| {
                if let Err(error) = event {
                    tracing::warn!(%error, kind, "watch failed; retrying");
                }
                futures::future::ready(())
            })
            .await;
    });
    store
}

use kube::runtime::reflector::reflector;

/// Of an object's metadata, which object and which version of it this is (name, namespace, uid,
/// resourceVersion): all a cache needs of an object it keeps nothing else of.
pub fn identity(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    }
}

impl ClusterView for Caches {
    fn namespace_defaults(&self, namespace: &str) -> Result<Option<ServiceList>, String> {
        let Some(object) = self.namespaces.get(&ObjectRef::new(namespace)) else {
            return Ok(None);
        };
        let annotations = object.metadata.annotations.as_ref();
        match annotations.and_then(|a| a.get(keys::DEFAULT_IMPORTED_SERVICES)) {
            None => Ok(None),
            Some(value) => parse_namespace_defaults(namespace, value).map(Some),
        }
    }

    fn forbids_host_path(&self, namespace: &str) -> bool {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .is_some_and(|object| labels_forbid_host_path(object.metadata.labels.as_ref()))
    }

    fn services(&self, namespace: &str) -> Option<Vec<Arc<Service>>> {
        if !self.services_ready.load(Ordering::SeqCst) {
            return None;
        }
        Some(
            self.services
                .state_filter(|s| s.metadata.namespace.as_deref() == Some(namespace)),
        )
    }
}
