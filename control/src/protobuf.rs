//! Decoding of the Kubernetes protobuf envelope (`k8s\0` + runtime.Unknown) for the kinds that
//! kubectl 1.32+ sends as protobuf: Secret and ConfigMap (`kubectl create secret|configmap`).
//! Field numbers are those of k8s.io/api's generated.proto.

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::status::{ApiError, ApiResult};

const MAGIC: &[u8] = b"k8s\0";

struct Reader<'a> {
    b: &'a [u8],
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
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
                self.b = self.b.get(8..)?;
                Field::Fixed
            }
            5 => {
                self.b = self.b.get(4..)?;
                Field::Fixed
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

/// A map entry message: key = 1, value = 2 (both length-delimited).
fn entry(b: &[u8]) -> Option<(String, Vec<u8>)> {
    let (mut k, mut v) = (String::new(), Vec::new());
    fields(b, |n, f| {
        match (n, f) {
            (1, Field::Bytes(x)) => k = text(x)?,
            (2, Field::Bytes(x)) => v = x.to_vec(),
            _ => {}
        }
        Some(())
    })?;
    Some((k, v))
}

fn object_meta(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    let mut finalizers = Vec::new();
    fields(b, |n, f| {
        if let Field::Bytes(x) = f {
            match n {
                1 => drop(m.insert("name".into(), json!(text(x)?))),
                2 => drop(m.insert("generateName".into(), json!(text(x)?))),
                3 => drop(m.insert("namespace".into(), json!(text(x)?))),
                11 => {
                    let (k, v) = entry(x)?;
                    labels.insert(k, json!(text(&v)?));
                }
                12 => {
                    let (k, v) = entry(x)?;
                    annotations.insert(k, json!(text(&v)?));
                }
                14 => finalizers.push(json!(text(x)?)),
                _ => {}
            }
        }
        Some(())
    })?;
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), Value::Object(annotations));
    }
    if !finalizers.is_empty() {
        m.insert("finalizers".into(), Value::Array(finalizers));
    }
    Some(Value::Object(m))
}

fn b64(v: &[u8]) -> Value {
    json!(base64::engine::general_purpose::STANDARD.encode(v))
}

fn secret(b: &[u8]) -> Option<Value> {
    let mut o = json!({"apiVersion": "v1", "kind": "Secret"});
    let (mut data, mut string_data) = (Map::new(), Map::new());
    fields(b, |n, f| {
        match (n, f) {
            (1, Field::Bytes(x)) => o["metadata"] = object_meta(x)?,
            (2, Field::Bytes(x)) => {
                let (k, v) = entry(x)?;
                data.insert(k, b64(&v));
            }
            (3, Field::Bytes(x)) => o["type"] = json!(text(x)?),
            (4, Field::Bytes(x)) => {
                let (k, v) = entry(x)?;
                string_data.insert(k, json!(text(&v)?));
            }
            (5, Field::Varint(v)) => o["immutable"] = json!(v != 0),
            _ => {}
        }
        Some(())
    })?;
    if !data.is_empty() {
        o["data"] = Value::Object(data);
    }
    if !string_data.is_empty() {
        o["stringData"] = Value::Object(string_data);
    }
    Some(o)
}

fn config_map(b: &[u8]) -> Option<Value> {
    let mut o = json!({"apiVersion": "v1", "kind": "ConfigMap"});
    let (mut data, mut binary) = (Map::new(), Map::new());
    fields(b, |n, f| {
        match (n, f) {
            (1, Field::Bytes(x)) => o["metadata"] = object_meta(x)?,
            (2, Field::Bytes(x)) => {
                let (k, v) = entry(x)?;
                data.insert(k, json!(text(&v)?));
            }
            (3, Field::Bytes(x)) => {
                let (k, v) = entry(x)?;
                binary.insert(k, b64(&v));
            }
            (4, Field::Varint(v)) => o["immutable"] = json!(v != 0),
            _ => {}
        }
        Some(())
    })?;
    if !data.is_empty() {
        o["data"] = Value::Object(data);
    }
    if !binary.is_empty() {
        o["binaryData"] = Value::Object(binary);
    }
    Some(o)
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
    let obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Secret") => secret(raw),
        ("v1", "ConfigMap") => config_map(raw),
        _ => None,
    };
    obj.ok_or_else(bad)
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
        assert_eq!(v["type"], "");
        assert!(decode_object(b"k8s\0\xff").is_err());
        assert!(decode_object(b"{}").is_err());
    }
}
