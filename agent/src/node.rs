//! The Node object: registration, status (capacity, addresses, nodeInfo, conditions) every
//! `node_status_interval` when it changed or every `node_status_report_interval`, and the Lease
//! in `kube-node-lease` renewed every `node_status_interval`, as kubelet does.

use crate::{Config, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// The Kubernetes version whose kubelet behaviour the agent follows.
pub const KUBELET_VERSION: &str = "v1.33.0";
pub const KUBELET_PORT: i32 = 10250;
pub const MAX_PODS: u32 = 110;

/// `oxlet://<crate version>`, the node's `containerRuntimeVersion`.
pub fn runtime_version() -> String {
    format!("oxlet://{}", env!("CARGO_PKG_VERSION"))
}

/// Kubernetes' name for this machine's architecture.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The node's InternalIP: the configured one, else the first IPv4 address of the interface
/// holding the default route, else loopback.
pub fn internal_ip(cfg: &Config) -> IpAddr {
    cfg.node_ip
        .or_else(default_route_ip)
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

fn default_route_ip() -> Option<IpAddr> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let dev = routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
    })?;
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        let sin = a.address?.as_sockaddr_in().copied()?;
        (a.interface_name == dev).then(|| IpAddr::V4(sin.ip()))
    })
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

/// What the machine has: cpu, memory, ephemeral-storage (of the data dir's file system), pods.
pub fn capacity(cfg: &Config) -> BTreeMap<String, Quantity> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let disk_kib = nix::sys::statvfs::statvfs(&cfg.data_dir)
        .or_else(|_| nix::sys::statvfs::statvfs("/"))
        .map(|s| s.blocks() * s.fragment_size() / 1024)
        .unwrap_or(0);
    BTreeMap::from([
        ("cpu".to_string(), Quantity(cpus.to_string())),
        ("memory".to_string(), Quantity(format!("{mem_kib}Ki"))),
        (
            "ephemeral-storage".to_string(),
            Quantity(format!("{disk_kib}Ki")),
        ),
        ("pods".to_string(), Quantity(MAX_PODS.to_string())),
    ])
}

/// kubelet's hard eviction thresholds, kept out of allocatable: memory.available < 100Mi and
/// nodefs.available < 10%.
const EVICTION_MEMORY: u64 = 100 << 20;
const EVICTION_DISK_PERCENT: u64 = 10;

/// Capacity minus reservations (system-reserved and kube-reserved together) and the eviction
/// thresholds, as kubelet computes allocatable; never below zero.
pub fn allocatable(
    capacity: &BTreeMap<String, Quantity>,
    reserved: &BTreeMap<String, Quantity>,
) -> BTreeMap<String, Quantity> {
    use runtime::cgroup::{cpu_milli, memory_bytes};
    let mut out = capacity.clone();
    let bytes = |m: &BTreeMap<String, Quantity>, k: &str| {
        m.get(k).and_then(|q| memory_bytes(q).ok()).unwrap_or(0)
    };
    if let Some(cpu) = capacity.get("cpu").and_then(|q| cpu_milli(q).ok()) {
        let r = reserved
            .get("cpu")
            .and_then(|q| cpu_milli(q).ok())
            .unwrap_or(0);
        let left = cpu.saturating_sub(r);
        let q = if left % 1000 == 0 {
            (left / 1000).to_string()
        } else {
            format!("{left}m")
        };
        out.insert("cpu".into(), Quantity(q));
    }
    let mem = bytes(capacity, "memory");
    let mem_left = mem.saturating_sub(bytes(reserved, "memory") + EVICTION_MEMORY);
    out.insert("memory".into(), Quantity(format!("{}Ki", mem_left / 1024)));
    let disk = bytes(capacity, "ephemeral-storage");
    let disk_reserved = bytes(reserved, "ephemeral-storage") + disk * EVICTION_DISK_PERCENT / 100;
    out.insert(
        "ephemeral-storage".into(),
        Quantity(disk.saturating_sub(disk_reserved).to_string()),
    );
    out
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> NodeCondition {
    NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        ..Default::default()
    }
}

