//! The REST verbs on resource paths: get, list, create, update, patch, delete,
//! deletecollection, and the status, scale and binding subresources.

use bytes::Bytes;
use std::collections::HashMap;

use hyper::{Method, Response};
use serde_json::{json, Value};

use crate::field_validation as fv;
use crate::http::{self, Body, MediaType};
use crate::patch::{self, PatchType};
use crate::registry::{
    meta_str, parse_rv, DeleteOptions, ListOptions, Listed, Propagation, Registry, Write,
};
use crate::resources::ResourceType;
use crate::select::{FieldSelector, LabelSelector};
use crate::status::{ApiError, ApiResult};
use crate::table;

/// One request on a resource path, already routed.
pub struct Call {
    pub method: Method,
    pub rt: &'static ResourceType,
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
    pub query: HashMap<String, String>,
    pub accept: Vec<MediaType>,
    pub content_type: String,
}

impl Call {
    fn ns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    fn write(&self) -> Write {
        Write {
            dry_run: self.query.get("dryRun").is_some_and(|v| v == "All"),
            strict: self
                .query
                .get("fieldValidation")
                .is_some_and(|v| v == "Strict"),
            admit: true,
        }
    }

    /// Unknown and duplicate fields of a request, handled as its `fieldValidation` says: an
    /// error (with the decoder's `prefix`), or the warnings to answer with.
    fn check_fields(&self, obj: &Value, body: &[u8], prefix: &str) -> ApiResult<Vec<String>> {
        match fv::Directive::from_query(&self.query)? {
            fv::Directive::Ignore => Ok(Vec::new()),
            d => fv::Findings::of(self.rt, obj, body)?.enforce(d, prefix),
        }
    }

    /// Answers `obj` as JSON, or as a Table when the client asked for one.
    fn answer(&self, code: u16, obj: Value) -> Response<Body> {
        if crate::protobuf::wants_protobuf(&self.accept) {
            if let Some(r) = crate::protobuf::encode::response(code, &obj) {
                return r;
            }
        }
        if http::wants_table(&self.accept)
            && obj.get("kind").and_then(Value::as_str) != Some("Status")
        {
            let include = self
                .query
                .get("includeObject")
                .map_or("Metadata", String::as_str);
            let meta = json!({"resourceVersion": meta_str(&obj, "resourceVersion")});
            return http::json_response(code, &table::table(self.rt, &[obj], meta, include, true));
        }
        http::json_response(code, &obj)
    }
}

pub fn list_options(q: &HashMap<String, String>) -> ApiResult<ListOptions> {
    Ok(ListOptions {
        labels: LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?,
        fields: FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?,
        limit: match q.get("limit").map(String::as_str) {
            None | Some("") => 0,
            Some(l) => l
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
        },
        continue_token: q.get("continue").filter(|c| !c.is_empty()).cloned(),
        resource_version: q.get("resourceVersion").cloned(),
        resource_version_match: q.get("resourceVersionMatch").cloned(),
    })
}

