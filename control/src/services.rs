//! Service ClusterIP and NodePort allocation. Used addresses are read from the stored services
//! (under the registry's allocation lock), so there is no separate bitmap to drift.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use rand::Rng;
use serde_json::{json, Value};

use crate::registry::{ListOptions, Listed, Registry};
use crate::resources;
use crate::status::{ApiError, ApiResult, Cause};

/// The service network, 10.96.0.0/12 like kubeadm's default; .1 is the `kubernetes` service.
pub const SERVICE_NET: (Ipv4Addr, u32) = (Ipv4Addr::new(10, 96, 0, 0), 12);
pub const NODE_PORTS: (u16, u16) = (30000, 32767);

fn in_net(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - SERVICE_NET.1);
    u32::from(ip) & mask == u32::from(SERVICE_NET.0)
}

fn used(reg: &Registry) -> ApiResult<(HashSet<String>, HashSet<i64>)> {
    let rt = resources::get("", "services");
    let Listed { items, .. } = reg.list(rt, None, &ListOptions::default())?;
    let mut ips = HashSet::new();
    let mut ports = HashSet::new();
    for s in items {
        if let Some(ip) = s.pointer("/spec/clusterIP").and_then(Value::as_str) {
            ips.insert(ip.to_string());
        }
        for p in s
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(n) = p["nodePort"].as_i64() {
                ports.insert(n);
            }
        }
    }
    Ok((ips, ports))
}

/// Fills spec.clusterIP(s), ipFamilies and nodePorts of a new service.
pub fn allocate(reg: &Registry, svc: &mut Value) -> ApiResult<()> {
    let name = svc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let rt = resources::get("", "services");
    let (ips, ports) = used(reg)?;
    let spec = &mut svc["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if ty == "ExternalName" {
        return Ok(());
    }
    let requested = spec["clusterIP"].as_str().unwrap_or("").to_string();
    let ip = match requested.as_str() {
        "" => {
            let mut rng = rand::thread_rng();
            let base = u32::from(SERVICE_NET.0);
            let size = 1u32 << (32 - SERVICE_NET.1);
            let mut found = None;
            for _ in 0..1000 {
                // Skip the network address and .1 (reserved for the `kubernetes` service).
                let cand = Ipv4Addr::from(base + rng.gen_range(2..size - 1)).to_string();
                if !ips.contains(&cand) {
                    found = Some(cand);
                    break;
                }
            }
            found.ok_or_else(|| {
                ApiError::internal("failed to allocate a serviceIP: range is full")
            })?
        }
        "None" => "None".to_string(),
        other => {
            let parsed: Option<Ipv4Addr> = other.parse().ok();
            let cause = match parsed {
                None => Some("must be a valid IP address"),
                Some(ip) if !in_net(ip) => Some(
                    "provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12",
                ),
                Some(_) if ips.contains(other) => Some("provided IP is already allocated"),
                Some(_) => None,
            };
            if let Some(why) = cause {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    vec![Cause::invalid("spec.clusterIPs", &json!([other]), why)],
                ));
            }
            other.to_string()
        }
    };
    spec["clusterIP"] = json!(ip);
    spec["clusterIPs"] = json!([ip]);
    if ip != "None" || spec.get("ipFamilies").is_none() {
        spec["ipFamilies"] = json!(["IPv4"]);
    }
    if spec.get("ipFamilyPolicy").is_none_or(Value::is_null) {
        spec["ipFamilyPolicy"] = json!("SingleStack");
    }
    if matches!(ty.as_str(), "NodePort" | "LoadBalancer") {
        let mut taken = ports;
        let mut rng = rand::thread_rng();
        for p in spec["ports"].as_array_mut().into_iter().flatten() {
            if let Some(n) = p["nodePort"].as_i64() {
                if !(NODE_PORTS.0 as i64..=NODE_PORTS.1 as i64).contains(&n) || !taken.insert(n) {
                    return Err(ApiError::invalid(rt, &name, vec![Cause::invalid("spec.ports[].nodePort", &json!(n),
                        "provided port is already allocated or not in the valid range 30000-32767")]));
                }
                continue;
            }
            let n = (0..10000)
                .map(|_| rng.gen_range(NODE_PORTS.0..=NODE_PORTS.1) as i64)
                .find(|n| !taken.contains(n))
                .ok_or_else(|| {
                    ApiError::internal("failed to allocate a nodePort: range is full")
                })?;
            taken.insert(n);
            p["nodePort"] = json!(n);
        }
    }
    Ok(())
}

/// An update keeps the allocated addresses unless it names them itself.
pub fn keep_allocations(old: &Value, new: &mut Value) {
    let Some(spec) = new.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
        if spec.get(f).is_none_or(|v| v.is_null() || v == "") {
            if let Some(v) = old["spec"].get(f) {
                spec[f] = v.clone();
            }
        }
    }
    let old_ports = old["spec"]["ports"].as_array().cloned().unwrap_or_default();
    for p in spec["ports"].as_array_mut().into_iter().flatten() {
        if p.get("nodePort").is_none_or(Value::is_null) {
            if let Some(o) = old_ports
                .iter()
                .find(|o| o["port"] == p["port"] && o.get("nodePort").is_some())
            {
                p["nodePort"] = o["nodePort"].clone();
            }
        }
    }
}