/// The status kubelet would report now, without times (see `with_times`).
pub fn current_status(cfg: &Config) -> NodeStatus {
    let capacity = capacity(cfg);
    let uname = nix::sys::utsname::uname().ok();
    let kernel = uname
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    NodeStatus {
        allocatable: Some(allocatable(&capacity, &cfg.reserved)),
        capacity: Some(capacity),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: internal_ip(cfg).to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: hostname(),
            },
        ]),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "kubelet is posting ready status",
            ),
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(cfg.kubelet_port),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: arch().into(),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: runtime_version(),
            kernel_version: kernel,
            kube_proxy_version: String::new(),
            kubelet_version: KUBELET_VERSION.into(),
            machine_id: read_trim("/etc/machine-id"),
            operating_system: "linux".into(),
            os_image: os_image(),
            system_uuid: read_trim("/sys/class/dmi/id/product_uuid"),
            swap: None,
        }),
        ..Default::default()
    }
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    crate::status::now()
}

/// Sets heartbeat times to now and transition times to the previous ones when the condition's
/// status did not change.
pub fn with_times(mut status: NodeStatus, previous: Option<&NodeStatus>) -> NodeStatus {
    let t = now();
    let old = previous.and_then(|p| p.conditions.as_ref());
    for c in status.conditions.iter_mut().flatten() {
        let same = old.and_then(|o| {
            o.iter()
                .find(|p| p.type_ == c.type_ && p.status == c.status)
        });
        c.last_heartbeat_time = Some(t.clone());
        c.last_transition_time = Some(
            same.and_then(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| t.clone()),
        );
    }
    status
}

/// Whether two statuses differ in anything but heartbeat times.
pub fn changed(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        s.images = None;
        s
    };
    strip(a) != strip(b)
}

fn labels(cfg: &Config) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kubernetes.io/hostname".into(), cfg.node_name.clone()),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), arch().into()),
        ("beta.kubernetes.io/os".into(), "linux".into()),
        ("beta.kubernetes.io/arch".into(), arch().into()),
    ])
}

/// Creates the Node, or takes over an existing one of the same name (an earlier run's), then
/// reports its status once. Returns the Node as stored and the status reported, which the
/// heartbeat goes on from.
pub async fn register(client: &kube::Client, cfg: &Config) -> Result<(Node, NodeStatus)> {
    let api: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(cfg.node_name.clone()),
            labels: Some(labels(cfg)),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!(node = %cfg.node_name, "registered node"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let patch = serde_json::json!({"metadata": {"labels": labels(cfg)}});
            api.patch(
                &cfg.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
            tracing::info!(node = %cfg.node_name, "node already registered; taking it over");
        }
        Err(e) => return Err(e.into()),
    }
    let existing = api.get_status(&cfg.node_name).await?;
    let status = with_times(current_status(cfg), existing.status.as_ref());
    let node = patch_status(&api, &cfg.node_name, &status).await?;
    Ok((node, status))
}

/// The Node's spec.podCIDR once it has one, polling for at most `limit`.
pub async fn wait_for_pod_cidr(
    client: &kube::Client,
    name: &str,
    limit: std::time::Duration,
) -> Option<String> {
    let api: Api<Node> = Api::all(client.clone());
    let start = std::time::Instant::now();
    loop {
        if let Ok(n) = api.get(name).await {
            if let Some(c) = n.spec.and_then(|s| s.pod_cidr) {
                return Some(c);
            }
        }
        if start.elapsed() >= limit {
            tracing::warn!(node = name, "the Node got no spec.podCIDR in {limit:?}");
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn patch_status(api: &Api<Node>, name: &str, status: &NodeStatus) -> Result<Node> {
    let patch = serde_json::json!({ "status": status });
    Ok(api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}

/// Node status and Lease, forever, from the status `registered` reported; failures are logged
/// and retried on the next tick (the Lease sooner, backing off 200 ms to 7 s as kubelet does).
pub async fn heartbeat(client: kube::Client, cfg: Config, registered: NodeStatus) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    // What register wrote is not written again, and its transition times are kept.
    let mut last = (registered, Instant::now());
    let mut tick = tokio::time::interval(cfg.node_status_interval);
    loop {
        tick.tick().await;
        let mut delay = Duration::from_millis(200);
        for _ in 0..5 {
            match renew_lease(&leases, &nodes, &cfg.node_name).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "renew node lease");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(7));
                }
            }
        }
        let status = with_times(current_status(&cfg), Some(&last.0));
        if !changed(&last.0, &status) && last.1.elapsed() < cfg.node_status_report_interval {
            continue;
        }
        match patch_status(&nodes, &cfg.node_name, &status).await {
            Ok(_) => last = (status, Instant::now()),
            Err(e) => tracing::warn!(error = %e, "update node status"),
        }
    }
}

