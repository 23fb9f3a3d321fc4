//! Namespaces: the built-in ones, and termination (a deleted namespace is marked Terminating,
//! its content is deleted, then the namespace itself).

use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::registry::{self, DeleteOptions, ListOptions, Listed, Registry, Write};
use crate::resources::{self, TYPES};
use crate::store::EventKind;

pub const BUILTIN: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

pub fn mark_terminating(ns: &mut Value) {
    let m = crate::defaults::metadata(ns);
    m.insert("deletionTimestamp".into(), json!(registry::now()));
    m.insert("deletionGracePeriodSeconds".into(), json!(0));
    ns["status"]["phase"] = json!("Terminating");
}

/// Creates the built-in namespaces and the `kubernetes` service when missing.
pub async fn bootstrap(reg: &Registry) -> Result<(), crate::status::ApiError> {
    let nst = resources::namespaces();
    for name in BUILTIN {
        if reg.get(nst, None, name).is_err() {
            let obj = json!({"metadata": {"name": name}});
            match reg.create(nst, None, obj, Write::NONE).await {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    let svc = resources::get("", "services");
    if reg.get(svc, Some("default"), "kubernetes").is_err() {
        let obj = json!({"metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}});
        match reg.create(svc, Some("default"), obj, Write::NONE).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The address other machines and pods reach this server at: the listen address when it is a
/// specific one, else the IPv4 address of the default-route interface; none on loopback.
pub fn advertise_address(listen: std::net::SocketAddr) -> Option<std::net::Ipv4Addr> {
    match listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_loopback() => None,
        std::net::IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
        _ => {
            let routes = std::fs::read_to_string("/proc/net/route").ok()?;
            let iface = routes
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[1] == "00000000")
                .map(|f| f[0].to_string())?;
            nix::ifaddrs::getifaddrs()
                .ok()?
                .filter(|i| i.interface_name == iface)
                .find_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
        }
    }
}

/// Points the `kubernetes` service at this server, as kube-apiserver's endpoint reconciler
/// does: the Endpoints and the EndpointSlice named `kubernetes` with `ip`:`port`.
pub async fn kubernetes_endpoints(
    reg: &Registry,
    ip: std::net::Ipv4Addr,
    port: u16,
) -> Result<(), crate::status::ApiError> {
    let ip = ip.to_string();
    let ep = json!({"metadata": {"name": "kubernetes", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}]});
    let slice = json!({"metadata": {"name": "kubernetes", "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}]});
    for (rt, mut want) in [
        (resources::get("", "endpoints"), ep),
        (resources::get("discovery.k8s.io", "endpointslices"), slice),
    ] {
        match reg.get(rt, Some("default"), "kubernetes") {
            Ok(cur) => {
                let same = ["subsets", "endpoints", "ports"]
                    .iter()
                    .all(|k| cur.get(*k) == want.get(*k));
                if !same {
                    want["metadata"]["resourceVersion"] =
                        cur["metadata"]["resourceVersion"].clone();
                    reg.update(rt, Some("default"), "kubernetes", want, false, Write::NONE)?;
                }
            }
            Err(_) => match reg.create(rt, Some("default"), want, Write::NONE).await {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => return Err(e),
            },
        }
    }
    Ok(())
}

/// Deletes everything in namespace `ns`, then the namespace. Pods go at once (there is no
/// grace for content of a deleted namespace in this first version).
pub fn finish(reg: &Registry, ns: &str) {
    let force = DeleteOptions {
        grace_seconds: Some(0),
        ..Default::default()
    };
    for rt in TYPES.iter().filter(|t| t.namespaced) {
        let Ok(Listed { items, .. }) = reg.list(rt, Some(ns), &ListOptions::default()) else {
            continue;
        };
        for obj in items {
            let name = registry::meta_str(&obj, "name").to_string();
            // Finalizers of content are not waited for: they are dropped with the namespace.
            if obj.pointer("/metadata/finalizers").is_some() {
                let mut o = obj.clone();
                o["metadata"]["finalizers"] = json!(null);
                let _ = reg.update(rt, Some(ns), &name, o, false, Write::NONE);
            }
            if let Err(e) = reg.delete(rt, Some(ns), &name, &force) {
                if e.code != 404 {
                    warn!(ns, name, "namespace cleanup: {e}");
                }
            }
        }
    }
    let nst = resources::namespaces();
    if let Err(e) = reg.store.delete(&nst.key(None, ns), None) {
        debug!(ns, "namespace already gone: {e}");
    }
}

/// What the service account and root-CA publisher controllers keep in every namespace: the
/// `default` service account and the `kube-root-ca.crt` config map.
pub async fn populate(reg: &Registry, ns: &str, ca_pem: &str) {
    let sa = resources::get("", "serviceaccounts");
    let cm = resources::get("", "configmaps");
    let wanted = [
        (sa, "default", json!({"metadata": {"name": "default"}})),
        (
            cm,
            "kube-root-ca.crt",
            json!({"metadata": {"name": "kube-root-ca.crt",
            "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
            "data": {"ca.crt": ca_pem}}),
        ),
    ];
    for (rt, name, obj) in wanted {
        if reg.get(rt, Some(ns), name).is_ok() {
            continue;
        }
        match reg.create(rt, Some(ns), obj, Write::NONE).await {
            Ok(_) => {}
            // Exists already, or the namespace is going away.
            Err(e) if matches!(e.code, 409 | 403 | 404) => {}
            Err(e) => warn!(ns, name, "populate namespace: {e}"),
        }
    }
}

/// Handles one namespace as it is now: finish it when deleting, else populate it.
async fn reconcile(reg: &Registry, ns: &Value, ca_pem: &str) {
    let name = registry::meta_str(ns, "name").to_string();
    if ns.pointer("/metadata/deletionTimestamp").is_some() {
        let r = reg.clone();
        let _ = tokio::task::spawn_blocking(move || finish(&r, &name)).await;
    } else {
        populate(reg, &name, ca_pem).await;
    }
}

/// Runs forever: populates new namespaces, finishes those that are (or become) Terminating.
pub async fn run(reg: Registry, ca_pem: String) {
    let nst = resources::namespaces();
    loop {
        let rev = reg.store.current_rev().unwrap_or(0);
        if let Ok(Listed { items, .. }) = reg.list(nst, None, &ListOptions::default()) {
            for ns in items {
                reconcile(&reg, &ns, &ca_pem).await;
            }
        }
        let Ok(mut w) = reg.store.watch(&nst.prefix(), rev) else {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        };
        let mut pending: Vec<Value> = w
            .backlog
            .drain(..)
            .filter(|e| e.kind != EventKind::Deleted)
            .map(|e| registry::decode(&e.entry))
            .collect();
        loop {
            for ns in pending.drain(..) {
                reconcile(&reg, &ns, &ca_pem).await;
            }
            match w.live.recv().await {
                Ok(ev)
                    if ev.kind != EventKind::Deleted && ev.entry.key.starts_with(&nst.prefix()) =>
                {
                    pending.push(registry::decode(&ev.entry));
                }
                Ok(_) => {}
                // Lagged: start over with a full scan.
                Err(_) => break,
            }
        }
    }
}
