//! A minimal OpenAPI v3: enough for kubectl to see that the server validates fields itself
//! (`fieldValidation` on patch operations), so `kubectl apply` sends `fieldValidation=Strict`
//! instead of validating against schemas. No schemas are served yet.

use serde_json::{json, Map, Value};

use crate::resources::{ResourceType, GROUPS, TYPES};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// A stable hash of the served document, so clients may cache it.
const HASH: &str = "oxlet-v1";

pub fn root() -> Value {
    let mut paths = Map::new();
    let gvs = std::iter::once(("", "v1")).chain(GROUPS.iter().copied());
    for (g, v) in gvs {
        let p = gv_path(g, v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={HASH}")}),
        );
    }
    json!({"paths": paths})
}

fn item_path(rt: &ResourceType) -> String {
    let base = if rt.group.is_empty() {
        format!("/api/{}", rt.version)
    } else {
        format!("/apis/{}/{}", rt.group, rt.version)
    };
    if rt.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}/{{name}}", rt.plural)
    } else {
        format!("{base}/{}/{{name}}", rt.plural)
    }
}

/// The document of one group version, e.g. `apis/apps/v1`.
pub fn group_version(path: &str) -> Option<Value> {
    let (group, version) = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    let mut paths = Map::new();
    for rt in TYPES
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let gvk = json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}]);
        let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        let op = json!({
            "operationId": format!("patch{}", rt.kind),
            "parameters": [param("dryRun"), param("fieldManager"), param("fieldValidation"), param("force")],
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk[0],
        });
        paths.insert(item_path(rt), json!({"patch": op}));
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

/// `/openapi/v2` as protobuf (gnostic `openapi_v2.Document`), which kubectl up to 1.2x reads
/// before `apply`: a document with no definitions, so client-side schema validation finds no
/// schema and leaves validation to the server.
pub fn v2_protobuf() -> Vec<u8> {
    fn ld(field: u8, b: &[u8]) -> Vec<u8> {
        let mut out = vec![field << 3 | 2, b.len() as u8];
        out.extend_from_slice(b);
        out
    }
    let info = [ld(1, b"Kubernetes"), ld(2, b"v1.33.0")].concat();
    [ld(1, b"2.0"), ld(2, &info)].concat()
}

/// What the real server answers (Go's mime parser rejects the `@` of the requested type).
pub const V2_PROTOBUF_TYPE: &str = "application/octet-stream";
