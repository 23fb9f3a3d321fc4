//! API discovery: legacy (/api, /apis, APIResourceList) and aggregated (apidiscovery.k8s.io
//! v2 and v2beta1), chosen by the Accept header, answered with the chosen media type.

use serde_json::{json, Value};

use crate::http::MediaType;
use crate::resources::{self, ResourceType};

fn sub_verbs(sub: &str) -> &'static [&'static str] {
    match sub {
        "status" | "scale" => &["get", "patch", "update"],
        "binding" | "eviction" | "token" => &["create"],
        "exec" | "attach" | "portforward" => &["create", "get"],
        "finalize" => &["update"],
        _ => &["get"],
    }
}

fn sub_kind(rt: &ResourceType, sub: &str) -> (&'static str, &'static str, &'static str) {
    match sub {
        "scale" => ("autoscaling", "v1", "Scale"),
        "binding" => ("", "v1", "Binding"),
        "eviction" => ("policy", "v1", "Eviction"),
        "token" => ("authentication.k8s.io", "v1", "TokenRequest"),
        "log" => ("", "v1", "Pod"),
        "exec" => ("", "v1", "PodExecOptions"),
        "attach" => ("", "v1", "PodAttachOptions"),
        "portforward" => ("", "v1", "PodPortForwardOptions"),
        _ => (rt.group, rt.version, rt.kind),
    }
}

/// The aggregated media type the client accepts, if any (the version: "v2" or "v2beta1").
pub fn aggregated_choice(accept: &[MediaType]) -> Option<(&'static str, String)> {
    for m in accept {
        if m.param("g") == Some("apidiscovery.k8s.io")
            && m.param("as") == Some("APIGroupDiscoveryList")
        {
            match m.param("v") {
                Some("v2") => return Some(("v2", m.raw.clone())),
                Some("v2beta1") => return Some(("v2beta1", m.raw.clone())),
                _ => {}
            }
        }
        if m.param("as").is_none() && m.essence == "application/json" {
            return None;
        }
    }
    None
}

fn aggregated_resource(rt: &ResourceType) -> Value {
    let subs: Vec<Value> = rt
        .subresources
        .iter()
        .map(|s| {
            let (g, v, k) = sub_kind(rt, s);
            json!({"subresource": s, "responseKind": {"group": g, "version": v, "kind": k}, "verbs": sub_verbs(s)})
        })
        .collect();
    let mut r = json!({
        "resource": rt.plural,
        "responseKind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
        "scope": if rt.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": rt.singular,
        "verbs": rt.verbs(),
    });
    if !rt.short_names.is_empty() {
        r["shortNames"] = json!(rt.short_names);
    }
    if !rt.categories.is_empty() {
        r["categories"] = json!(rt.categories);
    }
    if !subs.is_empty() {
        r["subresources"] = json!(subs);
    }
    r
}

fn aggregated_group(group: &str, version: &str) -> Value {
    let resources: Vec<Value> = resources::in_group_version(group, version)
        .map(aggregated_resource)
        .collect();
    json!({"metadata": {"name": group}, "versions": [{"version": version, "resources": resources, "freshness": "Current"}]})
}

/// `/api` (core only) or `/apis` (the named groups) as an APIGroupDiscoveryList.
pub fn aggregated(core: bool, version: &str) -> Value {
    let items: Vec<Value> = if core {
        vec![aggregated_group("", "v1")]
    } else {
        resources::discovery_groups()
            .map(|(g, v)| aggregated_group(g, v))
            .collect()
    };
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": format!("apidiscovery.k8s.io/{version}"), "metadata": {}, "items": items})
}

pub fn api_versions(server_addr: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_addr}]})
}

fn group_entry(g: &str, v: &str) -> Value {
    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = resources::discovery_groups()
        .map(|(g, v)| group_entry(g, v))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    resources::discovery_groups()
        .find(|(g, _)| *g == group)
        .map(|(g, v)| {
            let mut e = group_entry(g, v);
            e["kind"] = json!("APIGroup");
            e["apiVersion"] = json!("v1");
            e
        })
}

/// `/api/v1` or `/apis/<group>/<version>` as an APIResourceList.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut out = Vec::new();
    for rt in resources::in_group_version(group, version) {
        let mut r = json!({
            "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
            "kind": rt.kind, "verbs": rt.verbs(),
        });
        if !rt.short_names.is_empty() {
            r["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            r["categories"] = json!(rt.categories);
        }
        out.push(r);
        for s in rt.subresources {
            let (g, v, k) = sub_kind(rt, s);
            let mut sr = json!({"name": format!("{}/{s}", rt.plural), "singularName": "",
                "namespaced": rt.namespaced, "kind": k, "verbs": sub_verbs(s)});
            if !g.is_empty() {
                sr["group"] = json!(g);
                sr["version"] = json!(v);
            }
            out.push(sr);
        }
    }
    if out.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_accept;

    #[test]
    fn aggregated_is_chosen_only_when_asked_first() {
        let a = parse_accept(Some(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
        ));
        assert_eq!(aggregated_choice(&a).unwrap().0, "v2");
        assert!(aggregated_choice(&parse_accept(Some("application/json"))).is_none());
        let d = aggregated(false, "v2");
        let apps = &d["items"][0];
        assert_eq!(apps["metadata"]["name"], "apps");
        let deploy = &apps["versions"][0]["resources"][0];
        assert_eq!(deploy["shortNames"][0], "deploy");
        assert_eq!(deploy["subresources"][1]["responseKind"]["kind"], "Scale");
        let core = resource_list("", "v1").unwrap();
        assert!(core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "pods/status"));
    }
}
