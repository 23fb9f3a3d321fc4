//! `meta.k8s.io/v1` Table answers for `kubectl get`, with the real server's columns.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::resources::ResourceType;

/// (name, type, priority); the first column is the name.
type Col = (&'static str, &'static str, u8);

fn columns(kind: &str) -> &'static [Col] {
    match kind {
        "Pod" => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        "Deployment" => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "string", 0),
            ("Available", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "ReplicaSet" => &[
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "DaemonSet" => &[
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Node Selector", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "Job" => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Completions", "string", 0),
            ("Duration", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "Service" => &[
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ],
        "Namespace" => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Age", "string", 0),
        ],
        "ConfigMap" => &[
            ("Name", "string", 0),
            ("Data", "integer", 0),
            ("Age", "string", 0),
        ],
        "Secret" => &[
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Data", "integer", 0),
            ("Age", "string", 0),
        ],
        "Node" => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        "ServiceAccount" => &[
            ("Name", "string", 0),
            ("Secrets", "integer", 0),
            ("Age", "string", 0),
        ],
        "Endpoints" => &[
            ("Name", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        "EndpointSlice" => &[
            ("Name", "string", 0),
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        "Lease" => &[
            ("Name", "string", 0),
            ("Holder", "string", 0),
            ("Age", "string", 0),
        ],
        "Event" => &[
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        _ => &[("Name", "string", 0), ("Created At", "date", 0)],
    }
}

/// Age like the real server's HumanDuration: 45s, 3m20s, 12m, 5h10m, 20h, 3d4h, 40d, 2y100d.
pub fn human_age(created: &str, now: DateTime<Utc>) -> String {
    let Ok(t) = DateTime::parse_from_rfc3339(created) else {
        return "<unknown>".into();
    };
    let s = (now - t.with_timezone(&Utc)).num_seconds().max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => {
            if s % 60 == 0 {
                format!("{m}m")
            } else {
                format!("{m}m{}s", s % 60)
            }
        }
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => {
            if m % 60 == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{}m", m % 60)
            }
        }
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 => {
            if h % 24 == 0 {
                format!("{d}d")
            } else {
                format!("{d}d{}h", h % 24)
            }
        }
        _ if d < 730 => format!("{d}d"),
        _ if d < 2920 => {
            if d % 365 == 0 {
                format!("{}y", d / 365)
            } else {
                format!("{}y{}d", d / 365, d % 365)
            }
        }
        _ => format!("{}y", d / 365),
    }
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn i(v: &Value, p: &str) -> i64 {
    v.pointer(p).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(x: &str) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x.to_string()
    }
}

/// A string map as `k=v,k2=v2`, or `<none>`.
fn pairs(v: &Value, p: &str) -> String {
    let kv: Vec<String> = v
        .pointer(p)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    or_none(&kv.join(","))
}

fn count(v: &Value, p: &str) -> i64 {
    match v.pointer(p) {
        Some(Value::Object(m)) => m.len() as i64,
        Some(Value::Array(a)) => a.len() as i64,
        _ => 0,
    }
}

fn template_columns(o: &Value) -> (String, String, String) {
    let cs: Vec<&Value> = o
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let names: Vec<&str> = cs.iter().map(|c| s(c, "/name")).collect();
    let images: Vec<&str> = cs.iter().map(|c| s(c, "/image")).collect();
    let sel = crate::select::LabelSelector::from_object(
        o.pointer("/spec/selector").unwrap_or(&Value::Null),
    );
    (names.join(","), images.join(","), or_none(&sel.render()))
}

fn pod_status(o: &Value) -> String {
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let statuses: Vec<&Value> = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    for c in statuses.iter().rev() {
        let w = s(c, "/state/waiting/reason");
        if !w.is_empty() {
            return w.into();
        }
        let t = s(c, "/state/terminated/reason");
        if !t.is_empty() {
            return t.into();
        }
    }
    let reason = s(o, "/status/reason");
    if !reason.is_empty() {
        return reason.into();
    }
    or_none(s(o, "/status/phase"))
}

fn cells(kind: &str, o: &Value, age: String) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    match kind {
        "Pod" => {
            let total = count(o, "/spec/containers");
            let st: Vec<&Value> = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .collect();
            let ready = st.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = st
                .iter()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(o)),
                json!(restarts.to_string()),
                json!(age),
                json!(or_none(s(o, "/status/podIP"))),
                json!(or_none(s(o, "/spec/nodeName"))),
                json!(or_none(s(o, "/status/nominatedNodeName"))),
                json!("<none>"),
            ]
        }
        "Deployment" => {
            let (c, im, sel) = template_columns(o);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(o, "/status/readyReplicas"),
                    i(o, "/spec/replicas")
                )),
                json!(i(o, "/status/updatedReplicas")),
                json!(i(o, "/status/availableReplicas")),
                json!(age),
                json!(c),
                json!(im),
                json!(sel),
            ]
        }
        "ReplicaSet" => {
            let (c, im, sel) = template_columns(o);
            vec![
                name,
                json!(i(o, "/spec/replicas")),
                json!(i(o, "/status/replicas")),
                json!(i(o, "/status/readyReplicas")),
                json!(age),
                json!(c),
                json!(im),
                json!(sel),
            ]
        }
        "DaemonSet" => {
            let (c, im, sel) = template_columns(o);
            let node_sel = pairs(o, "/spec/template/spec/nodeSelector");
            vec![
                name,
                json!(i(o, "/status/desiredNumberScheduled")),
                json!(i(o, "/status/currentNumberScheduled")),
                json!(i(o, "/status/numberReady")),
                json!(i(o, "/status/updatedNumberScheduled")),
                json!(i(o, "/status/numberAvailable")),
                json!(node_sel),
                json!(age),
                json!(c),
                json!(im),
                json!(sel),
            ]
        }
        "Job" => {
            let (c, im, sel) = template_columns(o);
            let cond = |t: &str| {
                o.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == t && c["status"] == "True")
            };
            let status = if cond("Complete") {
                "Complete"
            } else if cond("Failed") {
                "Failed"
            } else if cond("Suspended") {
                "Suspended"
            } else {
                "Running"
            };
            let completions = match o.pointer("/spec/completions").and_then(Value::as_i64) {
                Some(n) => format!("{}/{n}", i(o, "/status/succeeded")),
                None => format!(
                    "{}/1 of {}",
                    i(o, "/status/succeeded"),
                    i(o, "/spec/parallelism")
                ),
            };
            let start = s(o, "/status/startTime");
            let end = s(o, "/status/completionTime");
            let duration = match (start.parse::<DateTime<Utc>>(), end.parse::<DateTime<Utc>>()) {
                (Ok(a), Ok(b)) => human_age(&a.to_rfc3339(), b),
                (Ok(a), _) => human_age(&a.to_rfc3339(), Utc::now()),
                _ => String::new(),
            };
            vec![
                name,
                json!(status),
                json!(completions),
                json!(duration),
                json!(age),
                json!(c),
                json!(im),
                json!(sel),
            ]
        }
        "Service" => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| {
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    match p["nodePort"].as_i64() {
                        Some(np) => format!("{}:{np}/{proto}", p["port"]),
                        None => format!("{}/{proto}", p["port"]),
                    }
                })
                .collect();
            let ext: Vec<&str> = o
                .pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let ext = if s(o, "/spec/type") == "ExternalName" {
                s(o, "/spec/externalName").to_string()
            } else {
                or_none(&ext.join(","))
            };
            let sel = pairs(o, "/spec/selector");
            vec![
                name,
                json!(s(o, "/spec/type")),
                json!(or_none(s(o, "/spec/clusterIP"))),
                json!(ext),
                json!(or_none(&ports.join(","))),
                json!(age),
                json!(sel),
            ]
        }
        "Namespace" => vec![name, json!(s(o, "/status/phase")), json!(age)],
        "ConfigMap" => vec![
            name,
            json!(count(o, "/data") + count(o, "/binaryData")),
            json!(age),
        ],
        "Secret" => vec![
            name,
            json!(s(o, "/type")),
            json!(count(o, "/data")),
            json!(age),
        ],
        "Node" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .is_some_and(|c| c["status"] == "True");
            let addr = |t: &str| {
                o.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|a| a["type"] == t)
                    .and_then(|a| a["address"].as_str())
                    .unwrap_or("<none>")
                    .to_string()
            };
            vec![
                name,
                json!(if ready { "Ready" } else { "NotReady" }),
                json!("<none>"),
                json!(age),
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(s(o, "/status/nodeInfo/osImage")),
                json!(s(o, "/status/nodeInfo/kernelVersion")),
                json!(s(o, "/status/nodeInfo/containerRuntimeVersion")),
            ]
        }
        "ServiceAccount" => vec![name, json!(count(o, "/secrets")), json!(age)],
        "Endpoints" => {
            let mut eps = Vec::new();
            for sub in o
                .pointer("/subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for a in sub["addresses"].as_array().into_iter().flatten() {
                    for p in sub["ports"].as_array().into_iter().flatten() {
                        eps.push(format!("{}:{}", s(a, "/ip"), p["port"]));
                    }
                }
            }
            vec![name, json!(or_none(&eps.join(","))), json!(age)]
        }
        "EndpointSlice" => {
            let ports: Vec<String> = o
                .pointer("/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| p["port"].to_string())
                .collect();
            let addrs: Vec<&str> = o
                .pointer("/endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    e["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                })
                .collect();
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(or_none(&ports.join(","))),
                json!(or_none(&addrs.join(","))),
                json!(age),
            ]
        }
        "Lease" => vec![
            name,
            json!(or_none(s(o, "/spec/holderIdentity"))),
            json!(age),
        ],
        "Event" => {
            let obj = format!(
                "{}/{}",
                s(o, "/involvedObject/kind").to_lowercase(),
                s(o, "/involvedObject/name")
            );
            vec![
                json!(age),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(obj),
                json!(s(o, "/message")),
            ]
        }
        _ => vec![name, json!(s(o, "/metadata/creationTimestamp"))],
    }
}

