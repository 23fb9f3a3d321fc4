//! The cluster as the DNS server sees it: reflector stores of Services, EndpointSlices, Pods and
//! Namespaces, fed by watches (with backoff), read at every query.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tracing::warn;

/// How long a query waits for the first full view of the cluster.
const READY_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Cluster {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    ready: Arc<AtomicBool>,
}

impl Cluster {
    /// Stores and the future that keeps them filled (to be spawned).
    pub fn watch(client: kube::Client) -> (Cluster, impl Future<Output = ()> + Send + 'static) {
        let (services, services_w) = reflector::store::<Service>();
        let (slices, slices_w) = reflector::store::<EndpointSlice>();
        let (pods, pods_w) = reflector::store::<Pod>();
        let (namespaces, namespaces_w) = reflector::store::<Namespace>();
        let cfg = watcher::Config::default;
        let a = reflector(
            services_w,
            watcher(Api::<Service>::all(client.clone()), cfg()).default_backoff(),
        )
        .map(|e| e.map(|_| ()));
        let b = reflector(
            slices_w,
            watcher(Api::<EndpointSlice>::all(client.clone()), cfg()).default_backoff(),
        )
        .map(|e| e.map(|_| ()));
        let c = reflector(
            pods_w,
            watcher(Api::<Pod>::all(client.clone()), cfg()).default_backoff(),
        )
        .map(|e| e.map(|_| ()));
        let d = reflector(
            namespaces_w,
            watcher(Api::<Namespace>::all(client), cfg()).default_backoff(),
        )
        .map(|e| e.map(|_| ()));
        let cluster = Cluster {
            services,
            slices,
            pods,
            namespaces,
            ready: Arc::new(AtomicBool::new(false)),
        };
        let watched = cluster.clone();
        let fut = async move {
            let ready = watched.clone();
            let mark = async move {
                let _ = tokio::join!(
                    ready.services.wait_until_ready(),
                    ready.slices.wait_until_ready(),
                    ready.pods.wait_until_ready(),
                    ready.namespaces.wait_until_ready()
                );
                ready.ready.store(true, Ordering::Release);
            };
            let events = async move {
                let mut all =
                    std::pin::pin!(stream::select(stream::select(a, b), stream::select(c, d)));
                while let Some(ev) = all.next().await {
                    if let Err(e) = ev {
                        warn!(error = %e, "cluster DNS watch failed; retrying with backoff");
                    }
                }
            };
            tokio::join!(mark, events);
        };
        (cluster, fut)
    }

    /// Whether every store holds a full list; waits for it a few seconds at most.
    pub async fn ready(&self) -> bool {
        if self.ready.load(Ordering::Acquire) {
            return true;
        }
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.ready.load(Ordering::Acquire) {
                return true;
            }
        }
        false
    }
}
