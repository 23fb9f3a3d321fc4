//! Service ClusterIP and NodePort allocation from bitmaps of what is in use, read from the
//! stored services at first use. Deleted services do not clear their bits: the bitmaps are read
//! again from the services when a range looks full or a requested address looks taken, so they
//! never refuse what is free and never need to follow every deletion.

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

const NET_SIZE: u32 = 1 << (32 - SERVICE_NET.1);
const PORT_COUNT: u32 = (NODE_PORTS.1 - NODE_PORTS.0) as u32 + 1;

/// A fixed-size set of small integers.
#[derive(Default)]
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn with_len(n: u32) -> Bitmap {
        Bitmap(vec![0; n.div_ceil(64) as usize])
    }
    fn get(&self, i: u32) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
        }
    }
}

/// Addresses (offsets in the service network) and node ports in use.
#[derive(Default)]
pub struct Allocations {
    ips: Bitmap,
    ports: Bitmap,
    loaded: bool,
    /// What the allocation in progress took (ports: true), kept across a reload: its service
    /// is not stored yet.
    taking: Vec<(bool, u32)>,
}

impl Allocations {
    /// Reads what the stored services use.
    fn reload(&mut self, reg: &Registry) -> ApiResult<()> {
        let rt = resources::get("", "services");
        let Listed { items, .. } = reg.list(rt, None, &ListOptions::default())?;
        self.ips = Bitmap::with_len(NET_SIZE);
        self.ports = Bitmap::with_len(PORT_COUNT);
        for s in items {
            if let Some(ip) = s
                .pointer("/spec/clusterIP")
                .and_then(Value::as_str)
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                .filter(|ip| in_net(*ip))
            {
                self.ips.set(ip_offset(ip));
            }
            for p in s
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(i) = p["nodePort"].as_i64().and_then(port_offset) {
                    self.ports.set(i);
                }
            }
        }
        for &(port, i) in &self.taking {
            if port {
                self.ports.set(i);
            } else {
                self.ips.set(i);
            }
        }
        self.loaded = true;
        Ok(())
    }

    fn take(&mut self, port: bool, i: u32) {
        if port {
            self.ports.set(i);
        } else {
            self.ips.set(i);
        }
        self.taking.push((port, i));
    }

    fn ensure(&mut self, reg: &Registry) -> ApiResult<()> {
        if !self.loaded {
            self.reload(reg)?;
        }
        Ok(())
    }
}

fn ip_offset(ip: Ipv4Addr) -> u32 {
    u32::from(ip) - u32::from(SERVICE_NET.0)
}

fn port_offset(n: i64) -> Option<u32> {
    (NODE_PORTS.0 as i64..=NODE_PORTS.1 as i64)
        .contains(&n)
        .then(|| (n - NODE_PORTS.0 as i64) as u32)
}

/// A free offset below `size` (skipping those below `from`), tried at random; when the map
/// looks full it is read again once from the services.
fn pick(
    reg: &Registry,
    a: &mut Allocations,
    ports: bool,
    from: u32,
    size: u32,
) -> ApiResult<Option<u32>> {
    let mut rng = rand::thread_rng();
    for round in 0..2 {
        if round == 1 {
            a.reload(reg)?;
        }
        let map = if ports { &a.ports } else { &a.ips };
        for _ in 0..64 {
            let i = rng.gen_range(from..size);
            if !map.get(i) {
                return Ok(Some(i));
            }
        }
        // Crowded: a scan from a random point finds any free one.
        let start = rng.gen_range(from..size);
        if let Some(i) = (start..size).chain(from..start).find(|i| !map.get(*i)) {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Whether `i` is in use, reading the services again before saying yes.
fn taken(reg: &Registry, a: &mut Allocations, ports: bool, i: u32) -> ApiResult<bool> {
    let map = |a: &Allocations| if ports { a.ports.get(i) } else { a.ips.get(i) };
    if !map(a) {
        return Ok(false);
    }
    a.reload(reg)?;
    Ok(map(a))
}

/// Fills spec.clusterIP(s), ipFamilies and nodePorts of a new service.
pub fn allocate(reg: &Registry, alloc: &mut Allocations, svc: &mut Value) -> ApiResult<()> {
    let name = svc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let rt = resources::get("", "services");
    alloc.ensure(reg)?;
    alloc.taking.clear();
    let spec = &mut svc["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if ty == "ExternalName" {
        return Ok(());
    }
    let requested = spec["clusterIP"].as_str().unwrap_or("").to_string();
    let ip = match requested.as_str() {
        "" => {
            // Skip the network address and .1 (reserved for the `kubernetes` service).
            let i = pick(reg, alloc, false, 2, NET_SIZE - 1)?.ok_or_else(|| {
                ApiError::internal("failed to allocate a serviceIP: range is full")
            })?;
            alloc.take(false, i);
            Ipv4Addr::from(u32::from(SERVICE_NET.0) + i).to_string()
        }
        "None" => "None".to_string(),
        other => {
            let parsed: Option<Ipv4Addr> = other.parse().ok();
            let cause = match parsed {
                None => Some("must be a valid IP address"),
                Some(ip) if !in_net(ip) => Some(
                    "provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12",
                ),
                Some(ip) if taken(reg, alloc, false, ip_offset(ip))? => {
                    Some("provided IP is already allocated")
                }
                Some(_) => None,
            };
            if let Some(why) = cause {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    vec![Cause::invalid("spec.clusterIPs", &json!([other]), why)],
                ));
            }
            if let Some(ip) = parsed {
                alloc.take(false, ip_offset(ip));
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
        for p in spec["ports"].as_array_mut().into_iter().flatten() {
            if let Some(n) = p["nodePort"].as_i64() {
                let free = match port_offset(n) {
                    Some(i) => !taken(reg, alloc, true, i)?,
                    None => false,
                };
                if !free {
                    return Err(ApiError::invalid(rt, &name, vec![Cause::invalid("spec.ports[].nodePort", &json!(n),
                        "provided port is already allocated or not in the valid range 30000-32767")]));
                }
                alloc.take(true, port_offset(n).expect("checked above"));
                continue;
            }
            let i = pick(reg, alloc, true, 0, PORT_COUNT)?.ok_or_else(|| {
                ApiError::internal("failed to allocate a nodePort: range is full")
            })?;
            alloc.take(true, i);
            p["nodePort"] = json!(NODE_PORTS.0 as i64 + i as i64);
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