pub async fn handle(reg: &Registry, c: Call, body: &[u8]) -> ApiResult<Response<Body>> {
    let rt = c.rt;
    match (&c.method, c.name.as_deref(), c.sub.as_deref()) {
        (&Method::GET, None, None) => list(reg, &c),
        (&Method::GET, Some(name), None | Some("status")) => {
            Ok(c.answer(200, reg.get(rt, c.ns(), name)?))
        }
        (&Method::GET, Some(name), Some("scale")) if has_sub(rt, "scale") => Ok(
            http::json_response(200, &to_scale(&reg.get(rt, c.ns(), name)?)),
        ),
        (&Method::POST, None, None) => {
            let obj = http::parse_object(&c.content_type, body)?;
            check_kind(rt, &obj)?;
            let warnings = c.check_fields(&obj, body, &fv::decode_prefix(rt))?;
            let mut obj = obj;
            if let Some(m) = c.query.get("fieldManager").filter(|m| !m.is_empty()) {
                let now = crate::registry::now();
                crate::apply::record_update(None, &mut obj, m, &rt.api_version(), &now);
            }
            let created = reg.create(rt, c.ns(), obj, c.write()).await?;
            Ok(fv::with_warnings(c.answer(201, created), &warnings))
        }
        (&Method::POST, Some(name), Some("binding")) if rt.kind == "Pod" => {
            bind(reg, &c, name, body)
        }
        (&Method::POST, Some(name), Some("eviction")) if rt.kind == "Pod" => {
            // No PodDisruptionBudgets are served, so an eviction is always allowed: it is a
            // delete with the eviction's options.
            let ev = http::parse_object(&c.content_type, body)?;
            let raw = match ev.get("deleteOptions") {
                Some(o) if o.is_object() => serde_json::to_vec(o).unwrap_or_default(),
                _ => Vec::new(),
            };
            reg.delete(rt, c.ns(), name, &delete_options(&HashMap::new(), &raw)?)?;
            let ok = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Success", "code": 201});
            Ok(http::json_response(201, &ok))
        }
        (&Method::PUT, Some(name), sub @ (None | Some("status"))) => {
            let obj = http::parse_object(&c.content_type, body)?;
            check_kind(rt, &obj)?;
            let warnings = c.check_fields(&obj, body, &fv::decode_prefix(rt))?;
            let mut obj = obj;
            if let Some(m) = c.query.get("fieldManager").filter(|m| !m.is_empty()) {
                let cur = reg.get(rt, c.ns(), name)?;
                let now = crate::registry::now();
                crate::apply::record_update(Some(&cur), &mut obj, m, &rt.api_version(), &now);
            }
            let status = sub == Some("status");
            let updated = reg.update(rt, c.ns(), name, obj, status, c.write())?;
            Ok(fv::with_warnings(c.answer(200, updated), &warnings))
        }
        (&Method::PUT, Some(name), Some("scale")) if has_sub(rt, "scale") => {
            let scale = http::parse_object(&c.content_type, body)?;
            Ok(http::json_response(200, &set_scale(reg, &c, name, &scale)?))
        }
        (&Method::PATCH, Some(name), sub @ (None | Some("status") | Some("scale"))) => {
            patch_object(reg, &c, name, sub, body).await
        }
        (&Method::DELETE, Some(name), None) => {
            let opts = delete_options(&c.query, body)?;
            if opts.propagation == Propagation::Orphan {
                let owner = reg.get(rt, c.ns(), name)?;
                crate::gc::orphan(
                    reg,
                    c.ns().filter(|_| rt.namespaced),
                    meta_str(&owner, "uid"),
                );
            }
            let out = reg.delete(rt, c.ns(), name, &opts)?;
            Ok(http::json_response(200, &out))
        }
        (&Method::DELETE, None, None) => {
            let opts = delete_options(&c.query, body)?;
            // The items stay the cache's JSON: a collection of thousands is never decoded whole.
            let listed = reg.list_json(rt, c.ns(), &list_options(&c.query)?)?;
            let items = &listed.items;
            // Deleted from several threads at once, so the deletions share commits.
            let workers = items.len().clamp(1, 16);
            let results: Vec<ApiResult<Option<usize>>> = std::thread::scope(|s| {
                let chunks: Vec<_> = (0..workers)
                    .map(|w| {
                        let opts = &opts;
                        s.spawn(move || {
                            items
                                .iter()
                                .enumerate()
                                .skip(w)
                                .step_by(workers)
                                .map(|(i, item)| {
                                    let key: ObjectKey = serde_json::from_slice(item)
                                        .map_err(|e| ApiError::internal(e.to_string()))?;
                                    let m = key.metadata;
                                    match reg.delete(rt, m.namespace.as_deref(), &m.name, opts) {
                                        Ok(_) => Ok(Some(i)),
                                        Err(e) if e.code == 404 => Ok(None),
                                        Err(e) => Err(e),
                                    }
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                chunks
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            });
            let mut deleted = Vec::new();
            for r in results {
                if let Some(i) = r? {
                    deleted.push(i);
                }
            }
            deleted.sort_unstable();
            let deleted: Vec<Bytes> = deleted.into_iter().map(|i| items[i].clone()).collect();
            let meta = json!({"resourceVersion": listed.rev.to_string()});
            Ok(json_list(rt, meta, &deleted))
        }
        (_, Some(_), Some(sub)) if has_sub(rt, sub) => Err(ApiError::new(
            501,
            "NotImplemented",
            format!("{}/{sub} is not served by this server yet", rt.plural),
        )),
        (_, Some(_), Some(_)) => Err(ApiError::path_not_found()),
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn has_sub(rt: &ResourceType, sub: &str) -> bool {
    rt.subresources.contains(&sub)
}

fn check_kind(rt: &ResourceType, obj: &Value) -> ApiResult<()> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if !kind.is_empty() && kind != rt.kind {
        // The decoder reads the data as its own kind, which does not convert to this one.
        let version = av.rsplit('/').next().unwrap_or(av);
        let internal = rt
            .group
            .split('.')
            .next()
            .filter(|g| !g.is_empty())
            .unwrap_or("core");
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {want}: converting ({version}.{kind}) to ({internal}.{want}): unknown conversion",
            want = rt.kind
        )));
    }
    if !av.is_empty() && av != rt.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    Ok(())
}

fn list(reg: &Registry, c: &Call) -> ApiResult<Response<Body>> {
    let opts = list_options(&c.query)?;
    let page_meta = |rev: i64, token: Option<String>, remaining: Option<i64>| {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if let Some(t) = token {
            meta["continue"] = json!(t);
        }
        if let Some(r) = remaining {
            meta["remainingItemCount"] = json!(r);
        }
        meta
    };
    if http::wants_table(&c.accept) {
        let Listed {
            items,
            rev,
            continue_token,
            remaining,
        } = reg.list(c.rt, c.ns(), &opts)?;
        let include = c
            .query
            .get("includeObject")
            .map_or("Metadata", String::as_str);
        let meta = page_meta(rev, continue_token, remaining);
        return Ok(http::json_response(
            200,
            &table::table(c.rt, &items, meta, include, true),
        ));
    }
    if crate::protobuf::wants_protobuf(&c.accept) {
        let Listed {
            items,
            rev,
            continue_token,
            remaining,
        } = reg.list(c.rt, c.ns(), &opts)?;
        let meta = page_meta(rev, continue_token, remaining);
        let out = json!({"kind": c.rt.list_kind(), "apiVersion": c.rt.api_version(), "metadata": meta, "items": items});
        if let Some(r) = crate::protobuf::encode::response(200, &out) {
            return Ok(r);
        }
        return Ok(http::json_response(200, &out));
    }
    // The items are the cache's JSON as is: nothing is decoded or encoded per item.
    let l = reg.list_json(c.rt, c.ns(), &opts)?;
    let meta = page_meta(l.rev, l.continue_token, l.remaining);
    Ok(json_list(c.rt, meta, &l.items))
}

/// The name and namespace of an object, read without decoding the rest of it.
#[derive(serde::Deserialize)]
struct ObjectKey {
    metadata: KeyMeta,
}

#[derive(serde::Deserialize)]
struct KeyMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// A JSON list of `rt` whose items are already-encoded objects, joined as they are.
fn json_list(rt: &ResourceType, meta: Value, items: &[Bytes]) -> Response<Body> {
    let head = json!({"kind": rt.list_kind(), "apiVersion": rt.api_version(), "metadata": meta});
    let mut out = serde_json::to_vec(&head).expect("JSON serialises");
    out.pop(); // the closing brace
    let size: usize = items.iter().map(|i| i.len() + 1).sum();
    out.reserve(size + 16);
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.extend_from_slice(b"]}");
    Response::builder()
        .status(200)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::CACHE_CONTROL, "no-cache, private")
        .body(http::full(out))
        .expect("valid response")
}

fn delete_options(q: &HashMap<String, String>, body: &[u8]) -> ApiResult<DeleteOptions> {
    let b: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let grace = match q.get("gracePeriodSeconds") {
        Some(g) => Some(
            g.parse()
                .map_err(|_| ApiError::bad_request("invalid gracePeriodSeconds"))?,
        ),
        None => b["gracePeriodSeconds"].as_i64(),
    };
    Ok(DeleteOptions {
        grace_seconds: grace,
        expected_rv: parse_rv(
            b.pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or(""),
        )?,
        propagation: match q
            .get("propagationPolicy")
            .map(String::as_str)
            .or(b["propagationPolicy"].as_str())
        {
            Some("Foreground") => Propagation::Foreground,
            Some("Orphan") => Propagation::Orphan,
            Some("Background") | None if !b["orphanDependents"].as_bool().unwrap_or(false) => {
                Propagation::Background
            }
            None | Some("Background") => Propagation::Orphan,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unsupported propagationPolicy {other:?}: Background, Foreground or Orphan"
                )))
            }
        },
        expected_uid: b
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

async fn patch_object(
    reg: &Registry,
    c: &Call,
    name: &str,
    sub: Option<&str>,
    body: &[u8],
) -> ApiResult<Response<Body>> {
    let rt = c.rt;
    let kind = PatchType::from_content_type(&c.content_type)?;
    let p: Value = match kind {
        PatchType::Apply => http::parse_object("application/yaml", body)?,
        _ => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid patch: {e}")))?,
    };
    let manager = c.query.get("fieldManager").cloned().unwrap_or_default();
    let force = http::flag(&c.query, "force");
    if kind == PatchType::Apply {
        if manager.is_empty() {
            return Err(ApiError::bad_request(
                "PATCH with apply requires a fieldManager parameter",
            ));
        }
        if !p.is_object() {
            return Err(ApiError::bad_request(
                "an apply configuration must be an object",
            ));
        }
        crate::apply::check_schema(rt, c.ns(), name, &p)?;
    }
    let now = crate::registry::now();
    // A patch that names a resourceVersion must match it; others are retried on conflict, as
    // the real server re-applies patches to the newest version.
    let pinned = p.pointer("/metadata/resourceVersion").is_some();
    for _ in 0..5 {
        let cur = match reg.get(rt, c.ns(), name) {
            Ok(cur) => cur,
            Err(e) if e.code == 404 && kind == PatchType::Apply && sub.is_none() => {
                check_kind(rt, &p)?;
                let mut obj = json!({"metadata": {"name": name}});
                crate::apply::apply(&mut obj, &p, &manager, &rt.api_version(), &now, force)?;
                return Ok(c.answer(201, reg.create(rt, c.ns(), obj, c.write()).await?));
            }
            Err(e) => return Err(e),
        };
        if sub == Some("scale") {
            if !has_sub(rt, "scale") {
                return Err(ApiError::path_not_found());
            }
            let mut scale = to_scale(&cur);
            patch::apply(kind, &mut scale, &p)?;
            match set_scale(reg, c, name, &scale) {
                Err(e) if e.code == 409 && !pinned => continue,
                r => return Ok(http::json_response(200, &r?)),
            }
        }
        let mut doc = cur.clone();
        match kind {
            PatchType::Apply => {
                crate::apply::apply(&mut doc, &p, &manager, &rt.api_version(), &now, force)?
            }
            _ => {
                patch::apply(kind, &mut doc, &p)?;
                if !manager.is_empty() {
                    crate::apply::record_update(
                        Some(&cur),
                        &mut doc,
                        &manager,
                        &rt.api_version(),
                        &now,
                    );
                }
            }
        }
        let warnings = match kind {
            PatchType::Apply => Vec::new(),
            _ => c.check_fields(&doc, body, "")?,
        };
        if kind == PatchType::Apply && !pinned {
            // Apply is not a conditional write unless the configuration says so.
            doc["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
        }
        match reg.update(rt, c.ns(), name, doc, sub == Some("status"), c.write()) {
            Err(e) if e.code == 409 && !pinned => continue,
            r => return Ok(fv::with_warnings(c.answer(200, r?), &warnings)),
        }
    }
    Err(ApiError::conflict(rt, name))
}

/// The autoscaling/v1 Scale of a deployment or replica set.
fn to_scale(o: &Value) -> Value {
    let sel = crate::select::LabelSelector::from_object(
        o.pointer("/spec/selector").unwrap_or(&Value::Null),
    );
    let m = &o["metadata"];
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": o.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": o.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": sel.render()}})
}

fn set_scale(reg: &Registry, c: &Call, name: &str, scale: &Value) -> ApiResult<Value> {
    let rt = c.rt;
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| {
            ApiError::invalid(
                rt,
                name,
                vec![crate::status::Cause::required("spec.replicas")],
            )
        })?;
    let mut cur = reg.get(rt, c.ns(), name)?;
    let rv = meta_str(scale, "resourceVersion");
    if !rv.is_empty() {
        cur["metadata"]["resourceVersion"] = json!(rv);
    }
    cur["spec"]["replicas"] = json!(replicas);
    let updated = reg.update(rt, c.ns(), name, cur, false, c.write())?;
    Ok(to_scale(&updated))
}

fn bind(reg: &Registry, c: &Call, name: &str, body: &[u8]) -> ApiResult<Response<Body>> {
    let rt = c.rt;
    let b = http::parse_object(&c.content_type, body)?;
    let node = b
        .pointer("/target/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if node.is_empty() {
        return Err(ApiError::invalid(
            rt,
            name,
            vec![crate::status::Cause::required("target.name")],
        ));
    }
    for _ in 0..5 {
        let mut pod = reg.get(rt, c.ns(), name)?;
        let cur = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !cur.is_empty() {
            return Err(ApiError::new(409, "Conflict", format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{cur}\"")));
        }
        pod["spec"]["nodeName"] = json!(node);
        match reg.update(rt, c.ns(), name, pod, false, c.write()) {
            Err(e) if e.code == 409 => continue,
            r => {
                r?;
                return Ok(http::json_response(
                    201,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                ));
            }
        }
    }
    Err(ApiError::conflict(rt, name))
}
