//! Validation: the shape is checked by decoding into the typed `k8s-openapi` structs (a wrong
//! type is 400 BadRequest, as the real server's decoder answers), then field rules give 422
//! Invalid with one cause per problem.

use std::collections::HashSet;

use k8s_openapi::api::discovery::v1 as disc;
use k8s_openapi::api::rbac::v1 as rbac;
use k8s_openapi::api::{apps::v1 as apps, coordination::v1 as coord, core::v1 as core};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::field_validation::{dotted, Step};
use crate::resources::ResourceType;
use crate::status::{ApiError, Cause};

/// Decodes into the typed struct and encodes back: a wrong type is an error, unknown fields
/// fall away, and what is stored always decodes for typed clients.
fn roundtrip<T: DeserializeOwned + Serialize>(
    rt: &ResourceType,
    obj: &Value,
) -> Result<Value, ApiError> {
    let typed: T =
        serde_json::from_value(obj.clone()).map_err(|e| cannot_handle(rt, &e.to_string()))?;
    serde_json::to_value(typed).map_err(|e| ApiError::internal(e.to_string()))
}

fn cannot_handle(rt: &ResourceType, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{kind} in version \"{v}\" cannot be handled as a {kind}: {why}",
        kind = rt.kind,
        v = rt.version
    ))
}

/// Paths of the fields of `orig` that the typed form `typed` lost (null values aside).
fn unknown_fields(orig: &Value, typed: &Value, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match (orig, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                path.push(Step::Field(k.clone()));
                match t.get(k) {
                    None if !v.is_null() => out.push(path.clone()),
                    Some(tv) => unknown_fields(v, tv, path, out),
                    None => {}
                }
                path.pop();
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                path.push(Step::Index(i));
                unknown_fields(x, y, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn decode(rt: &ResourceType, obj: &Value) -> Result<Value, ApiError> {
    Ok(match rt.kind {
        "Namespace" => roundtrip::<core::Namespace>(rt, obj)?,
        "Pod" => roundtrip::<core::Pod>(rt, obj)?,
        "Service" => roundtrip::<core::Service>(rt, obj)?,
        "Endpoints" => roundtrip::<core::Endpoints>(rt, obj)?,
        "ConfigMap" => roundtrip::<core::ConfigMap>(rt, obj)?,
        "Secret" => roundtrip::<core::Secret>(rt, obj)?,
        "ServiceAccount" => roundtrip::<core::ServiceAccount>(rt, obj)?,
        "Node" => roundtrip::<core::Node>(rt, obj)?,
        "Event" => roundtrip::<core::Event>(rt, obj)?,
        "Deployment" => roundtrip::<apps::Deployment>(rt, obj)?,
        "ReplicaSet" => roundtrip::<apps::ReplicaSet>(rt, obj)?,
        "DaemonSet" => roundtrip::<apps::DaemonSet>(rt, obj)?,
        "Job" => roundtrip::<k8s_openapi::api::batch::v1::Job>(rt, obj)?,
        "EndpointSlice" => roundtrip::<disc::EndpointSlice>(rt, obj)?,
        "Lease" => roundtrip::<coord::Lease>(rt, obj)?,
        "Role" => roundtrip::<rbac::Role>(rt, obj)?,
        "ClusterRole" => roundtrip::<rbac::ClusterRole>(rt, obj)?,
        "RoleBinding" => roundtrip::<rbac::RoleBinding>(rt, obj)?,
        "ClusterRoleBinding" => roundtrip::<rbac::ClusterRoleBinding>(rt, obj)?,
        _ => obj.clone(),
    })
}

/// The paths of the fields of `obj` that `rt`'s kind does not declare; an error when `obj`
/// does not decode as that kind.
pub fn unknown_fields_of(rt: &ResourceType, obj: &Value) -> Result<Vec<Vec<Step>>, ApiError> {
    let typed = decode(rt, obj)?;
    let mut out = Vec::new();
    unknown_fields(obj, &typed, &mut Vec::new(), &mut out);
    Ok(out)
}

/// The object in its typed form. With `strict`, unknown fields are a 400 as with
/// `fieldValidation=Strict` on the real server; otherwise they are dropped.
pub fn typed(rt: &ResourceType, obj: Value, strict: bool) -> Result<Value, ApiError> {
    let out = decode(rt, &obj)?;
    if strict {
        let mut unknown = Vec::new();
        unknown_fields(&obj, &out, &mut Vec::new(), &mut unknown);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{}\"", dotted(f)))
                .collect();
            return Err(cannot_handle(
                rt,
                &format!("strict decoding error: {}", list.join(", ")),
            ));
        }
    }
    Ok(out)
}

/// A DNS-1123 subdomain: lower-case alphanumerics, '-' and '.', at most 253.
pub fn dns_subdomain(s: &str) -> Option<&'static str> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !p.starts_with('-')
                && !p.ends_with('-')
        });
    (!ok).then_some(
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or \
         '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used \
         for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
    )
}

