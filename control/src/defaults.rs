//! Defaulting, as the real API server's scheme defaulters do, on JSON objects.

use serde_json::{json, Map, Value};

/// Sets `obj[key]` to `v` when it is absent or null.
fn dflt(obj: &mut Value, key: &str, v: Value) {
    if let Some(m) = obj.as_object_mut() {
        let e = m.entry(key).or_insert(Value::Null);
        if e.is_null() {
            *e = v;
        }
    }
}

fn each_mut<'a>(obj: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    obj.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

pub fn apply(kind: &str, obj: &mut Value) {
    match kind {
        "Pod" => {
            if let Some(spec) = obj.get_mut("spec") {
                pod_spec(spec);
                requests_from_limits(spec);
            }
        }
        "Deployment" => deployment(obj),
        "ReplicaSet" => replica_set(obj),
        "DaemonSet" => daemon_set(obj),
        "Job" => job(obj),
        "Service" => service_spec(obj),
        "Secret" => {
            let t = obj.get("type").and_then(Value::as_str).unwrap_or("");
            if t.is_empty() {
                obj["type"] = json!("Opaque");
            }
        }
        "Namespace" => {
            if let Some(m) = obj.as_object_mut() {
                let spec = m.entry("spec").or_insert(json!({}));
                dflt(spec, "finalizers", json!(["kubernetes"]));
            }
            let phase = obj.pointer("/status/phase").cloned();
            if phase.is_none() || phase == Some(Value::Null) {
                obj["status"] = json!({"phase": "Active"});
            }
        }
        _ => {}
    }
}

/// Pull policy from the image reference: `Always` for `:latest` or no tag, else `IfNotPresent`.
pub fn pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn container(c: &mut Value) {
    let image = c
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    dflt(c, "imagePullPolicy", json!(pull_policy(&image)));
    dflt(c, "terminationMessagePath", json!("/dev/termination-log"));
    dflt(c, "terminationMessagePolicy", json!("File"));
    dflt(c, "resources", json!({}));
    for p in each_mut(c, "ports") {
        dflt(p, "protocol", json!("TCP"));
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).filter(|p| p.is_object()) {
            dflt(p, "timeoutSeconds", json!(1));
            dflt(p, "periodSeconds", json!(10));
            dflt(p, "successThreshold", json!(1));
            dflt(p, "failureThreshold", json!(3));
        }
    }
}

pub fn pod_spec(spec: &mut Value) {
    dflt(spec, "restartPolicy", json!("Always"));
    dflt(spec, "terminationGracePeriodSeconds", json!(30));
    dflt(spec, "dnsPolicy", json!("ClusterFirst"));
    dflt(spec, "securityContext", json!({}));
    dflt(spec, "schedulerName", json!("default-scheduler"));
    dflt(spec, "enableServiceLinks", json!(true));
    for key in ["containers", "initContainers"] {
        for c in each_mut(spec, key) {
            container(c);
        }
    }
    for v in each_mut(spec, "volumes") {
        for (src, mode) in [("configMap", 0o644), ("secret", 0o644)] {
            if let Some(s) = v.get_mut(src).filter(|s| s.is_object()) {
                dflt(s, "defaultMode", json!(mode));
            }
        }
    }
}

/// A pod's containers request what they limit unless they say otherwise (pods only, not
/// templates, as the real defaulter).
fn requests_from_limits(spec: &mut Value) {
    for key in ["containers", "initContainers"] {
        for c in each_mut(spec, key) {
            let Some(limits) = c
                .pointer("/resources/limits")
                .and_then(Value::as_object)
                .cloned()
            else {
                continue;
            };
            let res = &mut c["resources"];
            if !res.get("requests").is_some_and(Value::is_object) {
                res["requests"] = json!({});
            }
            for (k, v) in limits {
                dflt(&mut res["requests"], &k, v);
            }
        }
    }
}

fn template(obj: &mut Value) {
    if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
        pod_spec(spec);
    }
}

fn deployment(obj: &mut Value) {
    if let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) {
        dflt(spec, "replicas", json!(1));
        dflt(spec, "revisionHistoryLimit", json!(10));
        dflt(spec, "progressDeadlineSeconds", json!(600));
        dflt(spec, "strategy", json!({}));
        let strategy = &mut spec["strategy"];
        dflt(strategy, "type", json!("RollingUpdate"));
        if strategy["type"] == "RollingUpdate" {
            dflt(strategy, "rollingUpdate", json!({}));
            let ru = &mut strategy["rollingUpdate"];
            dflt(ru, "maxUnavailable", json!("25%"));
            dflt(ru, "maxSurge", json!("25%"));
        }
    }
    template(obj);
}

fn replica_set(obj: &mut Value) {
    if let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) {
        dflt(spec, "replicas", json!(1));
    }
    template(obj);
}

