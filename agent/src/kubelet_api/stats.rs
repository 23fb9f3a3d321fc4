//! /pods, /stats/summary (kubelet's stats/v1alpha1 Summary: node and pods, cpu and memory from
//! cgroups, network from the pod's interface) and /metrics in Prometheus text.

use crate::pod_runtime::{parse_container_id, PodRuntime};
use runtime::container::State;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The pods the agent runs, as a v1 PodList.
pub fn pod_list(ctx: &PodRuntime) -> Value {
    let items: Vec<Value> = ctx
        .running_pods()
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p.as_ref()).unwrap_or(Value::Null);
            v["apiVersion"] = "v1".into();
            v["kind"] = "Pod".into();
            v
        })
        .collect();
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Previous cpu samples (cumulative ns, when), to turn totals into usageNanoCores.
static CPU_SAMPLES: Mutex<Option<HashMap<String, (Instant, u64)>>> = Mutex::new(None);

fn nano_cores(key: &str, total_ns: u64) -> Option<u64> {
    let mut guard = CPU_SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    let prev = map.insert(key.to_string(), (now, total_ns));
    let (at, before) = prev?;
    let secs = now.duration_since(at).as_secs_f64();
    (secs > 0.0).then(|| (total_ns.saturating_sub(before) as f64 / secs) as u64)
}

fn cpu(key: &str, total_ns: u64, time: &str) -> Value {
    let mut v = json!({"time": time, "usageCoreNanoSeconds": total_ns});
    if let Some(n) = nano_cores(key, total_ns) {
        v["usageNanoCores"] = n.into();
    }
    v
}

fn meminfo() -> HashMap<String, u64> {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some((k.to_string(), kib * 1024))
        })
        .collect()
}

/// Busy cpu time of the machine, in ns, from /proc/stat (USER_HZ is 100 on Linux).
fn node_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4) && *i < 8)
        .map(|(_, v)| v)
        .sum();
    busy * 10_000_000
}

/// (interface, rx bytes, tx bytes) from a /proc/<pid>/net/dev.
fn net_dev(pid: i32) -> Vec<(String, u64, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            Some((name.trim().to_string(), *f.first()?, *f.get(8)?))
        })
        .filter(|(n, _, _)| n != "lo")
        .collect()
}

fn network(ifaces: &[(String, u64, u64)], time: &str) -> Option<Value> {
    let list: Vec<Value> = ifaces
        .iter()
        .map(|(n, rx, tx)| json!({"name": n, "rxBytes": rx, "txBytes": tx}))
        .collect();
    let first = ifaces
        .iter()
        .find(|(n, _, _)| n == crate::pod_runtime::IFNAME)
        .or(ifaces.first())?;
    Some(json!({
        "time": time,
        "name": first.0,
        "rxBytes": first.1,
        "txBytes": first.2,
        "interfaces": list,
    }))
}

