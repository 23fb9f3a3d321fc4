//! Events about pods as kubelet records them (core/v1 Events from component `kubelet`):
//! Pulling, Pulled, Created, Started, Killing, BackOff, Failed. Best effort: each is written by a
//! task of its own; a failed write is logged, never retried.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

pub const NORMAL: &str = "Normal";
pub const WARNING: &str = "Warning";

#[derive(Clone)]
pub struct Recorder {
    client: kube::Client,
    node: String,
}

/// The field path of a container in the pod spec (`spec.containers{name}`).
pub fn field_path(init: bool, name: &str) -> String {
    let list = if init { "initContainers" } else { "containers" };
    format!("spec.{list}{{{name}}}")
}

impl Recorder {
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self {
            client,
            node: node.to_string(),
        }
    }

    /// Records one event about `pod` (about one of its containers with `field_path`).
    pub fn pod(
        &self,
        pod: &Pod,
        field_path: Option<String>,
        type_: &str,
        reason: &str,
        message: String,
    ) {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let now = k8s_openapi::jiff::Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name),
                namespace: Some(ns.clone()),
                uid: pod.metadata.uid.clone(),
                resource_version: pod.metadata.resource_version.clone(),
                field_path,
            },
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some(type_.into()),
            source: Some(EventSource {
                component: Some("kubelet".into()),
                host: Some(self.node.clone()),
            }),
            first_timestamp: Some(crate::status::now()),
            last_timestamp: Some(crate::status::now()),
            event_time: None,
            count: Some(1),
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(self.node.clone()),
            action: None,
            related: None,
            series: None,
        };
        // Written in the background, as kubelet's recorder does: a pod's start never waits
        // for its events.
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let reason = reason.to_string();
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::debug!(error = %e, reason, "record event");
            }
        });
    }
}