fn daemon_set(obj: &mut Value) {
    if let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) {
        dflt(spec, "revisionHistoryLimit", json!(10));
        dflt(spec, "updateStrategy", json!({}));
        let strategy = &mut spec["updateStrategy"];
        dflt(strategy, "type", json!("RollingUpdate"));
        if strategy["type"] == "RollingUpdate" {
            dflt(strategy, "rollingUpdate", json!({}));
            let ru = &mut strategy["rollingUpdate"];
            dflt(ru, "maxUnavailable", json!(1));
            dflt(ru, "maxSurge", json!(0));
        }
    }
    template(obj);
}

fn job(obj: &mut Value) {
    if let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) {
        dflt(spec, "parallelism", json!(1));
        if spec.get("completions").is_none_or(Value::is_null) && spec["parallelism"] == 1 {
            spec["completions"] = json!(1);
        }
        dflt(spec, "backoffLimit", json!(6));
        dflt(spec, "completionMode", json!("NonIndexed"));
        dflt(spec, "suspend", json!(false));
        dflt(spec, "manualSelector", json!(false));
        dflt(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
    }
    template(obj);
}

/// A new Job's selector and pod labels, as kube-apiserver makes them: its uid (and name)
/// as labels, the uid as the selector (unless `manualSelector`).
pub fn job_selector(obj: &mut Value) {
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    if spec.get("manualSelector") == Some(&json!(true)) {
        return;
    }
    let labels = json!({
        "batch.kubernetes.io/controller-uid": uid,
        "batch.kubernetes.io/job-name": name,
        "controller-uid": uid,
        "job-name": name,
    });
    spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
    dflt(spec, "template", json!({}));
    let t = &mut spec["template"];
    dflt(t, "metadata", json!({}));
    dflt(&mut t["metadata"], "labels", json!({}));
    if let (Some(have), Some(add)) = (t["metadata"]["labels"].as_object_mut(), labels.as_object()) {
        for (k, v) in add {
            have.insert(k.clone(), v.clone());
        }
    }
}

fn service_spec(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    dflt(spec, "type", json!("ClusterIP"));
    dflt(spec, "sessionAffinity", json!("None"));
    let external_name = spec["type"] == "ExternalName";
    if !external_name {
        dflt(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        dflt(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    for p in each_mut(spec, "ports") {
        dflt(p, "protocol", json!("TCP"));
        let port = p.get("port").cloned().unwrap_or(Value::Null);
        dflt(p, "targetPort", port);
    }
}

/// The DefaultTolerationSeconds admission: a new pod tolerates its node being not ready or
/// unreachable for 300 s (unless it says otherwise), so a short outage evicts nothing.
pub fn default_toleration_seconds(pod: &mut Value) {
    let Some(spec) = pod.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    dflt(spec, "tolerations", json!([]));
    let Some(tols) = spec["tolerations"].as_array_mut() else {
        return;
    };
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let covered = tols.iter().any(|t| {
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
            let k = t.get("key").and_then(Value::as_str).unwrap_or("");
            let exists = t.get("operator").and_then(Value::as_str) == Some("Exists");
            (effect.is_empty() || effect == "NoExecute") && (k == key || (k.is_empty() && exists))
        });
        if !covered {
            tols.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
}

/// Fills the metadata map if absent, returning it.
pub fn metadata(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_follows_the_tag() {
        assert_eq!(pull_policy("nginx"), "Always");
        assert_eq!(pull_policy("nginx:latest"), "Always");
        assert_eq!(pull_policy("nginx:1.27"), "IfNotPresent");
        assert_eq!(pull_policy("127.0.0.1:5000/test/busybox"), "Always");
        assert_eq!(
            pull_policy("127.0.0.1:5000/test/busybox:v1"),
            "IfNotPresent"
        );
        assert_eq!(pull_policy("busybox@sha256:abcd"), "IfNotPresent");
    }

    #[test]
    fn pods_services_secrets_get_defaults() {
        let mut pod = json!({"spec": {"containers": [{"name": "c", "image": "busybox", "ports": [{"containerPort": 80}]}]}});
        apply("Pod", &mut pod);
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["dnsPolicy"], "ClusterFirst");
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(pod["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        let mut svc = json!({"spec": {"ports": [{"port": 80}]}});
        apply("Service", &mut svc);
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        let mut s = json!({"type": ""});
        apply("Secret", &mut s);
        assert_eq!(s["type"], "Opaque");
        let mut d = json!({"spec": {"template": {"spec": {"containers": []}}}});
        apply("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
    }

    #[test]
    fn pods_tolerate_an_outage_for_five_minutes() {
        let mut pod = json!({"spec": {"containers": [], "tolerations": [
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]}});
        default_toleration_seconds(&mut pod);
        let t = pod["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0]["tolerationSeconds"], 5);
        assert_eq!(t[1]["key"], "node.kubernetes.io/not-ready");
        assert_eq!(t[1]["tolerationSeconds"], 300);
    }
}
