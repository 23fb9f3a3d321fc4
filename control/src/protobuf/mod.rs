//! Decoding of Kubernetes protobuf request bodies (`k8s\0` + runtime.Unknown), which kubectl
//! 1.32+ sends for `kubectl create ...`. The message layouts come from k8s.io/api's
//! generated.proto files (`schema.txt`, written by `control/tools/proto_schema.py`); a field
//! the table does not know is skipped.

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::status::{ApiError, ApiResult};

pub mod encode;

pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
pub const WATCH_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf;stream=watch";

/// Whether the client prefers protobuf: the first Accept entry the server can answer is
/// `application/vnd.kubernetes.protobuf` (Tables are JSON only).
pub fn wants_protobuf(accept: &[crate::http::MediaType]) -> bool {
    for m in accept {
        if m.param("as").is_some() {
            continue;
        }
        match m.essence.as_str() {
            CONTENT_TYPE => return true,
            "application/json" | "application/yaml" | "*/*" | "application/*" => return false,
            _ => {}
        }
    }
    false
}

const MAGIC: &[u8] = b"k8s\0";

struct Reader<'a> {
    b: &'a [u8],
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed64(u64),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.b.split_first()?;
            self.b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn next(&mut self) -> Option<Option<(u64, Field<'a>)>> {
        if self.b.is_empty() {
            return Some(None);
        }
        let tag = self.varint()?;
        let field = match tag & 7 {
            0 => Field::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                if len > self.b.len() {
                    return None;
                }
                let (data, rest) = self.b.split_at(len);
                self.b = rest;
                Field::Bytes(data)
            }
            1 => {
                let v = u64::from_le_bytes(self.b.get(..8)?.try_into().ok()?);
                self.b = &self.b[8..];
                Field::Fixed64(v)
            }
            5 => {
                let v = u32::from_le_bytes(self.b.get(..4)?.try_into().ok()?);
                self.b = &self.b[4..];
                Field::Fixed32(v)
            }
            _ => return None,
        };
        Some(Some((tag >> 3, field)))
    }
}

/// Iterates the fields of one message; `None` from `f` aborts with a decode error.
fn fields<'a>(b: &'a [u8], mut f: impl FnMut(u64, Field<'a>) -> Option<()>) -> Option<()> {
    let mut r = Reader { b };
    while let Some((n, v)) = r.next()? {
        f(n, v)?;
    }
    Some(())
}

fn text(b: &[u8]) -> Option<String> {
    String::from_utf8(b.to_vec()).ok()
}

fn b64(v: &[u8]) -> Value {
    json!(base64::engine::general_purpose::STANDARD.encode(v))
}

/// One field of a message layout.
struct FieldDef {
    json: String,
    label: Label,
    /// A scalar type name or a message name; for maps, the value type.
    ty: String,
}

#[derive(PartialEq)]
enum Label {
    Optional,
    Repeated,
    Map,
}

type Schema = HashMap<String, HashMap<u64, FieldDef>>;

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut s: Schema = HashMap::new();
        for line in include_str!("schema.txt").lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            let [msg, json, num, label, ty] = parts.as_slice() else {
                continue;
            };
            let (label, ty) = match *label {
                "repeated" => (Label::Repeated, ty.to_string()),
                "map" => (
                    Label::Map,
                    ty.split_once(',').map_or("string", |(_, v)| v).to_string(),
                ),
                _ => (Label::Optional, ty.to_string()),
            };
            let Ok(num) = num.parse() else { continue };
            s.entry(msg.to_string()).or_default().insert(
                num,
                FieldDef {
                    json: json.to_string(),
                    label,
                    ty,
                },
            );
        }
        s
    })
}

const META: &str = "k8s.io.apimachinery.pkg.apis.meta.v1.";

