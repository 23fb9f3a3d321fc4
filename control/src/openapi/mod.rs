//! OpenAPI documents of the served API: `/openapi/v3` (a root naming one document per group
//! version, each with the full schemas of its kinds, which `kubectl explain` reads) and
//! `/openapi/v2` as JSON. Patch operations declare `fieldValidation`, so `kubectl apply` leaves
//! unknown-field checks to the server and sends `fieldValidation=Strict`.
//!
//! Documents are built on first request and kept only gzip-compressed, with a content hash that
//! names them (`?hash=`, `ETag`) so clients cache them as they cache the real server's.

pub mod schemas;

use std::collections::HashMap;
use std::io::{Read, Write as _};
use std::sync::OnceLock;

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::http::{self, Body, MediaType};
use crate::resources::{self, ResourceType};
use crate::status::{ApiError, ApiResult};

const TITLE: &str = "Kubernetes";
const VERSION: &str = "v1.33.0";

/// A document as served: gzip-compressed JSON and the hash of the uncompressed bytes.
struct Doc {
    gzip: Bytes,
    hash: String,
}

impl Doc {
    fn new(v: &Value) -> Doc {
        let raw = serde_json::to_vec(v).expect("JSON values serialise");
        let digest = ring::digest::digest(&ring::digest::SHA512, &raw);
        let hash = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&raw).expect("writing to memory");
        Doc {
            gzip: enc.finish().expect("writing to memory").into(),
            hash,
        }
    }

    fn json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&self.gzip[..])
            .read_to_end(&mut out)
            .expect("our own gzip stream");
        out
    }
}

struct V3 {
    root: Doc,
    /// By path, e.g. `apis/apps/v1`.
    group_versions: HashMap<String, Doc>,
}

static V3_DOCS: OnceLock<V3> = OnceLock::new();
static V2_DOC: OnceLock<Doc> = OnceLock::new();

/// Hands the heap pages the schema building used back to the system: the documents are
/// built from many short-lived JSON values and only their compressed bytes stay.
fn release_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointers of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// Every served group version: the core group, the stored groups, the review groups.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    std::iter::once(("", "v1"))
        .chain(resources::discovery_groups())
        .collect()
}

fn served(group: &str, version: &str) -> Vec<&'static ResourceType> {
    resources::in_group_version(group, version).collect()
}

fn v3() -> &'static V3 {
    V3_DOCS.get_or_init(|| {
        let mut group_versions = HashMap::new();
        let mut paths = Map::new();
        for (g, v) in self::group_versions() {
            let p = gv_path(g, v);
            let doc = Doc::new(&v3_document(&served(g, v)));
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", doc.hash)}),
            );
            group_versions.insert(p, doc);
        }
        let v3 = V3 {
            root: Doc::new(&json!({ "paths": paths })),
            group_versions,
        };
        release_heap();
        v3
    })
}

fn v2() -> &'static Doc {
    V2_DOC.get_or_init(|| {
        let all: Vec<_> = group_versions()
            .into_iter()
            .flat_map(|(g, v)| served(g, v))
            .collect();
        let doc = Doc::new(&v2_document(&all));
        release_heap();
        doc
    })
}

/// What one operation of the REST API takes and answers.
struct Op {
    method: &'static str,
    action: &'static str,
    verb: &'static str,
    description: String,
    query: &'static [&'static str],
    body: Option<&'static [&'static str]>,
    body_ref: String,
    responses: &'static [(&'static str, &'static str)],
    response_ref: String,
}

const WRITE_PARAMS: &[&str] = &["dryRun", "fieldManager", "fieldValidation"];
const PATCH_PARAMS: &[&str] = &["dryRun", "fieldManager", "fieldValidation", "force"];
const DELETE_PARAMS: &[&str] = &[
    "dryRun",
    "gracePeriodSeconds",
    "propagationPolicy",
    "orphanDependents",
];
const JSON_TYPES: &[&str] = &["application/json", "application/yaml"];
/// The schemas carry no patch strategies (k8s-openapi's have none), so the patch operations
/// leave out `application/strategic-merge-patch+json`: kubectl 1.30+ then builds a client-side
/// apply's strategic merge patch from the strategies compiled into it rather than from these
/// schemas, which would make every list atomic. The server takes such patches all the same.
const PATCH_TYPES: &[&str] = &[
    "application/apply-patch+yaml",
    "application/json-patch+json",
    "application/merge-patch+json",
];

