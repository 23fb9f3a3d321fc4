//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch
//! (lists merged by the merge keys of the built-in types) and server-side apply.

use serde_json::{Map, Value};

use crate::status::{ApiError, ApiResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> ApiResult<PatchType> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Ok(PatchType::Apply),
            other => Err(ApiError::unsupported_media(other)),
        }
    }
}

/// Applies `patch` to `doc` in place.
pub fn apply(kind: PatchType, doc: &mut Value, patch: &Value) -> ApiResult<()> {
    match kind {
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(doc, &p).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })
        }
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("merge patch must be a JSON object"));
            }
            json_patch::merge(doc, patch);
            Ok(())
        }
        PatchType::Strategic | PatchType::Apply => {
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "strategic merge patch must be a JSON object",
                ));
            }
            strategic(doc, patch, "");
            Ok(())
        }
    }
}

/// The key that identifies list elements of `field`, for lists that merge rather than replace.
fn merge_key(field: &str, sample: Option<&Value>) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => {
            // Container ports merge by containerPort, service ports by port.
            if sample.is_some_and(|s| s.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// The merge key of list `field` (for server-side apply's field sets).
pub fn list_merge_key(field: &str, sample: Option<&Value>) -> Option<&'static str> {
    merge_key(field, sample)
}

/// Whether list `field` holds scalars merged as a set.
pub fn list_merges_primitives(field: &str) -> bool {
    merges_primitives(field)
}

/// Lists of scalars merged as sets rather than replaced.
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn strategic(target: &mut Value, patch: &Value, _field: &str) {
    let Some(pm) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if pm.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let mut orders = Vec::new();
    for (k, v) in pm {
        if let Some(f) = k.strip_prefix("$setElementOrder/") {
            orders.push((f.to_string(), v.clone()));
            continue;
        }
        if let Some(f) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let Some(list) = target.get_mut(f).and_then(Value::as_array_mut) {
                let drop: Vec<&Value> = v.as_array().into_iter().flatten().collect();
                list.retain(|x| !drop.contains(&x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let t = target.as_object_mut().expect("made an object above");
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(o) if o.get("$patch").and_then(Value::as_str) == Some("delete") => {
                t.remove(k);
            }
            Value::Object(_) => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                strategic(slot, v, k);
            }
            Value::Array(items) => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                merge_list(slot, items, k);
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
    if let Some(retain) = pm.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        if let Some(t) = target.as_object_mut() {
            t.retain(|k, _| keep.contains(&k.as_str()));
        }
    }
    for (field, order) in orders {
        if let Some(list) = target.get_mut(&field).and_then(Value::as_array_mut) {
            reorder(list, &order, &field);
        }
    }
}

fn merge_list(target: &mut Value, patch: &[Value], field: &str) {
    // A `{"$patch": "replace"}` element replaces the whole list with the other elements.
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *target = Value::Array(
            patch
                .iter()
                .filter(|p| p.get("$patch").is_none())
                .map(strip_directives)
                .collect(),
        );
        return;
    }
    let sample = patch.iter().find(|p| p.is_object());
    let key = merge_key(field, sample);
    if !target.is_array() {
        *target = Value::Array(Vec::new());
    }
    let list = target.as_array_mut().expect("made an array above");
    match key {
        Some(key) if sample.is_some() => {
            for p in patch {
                let kv = p.get(key).cloned().unwrap_or(Value::Null);
                let pos = list.iter().position(|e| e.get(key) == Some(&kv));
                let delete = p.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        list.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => strategic(&mut list[i], p, field),
                    (None, false) => list.push(strip_directives(p)),
                }
            }
        }
        _ if merges_primitives(field) => {
            for p in patch {
                if !list.contains(p) {
                    list.push(p.clone());
                }
            }
        }
        _ => *list = patch.iter().map(strip_directives).collect(),
    }
}

/// Orders `list` as `$setElementOrder` says; elements it does not name keep their place after.
fn reorder(list: &mut Vec<Value>, order: &Value, field: &str) {
    let order: Vec<&Value> = order.as_array().into_iter().flatten().collect();
    let key = merge_key(field, order.first().copied());
    let ident = |v: &Value| -> Value {
        match key {
            Some(k) if v.is_object() => v.get(k).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let wanted: Vec<Value> = order.iter().map(|v| ident(v)).collect();
    let mut indexed: Vec<(usize, Value)> = list
        .drain(..)
        .map(|v| {
            let id = ident(&v);
            let pos = wanted.iter().position(|w| *w == id).unwrap_or(usize::MAX);
            (pos, v)
        })
        .collect();
    indexed.sort_by_key(|(p, _)| *p);
    list.extend(indexed.into_iter().map(|(_, v)| v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_by_name() {
        let mut doc = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "nginx:1.25", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "busybox"}]}}}});
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [{"name": "a", "image": "nginx:1.26", "env": [{"name": "Y", "value": "2"}]}]}}}});
        apply(PatchType::Strategic, &mut doc, &patch).unwrap();
        let cs = &doc["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["name"], "b");
        assert_eq!(cs[1]["image"], "nginx:1.26");
        assert_eq!(cs[1]["env"].as_array().unwrap().len(), 2);
        let del = json!({"spec": {"template": {"spec": {"containers": [{"$patch": "delete", "name": "b"}]}}}});
        apply(PatchType::Strategic, &mut doc, &del).unwrap();
        assert_eq!(
            doc["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn strategic_nulls_delete_and_scalars_lists_replace() {
        let mut doc = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {"paused": true, "args": ["1", "2"], "ports": [{"port": 80, "name": "http"}]}});
        let p = json!({"metadata": {"labels": {"a": null}, "finalizers": ["y"]},
            "spec": {"paused": null, "args": ["3"], "ports": [{"port": 443, "name": "https"}]}});
        apply(PatchType::Strategic, &mut doc, &p).unwrap();
        assert_eq!(doc["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(doc["metadata"]["finalizers"], json!(["x", "y"]));
        assert!(doc["spec"].get("paused").is_none());
        assert_eq!(doc["spec"]["args"], json!(["3"]));
        assert_eq!(doc["spec"]["ports"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn json_and_merge_patches() {
        let mut doc = json!({"spec": {"replicas": 1, "template": {"a": 1}}});
        apply(
            PatchType::Merge,
            &mut doc,
            &json!({"spec": {"replicas": 3, "template": null}}),
        )
        .unwrap();
        assert_eq!(doc, json!({"spec": {"replicas": 3}}));
        apply(
            PatchType::Json,
            &mut doc,
            &json!([{"op": "replace", "path": "/spec/replicas", "value": 5}]),
        )
        .unwrap();
        assert_eq!(doc["spec"]["replicas"], 5);
        let bad = apply(
            PatchType::Json,
            &mut doc,
            &json!([{"op": "test", "path": "/spec/replicas", "value": 1}]),
        );
        assert_eq!(bad.unwrap_err().code, 422);
        assert_eq!(
            PatchType::from_content_type("text/plain").unwrap_err().code,
            415
        );
    }
}
