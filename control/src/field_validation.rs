//! Server-side field validation (`fieldValidation=Strict|Warn|Ignore`): unknown and duplicate
//! fields in a request are an error, `Warning` headers, or silently dropped, as on
//! kube-apiserver. `Warn` is the default when a client names none.

use std::collections::{HashMap, HashSet};
use std::fmt;

use hyper::header::HeaderValue;
use hyper::Response;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::http::Body;
use crate::resources::ResourceType;
use crate::status::{ApiError, ApiResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Strict,
    Warn,
    Ignore,
}

impl Directive {
    pub fn from_query(q: &HashMap<String, String>) -> ApiResult<Directive> {
        match q.get("fieldValidation").map(String::as_str) {
            None | Some("") | Some("Warn") => Ok(Directive::Warn),
            Some("Strict") => Ok(Directive::Strict),
            Some("Ignore") => Ok(Directive::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: \"{other}\": supported values: \"Ignore\", \"Strict\", \"Warn\""
            ))),
        }
    }
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Field(String),
    Index(usize),
}

/// A path as the JSON decoder prints it: `spec.containers[0].image`.
pub fn dotted(path: &[Step]) -> String {
    let mut out = String::new();
    for s in path {
        match s {
            Step::Field(f) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(f);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Paths of the fields that appear twice in one JSON object of `body`, in document order.
/// Bodies that are not JSON have none (their decoder reports them, or cannot carry them).
pub fn duplicate_fields(body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = Walk {
        path: Vec::new(),
        out: &mut out,
    }
    .deserialize(&mut de);
    out
}

struct Walk<'a> {
    path: Vec<Step>,
    out: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            let mut path = self.path.clone();
            path.push(Step::Field(k.clone()));
            if !seen.insert(k) {
                self.out.push(dotted(&path));
            }
            map.next_value_seed(Walk {
                path,
                out: &mut *self.out,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let mut path = self.path.clone();
            path.push(Step::Index(i));
            let seed = Walk {
                path,
                out: &mut *self.out,
            };
            if seq.next_element_seed(seed)?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// What the checks found in one request: `unknown field "x"`, `duplicate field "y"`.
#[derive(Debug, Default)]
pub struct Findings(pub Vec<String>);

impl Findings {
    /// Unknown fields of `obj` (which must decode as `rt`'s kind) and duplicate fields of the
    /// raw `body`.
    pub fn of(rt: &ResourceType, obj: &Value, body: &[u8]) -> ApiResult<Findings> {
        let mut f: Vec<String> = crate::validate::unknown_fields_of(rt, obj)?
            .iter()
            .map(|p| format!("unknown field \"{}\"", dotted(p)))
            .collect();
        f.extend(
            duplicate_fields(body)
                .into_iter()
                .map(|p| format!("duplicate field \"{p}\"")),
        );
        Ok(Findings(f))
    }

    /// Applies `directive`: with `Strict` any finding is a 400 with the decoder's message
    /// (after `prefix`, e.g. `Deployment in version "v1" cannot be handled as a Deployment: `);
    /// with `Warn` they are the warnings to send; with `Ignore` nothing.
    pub fn enforce(self, directive: Directive, prefix: &str) -> ApiResult<Vec<String>> {
        match directive {
            Directive::Ignore => Ok(Vec::new()),
            Directive::Warn => Ok(self.0),
            Directive::Strict if self.0.is_empty() => Ok(Vec::new()),
            Directive::Strict => Err(ApiError::bad_request(format!(
                "{prefix}strict decoding error: {}",
                self.0.join(", ")
            ))),
        }
    }
}

/// The decode error prefix of a create or update: `Pod in version "v1" cannot be handled as a Pod: `.
pub fn decode_prefix(rt: &ResourceType) -> String {
    format!(
        "{kind} in version \"{v}\" cannot be handled as a {kind}: ",
        kind = rt.kind,
        v = rt.version
    )
}

/// A `Warning` header value (RFC 7234, code 299 as kube-apiserver sends).
fn warning_header(text: &str) -> Option<HeaderValue> {
    let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
    HeaderValue::from_str(&format!("299 - \"{escaped}\"")).ok()
}

/// Adds `warnings` to a response as `Warning` headers.
pub fn with_warnings(mut resp: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        if let Some(v) = warning_header(w) {
            resp.headers_mut().append(hyper::header::WARNING, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_found_with_their_paths() {
        let body = br#"{"spec":{"replicas":1,"replicas":2,"template":{"spec":{"containers":[{"name":"a","image":"x","name":"b"}]}}},"kind":"Deployment"}"#;
        assert_eq!(
            duplicate_fields(body),
            vec![
                "spec.replicas".to_string(),
                "spec.template.spec.containers[0].name".to_string()
            ]
        );
        assert!(duplicate_fields(br#"{"a":[1,{"b":2}],"c":"d"}"#).is_empty());
        assert!(duplicate_fields(b"not json").is_empty());
    }

    #[test]
    fn directives_decide_between_error_warning_and_nothing() {
        let f = || Findings(vec!["unknown field \"spec.replicsa\"".into()]);
        let e = f().enforce(Directive::Strict, "P: ").unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(
            e.message,
            "P: strict decoding error: unknown field \"spec.replicsa\""
        );
        assert_eq!(f().enforce(Directive::Warn, "").unwrap().len(), 1);
        assert!(f().enforce(Directive::Ignore, "").unwrap().is_empty());
        assert_eq!(
            warning_header("unknown field \"a\"").unwrap(),
            r#"299 - "unknown field \"a\"""#
        );
        let q = HashMap::from([("fieldValidation".to_string(), "Bogus".to_string())]);
        assert!(Directive::from_query(&q).is_err());
        assert_eq!(
            Directive::from_query(&HashMap::new()).unwrap(),
            Directive::Warn
        );
    }
}