fn operation_id(verb: &str, rt: &ResourceType) -> String {
    let group = match rt.group.split('.').next().unwrap_or("") {
        "" => "Core".to_string(),
        g => {
            let mut c = g.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        }
    };
    let version = {
        let mut c = rt.version.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect::<String>())
            .unwrap_or_default()
    };
    let ns = if rt.namespaced { "Namespaced" } else { "" };
    format!("{verb}{group}{version}{ns}{}", rt.kind)
}

/// The operations on `rt`: (collection path, its operations), (item path, its operations).
fn operations(rt: &ResourceType, def: &str) -> Vec<(String, bool, Vec<Op>)> {
    let base = format!("/{}", gv_path(rt.group, rt.version));
    let collection = if rt.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", rt.plural)
    } else {
        format!("{base}/{}", rt.plural)
    };
    let create = Op {
        method: "post",
        action: "post",
        verb: "create",
        description: format!("create a {}", rt.kind),
        query: WRITE_PARAMS,
        body: Some(JSON_TYPES),
        body_ref: def.to_string(),
        responses: &[("200", "OK"), ("201", "Created"), ("202", "Accepted")],
        response_ref: def.to_string(),
    };
    if rt.review {
        return vec![(collection, false, vec![create])];
    }
    let item = vec![
        Op {
            method: "get",
            action: "get",
            verb: "read",
            description: format!("read the specified {}", rt.kind),
            query: &[],
            body: None,
            body_ref: String::new(),
            responses: &[("200", "OK")],
            response_ref: def.to_string(),
        },
        Op {
            method: "put",
            action: "put",
            verb: "replace",
            description: format!("replace the specified {}", rt.kind),
            query: WRITE_PARAMS,
            body: Some(JSON_TYPES),
            body_ref: def.to_string(),
            responses: &[("200", "OK"), ("201", "Created")],
            response_ref: def.to_string(),
        },
        Op {
            method: "patch",
            action: "patch",
            verb: "patch",
            description: format!("partially update the specified {}", rt.kind),
            query: PATCH_PARAMS,
            body: Some(PATCH_TYPES),
            body_ref: PATCH.to_string(),
            responses: &[("200", "OK"), ("201", "Created")],
            response_ref: def.to_string(),
        },
        Op {
            method: "delete",
            action: "delete",
            verb: "delete",
            description: format!("delete a {}", rt.kind),
            query: DELETE_PARAMS,
            body: Some(&["application/json"]),
            body_ref: schemas::DELETE_OPTIONS.to_string(),
            responses: &[("200", "OK"), ("202", "Accepted")],
            response_ref: schemas::STATUS.to_string(),
        },
    ];
    vec![
        (collection.clone(), false, vec![create]),
        (format!("{collection}/{{name}}"), true, item),
    ]
}

const PATCH: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch";

fn path_params(rt: &ResourceType, item: bool) -> Vec<&'static str> {
    let mut p = Vec::new();
    if item {
        p.push("name");
    }
    if rt.namespaced {
        p.push("namespace");
    }
    p
}

fn gvk(rt: &ResourceType) -> Value {
    json!({"group": rt.group, "kind": rt.kind, "version": rt.version})
}

fn tag(rt: &ResourceType) -> String {
    let g = if rt.group.is_empty() {
        "core"
    } else {
        rt.group.split('.').next().unwrap_or("")
    };
    format!("{g}_{}", rt.version)
}

fn patch_definition() -> Value {
    json!({"description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.", "type": "object"})
}

