//! Events as the controllers' event recorders write them: one Event per object, reason and
//! message; a repeat within ten minutes raises its count instead of adding another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::debug;

const AGGREGATE_WINDOW: Duration = Duration::from_secs(600);
/// Per object: at most this many events at once, then one more per refill period (client-go's
/// spam filter), so a controller creating a thousand pods writes tens of events, not a thousand.
const SPAM_BURST: f64 = 25.0;
const SPAM_REFILL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Type {
    Normal,
    Warning,
}

/// An event's identity: object uid, type, reason, message.
type EventKey = (String, Type, String, String);
/// Where it was written and how often: namespace, name, count, last seen.
type Written = (String, String, i32, Instant);

#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: &'static str,
    /// (object uid, type, reason, message) -> (event namespace and name, count, last seen)
    seen: Arc<Mutex<HashMap<EventKey, Written>>>,
    /// Per object uid: tokens left and when they were last counted.
    budget: Arc<Mutex<HashMap<String, (f64, Instant)>>>,
}

impl Recorder {
    pub fn new(client: Client, component: &'static str) -> Recorder {
        Recorder {
            client,
            component,
            seen: Arc::default(),
            budget: Arc::default(),
        }
    }

    /// Records an event about `obj` in the background; failures are logged, never returned
    /// (as client-go's recorder: events are best effort and never slow the controller).
    pub fn publish<K>(&self, obj: &K, ty: Type, reason: &str, message: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let involved = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: Some(obj.name_any()),
            namespace: obj.meta().namespace.clone(),
            uid: obj.meta().uid.clone(),
            resource_version: obj.meta().resource_version.clone(),
            ..Default::default()
        };
        if !self.take_token(involved.uid.as_deref().unwrap_or("")) {
            debug!(reason, "event dropped by the spam filter");
            return;
        }
        let (this, reason) = (self.clone(), reason.to_string());
        tokio::spawn(async move { this.write(involved, ty, reason, message).await });
    }

    async fn write(&self, involved: ObjectReference, ty: Type, reason: String, message: String) {
        let uid = involved.uid.clone().unwrap_or_default();
        let key = (uid, ty, reason.clone(), message.clone());
        let now = Timestamp::now();
        let prior = {
            let mut seen = self.seen.lock().expect("events lock");
            seen.retain(|_, v| v.3.elapsed() < AGGREGATE_WINDOW);
            seen.get(&key).cloned()
        };
        if let Some((ns, name, count, _)) = prior {
            let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
            let patch = json!({"count": count + 1, "lastTimestamp": Time(now)});
            if api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                self.remember(key, ns, name, count + 1);
                return;
            }
        }
        let ns = involved
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = format!(
            "{}.{:x}",
            involved.name.as_deref().unwrap_or(""),
            now.as_nanosecond() as u128 + rand::random::<u16>() as u128
        );
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: involved,
            reason: Some(reason.clone()),
            message: Some(message),
            type_: Some(format!("{ty:?}")),
            source: Some(EventSource {
                component: Some(self.component.to_string()),
                host: None,
            }),
            reporting_component: Some(self.component.to_string()),
            reporting_instance: Some(self.component.to_string()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: None::<MicroTime>,
            count: Some(1),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => self.remember(key, ns, name, 1),
            Err(e) => debug!("event {reason}: {e}"),
        }
    }

    fn take_token(&self, uid: &str) -> bool {
        let mut b = self.budget.lock().expect("events lock");
        let now = Instant::now();
        b.retain(|_, (tokens, at)| *tokens < SPAM_BURST || now.duration_since(*at) < SPAM_REFILL);
        let (tokens, at) = b.entry(uid.to_string()).or_insert((SPAM_BURST, now));
        let refill = now.duration_since(*at).as_secs_f64() / SPAM_REFILL.as_secs_f64();
        *tokens = (*tokens + refill).min(SPAM_BURST);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }

    fn remember(&self, key: EventKey, ns: String, name: String, n: i32) {
        self.seen
            .lock()
            .expect("events lock")
            .insert(key, (ns, name, n, Instant::now()));
    }
}
