//! Encoding of responses as Kubernetes protobuf (`k8s\0` + runtime.Unknown around the
//! object's message), with the message layouts of the same table the decoder uses, and watch
//! events as length-prefixed `WatchEvent` frames.

use base64::Engine;
use serde_json::{Map, Value};

use super::{package, schema, Label, MAGIC, META};

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, n: u64, wire: u64) {
    varint(out, n << 3 | wire);
}

fn bytes_field(out: &mut Vec<u8>, n: u64, b: &[u8]) {
    tag(out, n, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn int_field(out: &mut Vec<u8>, n: u64, v: i64) {
    tag(out, n, 0);
    varint(out, v as u64);
}

/// `seconds`/`nanos` of an RFC 3339 time.
fn timestamp(v: &Value) -> Option<Vec<u8>> {
    let t = chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok()?;
    let mut out = Vec::new();
    int_field(&mut out, 1, t.timestamp());
    let nanos = t.timestamp_subsec_nanos();
    if nanos != 0 {
        int_field(&mut out, 2, i64::from(nanos));
    }
    Some(out)
}

fn as_i64(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_u64().map(|u| u as i64))
        .or_else(|| v.as_f64().map(|f| f as i64))
}

/// Encodes value `v` of type `ty` as field `n`; values that do not fit the type are left out,
/// as the typed structs would not hold them either.
fn field(out: &mut Vec<u8>, n: u64, ty: &str, v: &Value) {
    match ty {
        "string" => {
            if let Some(s) = v.as_str() {
                bytes_field(out, n, s.as_bytes());
            }
        }
        "bytes" => {
            if let Some(b) = v
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            {
                bytes_field(out, n, &b);
            }
        }
        "bool" => {
            if let Some(b) = v.as_bool() {
                int_field(out, n, i64::from(b));
            }
        }
        "int32" | "int64" | "uint32" | "uint64" => {
            if let Some(i) = as_i64(v) {
                int_field(out, n, i);
            }
        }
        "double" => {
            if let Some(f) = v.as_f64() {
                tag(out, n, 1);
                out.extend_from_slice(&f.to_bits().to_le_bytes());
            }
        }
        "float" => {
            if let Some(f) = v.as_f64() {
                tag(out, n, 5);
                out.extend_from_slice(&(f as f32).to_bits().to_le_bytes());
            }
        }
        "k8s.io.apimachinery.pkg.util.intstr.IntOrString" => {
            let mut m = Vec::new();
            match v {
                Value::String(s) => {
                    int_field(&mut m, 1, 1);
                    bytes_field(&mut m, 3, s.as_bytes());
                }
                _ => {
                    int_field(&mut m, 1, 0);
                    int_field(&mut m, 2, as_i64(v).unwrap_or(0));
                }
            }
            bytes_field(out, n, &m);
        }
        "k8s.io.apimachinery.pkg.api.resource.Quantity" => {
            let s = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let mut m = Vec::new();
            bytes_field(&mut m, 1, s.as_bytes());
            bytes_field(out, n, &m);
        }
        "k8s.io.apimachinery.pkg.runtime.RawExtension" => {
            let mut m = Vec::new();
            bytes_field(&mut m, 1, &serde_json::to_vec(v).unwrap_or_default());
            bytes_field(out, n, &m);
        }
        t if t == format!("{META}FieldsV1") => {
            let mut m = Vec::new();
            bytes_field(&mut m, 1, &serde_json::to_vec(v).unwrap_or_default());
            bytes_field(out, n, &m);
        }
        t if t == format!("{META}Time") || t == format!("{META}MicroTime") => {
            if let Some(m) = timestamp(v) {
                bytes_field(out, n, &m);
            }
        }
        t => {
            if let Value::Object(o) = v {
                bytes_field(out, n, &message(t, o));
            }
        }
    }
}

/// Encodes the JSON object `obj` as message `name`, fields in number order.
pub(super) fn message(name: &str, obj: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(defs) = schema().get(name) else {
        return out;
    };
    let mut nums: Vec<&u64> = defs.keys().collect();
    nums.sort();
    for n in nums {
        let def = &defs[n];
        let Some(v) = obj.get(&def.json).filter(|v| !v.is_null()) else {
            continue;
        };
        match def.label {
            Label::Optional => field(&mut out, *n, &def.ty, v),
            Label::Repeated => {
                for item in v.as_array().into_iter().flatten() {
                    field(&mut out, *n, &def.ty, item);
                }
            }
            Label::Map => {
                let mut keys: Vec<(&String, &Value)> =
                    v.as_object().into_iter().flatten().collect();
                keys.sort_by(|a, b| a.0.cmp(b.0));
                for (k, item) in keys {
                    let mut e = Vec::new();
                    bytes_field(&mut e, 1, k.as_bytes());
                    field(&mut e, 2, &def.ty, item);
                    bytes_field(&mut out, *n, &e);
                }
            }
        }
    }
    out
}

/// Whether `kind` of `api_version` has a protobuf message (lists as `<Kind>List`).
pub fn has_message(api_version: &str, kind: &str) -> bool {
    schema().contains_key(&format!("{}.{kind}", package(api_version)))
}

/// An object (or list) as the body of a protobuf response: magic, then runtime.Unknown with
/// its type and the message.
pub fn encode_object(obj: &Value) -> Option<Vec<u8>> {
    let api_version = obj.get("apiVersion")?.as_str()?;
    let kind = obj.get("kind")?.as_str()?;
    let name = if kind == "Status" {
        format!("{META}Status")
    } else {
        format!("{}.{kind}", package(api_version))
    };
    schema().get(&name)?;
    let raw = message(&name, obj.as_object()?);
    let mut type_meta = Vec::new();
    bytes_field(&mut type_meta, 1, api_version.as_bytes());
    bytes_field(&mut type_meta, 2, kind.as_bytes());
    let mut out = MAGIC.to_vec();
    bytes_field(&mut out, 1, &type_meta);
    bytes_field(&mut out, 2, &raw);
    // contentEncoding and contentType, empty as the real server writes them.
    bytes_field(&mut out, 3, b"");
    bytes_field(&mut out, 4, b"");
    Some(out)
}

/// A protobuf response of `obj`, when its kind has a message.
pub fn response(code: u16, obj: &Value) -> Option<hyper::Response<crate::http::Body>> {
    let body = encode_object(obj)?;
    Some(
        hyper::Response::builder()
            .status(code)
            .header(hyper::header::CONTENT_TYPE, super::CONTENT_TYPE)
            .header(hyper::header::CACHE_CONTROL, "no-cache, private")
            .body(crate::http::full(body))
            .expect("valid response"),
    )
}

/// One watch event as a protobuf stream frame: a 4-byte big-endian length, then a
/// `WatchEvent` whose object is the encoded object.
pub fn watch_frame(event_type: &str, obj: &Value) -> Option<Vec<u8>> {
    let inner = encode_object(obj)?;
    let mut raw_ext = Vec::new();
    bytes_field(&mut raw_ext, 1, &inner);
    let mut ev = Vec::new();
    bytes_field(&mut ev, 1, event_type.as_bytes());
    bytes_field(&mut ev, 2, &raw_ext);
    let mut out = (ev.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&ev);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_round_trip_through_the_decoder() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "n", "labels": {"a": "b"},
                "creationTimestamp": "2026-01-02T03:04:05Z", "resourceVersion": "7",
                "managedFields": [{"manager": "m", "operation": "Apply", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {}}}]},
            "spec": {"containers": [{"name": "c", "image": "busybox", "ports": [{"containerPort": 80}],
                "resources": {"limits": {"cpu": "100m"}}}],
                "terminationGracePeriodSeconds": 30},
            "status": {"phase": "Running"}});
        let b = encode_object(&pod).unwrap();
        let back = super::super::decode_object(&b).unwrap();
        assert_eq!(back["metadata"]["name"], "p");
        assert_eq!(back["metadata"]["labels"]["a"], "b");
        assert_eq!(
            back["metadata"]["creationTimestamp"],
            "2026-01-02T03:04:05Z"
        );
        assert_eq!(
            back["spec"]["containers"][0]["ports"][0]["containerPort"],
            80
        );
        assert_eq!(
            back["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "100m"
        );
        assert_eq!(back["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(back["status"]["phase"], "Running");
        assert!(has_message("apps/v1", "DeploymentList"));
        let frame = watch_frame("ADDED", &pod).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
    }
}
