//! The node's cluster DNS: the server listening on the node's InternalIP, and the `kube-dns`
//! Service in kube-system at the cluster DNS address with an EndpointSlice to that address, so
//! the proxy routes the Service like any other. Level-triggered: every change of the Node, the
//! Service or the slice (and a periodic tick) recomputes all of it; the server moves when the
//! node address does, and a deleted Service or slice is made again.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use tracing::{error, info, warn};

pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "kube-dns";
/// Marks the slice as this reconciler's, so the EndpointSlice controller leaves it alone.
pub const MANAGED_BY: &str = "oxlet.dev/cluster-dns";

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    /// The cluster DNS address: the `kube-dns` Service's ClusterIP.
    pub service_ip: IpAddr,
    /// The port the server listens on at the node address (53).
    pub port: u16,
    /// Address served until the Node reports an InternalIP.
    pub fallback_address: Option<IpAddr>,
    /// The server's settings (its listen addresses are the node's).
    pub dns: crate::Config,
    /// How often everything is checked without a change being seen.
    pub resync: Duration,
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `kube-dns` Service as kubeadm's CoreDNS addon makes it.
pub fn service(ip: IpAddr) -> Service {
    let port = |name: &str, proto: &str| ServicePort {
        name: Some(name.into()),
        port: 53,
        protocol: Some(proto.into()),
        target_port: Some(IntOrString::Int(53)),
        ..Default::default()
    };
    Service {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(labels(&[
                ("k8s-app", "kube-dns"),
                ("kubernetes.io/name", "CoreDNS"),
                ("kubernetes.io/cluster-service", "true"),
            ])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.to_string()),
            cluster_ips: Some(vec![ip.to_string()]),
            ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The slice sending the Service to `addr`:`port` on node `node`.
pub fn slice(addr: IpAddr, port: u16, node: &str) -> EndpointSlice {
    let port = |name: &str, proto: &str| EndpointPort {
        name: Some(name.into()),
        port: Some(port.into()),
        protocol: Some(proto.into()),
        ..Default::default()
    };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(labels(&[
                ("kubernetes.io/service-name", NAME),
                ("endpointslice.kubernetes.io/managed-by", MANAGED_BY),
                ("k8s-app", "kube-dns"),
            ])),
            ..Default::default()
        },
        address_type: if addr.is_ipv4() { "IPv4" } else { "IPv6" }.into(),
        endpoints: vec![Endpoint {
            addresses: vec![addr.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: Some(node.into()),
            ..Default::default()
        }],
        ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
    }
}

/// The Node's InternalIP.
async fn node_address(client: &kube::Client, node: &str) -> Option<IpAddr> {
    let n = Api::<Node>::all(client.clone())
        .get_opt(node)
        .await
        .ok()??;
    n.status?
        .addresses?
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
}

/// Makes the Service exist with its ports and labels (its ClusterIP cannot change in place).
pub async fn ensure_service(client: &kube::Client, ip: IpAddr) -> Result<(), kube::Error> {
    let api = Api::<Service>::namespaced(client.clone(), NAMESPACE);
    let want = service(ip);
    match api.get_opt(NAME).await? {
        None => match api.create(&PostParams::default(), &want).await {
            Ok(_) => info!(ip = %ip, "created Service kube-system/kube-dns"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e),
        },
        Some(mut cur) => {
            let spec = cur.spec.get_or_insert_with(Default::default);
            if spec.cluster_ip.as_deref() != Some(ip.to_string().as_str()) {
                warn!(cluster_ip = ?spec.cluster_ip, want = %ip, "Service kube-system/kube-dns has another ClusterIP than the cluster DNS address; pods will not reach DNS");
            }
            let want_spec = want.spec.expect("spec");
            let labels = cur.metadata.labels.get_or_insert_with(Default::default);
            let mut changed = false;
            for (k, v) in want.metadata.labels.expect("labels") {
                if labels.get(&k) != Some(&v) {
                    labels.insert(k, v);
                    changed = true;
                }
            }
            let spec = cur.spec.get_or_insert_with(Default::default);
            if spec.ports != want_spec.ports
                || spec.selector.as_ref().is_some_and(|s| !s.is_empty())
            {
                spec.ports = want_spec.ports;
                spec.selector = None;
                changed = true;
            }
            if changed {
                api.replace(NAME, &PostParams::default(), &cur).await?;
                info!("restored Service kube-system/kube-dns");
            }
        }
    }
    Ok(())
}

/// Makes the slice send the Service to `addr`:`port`.
pub async fn ensure_slice(
    client: &kube::Client,
    addr: IpAddr,
    port: u16,
    node: &str,
) -> Result<(), kube::Error> {
    let api = Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE);
    let mut want = slice(addr, port, node);
    match api.get_opt(NAME).await? {
        None => match api.create(&PostParams::default(), &want).await {
            Ok(_) => info!(%addr, port, "created EndpointSlice kube-system/kube-dns"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e),
        },
        Some(cur) => {
            let labels_ok = want
                .metadata
                .labels
                .iter()
                .flatten()
                .all(|(k, v)| cur.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
            if !labels_ok
                || cur.endpoints != want.endpoints
                || cur.ports != want.ports
                || cur.address_type != want.address_type
            {
                if cur.address_type != want.address_type {
                    // addressType is immutable: the slice is made anew.
                    api.delete(NAME, &Default::default()).await?;
                    api.create(&PostParams::default(), &want).await?;
                } else {
                    want.metadata.resource_version = cur.metadata.resource_version.clone();
                    api.replace(NAME, &PostParams::default(), &want).await?;
                }
                info!(%addr, port, "EndpointSlice kube-system/kube-dns points to the node again");
            }
        }
    }
    Ok(())
}

/// Serves cluster DNS on the node address and keeps `kube-dns` pointing there, until the watches
/// end.
pub async fn run(client: kube::Client, cfg: Config) -> crate::Result<()> {
    let by_name = |n: &str| watcher::Config::default().fields(&format!("metadata.name={n}"));
    let nodes = watcher(Api::<Node>::all(client.clone()), by_name(&cfg.node_name))
        .default_backoff()
        .map(|_| ());
    let svcs = watcher(
        Api::<Service>::namespaced(client.clone(), NAMESPACE),
        by_name(NAME),
    )
    .default_backoff()
    .map(|_| ());
    let slices = watcher(
        Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE),
        by_name(NAME),
    )
    .default_backoff()
    .map(|_| ());
    let mut changes = std::pin::pin!(stream::select(stream::select(nodes, svcs), slices));
    let mut server: Option<(IpAddr, crate::Running)> = None;
    loop {
        let addr = node_address(&client, &cfg.node_name)
            .await
            .or(cfg.fallback_address);
        match addr {
            None => warn!(node = %cfg.node_name, "no node address yet; cluster DNS waits for it"),
            Some(addr) => {
                if server.as_ref().map(|(a, _)| *a) != Some(addr) {
                    if let Some((old, running)) = server.take() {
                        info!(%old, new = %addr, "node address changed; cluster DNS moves");
                        running.stop().await;
                    }
                    let mut dcfg = cfg.dns.clone();
                    dcfg.listen = vec![SocketAddr::new(addr, cfg.port)];
                    if !dcfg.own_addresses.contains(&cfg.service_ip) {
                        dcfg.own_addresses.push(cfg.service_ip);
                    }
                    match crate::start(client.clone(), dcfg).await {
                        Ok(r) => server = Some((addr, r)),
                        Err(e) => error!(error = %e, "cluster DNS cannot listen; retrying"),
                    }
                }
                if server.is_some() {
                    if let Err(e) = ensure_service(&client, cfg.service_ip).await {
                        warn!(error = %e, "Service kube-system/kube-dns");
                    }
                    if let Err(e) = ensure_slice(&client, addr, cfg.port, &cfg.node_name).await {
                        warn!(error = %e, "EndpointSlice kube-system/kube-dns");
                    }
                }
            }
        }
        let retry = if server.is_some() {
            cfg.resync
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            ev = changes.next() => if ev.is_none() { return Err(crate::Error::WatchEnded) },
            _ = tokio::time::sleep(retry) => {}
        }
        // A burst of events (our own writes among them) is handled in one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Some(Some(_)) = futures_util::FutureExt::now_or_never(changes.next()) {}
    }
}
