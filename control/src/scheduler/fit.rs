//! Whether a pod fits a node (the scheduler's filters) and how well (its scores), as pure
//! functions of the pod, the node and the pods already on it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::controllers::owners;

/// Why a node was filtered out, in kube-scheduler's words.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unfit {
    Unschedulable,
    Taint(String),
    Affinity,
    Insufficient(&'static str),
    TooManyPods,
    Ports,
    AntiAffinity,
}

impl Unfit {
    pub fn message(&self) -> String {
        match self {
            Unfit::Unschedulable => "node(s) were unschedulable".into(),
            Unfit::Taint(t) => format!("node(s) had untolerated taint {{{t}}}"),
            Unfit::Affinity => "node(s) didn't match Pod's node affinity/selector".into(),
            Unfit::Insufficient(r) => format!("Insufficient {r}"),
            Unfit::TooManyPods => "Too many pods".into(),
            Unfit::Ports => "node(s) didn't have free ports for the requested pod ports".into(),
            Unfit::AntiAffinity => "node(s) didn't match pod anti-affinity rules".into(),
        }
    }

    /// Whether evicting lower-priority pods could make room (kube-scheduler's preemption).
    pub fn preemptible(&self) -> bool {
        matches!(
            self,
            Unfit::Insufficient(_) | Unfit::TooManyPods | Unfit::Ports | Unfit::AntiAffinity
        )
    }
}

/// Parses a quantity into thousandths of its unit (millicores, millibytes), rounding up.
pub fn milli(q: &Quantity) -> Option<i128> {
    let s = q.0.trim();
    let at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(at);
    let (scale_num, scale_den): (i128, i128) = match suffix {
        "" => (1000, 1),
        "n" => (1, 1_000_000),
        "u" => (1, 1000),
        "m" => (1, 1),
        "k" => (1000 * 1000, 1),
        "M" => (1000 * 1_000_000, 1),
        "G" => (1000 * 1_000_000_000, 1),
        "T" => (1000 * 1_000_000_000_000, 1),
        "Ki" => (1000 << 10, 1),
        "Mi" => (1000 << 20, 1),
        "Gi" => (1000 << 30, 1),
        "Ti" => (1000 << 40, 1),
        e if e.starts_with(['e', 'E']) => (1000 * 10i128.checked_pow(e[1..].parse().ok()?)?, 1),
        _ => return None,
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits: i128 = format!("{int}{frac}").parse().ok()?;
    let den = 10i128.checked_pow(frac.len() as u32)? * scale_den;
    let n = digits * scale_num;
    Some((n + den - 1).div_euclid(den))
}

/// What a pod asks for: cpu in millicores, memory in bytes (the larger of its containers' sum
/// and any one init container, plus overhead); a limit stands in for a missing request.
pub fn requests(spec: &PodSpec) -> (i128, i128) {
    let of = |c: &k8s_openapi::api::core::v1::Container, r: &str| -> i128 {
        let res = c.resources.as_ref();
        res.and_then(|x| x.requests.as_ref())
            .and_then(|m| m.get(r))
            .or_else(|| res.and_then(|x| x.limits.as_ref()).and_then(|m| m.get(r)))
            .and_then(milli)
            .unwrap_or(0)
    };
    let mut cpu: i128 = spec.containers.iter().map(|c| of(c, "cpu")).sum();
    let mut mem: i128 = spec.containers.iter().map(|c| of(c, "memory")).sum();
    for c in spec.init_containers.iter().flatten() {
        cpu = cpu.max(of(c, "cpu"));
        mem = mem.max(of(c, "memory"));
    }
    if let Some(o) = &spec.overhead {
        cpu += o.get("cpu").and_then(milli).unwrap_or(0);
        mem += o.get("memory").and_then(milli).unwrap_or(0);
    }
    (cpu, mem.div_euclid(1000))
}

fn allocatable(node: &Node, r: &str) -> Option<i128> {
    let st = node.status.as_ref()?;
    st.allocatable
        .as_ref()
        .and_then(|a| a.get(r))
        .or_else(|| st.capacity.as_ref().and_then(|c| c.get(r)))
        .and_then(milli)
}

pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = t
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == taint.key);
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        effect_ok
            && key_ok
            && value_ok
            && (t.key.is_some() || t.operator.as_deref() == Some("Exists"))
    })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