/// A DNS-1123 label: lower-case alphanumerics and '-', at most 63.
pub fn dns_label(s: &str) -> Option<&'static str> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    (!ok).then_some(
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and \
         must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex \
         used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
    )
}

/// RBAC names (`system:discovery`) need only be usable in a path, as upstream's
/// `ValidateRBACName`.
fn path_segment(name: &str) -> Option<String> {
    if name == "." || name == ".." {
        return Some(format!("may not be '{name}'"));
    }
    ["/", "%"]
        .iter()
        .find(|x| name.contains(*x))
        .map(|x| format!("may not contain '{x}'"))
}

/// Types whose names must be DNS labels rather than subdomains.
fn label_named(kind: &str) -> bool {
    matches!(kind, "Namespace" | "Service")
}

/// Rules about what an update may change.
pub fn update(rt: &ResourceType, old: &Value, new: &Value) -> Vec<Cause> {
    let mut c = Vec::new();
    if matches!(rt.kind, "RoleBinding" | "ClusterRoleBinding") && old["roleRef"] != new["roleRef"] {
        let r = &new["roleRef"];
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        // Upstream prints the Go value of the new reference.
        c.push(Cause {
            reason: "FieldValueInvalid",
            field: "roleRef".into(),
            message: format!(
                "Invalid value: rbac.RoleRef{{APIGroup:{:?}, Kind:{:?}, Name:{:?}}}: cannot \
                 change roleRef",
                s("apiGroup"),
                s("kind"),
                s("name")
            ),
        });
    }
    c
}

/// Field rules. Returns all problems found.
pub fn fields(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    let mut c = Vec::new();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if name.is_empty() {
        c.push(Cause::required("metadata.name"));
    } else {
        let bad = if label_named(rt.kind) {
            dns_label(name).map(str::to_string)
        } else if rt.group == crate::resources::RBAC_GROUP {
            path_segment(name)
        } else {
            dns_subdomain(name).map(str::to_string)
        };
        if let Some(why) = bad {
            c.push(Cause::invalid("metadata.name", &Value::from(name), why));
        }
    }
    match rt.kind {
        "Pod" => pod_spec(&obj["spec"], "spec", &mut c),
        "Deployment" | "ReplicaSet" | "DaemonSet" => workload(obj, &mut c),
        "Job" => job(obj, &mut c),
        "Service" => service(&obj["spec"], &mut c),
        "ConfigMap" | "Secret" => data_keys(obj, &mut c),
        _ => {}
    }
    c
}