/// kubelet's Summary (blocking: reads cgroups and /proc).
pub fn summary(ctx: &PodRuntime, started: Instant) -> Value {
    let time = now();
    let mem = meminfo();
    let total = mem.get("MemTotal").copied().unwrap_or(0);
    let available = mem.get("MemAvailable").copied().unwrap_or(0);
    let free = mem.get("MemFree").copied().unwrap_or(0);
    let boot =
        chrono::Utc::now() - chrono::Duration::from_std(started.elapsed()).unwrap_or_default();
    let host_net = net_dev(std::process::id() as i32);
    let mut node = json!({
        "nodeName": ctx.cfg.node_name,
        "startTime": boot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "cpu": cpu("node", node_cpu_ns(), &time),
        "memory": {
            "time": time,
            "availableBytes": available,
            "usageBytes": total.saturating_sub(free),
            "workingSetBytes": total.saturating_sub(available),
        },
    });
    if let Some(n) = network(&host_net, &time) {
        node["network"] = n;
    }
    let mut pods = Vec::new();
    for uid in ctx.local_pods() {
        let Some(rec) = ctx.record(&uid) else {
            continue;
        };
        let mut containers = Vec::new();
        let mut pid = None;
        for (name, attempts) in ctx.attempts(&uid) {
            let Some((_, id)) = attempts.first() else {
                continue;
            };
            let Ok(State::Running { pid: p }) = ctx.rt.container_state(id) else {
                continue;
            };
            pid.get_or_insert(p);
            let u = ctx.rt.container_usage(id).unwrap_or_default();
            containers.push(json!({
                "name": name,
                "startTime": runtime::container::started_at(ctx.rt.paths(), id)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|| time.clone()),
                "cpu": cpu(id, u.cpu_usage_ns, &time),
                "memory": {"time": time, "workingSetBytes": u.memory_working_set},
            }));
        }
        let u = runtime::cgroup::usage(&rec.cgroup);
        let start = ctx.pods_by_name(&rec.namespace, &rec.name).and_then(|p| {
            p.status
                .as_ref()?
                .start_time
                .as_ref()
                .map(|t| t.0.to_string())
        });
        let mut pod = json!({
            "podRef": {"name": rec.name, "namespace": rec.namespace, "uid": uid},
            "startTime": start.unwrap_or_else(|| time.clone()),
            "containers": containers,
            "cpu": cpu(&uid, u.cpu_usage_ns, &time),
            "memory": {"time": time, "workingSetBytes": u.memory_working_set},
        });
        if let Some(n) = pid.and_then(|p| network(&net_dev(p), &time)) {
            pod["network"] = n;
        }
        pods.push(pod);
    }
    json!({"node": node, "pods": pods})
}

/// The agent's metrics in Prometheus text format (blocking).
pub fn metrics(ctx: &PodRuntime, sessions: &super::Sessions) -> String {
    let mut states: HashMap<&str, usize> = HashMap::new();
    for id in ctx.rt.list_containers() {
        if parse_container_id(&id).is_none() {
            continue;
        }
        let s = match ctx.rt.container_state(&id) {
            Ok(State::Running { .. }) => "running",
            Ok(State::Created) => "created",
            Ok(State::Exited(_)) => "exited",
            Err(_) => "unknown",
        };
        *states.entry(s).or_default() += 1;
    }
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096;
    let node = ctx.cfg.node_name.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::new();
    out.push_str("# HELP kubelet_node_name [ALPHA] The node's name. The count is always 1.\n");
    out.push_str("# TYPE kubelet_node_name gauge\n");
    out.push_str(&format!("kubelet_node_name{{node=\"{node}\"}} 1\n"));
    out.push_str(
        "# HELP kubelet_running_pods [ALPHA] Number of pods that have a running pod sandbox\n",
    );
    out.push_str("# TYPE kubelet_running_pods gauge\n");
    out.push_str(&format!(
        "kubelet_running_pods {}\n",
        ctx.rt.list_sandboxes().len()
    ));
    out.push_str(
        "# HELP kubelet_running_containers [ALPHA] Number of containers currently running\n",
    );
    out.push_str("# TYPE kubelet_running_containers gauge\n");
    for s in ["created", "exited", "running", "unknown"] {
        out.push_str(&format!(
            "kubelet_running_containers{{container_state=\"{s}\"}} {}\n",
            states.get(s).copied().unwrap_or(0)
        ));
    }
    out.push_str("# HELP process_resident_memory_bytes Resident memory size in bytes.\n");
    out.push_str("# TYPE process_resident_memory_bytes gauge\n");
    out.push_str(&format!("process_resident_memory_bytes {rss}\n"));
    out.push_str("# HELP oxlet_kubelet_streaming_sessions_total Exec, attach and port-forward sessions served, by transport.\n");
    out.push_str("# TYPE oxlet_kubelet_streaming_sessions_total counter\n");
    for ((kind, transport), n) in sessions {
        out.push_str(&format!(
            "oxlet_kubelet_streaming_sessions_total{{kind=\"{kind}\",transport=\"{transport}\"}} {n}\n"
        ));
    }
    out
}