/// The v3 document of one group version.
fn v3_document(types: &[&ResourceType]) -> Value {
    let (mut defs, named) = schemas::definitions(types.iter().copied());
    defs.insert(PATCH.into(), patch_definition());
    let mut paths = Map::new();
    for (rt, def) in &named {
        for (path, item, ops) in operations(rt, def) {
            let mut entry = Map::new();
            let params: Vec<Value> = path_params(rt, item)
                .into_iter()
                .map(|n| json!({"name": n, "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}}))
                .collect();
            entry.insert("parameters".into(), params.into());
            for op in ops {
                let refv = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
                let mut o = json!({
                    "description": op.description,
                    "operationId": operation_id(op.verb, rt),
                    "parameters": op.query.iter().map(|q| json!({"name": q, "in": "query", "schema": {"type": "string", "uniqueItems": true}})).collect::<Vec<_>>(),
                    "responses": op.responses.iter().map(|(code, d)| (code.to_string(), json!({"description": d, "content": {"application/json": {"schema": refv(&op.response_ref)}}}))).collect::<Map<_, _>>(),
                    "tags": [tag(rt)],
                    "x-kubernetes-action": op.action,
                    "x-kubernetes-group-version-kind": gvk(rt),
                });
                if let Some(types) = op.body {
                    o["requestBody"] = json!({"required": op.method != "delete",
                        "content": types.iter().map(|t| (t.to_string(), json!({"schema": refv(&op.body_ref)}))).collect::<Map<_, _>>()});
                }
                entry.insert(op.method.into(), o);
            }
            paths.insert(path, Value::Object(entry));
        }
    }
    let mut defs = Value::Object(defs);
    schemas::to_v3(&mut defs);
    if let Some(Value::Object(q)) = defs.get_mut(schemas::QUANTITY) {
        // The API server's v3 form: a string or a number.
        q.remove("type");
        q.insert(
            "oneOf".into(),
            json!([{"type": "string"}, {"type": "number"}]),
        );
    }
    if let Some(Value::Object(q)) = defs.get_mut(schemas::INT_OR_STRING) {
        // No single type in v3, so clients name it by its definition (`<IntOrString>`).
        q.remove("type");
        q.remove("format");
        q.insert("x-kubernetes-int-or-string".into(), json!(true));
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": TITLE, "version": VERSION},
        "paths": paths,
        "components": {"schemas": defs},
    })
}

/// The v2 document of all served types.
fn v2_document(types: &[&ResourceType]) -> Value {
    let (mut defs, named) = schemas::definitions(types.iter().copied());
    defs.insert(PATCH.into(), patch_definition());
    let mut paths = Map::new();
    for (rt, def) in &named {
        for (path, item, ops) in operations(rt, def) {
            let mut entry = Map::new();
            let params: Vec<Value> = path_params(rt, item)
                .into_iter()
                .map(|n| json!({"name": n, "in": "path", "required": true, "type": "string", "uniqueItems": true}))
                .collect();
            entry.insert("parameters".into(), params.into());
            for op in ops {
                let mut params: Vec<Value> = op
                    .query
                    .iter()
                    .map(|q| json!({"name": q, "in": "query", "type": "string", "uniqueItems": true}))
                    .collect();
                if op.body.is_some() {
                    params.push(
                        json!({"name": "body", "in": "body", "required": op.method != "delete",
                        "schema": schemas::v2_ref(&op.body_ref)}),
                    );
                }
                let o = json!({
                    "description": op.description,
                    "operationId": operation_id(op.verb, rt),
                    "consumes": op.body.unwrap_or(&["*/*"]),
                    "produces": ["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"],
                    "schemes": ["https"],
                    "parameters": params,
                    "responses": op.responses.iter().map(|(code, d)| (code.to_string(), json!({"description": d, "schema": schemas::v2_ref(&op.response_ref)}))).collect::<Map<_, _>>(),
                    "tags": [tag(rt)],
                    "x-kubernetes-action": op.action,
                    "x-kubernetes-group-version-kind": gvk(rt),
                });
                entry.insert(op.method.into(), o);
            }
            paths.insert(path, Value::Object(entry));
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": TITLE, "version": VERSION},
        "paths": paths,
        "definitions": defs,
    })
}

/// `/openapi/v2` as protobuf (gnostic `openapi_v2.Document`), which kubectl reads before a
/// client-side `apply` to find patch strategies: a document with no definitions, so kubectl
/// uses the patch strategies compiled into it (the schemas carry none) and leaves
/// validation to the server.
fn v2_protobuf() -> Vec<u8> {
    fn ld(field: u8, b: &[u8]) -> Vec<u8> {
        let mut out = vec![field << 3 | 2, b.len() as u8];
        out.extend_from_slice(b);
        out
    }
    let info = [ld(1, TITLE.as_bytes()), ld(2, VERSION.as_bytes())].concat();
    [ld(1, b"2.0"), ld(2, &info)].concat()
}

/// What the real server answers (Go's mime parser rejects the `@` of the requested type).
const V2_PROTOBUF_TYPE: &str = "application/octet-stream";

fn wants_protobuf(accept: &[MediaType]) -> bool {
    accept
        .first()
        .is_some_and(|m| m.raw.contains("protobuf") || m.raw.contains("proto-openapi"))
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.split(';').next().unwrap_or("").trim() == "gzip")
}

/// Answers `doc`: 304 when the client holds this version, gzip when the client takes it.
/// `immutable` when the request named the document by its hash.
fn answer(doc: &Doc, headers: &HeaderMap, immutable: bool) -> Response<Body> {
    let etag = format!("\"{}\"", doc.hash);
    let cache = if immutable {
        "public, immutable"
    } else {
        "no-cache, private"
    };
    let b = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::CACHE_CONTROL, cache)
        .header(header::VARY, "Accept-Encoding");
    let held = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if held {
        return b
            .status(StatusCode::NOT_MODIFIED)
            .body(http::full(Bytes::new()))
            .expect("valid response");
    }
    let b = b.header(header::CONTENT_TYPE, "application/json");
    if accepts_gzip(headers) {
        b.header(header::CONTENT_ENCODING, "gzip")
            .body(http::full(doc.gzip.clone()))
            .expect("valid response")
    } else {
        b.body(http::full(doc.json())).expect("valid response")
    }
}

