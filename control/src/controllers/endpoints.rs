//! The EndpointSlice and Endpoints controllers: for each Service with a selector, its pods'
//! addresses and resolved target ports, with ready/serving/terminating from the pods.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, ObjectReference, Pod,
    Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::ResourceExt;
use tokio::task::JoinSet;

use super::owners;
use super::queue::{Action, Queue};
use super::{key_of, Ctx, Error, Key};

/// A resolved port set (name, number, protocol) and the endpoints that share it.
type PortSet = Vec<(Option<String>, i32, String)>;
type Groups<'a> = BTreeMap<PortSet, Vec<(Endpoint, &'a Pod)>>;

pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// At most this many endpoints per slice (kube-controller-manager's default).
const MAX_PER_SLICE: usize = 100;

pub fn start(tasks: &mut JoinSet<()>, ctx: Arc<Ctx>) {
    let q = Queue::<Key>::new(ctx.cfg.max_backoff);
    let (qq, c) = (q.clone(), ctx.clone());
    let mut svc_events = ctx.services.subscribe();
    let mut pod_events = ctx.pods.subscribe();
    let mut slice_events = ctx.slices.subscribe();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                Some(s) = svc_events.recv() => qq.add(key_of(s.as_ref())),
                Some(p) = pod_events.recv() => {
                    let ns = p.namespace().unwrap_or_default();
                    for s in c.services.in_namespace(&ns) {
                        if selects(&s, &p) {
                            qq.add(key_of(s.as_ref()));
                        }
                    }
                }
                Some(sl) = slice_events.recv() => {
                    if sl.labels().get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER) {
                        if let Some(svc) = sl.labels().get(SERVICE_NAME) {
                            qq.add((sl.namespace().unwrap_or_default(), svc.clone()));
                        }
                    }
                }
                else => break,
            }
        }
    });
    for s in ctx.services.store().state() {
        q.add(key_of(s.as_ref()));
    }
    q.run(tasks, 2, move |k| reconcile(ctx.clone(), k));
}

fn selector(s: &Service) -> Option<&BTreeMap<String, String>> {
    s.spec.as_ref()?.selector.as_ref().filter(|m| !m.is_empty())
}

fn selects(s: &Service, p: &Pod) -> bool {
    let Some(sel) = selector(s) else {
        return false;
    };
    let labels = p.metadata.labels.clone().unwrap_or_default();
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The container port a Service port reaches on `pod`: a number as is, a name through the
/// pod's container ports.
fn target_port(sp: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<i32> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse() {
                return Some(n);
            }
            let proto = sp.protocol.as_deref().unwrap_or("TCP");
            pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports.iter().flatten().find_map(|p| {
                    (p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == proto)
                        .then_some(p.container_port)
                })
            })
        }
    }
}