/// Creates or renews the node's Lease (holder = node, 40 s, owned by the Node).
pub async fn renew_lease(leases: &Api<Lease>, nodes: &Api<Node>, node: &str) -> Result<()> {
    let renew = MicroTime(k8s_openapi::jiff::Timestamp::now());
    match leases.get_opt(node).await? {
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(renew);
            spec.holder_identity = Some(node.to_string());
            spec.lease_duration_seconds = Some(LEASE_DURATION_SECONDS);
            leases.replace(node, &PostParams::default(), &lease).await?;
        }
        None => {
            let owner = nodes.get(node).await?;
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.to_string()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: node.to_string(),
                        uid: owner.metadata.uid.unwrap_or_default(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(node.to_string()),
                    lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
                    renew_time: Some(renew),
                    ..Default::default()
                }),
            };
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_has_kubelet_conditions_and_runtime_version() {
        let s = current_status(&Config::new("n1"));
        let conds: Vec<(String, String, String)> = s
            .conditions
            .iter()
            .flatten()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone().unwrap()))
            .collect();
        assert_eq!(
            conds[3],
            ("Ready".into(), "True".into(), "KubeletReady".into())
        );
        assert_eq!(conds[0].2, "KubeletHasSufficientMemory");
        let info = s.node_info.unwrap();
        assert_eq!(info.container_runtime_version, "oxlet://0.1.0");
        assert_eq!(info.operating_system, "linux");
        assert!(!info.kernel_version.is_empty());
        assert_eq!(s.capacity.unwrap()["pods"], Quantity("110".into()));
    }

    #[test]
    fn allocatable_subtracts_reservations_and_eviction_thresholds() {
        let q = |v: &str| Quantity(v.into());
        let cap = BTreeMap::from([
            ("cpu".to_string(), q("4")),
            ("memory".to_string(), q("4Gi")),
            ("ephemeral-storage".to_string(), q("1000Ki")),
            ("pods".to_string(), q("110")),
        ]);
        let none = allocatable(&cap, &BTreeMap::new());
        assert_eq!(none["cpu"], q("4"));
        assert_eq!(none["memory"], q(&format!("{}Ki", (4 << 20) - (100 << 10))));
        assert_eq!(none["ephemeral-storage"], q("921600"));
        assert_eq!(none["pods"], q("110"));
        let reserved = BTreeMap::from([
            ("cpu".to_string(), q("250m")),
            ("memory".to_string(), q("1Gi")),
        ]);
        let some = allocatable(&cap, &reserved);
        assert_eq!(some["cpu"], q("3750m"));
        assert_eq!(some["memory"], q(&format!("{}Ki", (3 << 20) - (100 << 10))));
    }

    #[test]
    fn heartbeat_only_is_no_change_and_transitions_are_kept() {
        let cfg = Config::new("n1");
        let a = with_times(current_status(&cfg), None);
        let mut b = with_times(current_status(&cfg), Some(&a));
        assert!(!changed(&a, &b));
        assert_eq!(
            a.conditions.as_ref().unwrap()[0].last_transition_time,
            b.conditions.as_ref().unwrap()[0].last_transition_time
        );
        b.conditions.as_mut().unwrap()[3].status = "False".into();
        assert!(changed(&a, &b));
    }
}
