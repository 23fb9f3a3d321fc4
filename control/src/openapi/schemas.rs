//! The schemas of the served kinds, generated from the `k8s-openapi` types (their `schemars`
//! implementations carry the upstream field descriptions) under upstream's definition names
//! (`io.k8s.api.apps.v1.Deployment`).

use k8s_openapi::api::{
    apps::v1 as apps, authentication::v1 as authn, authorization::v1 as authz, batch::v1 as batch,
    coordination::v1 as coord, core::v1 as core, discovery::v1 as disc, rbac::v1 as rbac,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::resources::ResourceType;

/// Where definitions live in an OpenAPI v2 document; v3 documents are rewritten from this.
const V2_PREFIX: &str = "#/definitions/";
const V3_PREFIX: &str = "#/components/schemas/";

/// The definition names of the meta types every document refers to.
pub const STATUS: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Status";
pub const DELETE_OPTIONS: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions";

fn one<T: JsonSchema>(gen: &mut SchemaGenerator) -> String {
    gen.subschema_for::<T>();
    T::schema_name().into_owned()
}

/// Adds the schema of `rt`'s kind and of everything it refers to; the name of its definition.
fn add(gen: &mut SchemaGenerator, rt: &ResourceType) -> Option<String> {
    Some(match (rt.group, rt.version, rt.kind) {
        ("", "v1", "Namespace") => one::<core::Namespace>(gen),
        ("", "v1", "Pod") => one::<core::Pod>(gen),
        ("", "v1", "Service") => one::<core::Service>(gen),
        ("", "v1", "Endpoints") => one::<core::Endpoints>(gen),
        ("", "v1", "ConfigMap") => one::<core::ConfigMap>(gen),
        ("", "v1", "Secret") => one::<core::Secret>(gen),
        ("", "v1", "ServiceAccount") => one::<core::ServiceAccount>(gen),
        ("", "v1", "Node") => one::<core::Node>(gen),
        ("", "v1", "Event") => one::<core::Event>(gen),
        ("apps", "v1", "Deployment") => one::<apps::Deployment>(gen),
        ("apps", "v1", "ReplicaSet") => one::<apps::ReplicaSet>(gen),
        ("apps", "v1", "DaemonSet") => one::<apps::DaemonSet>(gen),
        ("batch", "v1", "Job") => one::<batch::Job>(gen),
        ("discovery.k8s.io", "v1", "EndpointSlice") => one::<disc::EndpointSlice>(gen),
        ("coordination.k8s.io", "v1", "Lease") => one::<coord::Lease>(gen),
        ("authentication.k8s.io", "v1", "SelfSubjectReview") => {
            one::<authn::SelfSubjectReview>(gen)
        }
        ("authorization.k8s.io", "v1", "SelfSubjectAccessReview") => {
            one::<authz::SelfSubjectAccessReview>(gen)
        }
        ("authorization.k8s.io", "v1", "SelfSubjectRulesReview") => {
            one::<authz::SelfSubjectRulesReview>(gen)
        }
        ("authorization.k8s.io", "v1", "SubjectAccessReview") => {
            one::<authz::SubjectAccessReview>(gen)
        }
        ("rbac.authorization.k8s.io", "v1", "Role") => one::<rbac::Role>(gen),
        ("rbac.authorization.k8s.io", "v1", "ClusterRole") => one::<rbac::ClusterRole>(gen),
        ("rbac.authorization.k8s.io", "v1", "RoleBinding") => one::<rbac::RoleBinding>(gen),
        ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding") => {
            one::<rbac::ClusterRoleBinding>(gen)
        }
        _ => return None,
    })
}