async fn reconcile(ctx: Arc<Ctx>, key: Key) -> Result<Action, Error> {
    let (ns, name) = (&key.0, &key.1);
    let slice_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), ns);
    let ours: Vec<Arc<EndpointSlice>> = ctx
        .slices
        .in_namespace(ns)
        .into_iter()
        .filter(|s| {
            s.labels().get(SERVICE_NAME) == Some(name)
                && s.labels().get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER)
        })
        .collect();
    let svc = ctx.services.get(Some(ns), name);
    let Some(svc) =
        svc.filter(|s| selector(s).is_some() && s.metadata.deletion_timestamp.is_none())
    else {
        // No Service, or one without a selector: its endpoints are someone else's.
        for s in ours {
            delete_ignoring_missing(&slice_api, &s.name_any()).await?;
        }
        let ep_api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), ns);
        if let Some(ep) = ep_api.get_opt(name).await? {
            if ep
                .labels()
                .get("endpoints.kubernetes.io/managed-by")
                .map(String::as_str)
                == Some("endpoint-controller")
            {
                delete_ignoring_missing(&ep_api, name).await?;
            }
        }
        return Ok(Action::Done);
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let mut pods: Vec<Arc<Pod>> = ctx
        .pods
        .in_namespace(ns)
        .into_iter()
        .filter(|p| selects(&svc, p) && !super::pods::is_terminal(p))
        .collect();
    pods.sort_by_key(|p| p.name_any());

    // Endpoints grouped by the ports they resolve to (pods may name ports differently).
    let mut groups: Groups = BTreeMap::new();
    for p in &pods {
        let Some(ip) = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .filter(|i| !i.is_empty())
        else {
            continue;
        };
        let ports: PortSet = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|sp| {
                target_port(sp, p).map(|n| {
                    (
                        sp.name.clone(),
                        n,
                        sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    )
                })
            })
            .collect();
        let terminating = p.metadata.deletion_timestamp.is_some();
        let pod_ready = super::pods::is_ready(p);
        let ep = Endpoint {
            addresses: vec![ip],
            conditions: Some(EndpointConditions {
                ready: Some(publish_not_ready || (pod_ready && !terminating)),
                serving: Some(publish_not_ready || pod_ready),
                terminating: Some(terminating),
            }),
            node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some(ns.clone()),
                name: Some(p.name_any()),
                uid: p.metadata.uid.clone(),
                ..Default::default()
            }),
            hostname: p.spec.as_ref().and_then(|s| s.hostname.clone()),
            ..Default::default()
        };
        groups.entry(ports).or_default().push((ep, p));
    }
    if groups.is_empty() {
        // A placeholder slice (no endpoints, no ports) says "no endpoints" to readers.
        groups.insert(Vec::new(), Vec::new());
    }

    let mut labels = svc.labels().clone();
    labels.insert(SERVICE_NAME.into(), name.clone());
    labels.insert(MANAGED_BY.into(), CONTROLLER.into());
    let mut desired: Vec<EndpointSlice> = Vec::new();
    for (ports, eps) in &groups {
        let slice_ports: Vec<EndpointPort> = ports
            .iter()
            .map(|(n, port, proto)| EndpointPort {
                name: Some(n.clone().unwrap_or_default()),
                port: Some(*port),
                protocol: Some(proto.clone()),
                app_protocol: spec
                    .ports
                    .iter()
                    .flatten()
                    .find(|sp| sp.name == *n)
                    .and_then(|sp| sp.app_protocol.clone()),
            })
            .collect();
        let chunks: Vec<Vec<Endpoint>> = if eps.is_empty() {
            vec![Vec::new()]
        } else {
            eps.chunks(MAX_PER_SLICE)
                .map(|c| c.iter().map(|(e, _)| e.clone()).collect())
                .collect()
        };
        for endpoints in chunks {
            desired.push(EndpointSlice {
                metadata: ObjectMeta {
                    namespace: Some(ns.clone()),
                    generate_name: Some(format!("{name}-")),
                    labels: Some(labels.clone()),
                    owner_references: Some(vec![owners::controller_ref(svc.as_ref())]),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints,
                ports: Some(slice_ports.clone()),
            });
        }
    }
    // Reuse existing slices in name order; create or delete the difference.
    let mut existing: Vec<Arc<EndpointSlice>> = ours;
    existing.sort_by_key(|s| s.name_any());
    for (i, mut want) in desired.into_iter().enumerate() {
        if let Some(cur) = existing.get(i) {
            let same = cur.endpoints == want.endpoints
                && cur.ports == want.ports
                && cur.metadata.labels == want.metadata.labels;
            if !same {
                want.metadata.name = cur.metadata.name.clone();
                want.metadata.generate_name = None;
                want.metadata.resource_version = cur.metadata.resource_version.clone();
                slice_api
                    .replace(&cur.name_any(), &PostParams::default(), &want)
                    .await?;
            }
        } else {
            slice_api.create(&PostParams::default(), &want).await?;
        }
    }
    let keep = groups
        .values()
        .map(|e| e.len().div_ceil(MAX_PER_SLICE).max(1))
        .sum::<usize>();
    for s in existing.iter().skip(keep) {
        delete_ignoring_missing(&slice_api, &s.name_any()).await?;
    }
    sync_endpoints(&ctx, &svc, &groups).await?;
    Ok(Action::Done)
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The legacy Endpoints object of the same name (what `kubectl describe svc` prints).
async fn sync_endpoints(ctx: &Ctx, svc: &Service, groups: &Groups<'_>) -> Result<(), Error> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    let subsets: Vec<EndpointSubset> = groups
        .iter()
        .filter(|(_, eps)| !eps.is_empty())
        .map(|(ports, eps)| {
            let addr = |e: &Endpoint, p: &Pod| EndpointAddress {
                ip: e.addresses[0].clone(),
                node_name: e.node_name.clone(),
                target_ref: e.target_ref.clone(),
                hostname: p.spec.as_ref().and_then(|s| s.hostname.clone()),
            };
            let ready: Vec<EndpointAddress> = eps
                .iter()
                .filter(|(e, _)| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .map(|(e, p)| addr(e, p))
                .collect();
            let not_ready: Vec<EndpointAddress> = eps
                .iter()
                .filter(|(e, _)| e.conditions.as_ref().and_then(|c| c.ready) != Some(true))
                .filter(|(e, _)| e.conditions.as_ref().and_then(|c| c.terminating) != Some(true))
                .map(|(e, p)| addr(e, p))
                .collect();
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, port, proto)| CorePort {
                            name: n.clone(),
                            port: *port,
                            protocol: Some(proto.clone()),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            }
        })
        .filter(|s| s.addresses.is_some() || s.not_ready_addresses.is_some())
        .collect();
    let mut labels = svc.labels().clone();
    labels.insert(
        "endpoints.kubernetes.io/managed-by".into(),
        "endpoint-controller".into(),
    );
    let mut want = Endpoints {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    };
    match api.get_opt(&name).await? {
        None => {
            api.create(&PostParams::default(), &want).await?;
        }
        Some(cur) => {
            if cur.subsets != want.subsets || cur.metadata.labels != want.metadata.labels {
                want.metadata.resource_version = cur.metadata.resource_version.clone();
                want.metadata.annotations = cur.metadata.annotations.clone();
                api.replace(&name, &PostParams::default(), &want).await?;
            }
        }
    }
    Ok(())
}