fn timestamp(b: &[u8], micros: bool) -> Option<Value> {
    let (mut secs, mut nanos) = (0i64, 0i64);
    fields(b, |n, f| {
        match (n, f) {
            (1, Field::Varint(v)) => secs = v as i64,
            (2, Field::Varint(v)) => nanos = v as i64,
            _ => {}
        }
        Some(())
    })?;
    if secs == 0 && nanos == 0 {
        return Some(Value::Null);
    }
    let t = chrono::DateTime::from_timestamp(secs, nanos as u32)?;
    let fmt = if micros {
        chrono::SecondsFormat::Micros
    } else {
        chrono::SecondsFormat::Secs
    };
    Some(json!(t.to_rfc3339_opts(fmt, true)))
}

/// The JSON value of one field value of type `ty`.
fn value(ty: &str, f: Field) -> Option<Value> {
    Some(match (ty, f) {
        ("string", Field::Bytes(b)) => json!(text(b)?),
        ("bytes", Field::Bytes(b)) => b64(b),
        ("bool", Field::Varint(v)) => json!(v != 0),
        ("int32", Field::Varint(v)) => json!(v as i64 as i32),
        ("int64", Field::Varint(v)) => json!(v as i64),
        ("uint32" | "uint64", Field::Varint(v)) => json!(v),
        ("double", Field::Fixed64(v)) => json!(f64::from_bits(v)),
        ("float", Field::Fixed32(v)) => json!(f32::from_bits(v)),
        ("k8s.io.apimachinery.pkg.util.intstr.IntOrString", Field::Bytes(b)) => {
            let m = message(ty, b)?;
            if m.get("type").and_then(Value::as_i64) == Some(1) {
                m.get("strVal").cloned().unwrap_or(json!(""))
            } else {
                m.get("intVal").cloned().unwrap_or(json!(0))
            }
        }
        ("k8s.io.apimachinery.pkg.api.resource.Quantity", Field::Bytes(b)) => {
            message(ty, b)?.get("string").cloned().unwrap_or(json!("0"))
        }
        ("k8s.io.apimachinery.pkg.runtime.RawExtension", Field::Bytes(b)) => {
            let raw = message(ty, b)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(raw.get("raw").and_then(Value::as_str).unwrap_or(""))
                .ok()?;
            serde_json::from_slice(&bytes).ok()?
        }
        (t, Field::Bytes(b)) if t == format!("{META}Time") => timestamp(b, false)?,
        (t, Field::Bytes(b)) if t == format!("{META}MicroTime") => timestamp(b, true)?,
        (t, Field::Bytes(b)) if schema().contains_key(t) => Value::Object(message(t, b)?),
        _ => return None,
    })
}

/// Fields that are pointers in the Go types, where a zero value was set on purpose.
const ZERO_IS_SET: &[&str] = &[
    "replicas",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "revisionHistoryLimit",
    "progressDeadlineSeconds",
    "expirationSeconds",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "immutable",
    "optional",
    "privileged",
    "readOnlyRootFilesystem",
    "runAsNonRoot",
    "allowPrivilegeEscalation",
    "runAsUser",
    "runAsGroup",
    "fsGroup",
    "defaultMode",
    "mode",
    "priority",
    "ready",
    "serving",
    "terminating",
    "leaseDurationSeconds",
    "leaseTransitions",
    "timeoutSeconds",
    "shareProcessNamespace",
    "hostUsers",
    "setHostnameAsFQDN",
    "allocateLoadBalancerNodePorts",
    "publishNotReadyAddresses",
];

/// Go's protobuf encoding writes every non-pointer field, zero or not, where JSON omits
/// zeros: such zeros (and zero timestamps) are taken as unset.
fn is_unset(json_name: &str, v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Bool(false) => !ZERO_IS_SET.contains(&json_name),
        Value::Number(n) => n.as_f64() == Some(0.0) && !ZERO_IS_SET.contains(&json_name),
        _ => false,
    }
}

