//! The downward API's values of a pod, as kubelet renders them for env variables and volume
//! files: object fields (`metadata.labels['k']`, ...) and container resources with a divisor.

use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector, Pod, ResourceFieldSelector};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use runtime::cgroup::{cpu_milli, memory_bytes};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("unsupported fieldPath: {0}")]
    Field(String),
    #[error("unsupported container resource : {0}")]
    Resource(String),
    #[error("invalid quantity {0:?} for {1}")]
    Quantity(String, &'static str),
    #[error("container {0:?} not found in pod")]
    NoContainer(String),
}

/// Go's `%q` of a string: printable characters as they are, the rest escaped.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A label or annotation map as kubelet writes it: `key="value"` lines, sorted by key.
pub fn format_map(m: Option<&BTreeMap<String, String>>) -> String {
    m.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `metadata.labels['key']` -> `("metadata.labels", "key")`.
fn subscript(path: &str) -> Option<(&str, &str)> {
    let (field, rest) = path.split_once('[')?;
    let key = rest.strip_suffix(']')?;
    let key = key
        .strip_prefix('\'')
        .and_then(|k| k.strip_suffix('\''))
        .unwrap_or(key);
    Some((field, key))
}

/// A metadata field of the pod (what volumes may reference).
pub fn metadata_field(pod: &Pod, path: &str) -> Result<String, Error> {
    let m = &pod.metadata;
    if let Some((field, key)) = subscript(path) {
        let map = match field {
            "metadata.labels" => m.labels.as_ref(),
            "metadata.annotations" => m.annotations.as_ref(),
            _ => return Err(Error::Field(path.into())),
        };
        return Ok(map.and_then(|m| m.get(key)).cloned().unwrap_or_default());
    }
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(m.labels.as_ref()),
        "metadata.annotations" => format_map(m.annotations.as_ref()),
        _ => return Err(Error::Field(path.into())),
    })
}

/// A field an env variable may reference: metadata, and what only the node knows.
pub fn env_field(
    pod: &Pod,
    sel: &ObjectFieldSelector,
    host_ip: &str,
    pod_ips: &[String],
) -> Result<String, Error> {
    let spec = pod.spec.as_ref();
    Ok(match sel.field_path.as_str() {
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        "status.podIP" => pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => pod_ips.join(","),
        path => metadata_field(pod, path)?,
    })
}

/// The container's resources as the downward API sees them: limits left unset are the node's
/// allocatable, requests left unset are the limits (the API server's defaulting).
fn resource(
    c: &Container,
    allocatable: &BTreeMap<String, Quantity>,
    which: &str,
    name: &str,
) -> Option<Quantity> {
    let res = c.resources.as_ref();
    let limit = res
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get(name))
        .cloned();
    match which {
        "limits" => limit.or_else(|| allocatable.get(name).cloned()),
        _ => res
            .and_then(|r| r.requests.as_ref())
            .and_then(|l| l.get(name))
            .cloned()
            .or(limit),
    }
}

