//! Server-side apply: each manager's field set is kept in `metadata.managedFields` (FieldsV1).
//! A field that an applier applied before and leaves out now is removed unless another manager
//! owns it; setting a field another manager owns to a new value is a conflict unless forced;
//! updates take ownership of what they change. The configuration itself is merged as a
//! strategic merge patch.

use serde_json::{json, Map, Value};

use crate::field_validation::Step;
use crate::patch;
use crate::resources::ResourceType;
use crate::status::{ApiError, ApiResult};

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

/// A field path as server-side apply prints it: `.spec.containers[name="web"].image`, list
/// elements named by their merge key where the list has one.
fn apply_path(config: &Value, path: &[Step]) -> String {
    let mut out = String::new();
    let mut at = Some(config);
    let mut field = "";
    for s in path {
        match s {
            Step::Field(f) => {
                out.push('.');
                out.push_str(f);
                at = at.and_then(|v| v.get(f));
                field = f;
            }
            Step::Index(i) => {
                let item = at.and_then(|v| v.get(*i));
                match patch::list_merge_key(field, item)
                    .and_then(|k| item.and_then(|it| it.get(k)).map(|v| (k, v)))
                {
                    Some((k, v)) => out.push_str(&format!("[{k}={v}]")),
                    None => out.push_str(&format!("[{i}]")),
                }
                at = item;
            }
        }
    }
    out
}

/// An apply configuration may name only fields of its kind's schema (whatever the request's
/// `fieldValidation`), as on the real server.
pub fn check_schema(
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    config: &Value,
) -> ApiResult<()> {
    let unknown = crate::validate::unknown_fields_of(rt, config)?;
    if unknown.is_empty() {
        return Ok(());
    }
    let errs: Vec<String> = unknown
        .iter()
        .map(|p| format!("{}: field not declared in schema", apply_path(config, p)))
        .collect();
    let errs = match errs.as_slice() {
        [one] => one.clone(),
        many => format!("errors:\n  {}", many.join("\n  ")),
    };
    let group = rt.group;
    Err(ApiError::bad_request(format!(
        "failed to create typed patch object ({ns}/{name}; {group}/{v}, Kind={kind}): {errs}",
        ns = ns.filter(|_| rt.namespaced).unwrap_or(""),
        v = rt.version,
        kind = rt.kind,
    )))
}

/// The configuration part of an object: what a manager can own.
fn owned_part(obj: &Value) -> Value {
    let mut cfg = obj.clone();
    if let Some(m) = cfg.get_mut("metadata").and_then(Value::as_object_mut) {
        // Identity and bookkeeping are not the configuration's to own.
        for f in [
            "name",
            "namespace",
            "resourceVersion",
            "uid",
            "managedFields",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            m.remove(f);
        }
        if m.is_empty() {
            cfg.as_object_mut().expect("object").remove("metadata");
        }
    }
    if let Some(m) = cfg.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    cfg
}

/// The leaves of a field set: paths of keys to `{}` (a field or a set element) or to `.`
/// (a list element itself).
fn leaves(set: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let Some(m) = set.as_object() else {
        return;
    };
    for (k, v) in m {
        prefix.push(k.clone());
        if k == "." || v.as_object().is_some_and(Map::is_empty) {
            out.push(prefix.clone());
        } else {
            leaves(v, prefix, out);
        }
        prefix.pop();
    }
}

fn has_leaf(set: &Value, path: &[String]) -> bool {
    let mut at = set;
    for k in path {
        match at.get(k) {
            Some(v) => at = v,
            None => return false,
        }
    }
    at.as_object().is_some_and(Map::is_empty) || path.last().is_some_and(|k| k == ".")
}

/// Removes the leaf at `path` and the parents it leaves empty.
fn remove_leaf(set: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(m) = set.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        m.remove(first);
        return;
    }
    if let Some(child) = m.get_mut(first) {
        remove_leaf(child, rest);
        if child.as_object().is_some_and(Map::is_empty) {
            m.remove(first);
        }
    }
}