/// Decodes message `name` into a JSON object.
fn message(name: &str, b: &[u8]) -> Option<Map<String, Value>> {
    let defs = schema().get(name)?;
    let mut out = Map::new();
    fields(b, |n, f| {
        let Some(def) = defs.get(&n) else {
            return Some(());
        };
        match def.label {
            Label::Optional => {
                let v = value(&def.ty, f)?;
                if !is_unset(&def.json, &v) {
                    out.insert(def.json.clone(), v);
                }
            }
            Label::Repeated => {
                let list = out.entry(def.json.clone()).or_insert_with(|| json!([]));
                let list = list.as_array_mut()?;
                match f {
                    // Packed numbers: several varints in one length-delimited field.
                    Field::Bytes(b) if matches!(def.ty.as_str(), "int32" | "int64" | "bool") => {
                        let mut r = Reader { b };
                        while !r.b.is_empty() {
                            list.push(value(&def.ty, Field::Varint(r.varint()?))?);
                        }
                    }
                    f => list.push(value(&def.ty, f)?),
                }
            }
            Label::Map => {
                let Field::Bytes(e) = f else { return None };
                let (mut k, mut v) = (String::new(), None);
                fields(e, |n, f| {
                    match (n, f) {
                        (1, Field::Bytes(x)) => k = text(x)?,
                        (2, f) => v = Some(value(&def.ty, f)?),
                        _ => {}
                    }
                    Some(())
                })?;
                let m = out.entry(def.json.clone()).or_insert_with(|| json!({}));
                m.as_object_mut()?.insert(k, v.unwrap_or(Value::Null));
            }
        }
        Some(())
    })?;
    Some(out)
}

/// The proto package of an API group version: `apps/v1` -> `k8s.io.api.apps.v1`.
fn package(api_version: &str) -> String {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let short = match group {
        "" => "core",
        g => g.split('.').next().unwrap_or(g),
    };
    format!("k8s.io.api.{short}.{version}")
}

/// Decodes a protobuf request body into the JSON form of the object.
pub fn decode_object(body: &[u8]) -> ApiResult<Value> {
    let bad = || ApiError::unsupported_media("application/vnd.kubernetes.protobuf");
    let inner = body.strip_prefix(MAGIC).ok_or_else(bad)?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    fields(inner, |n, f| {
        match (n, f) {
            (1, Field::Bytes(tm)) => fields(tm, |n, f| {
                match (n, f) {
                    (1, Field::Bytes(x)) => api_version = text(x)?,
                    (2, Field::Bytes(x)) => kind = text(x)?,
                    _ => {}
                }
                Some(())
            })?,
            (2, Field::Bytes(x)) => raw = x,
            _ => {}
        }
        Some(())
    })
    .ok_or_else(bad)?;
    let mut obj = message(&format!("{}.{kind}", package(&api_version)), raw).ok_or_else(bad)?;
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(n: u64, b: &[u8]) -> Vec<u8> {
        let mut out = vec![(n << 3 | 2) as u8, b.len() as u8];
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn decodes_a_secret_envelope() {
        let meta = [
            ld(1, b"s1"),
            ld(3, b"ns1"),
            ld(11, &[ld(1, b"app"), ld(2, b"web")].concat()),
        ]
        .concat();
        let secret = [
            ld(1, &meta),
            ld(2, &[ld(1, b"k"), ld(2, b"\x00\xff")].concat()),
            ld(3, b""),
        ]
        .concat();
        let unknown = [
            ld(1, &[ld(1, b"v1"), ld(2, b"Secret")].concat()),
            ld(2, &secret),
        ]
        .concat();
        let body = [MAGIC, &unknown].concat();
        let v = decode_object(&body).unwrap();
        assert_eq!(v["metadata"]["name"], "s1");
        assert_eq!(v["metadata"]["namespace"], "ns1");
        assert_eq!(v["metadata"]["labels"]["app"], "web");
        assert_eq!(v["data"]["k"], "AP8=");
        assert!(v.get("type").is_none(), "an empty string is unset");
        assert!(decode_object(b"k8s\0\xff").is_err());
        assert!(decode_object(b"{}").is_err());
    }
}