fn term_matches(t: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.metadata.name.clone();
    let exprs = t.match_expressions.as_deref().unwrap_or_default();
    let fields = t.match_fields.as_deref().unwrap_or_default();
    (!exprs.is_empty() || !fields.is_empty())
        && exprs
            .iter()
            .all(|r| requirement_matches(r, labels.get(&r.key)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, name.as_ref()))
}

fn selector_matches(spec: &PodSpec, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let by_selector = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    by_selector
        && required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)))
}

fn host_ports(spec: &PodSpec) -> Vec<(String, String, i32)> {
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let hp = p.host_port.filter(|h| *h > 0)?;
            Some((
                p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                hp,
            ))
        })
        .collect()
}

fn ports_conflict(a: &(String, String, i32), b: &(String, String, i32)) -> bool {
    let any = |ip: &str| ip == "0.0.0.0" || ip == "::" || ip.is_empty();
    a.1 == b.1 && a.2 == b.2 && (a.0 == b.0 || any(&a.0) || any(&b.0))
}

/// Whether a pod already on the node stands against `pod`'s required anti-affinity by hostname.
fn anti_affinity_violated(pod: &Pod, on_node: &[&Pod]) -> bool {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let terms = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let Some(terms) = terms else {
        return false;
    };
    terms
        .iter()
        .filter(|t| t.topology_key == "kubernetes.io/hostname")
        .any(|t| {
            let namespaces = t
                .namespaces
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| vec![ns.clone()]);
            on_node.iter().any(|other| {
                let in_ns = t.namespace_selector.is_some()
                    || namespaces.contains(&other.metadata.namespace.clone().unwrap_or_default());
                in_ns
                    && t.label_selector
                        .as_ref()
                        .is_some_and(|s| owners::matches(s, other.metadata.labels.as_ref()))
            })
        })
}

/// Filters `node` for `pod`, given the pods already bound to it; the first reason it fails.
pub fn filter(pod: &Pod, node: &Node, on_node: &[&Pod]) -> Result<(), Unfit> {
    let spec = pod.spec.clone().unwrap_or_default();
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    let nspec = node.spec.clone().unwrap_or_default();
    if nspec.unschedulable == Some(true) {
        let t = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        if !tolerates(&tolerations, &t) {
            return Err(Unfit::Unschedulable);
        }
    }
    let mut taints: Vec<Taint> = nspec.taints.clone().unwrap_or_default();
    if !node_ready(node)
        && !taints
            .iter()
            .any(|t| t.key.starts_with("node.kubernetes.io/"))
    {
        // A node that is not Ready has (or is about to get) the not-ready taint.
        taints.push(Taint {
            key: "node.kubernetes.io/not-ready".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        });
    }
    for t in taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
    {
        if !tolerates(&tolerations, t) {
            return Err(Unfit::Taint(format!(
                "{}: {}",
                t.key,
                t.value.as_deref().unwrap_or("")
            )));
        }
    }
    if !selector_matches(&spec, node) {
        return Err(Unfit::Affinity);
    }
    let (cpu, mem) = requests(&spec);
    let used = on_node
        .iter()
        .filter_map(|p| p.spec.as_ref())
        .map(requests)
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let max_pods = allocatable(node, "pods").map_or(110, |p| p / 1000);
    if on_node.len() as i128 + 1 > max_pods {
        return Err(Unfit::TooManyPods);
    }
    if cpu > 0 && allocatable(node, "cpu").is_some_and(|a| used.0 + cpu > a) {
        return Err(Unfit::Insufficient("cpu"));
    }
    if mem > 0 && allocatable(node, "memory").is_some_and(|a| used.1 + mem > a / 1000) {
        return Err(Unfit::Insufficient("memory"));
    }
    let want = host_ports(&spec);
    let taken: Vec<_> = on_node
        .iter()
        .filter_map(|p| p.spec.as_ref())
        .flat_map(host_ports)
        .collect();
    if want
        .iter()
        .any(|w| taken.iter().any(|t| ports_conflict(w, t)))
    {
        return Err(Unfit::Ports);
    }
    if anti_affinity_violated(pod, on_node) {
        return Err(Unfit::AntiAffinity);
    }
    Ok(())
}