/// The definitions of `types` (OpenAPI v2 form), each kind with its
/// `x-kubernetes-group-version-kind`, and the definition name of each type.
pub fn definitions<'a>(
    types: impl IntoIterator<Item = &'a ResourceType>,
) -> (Map<String, Value>, Vec<(&'a ResourceType, String)>) {
    let mut gen = SchemaSettings::draft07()
        .with(|s| {
            s.meta_schema = None;
            s.transforms.clear();
        })
        .into_generator();
    let named: Vec<_> = types
        .into_iter()
        .filter_map(|rt| add(&mut gen, rt).map(|n| (rt, n)))
        .collect();
    gen.subschema_for::<meta::Status>();
    gen.subschema_for::<meta::DeleteOptions>();
    let mut defs = gen.take_definitions(false);
    for (rt, name) in &named {
        if let Some(Value::Object(d)) = defs.get_mut(name) {
            // k8s-openapi requires `metadata` of its Rust types; the API does not.
            if let Some(Value::Array(req)) = d.get_mut("required") {
                req.retain(|f| f != "metadata");
                if req.is_empty() {
                    d.remove("required");
                }
            }
            d.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": rt.group, "kind": rt.kind, "version": rt.version}]),
            );
        }
    }
    if let Some(Value::Object(d)) = defs.get_mut(STATUS) {
        d.insert(
            "x-kubernetes-group-version-kind".into(),
            json!([{"group": "", "kind": "Status", "version": "v1"}]),
        );
    }
    // Built-in types are described as the API server describes them, not as CRD schemas.
    if let Some(Value::Object(d)) = defs.get_mut(INT_OR_STRING) {
        d.remove("x-kubernetes-int-or-string");
        d.insert("type".into(), json!("string"));
        d.insert("format".into(), json!("int-or-string"));
    }
    if let Some(Value::Object(d)) = defs.get_mut(QUANTITY) {
        d.remove("x-kubernetes-int-or-string");
        d.insert("type".into(), json!("string"));
    }
    (defs, named)
}

/// A v2 reference to definition `name`.
pub fn v2_ref(name: &str) -> Value {
    json!({ "$ref": format!("{V2_PREFIX}{name}") })
}

pub const INT_OR_STRING: &str = "io.k8s.apimachinery.pkg.util.intstr.IntOrString";
pub const QUANTITY: &str = "io.k8s.apimachinery.pkg.api.resource.Quantity";

/// Rewrites v2 schemas into OpenAPI v3 form: references under `components/schemas`, and a
/// reference with a description of its own wrapped in `allOf` (a v3 `$ref` has no siblings).
pub fn to_v3(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get_mut("$ref") {
                if let Some(name) = r.strip_prefix(V2_PREFIX) {
                    *r = format!("{V3_PREFIX}{name}");
                }
                if m.len() > 1 {
                    let r = m.remove("$ref").expect("present");
                    m.insert("allOf".into(), json!([{ "$ref": r }]));
                }
                return;
            }
            m.values_mut().for_each(to_v3);
        }
        Value::Array(a) => a.iter_mut().for_each(to_v3),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::TYPES;

    #[test]
    fn deployment_schema_has_upstream_names_and_docs() {
        let (defs, named) = definitions(TYPES.iter());
        assert_eq!(named.len(), TYPES.len(), "every served kind has a schema");
        let d = &defs["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            d["x-kubernetes-group-version-kind"],
            json!([{"group": "apps", "kind": "Deployment", "version": "v1"}])
        );
        assert_eq!(
            d["properties"]["spec"]["$ref"],
            "#/definitions/io.k8s.api.apps.v1.DeploymentSpec"
        );
        let ru = &defs["io.k8s.api.apps.v1.RollingUpdateDeployment"];
        assert!(ru["properties"]["maxSurge"]["description"]
            .as_str()
            .unwrap()
            .contains("maximum number of pods that can be scheduled above the desired number"));
        assert_eq!(
            defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]["format"],
            "int-or-string"
        );
        let mut spec = d["properties"]["spec"].clone();
        to_v3(&mut spec);
        assert_eq!(
            spec["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.apps.v1.DeploymentSpec"
        );
        assert!(spec["description"].is_string());
    }
}