/// Serves an `/openapi/...` or `/swagger-2.0.0.pb-v1` path; `None` for other paths.
pub fn serve(
    segs: &[&str],
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    accept: &[MediaType],
) -> Option<ApiResult<Response<Body>>> {
    Some(match segs {
        ["openapi", "v2"] | ["swagger-2.0.0.pb-v1"] if wants_protobuf(accept) => {
            Ok(Response::builder()
                .header(header::CONTENT_TYPE, V2_PROTOBUF_TYPE)
                .body(http::full(v2_protobuf()))
                .expect("valid response"))
        }
        ["openapi", "v2"] => Ok(answer(v2(), headers, false)),
        ["openapi", "v3"] => Ok(answer(&v3().root, headers, false)),
        ["openapi", "v3", rest @ ..] => {
            let path = rest.join("/");
            match v3().group_versions.get(&path) {
                None => Err(ApiError::path_not_found()),
                Some(doc) => match query.get("hash") {
                    Some(h) if *h != doc.hash => {
                        // An old hash: send the client to the current document.
                        let to = format!("/openapi/v3/{path}?hash={}", doc.hash);
                        Ok(Response::builder()
                            .status(StatusCode::MOVED_PERMANENTLY)
                            .header(
                                header::LOCATION,
                                HeaderValue::from_str(&to).expect("ASCII path"),
                            )
                            .body(http::full(Bytes::new()))
                            .expect("valid response"))
                    }
                    h => Ok(answer(doc, headers, h.is_some())),
                },
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_name_their_schemas_and_patch_parameters() {
        let root: Value = serde_json::from_slice(&v3().root.json()).unwrap();
        let url = root["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        let hash = url.split("hash=").nth(1).unwrap();
        let doc = &v3().group_versions["apis/apps/v1"];
        assert_eq!(hash, doc.hash);
        let d: Value = serde_json::from_slice(&doc.json()).unwrap();
        let patch = &d["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(patch["operationId"], "patchAppsV1NamespacedDeployment");
        assert!(patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation"));
        let schemas = &d["components"]["schemas"];
        assert_eq!(
            schemas["io.k8s.api.apps.v1.Deployment"]["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        // Every reference resolves within the document.
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|c| refs(c, out));
                }
                Value::Array(a) => a.iter().for_each(|c| refs(c, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&d, &mut all);
        for r in all {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(schemas.get(name).is_some(), "{r} resolves");
        }
        let v2: Value = serde_json::from_slice(&v2().json()).unwrap();
        assert!(
            v2["definitions"]["io.k8s.api.core.v1.Pod"]["properties"]["spec"]["$ref"]
                .as_str()
                .is_some_and(|r| r == "#/definitions/io.k8s.api.core.v1.PodSpec")
        );
    }
}