/// `resourceFieldRef` of container `c`: the ceiling of the value divided by the divisor.
pub fn container_resource(
    c: &Container,
    sel: &ResourceFieldSelector,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<String, Error> {
    let (which, name) = sel
        .resource
        .split_once('.')
        .filter(|(w, _)| matches!(*w, "limits" | "requests"))
        .ok_or_else(|| Error::Resource(sel.resource.clone()))?;
    let divisor = sel
        .divisor
        .clone()
        .filter(|d| !d.0.is_empty() && d.0 != "0");
    let value = resource(c, allocatable, which, name);
    let zero = Quantity("0".into());
    let value = value.as_ref().unwrap_or(&zero);
    let q = |q: &Quantity, what| Error::Quantity(q.0.clone(), what);
    let n = match name {
        "cpu" => {
            let v = cpu_milli(value).map_err(|_| q(value, "cpu"))? as f64;
            let d = match &divisor {
                Some(d) => cpu_milli(d).map_err(|_| q(d, "cpu"))? as f64,
                None => 1000.0,
            };
            (v / d).ceil()
        }
        "memory" | "ephemeral-storage" => {
            let v = memory_bytes(value).map_err(|_| q(value, "memory"))? as f64;
            let d = match &divisor {
                Some(d) => memory_bytes(d).map_err(|_| q(d, "memory"))? as f64,
                None => 1.0,
            };
            (v / d).ceil()
        }
        _ => return Err(Error::Resource(sel.resource.clone())),
    };
    Ok(format!("{}", n as i64))
}

/// `resourceFieldRef` naming a container of the pod (volumes name it; env defaults to its own).
pub fn pod_container_resource(
    pod: &Pod,
    container: &str,
    sel: &ResourceFieldSelector,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<String, Error> {
    let spec = pod.spec.as_ref();
    let c = spec
        .into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .find(|c| c.name == container)
        .ok_or_else(|| Error::NoContainer(container.into()))?;
    container_resource(c, sel, allocatable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1",
                "labels": {"zone": "us-est-coast", "cluster": "test-cluster1"},
                "annotations": {"build": "two", "quote": "a\"b\nc"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "sa", "containers": [{"name": "c"}]}
        }))
        .unwrap()
    }

    #[test]
    fn metadata_fields_as_kubelet_renders_them() {
        let p = pod();
        assert_eq!(
            metadata_field(&p, "metadata.labels").unwrap(),
            "cluster=\"test-cluster1\"\nzone=\"us-est-coast\""
        );
        assert_eq!(
            metadata_field(&p, "metadata.annotations").unwrap(),
            "build=\"two\"\nquote=\"a\\\"b\\nc\""
        );
        assert_eq!(
            metadata_field(&p, "metadata.labels['zone']").unwrap(),
            "us-est-coast"
        );
        assert_eq!(metadata_field(&p, "metadata.labels['none']").unwrap(), "");
        assert_eq!(metadata_field(&p, "metadata.uid").unwrap(), "u-1");
        assert!(metadata_field(&p, "spec.nodeName").is_err());
        let sel = |f: &str| ObjectFieldSelector {
            field_path: f.into(),
            api_version: None,
        };
        let ips = ["10.0.0.5".to_string(), "fd00::5".to_string()];
        assert_eq!(
            env_field(&p, &sel("spec.nodeName"), "1.2.3.4", &ips).unwrap(),
            "n1"
        );
        assert_eq!(
            env_field(&p, &sel("status.podIPs"), "1.2.3.4", &ips).unwrap(),
            "10.0.0.5,fd00::5"
        );
        assert_eq!(
            env_field(&p, &sel("status.hostIP"), "1.2.3.4", &ips).unwrap(),
            "1.2.3.4"
        );
    }

    #[test]
    fn resources_with_divisors_and_node_defaults() {
        let q = |s: &str| Quantity(s.into());
        let c = Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                limits: Some(BTreeMap::from([("memory".into(), q("64Mi"))])),
                requests: Some(BTreeMap::from([("cpu".into(), q("250m"))])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let alloc = BTreeMap::from([("cpu".into(), q("2")), ("memory".into(), q("1Gi"))]);
        let sel = |r: &str, d: Option<&str>| ResourceFieldSelector {
            resource: r.into(),
            divisor: d.map(q),
            container_name: None,
        };
        let v = |r, d| container_resource(&c, &sel(r, d), &alloc).unwrap();
        assert_eq!(v("requests.cpu", None), "1");
        assert_eq!(v("requests.cpu", Some("1m")), "250");
        assert_eq!(v("limits.cpu", None), "2");
        assert_eq!(v("limits.memory", None), (64u64 << 20).to_string());
        assert_eq!(v("limits.memory", Some("1Mi")), "64");
        assert_eq!(v("requests.memory", Some("1Mi")), "64");
        assert_eq!(v("limits.memory", Some("1Gi")), "1");
        assert!(container_resource(&c, &sel("limits.gpu", None), &alloc).is_err());
    }
}
