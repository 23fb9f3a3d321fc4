//! Server-side apply, first part: each apply manager's field set is kept in
//! `metadata.managedFields` (FieldsV1), so a field that a manager applied before and leaves
//! out now is removed. The configuration itself is merged as a strategic merge patch. Not yet:
//! ownership shared between managers and conflicts (`force`).

use serde_json::{json, Map, Value};

use crate::patch;

/// The FieldsV1 set of an applied configuration: `f:<field>` for fields, `k:<key json>` for
/// list elements merged by key, `v:<value>` for elements of set-like lists, `.` for an element
/// itself. Lists of other kinds are atomic (owned as a whole).
pub fn field_set(v: &Value) -> Value {
    let mut out = Map::new();
    if let Value::Object(m) = v {
        for (k, child) in m {
            if k.starts_with('$') {
                continue;
            }
            out.insert(format!("f:{k}"), child_set(k, child));
        }
    }
    Value::Object(out)
}

fn child_set(field: &str, v: &Value) -> Value {
    match v {
        Value::Object(_) => field_set(v),
        Value::Array(items) => {
            let sample = items.iter().find(|i| i.is_object());
            match patch::list_merge_key(field, sample) {
                Some(key) if sample.is_some() => {
                    let mut out = Map::new();
                    for it in items {
                        let id = json!({key: it.get(key).cloned().unwrap_or(Value::Null)});
                        let mut s = field_set(it);
                        s.as_object_mut()
                            .expect("object")
                            .insert(".".into(), json!({}));
                        out.insert(format!("k:{id}"), s);
                    }
                    Value::Object(out)
                }
                _ if patch::list_merges_primitives(field) => {
                    let out: Map<String, Value> = items
                        .iter()
                        .map(|i| (format!("v:{i}"), json!({})))
                        .collect();
                    Value::Object(out)
                }
                _ => json!({}),
            }
        }
        _ => json!({}),
    }
}

/// Removes from `doc` what `prev` has and `new` has not.
fn remove_dropped(doc: &mut Value, prev: &Map<String, Value>, new: Option<&Map<String, Value>>) {
    for (k, pv) in prev {
        if k == "." {
            continue;
        }
        let nv = new.and_then(|n| n.get(k)).and_then(Value::as_object);
        let gone = new.is_none_or(|n| !n.contains_key(k));
        if let Some(name) = k.strip_prefix("f:") {
            let Some(obj) = doc.as_object_mut() else {
                continue;
            };
            if gone {
                obj.remove(name);
            } else if let (Some(pm), Some(child)) = (pv.as_object(), obj.get_mut(name)) {
                if !pm.is_empty() {
                    remove_dropped(child, pm, nv);
                }
            }
        } else if let Some(id) = k.strip_prefix("k:") {
            let Ok(Value::Object(want)) = serde_json::from_str::<Value>(id) else {
                continue;
            };
            let Some(list) = doc.as_array_mut() else {
                continue;
            };
            let Some(i) = list
                .iter()
                .position(|e| want.iter().all(|(wk, wv)| e.get(wk) == Some(wv)))
            else {
                continue;
            };
            if gone {
                list.remove(i);
            } else if let Some(pm) = pv.as_object() {
                remove_dropped(&mut list[i], pm, nv);
            }
        } else if let Some(val) = k.strip_prefix("v:") {
            let (Ok(val), Some(list)) = (serde_json::from_str::<Value>(val), doc.as_array_mut())
            else {
                continue;
            };
            if gone {
                list.retain(|x| *x != val);
            }
        }
    }
}

/// Applies `config` for `manager` onto `doc` (the current object, or a new one).
pub fn apply(doc: &mut Value, config: &Value, manager: &str, api_version: &str, now: &str) {
    let mut cfg = config.clone();
    if let Some(m) = cfg.get_mut("metadata").and_then(Value::as_object_mut) {
        // Identity and bookkeeping are not the configuration's to own.
        for f in [
            "name",
            "namespace",
            "resourceVersion",
            "uid",
            "managedFields",
            "creationTimestamp",
        ] {
            m.remove(f);
        }
    }
    if let Some(m) = cfg.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    let new_set = field_set(&cfg);
    let mut entries: Vec<Value> = doc
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mine = entries
        .iter()
        .position(|e| e["manager"] == manager && e["operation"] == "Apply");
    if let Some(prev) = mine.and_then(|i| entries[i]["fieldsV1"].as_object().cloned()) {
        remove_dropped(doc, &prev, new_set.as_object());
    }
    strategic(doc, &cfg);
    let entry = json!({"manager": manager, "operation": "Apply", "apiVersion": api_version,
        "time": now, "fieldsType": "FieldsV1", "fieldsV1": new_set});
    match mine {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
    crate::defaults::metadata(doc).insert("managedFields".into(), Value::Array(entries));
}

fn strategic(doc: &mut Value, cfg: &Value) {
    // The configuration is an object (checked by the caller), so this cannot fail.
    let _ = patch::apply(patch::PatchType::Strategic, doc, cfg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_left_out_of_a_new_apply_are_removed() {
        let mut doc = json!({"metadata": {"name": "d", "labels": {"other": "kept"}}});
        let v1 = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"a": "1", "b": "2"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "web", "image": "nginx", "env": [{"name": "X", "value": "1"}]},
                {"name": "side", "image": "busybox"}]}}}});
        apply(&mut doc, &v1, "mgr", "apps/v1", "2026-01-01T00:00:00Z");
        let set = &doc["metadata"]["managedFields"][0]["fieldsV1"];
        assert!(set["f:spec"]["f:template"]["f:spec"]["f:containers"][r#"k:{"name":"web"}"#]["f:env"][r#"k:{"name":"X"}"#].is_object());
        let v2 = json!({"metadata": {"name": "d", "labels": {"a": "1"}},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:2"}]}}}});
        apply(&mut doc, &v2, "mgr", "apps/v1", "2026-01-01T00:00:01Z");
        assert_eq!(
            doc["metadata"]["labels"],
            json!({"a": "1", "other": "kept"})
        );
        assert!(doc["spec"].get("replicas").is_none());
        let cs = doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0]["image"], "nginx:2");
        assert!(cs[0].get("env").is_none());
        assert_eq!(
            doc["metadata"]["managedFields"].as_array().unwrap().len(),
            1
        );
        // Another manager's apply does not remove the first one's fields.
        apply(
            &mut doc,
            &json!({"metadata": {"annotations": {"x": "y"}}}),
            "other",
            "apps/v1",
            "t",
        );
        assert_eq!(doc["metadata"]["labels"]["a"], "1");
        assert_eq!(
            doc["metadata"]["managedFields"].as_array().unwrap().len(),
            2
        );
    }
}