/// Least requested plus balanced allocation, 0 to 200.
pub fn score(pod: &Pod, node: &Node, on_node: &[&Pod]) -> i64 {
    let (cpu, mem) = requests(&pod.spec.clone().unwrap_or_default());
    // Pods without requests count as 100m and 200 MB, as kube-scheduler's non-zero defaults.
    let nz = |(c, m): (i128, i128)| {
        (
            if c == 0 { 100 } else { c },
            if m == 0 { 200 << 20 } else { m },
        )
    };
    let (cpu, mem) = nz((cpu, mem));
    let used = on_node
        .iter()
        .filter_map(|p| p.spec.as_ref())
        .map(|s| nz(requests(s)))
        .fold((cpu, mem), |a, b| (a.0 + b.0, a.1 + b.1));
    let frac = |used: i128, cap: Option<i128>| {
        cap.filter(|c| *c > 0)
            .map_or(1.0, |c| (used as f64 / c as f64).min(1.0))
    };
    let fc = frac(used.0, allocatable(node, "cpu"));
    let fm = frac(used.1, allocatable(node, "memory").map(|m| m / 1000));
    let least = ((1.0 - fc) + (1.0 - fm)) * 50.0;
    let balanced = (1.0 - (fc - fm).abs()) * 100.0;
    (least + balanced) as i64
}

/// kube-scheduler's summary of why no node fits, e.g.
/// `0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: 1
/// No preemption victims found for incoming pod.`
pub fn unschedulable_message(nodes: usize, reasons: &[Unfit]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in reasons {
        *counts.entry(r.message()).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(m, n)| format!("{n} {m}")).collect();
    let mut msg = format!("0/{nodes} nodes are available");
    if !parts.is_empty() {
        msg.push_str(": ");
        msg.push_str(&parts.join(", "));
    }
    msg.push('.');
    if nodes > 0 {
        let victims = reasons.iter().filter(|r| r.preemptible()).count();
        let mut pre = Vec::new();
        if victims > 0 {
            pre.push(format!(
                "{victims} No preemption victims found for incoming pod"
            ));
        }
        if nodes - victims > 0 {
            pre.push(format!(
                "{} Preemption is not helpful for scheduling",
                nodes - victims
            ));
        }
        msg.push_str(&format!(
            " preemption: 0/{nodes} nodes are available: {}.",
            pre.join(", ")
        ));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(cpu: &str, mem: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "disk": "ssd"}},
            "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "3"},
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap()
    }

    fn pod(extra: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": "p", "namespace": "default", "labels": {"app": "a"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}});
        json_patch::merge(&mut p, &extra);
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn quantities_parse_exactly() {
        assert_eq!(milli(&Quantity("250m".into())), Some(250));
        assert_eq!(milli(&Quantity("1.5".into())), Some(1500));
        assert_eq!(milli(&Quantity("1Gi".into())), Some(1000 << 30));
        assert_eq!(milli(&Quantity("1e3".into())), Some(1_000_000));
        assert_eq!(milli(&Quantity("x".into())), None);
    }

    #[test]
    fn filters_say_why() {
        let n = node("2", "1Gi");
        let big = pod(json!({"spec": {"containers": [{"name": "c", "image": "i",
            "resources": {"requests": {"memory": "2Gi"}}}]}}));
        assert_eq!(filter(&big, &n, &[]), Err(Unfit::Insufficient("memory")));
        let sel = pod(json!({"spec": {"nodeSelector": {"disk": "hdd"}}}));
        assert_eq!(filter(&sel, &n, &[]), Err(Unfit::Affinity));
        let ok = pod(json!({"spec": {"nodeSelector": {"disk": "ssd"}}}));
        assert_eq!(filter(&ok, &n, &[]), Ok(()));
        let mut tainted = n.clone();
        tainted.spec = Some(
            serde_json::from_value(
                json!({"taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]}),
            )
            .unwrap(),
        );
        assert_eq!(filter(&ok, &tainted, &[]), Err(Unfit::Taint("k: v".into())));
        let tolerant = pod(json!({"spec": {"tolerations": [{"key": "k", "operator": "Exists"}]}}));
        assert_eq!(filter(&tolerant, &tainted, &[]), Ok(()));
        let full = [&ok, &ok, &ok];
        assert_eq!(filter(&ok, &n, &full), Err(Unfit::TooManyPods));
        let hp = pod(
            json!({"spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}),
        );
        assert_eq!(filter(&hp, &n, &[&hp]), Err(Unfit::Ports));
        let anti = pod(
            json!({"spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "a"}}}]}}}}),
        );
        assert_eq!(filter(&anti, &n, &[&ok]), Err(Unfit::AntiAffinity));
        assert_eq!(
            unschedulable_message(1, &[Unfit::Insufficient("memory")]),
            "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
        );
    }
}