fn pod_spec(spec: &Value, path: &str, c: &mut Vec<Cause>) {
    let containers = spec["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if containers.is_empty() {
        c.push(Cause::required(format!("{path}.containers")));
    }
    let mut names = HashSet::new();
    for (key, list) in [
        ("initContainers", &spec["initContainers"]),
        ("containers", &spec["containers"]),
    ] {
        for (i, ctr) in list.as_array().into_iter().flatten().enumerate() {
            let p = format!("{path}.{key}[{i}]");
            match ctr["name"].as_str().unwrap_or("") {
                "" => c.push(Cause::required(format!("{p}.name"))),
                n => {
                    if let Some(why) = dns_label(n) {
                        c.push(Cause::invalid(format!("{p}.name"), &ctr["name"], why));
                    } else if !names.insert(n.to_string()) {
                        c.push(Cause::duplicate(format!("{p}.name"), &ctr["name"]));
                    }
                }
            }
            if ctr["image"].as_str().unwrap_or("").trim().is_empty() {
                c.push(Cause::required(format!("{p}.image")));
            }
            for (j, port) in ctr["ports"].as_array().into_iter().flatten().enumerate() {
                let n = port["containerPort"].as_i64().unwrap_or(0);
                if !(1..=65535).contains(&n) {
                    c.push(Cause::invalid(
                        format!("{p}.ports[{j}].containerPort"),
                        &port["containerPort"],
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
            if let Some(pp) = ctr.get("imagePullPolicy").and_then(Value::as_str) {
                let ok = ["Always", "IfNotPresent", "Never"];
                if !ok.contains(&pp) {
                    c.push(Cause::not_supported(
                        format!("{p}.imagePullPolicy"),
                        &ctr["imagePullPolicy"],
                        &ok,
                    ));
                }
            }
        }
    }
    if let Some(rp) = spec.get("restartPolicy").and_then(Value::as_str) {
        let ok = ["Always", "OnFailure", "Never"];
        if !ok.contains(&rp) {
            c.push(Cause::not_supported(
                format!("{path}.restartPolicy"),
                &spec["restartPolicy"],
                &ok,
            ));
        }
    }
}

fn workload(obj: &Value, c: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    if let Some(r) = spec.get("replicas").and_then(Value::as_i64) {
        if r < 0 {
            c.push(Cause::invalid(
                "spec.replicas",
                &spec["replicas"],
                "must be greater than or equal to 0",
            ));
        }
    }
    let sel = &spec["selector"];
    let empty_sel = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_none_or(|m| m.is_empty())
        && sel
            .get("matchExpressions")
            .and_then(Value::as_array)
            .is_none_or(|m| m.is_empty());
    if empty_sel {
        c.push(Cause::required("spec.selector"));
    } else {
        let s = crate::select::LabelSelector::from_object(sel);
        let labels = spec.pointer("/template/metadata/labels");
        if !s.matches(labels) {
            c.push(Cause::invalid(
                "spec.template.metadata.labels",
                labels.unwrap_or(&Value::Null),
                "`selector` does not match template `labels`",
            ));
        }
    }
    pod_spec(&spec["template"]["spec"], "spec.template.spec", c);
    if let Some(rp) = spec
        .pointer("/template/spec/restartPolicy")
        .and_then(Value::as_str)
    {
        if rp != "Always" {
            c.push(Cause::not_supported(
                "spec.template.spec.restartPolicy",
                &Value::from(rp),
                &["Always"],
            ));
        }
    }
}

fn job(obj: &Value, c: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    pod_spec(&spec["template"]["spec"], "spec.template.spec", c);
    let rp = spec
        .pointer("/template/spec/restartPolicy")
        .and_then(Value::as_str);
    if !matches!(rp, Some("OnFailure" | "Never")) {
        c.push(Cause::not_supported(
            "spec.template.spec.restartPolicy",
            &Value::from(rp.unwrap_or("")),
            &["OnFailure", "Never"],
        ));
    }
    for f in [
        "parallelism",
        "completions",
        "backoffLimit",
        "activeDeadlineSeconds",
        "ttlSecondsAfterFinished",
    ] {
        if spec.get(f).and_then(Value::as_i64).is_some_and(|n| n < 0) {
            c.push(Cause::invalid(
                format!("spec.{f}"),
                &spec[f],
                "must be greater than or equal to 0",
            ));
        }
    }
}

fn service(spec: &Value, c: &mut Vec<Cause>) {
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    let types = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    if !types.contains(&ty) {
        c.push(Cause::not_supported("spec.type", &spec["type"], &types));
    }
    let ports = spec["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let headless = spec["clusterIP"] == "None";
    if ports.is_empty() && ty != "ExternalName" && !headless {
        c.push(Cause::required("spec.ports"));
    }
    let mut seen = HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let n = p["port"].as_i64().unwrap_or(0);
        if !(1..=65535).contains(&n) {
            c.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &p["port"],
                "must be between 1 and 65535, inclusive",
            ));
        }
        if ports.len() > 1 && p["name"].as_str().unwrap_or("").is_empty() {
            c.push(Cause::required(format!("spec.ports[{i}].name")));
        }
        let proto = p["protocol"].as_str().unwrap_or("TCP");
        if !seen.insert((n, proto.to_string())) {
            c.push(Cause::duplicate(format!("spec.ports[{i}]"), &p["port"]));
        }
    }
    if ty == "ExternalName" && spec["externalName"].as_str().unwrap_or("").is_empty() {
        c.push(Cause::required("spec.externalName"));
    }
}

fn data_keys(obj: &Value, c: &mut Vec<Cause>) {
    for field in ["data", "binaryData", "stringData"] {
        for k in obj[field].as_object().into_iter().flatten().map(|(k, _)| k) {
            let ok = !k.is_empty()
                && k.len() <= 253
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !ok {
                c.push(Cause::invalid(
                    format!("{field}[{k}]"),
                    &Value::from(k.as_str()),
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources;
    use serde_json::json;

    #[test]
    fn bad_pods_list_every_problem() {
        let rt = resources::get("", "pods");
        let pod = json!({"metadata": {"name": "Bad_Name"}, "spec": {"containers": [
            {"name": "a", "image": ""}, {"name": "a", "image": "x", "ports": [{"containerPort": 70000}]}]}});
        let causes = fields(rt, &pod);
        let f: Vec<_> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            f,
            [
                "metadata.name",
                "spec.containers[0].image",
                "spec.containers[1].name",
                "spec.containers[1].ports[0].containerPort"
            ]
        );
        assert!(typed(rt, json!({"spec": {"containers": "no"}}), false).is_err());
        let with_typo = json!({"metadata": {"name": "p", "labels": {"any": "x"}}, "spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicyy": "Never"}], "nodeName": null}});
        let cleaned = typed(rt, with_typo.clone(), false).unwrap();
        assert!(cleaned
            .pointer("/spec/containers/0/imagePullPolicyy")
            .is_none());
        assert_eq!(cleaned.pointer("/metadata/labels/any").unwrap(), "x");
        let e = typed(rt, with_typo, true).unwrap_err();
        assert!(
            e.message.ends_with(
                "strict decoding error: unknown field \"spec.containers[0].imagePullPolicyy\""
            ),
            "{}",
            e.message
        );
    }

    #[test]
    fn deployment_selector_must_match_template() {
        let rt = resources::get("apps", "deployments");
        let d = json!({"metadata": {"name": "web"}, "spec": {"selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "y"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let causes = fields(rt, &d);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.template.metadata.labels");
    }
}