fn insert_leaf(set: &mut Value, path: &[String]) {
    let mut at = set;
    for k in path {
        if !at.is_object() {
            *at = json!({});
        }
        at = at
            .as_object_mut()
            .expect("object")
            .entry(k.clone())
            .or_insert_with(|| json!({}));
    }
}

/// The value at a field-set path in an object (`f:` fields, `k:` keyed and `v:` set elements).
fn resolve<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut at = v;
    for k in path {
        if k == "." {
            continue;
        }
        at = if let Some(f) = k.strip_prefix("f:") {
            at.get(f)?
        } else if let Some(id) = k.strip_prefix("k:") {
            let Ok(Value::Object(want)) = serde_json::from_str::<Value>(id) else {
                return None;
            };
            at.as_array()?
                .iter()
                .find(|e| want.iter().all(|(wk, wv)| e.get(wk) == Some(wv)))?
        } else if let Some(val) = k.strip_prefix("v:") {
            let val: Value = serde_json::from_str(val).ok()?;
            at.as_array()?.iter().find(|e| **e == val)?
        } else {
            return None;
        };
    }
    Some(at)
}

/// A field-set path as server-side apply prints it: `.spec.containers[name="web"].image`.
fn print_path(path: &[String]) -> String {
    let mut out = String::new();
    for k in path {
        if let Some(f) = k.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(id) = k.strip_prefix("k:") {
            let keys = match serde_json::from_str::<Value>(id) {
                Ok(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                _ => id.to_string(),
            };
            out.push_str(&format!("[{keys}]"));
        } else if let Some(v) = k.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

/// How a manager is named in a conflict: appliers by name, updaters with their API version.
fn print_manager(e: &Value) -> String {
    let name = format!("{:?}", e["manager"].as_str().unwrap_or(""));
    match e["operation"].as_str() {
        Some("Update") => format!("{name} using {}", e["apiVersion"].as_str().unwrap_or("")),
        _ => name,
    }
}

fn conflict_error(conflicts: &[(String, String)]) -> ApiError {
    let message = match conflicts {
        [(m, p)] => format!("Apply failed with 1 conflict: conflict with {m}: {p}"),
        _ => {
            let mut managers: Vec<&String> = conflicts.iter().map(|(m, _)| m).collect();
            managers.sort();
            managers.dedup();
            let mut lines = Vec::new();
            for m in managers {
                lines.push(format!("conflicts with {m}:"));
                for (_, p) in conflicts.iter().filter(|(cm, _)| cm == m) {
                    lines.push(format!("- {p}"));
                }
            }
            format!(
                "Apply failed with {} conflicts: {}",
                conflicts.len(),
                lines.join("\n")
            )
        }
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, p)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with {m}"), "field": p}))
        .collect();
    let mut e = ApiError::new(409, "Conflict", message);
    e.details = Some(json!({ "causes": causes }));
    e
}

fn entries_of(doc: &Value) -> Vec<Value> {
    doc.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn set_entries(doc: &mut Value, mut entries: Vec<Value>) {
    entries.retain(|e| e["fieldsV1"].as_object().is_some_and(|m| !m.is_empty()));
    let meta = crate::defaults::metadata(doc);
    if entries.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(entries));
    }
}

/// Applies `config` for `manager` onto `doc` (the current object, or a new one). A field the
/// configuration sets to a new value while another manager owns it is a conflict, unless
/// `force` moves its ownership to `manager`; the same value is shared ownership.
pub fn apply(
    doc: &mut Value,
    config: &Value,
    manager: &str,
    api_version: &str,
    now: &str,
    force: bool,
) -> ApiResult<()> {
    let cfg = owned_part(config);
    let new_set = field_set(&cfg);
    let mut entries = entries_of(doc);
    let mine = entries
        .iter()
        .position(|e| e["manager"] == manager && e["operation"] == "Apply");
    let mut new_leaves = Vec::new();
    leaves(&new_set, &mut Vec::new(), &mut new_leaves);
    let mut conflicts = Vec::new();
    for leaf in new_leaves
        .iter()
        .filter(|l| l.last().is_some_and(|k| k != "."))
    {
        let (Some(want), Some(have)) = (resolve(&cfg, leaf), resolve(doc, leaf)) else {
            continue;
        };
        if want == have {
            continue;
        }
        for (i, e) in entries.iter_mut().enumerate() {
            if Some(i) == mine || !has_leaf(&e["fieldsV1"], leaf) {
                continue;
            }
            if force {
                remove_leaf(&mut e["fieldsV1"], leaf);
            } else {
                conflicts.push((print_manager(e), print_path(leaf)));
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflict_error(&conflicts));
    }
    if let Some(mut prev) = mine.and_then(|i| {
        entries[i]["fieldsV1"]
            .as_object()
            .cloned()
            .map(Value::Object)
    }) {
        // A field another manager still owns stays when this one lets go of it.
        let mut prev_leaves = Vec::new();
        leaves(&prev, &mut Vec::new(), &mut prev_leaves);
        for leaf in prev_leaves {
            let shared = entries
                .iter()
                .enumerate()
                .any(|(i, e)| Some(i) != mine && has_leaf(&e["fieldsV1"], &leaf));
            if shared && !has_leaf(&new_set, &leaf) {
                remove_leaf(&mut prev, &leaf);
            }
        }
        if let Some(prev) = prev.as_object() {
            remove_dropped(doc, prev, new_set.as_object());
        }
    }
    strategic(doc, &cfg);
    let entry = json!({"manager": manager, "operation": "Apply", "apiVersion": api_version,
        "time": now, "fieldsType": "FieldsV1", "fieldsV1": new_set});
    match mine {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
    set_entries(doc, entries);
    Ok(())
}

/// Records an update (create, PUT, non-apply patch) by `manager`: it owns the fields it set to
/// a new value, which no other manager owns any longer. `old` is the object before (none on
/// create); `new` the object as written, whose managedFields are replaced.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    now: &str,
) {
    // managedFields the request changed itself (as kubectl does when it moves client-side
    // apply ownership to server-side apply) are taken as they are.
    let sent = new.pointer("/metadata/managedFields").cloned();
    let mut entries = match (old, sent) {
        (Some(o), Some(Value::Array(s)))
            if o.pointer("/metadata/managedFields") != Some(&Value::Array(s.clone())) =>
        {
            s
        }
        (None, Some(Value::Array(s))) => s,
        (o, _) => o.map(entries_of).unwrap_or_default(),
    };
    let mut changed = Vec::new();
    leaves(&field_set(&owned_part(new)), &mut Vec::new(), &mut changed);
    changed.retain(|leaf| match old {
        Some(o) => resolve(o, leaf) != resolve(new, leaf),
        None => true,
    });
    let mine = entries
        .iter()
        .position(|e| e["manager"] == manager && e["operation"] == "Update");
    for (i, e) in entries.iter_mut().enumerate() {
        if Some(i) != mine {
            for leaf in &changed {
                remove_leaf(&mut e["fieldsV1"], leaf);
            }
        }
    }
    if !changed.is_empty() || mine.is_some() {
        let mut set = mine
            .map(|i| entries[i]["fieldsV1"].clone())
            .unwrap_or_else(|| json!({}));
        for leaf in &changed {
            insert_leaf(&mut set, leaf);
        }
        let entry = json!({"manager": manager, "operation": "Update", "apiVersion": api_version,
            "time": now, "fieldsType": "FieldsV1", "fieldsV1": set});
        match mine {
            Some(i) => entries[i] = entry,
            None => entries.push(entry),
        }
    }
    set_entries(new, entries);
}

fn strategic(doc: &mut Value, cfg: &Value) {
    // The configuration is an object (checked by the caller), so this cannot fail.
    let _ = patch::apply(patch::PatchType::Strategic, doc, cfg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_name_managers_and_force_moves_ownership() {
        let t = "2026-01-01T00:00:00Z";
        let mut doc = json!({"metadata": {"name": "d"}, "spec": {"replicas": 1}});
        record_update(None, &mut doc, "creator", "apps/v1", t);
        let cfg = |n: i64| json!({"metadata": {"name": "d"}, "spec": {"replicas": n}});
        apply(&mut doc, &cfg(1), "a", "apps/v1", t, false).unwrap();
        let e = apply(&mut doc, &cfg(2), "b", "apps/v1", t, false).unwrap_err();
        assert_eq!(e.code, 409);
        assert_eq!(
            e.message,
            "Apply failed with 2 conflicts: conflicts with \"a\":\n- .spec.replicas\nconflicts with \"creator\" using apps/v1:\n- .spec.replicas"
        );
        assert_eq!(e.details.unwrap()["causes"][0]["field"], ".spec.replicas");
        assert_eq!(doc["spec"]["replicas"], 1, "a conflict changes nothing");
        apply(&mut doc, &cfg(2), "b", "apps/v1", t, true).unwrap();
        assert_eq!(doc["spec"]["replicas"], 2);
        let owners: Vec<&str> = doc["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(owners, ["b"], "the others owned nothing else");
        // An update of the field takes it from the applier.
        let old = doc.clone();
        doc["spec"]["replicas"] = json!(7);
        record_update(Some(&old), &mut doc, "scaler", "apps/v1", t);
        let e = apply(&mut doc, &cfg(3), "b", "apps/v1", t, false).unwrap_err();
        assert_eq!(
            e.message,
            "Apply failed with 1 conflict: conflict with \"scaler\" using apps/v1: .spec.replicas"
        );
        // A field two appliers share stays when one of them leaves it out.
        let mut doc = json!({"metadata": {"name": "d"}});
        let lab = json!({"metadata": {"labels": {"x": "1"}}});
        apply(&mut doc, &lab, "a", "v1", t, false).unwrap();
        apply(&mut doc, &lab, "b", "v1", t, false).unwrap();
        apply(&mut doc, &json!({"metadata": {}}), "a", "v1", t, false).unwrap();
        assert_eq!(doc["metadata"]["labels"]["x"], "1");
        apply(&mut doc, &json!({"metadata": {}}), "b", "v1", t, false).unwrap();
        assert!(doc["metadata"]["labels"].get("x").is_none());
    }

    #[test]
    fn undeclared_fields_are_named_by_merge_key() {
        let rt = crate::resources::get("apps", "deployments");
        let cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicsa": 2, "template": {"spec": {"containers": [{"name": "web", "image": "x", "imagee": "y"}]}}}});
        let e = check_schema(rt, Some("ns"), "d", &cfg).unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(
            e.message,
            "failed to create typed patch object (ns/d; apps/v1, Kind=Deployment): errors:\n  .spec.replicsa: field not declared in schema\n  .spec.template.spec.containers[name=\"web\"].imagee: field not declared in schema"
        );
        let ok = json!({"metadata": {"name": "d"}, "spec": {"replicas": 2}});
        assert!(check_schema(rt, Some("ns"), "d", &ok).is_ok());
    }

    #[test]
    fn fields_left_out_of_a_new_apply_are_removed() {
        let mut doc = json!({"metadata": {"name": "d", "labels": {"other": "kept"}}});
        let v1 = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"a": "1", "b": "2"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "web", "image": "nginx", "env": [{"name": "X", "value": "1"}]},
                {"name": "side", "image": "busybox"}]}}}});
        apply(
            &mut doc,
            &v1,
            "mgr",
            "apps/v1",
            "2026-01-01T00:00:00Z",
            false,
        )
        .unwrap();
        let set = &doc["metadata"]["managedFields"][0]["fieldsV1"];
        assert!(set["f:spec"]["f:template"]["f:spec"]["f:containers"][r#"k:{"name":"web"}"#]["f:env"][r#"k:{"name":"X"}"#].is_object());
        let v2 = json!({"metadata": {"name": "d", "labels": {"a": "1"}},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:2"}]}}}});
        apply(
            &mut doc,
            &v2,
            "mgr",
            "apps/v1",
            "2026-01-01T00:00:01Z",
            false,
        )
        .unwrap();
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
            false,
        )
        .unwrap();
        assert_eq!(doc["metadata"]["labels"]["a"], "1");
        assert_eq!(
            doc["metadata"]["managedFields"].as_array().unwrap().len(),
            2
        );
    }
}