fn row_object(o: &Value, full: bool) -> Value {
    if full {
        return o.clone();
    }
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o.get("metadata").cloned().unwrap_or(json!({}))})
}

/// A Table of `items`. `include`: "None", "Metadata" (default) or "Object".
pub fn table(
    rt: &ResourceType,
    items: &[Value],
    list_meta: Value,
    include: &str,
    with_headers: bool,
) -> Value {
    let now = Utc::now();
    let cols = columns(rt.kind);
    let defs: Vec<Value> =
        if with_headers {
            cols.iter().map(|(n, t, p)| {
            let format = if *n == "Name" { "name" } else { "" };
            json!({"name": n, "type": t, "format": format, "description": "", "priority": p})
        }).collect()
        } else {
            Vec::new()
        };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let age_from = if rt.kind == "Event" {
                let last = s(o, "/lastTimestamp");
                if last.is_empty() {
                    s(o, "/eventTime")
                } else {
                    last
                }
            } else {
                s(o, "/metadata/creationTimestamp")
            };
            let age = human_age(age_from, now);
            let mut row = json!({"cells": cells(rt.kind, o, age)});
            if include != "None" {
                row["object"] = row_object(o, include == "Object");
            }
            row
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources;

    #[test]
    fn ages_read_like_kubectl() {
        let now = DateTime::parse_from_rfc3339("2026-01-10T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(human_age("2026-01-09T23:59:15Z", now), "45s");
        assert_eq!(human_age("2026-01-09T23:56:40Z", now), "3m20s");
        assert_eq!(human_age("2026-01-09T23:30:00Z", now), "30m");
        assert_eq!(human_age("2026-01-09T19:00:00Z", now), "5h");
        assert_eq!(human_age("2026-01-06T20:00:00Z", now), "3d4h");
    }

    #[test]
    fn pod_and_service_rows() {
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [{"ready": true, "restartCount": 2}]}});
        let t = table(
            resources::get("", "pods"),
            &[pod],
            json!({"resourceVersion": "5"}),
            "Metadata",
            true,
        );
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "1/1");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], "2");
        assert_eq!(cells[6], "n1");
        assert_eq!(t["columnDefinitions"][5]["priority"], 1);
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.9",
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}], "selector": {"app": "web"}}});
        let t = table(
            resources::get("", "services"),
            &[svc],
            json!({}),
            "None",
            true,
        );
        assert_eq!(t["rows"][0]["cells"][4], "80:30080/TCP");
        assert_eq!(t["rows"][0]["cells"][6], "app=web");
    }
}
