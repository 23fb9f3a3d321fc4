//! `kubectl auth whoami` (SelfSubjectReview) and `kubectl auth can-i` (SelfSubjectAccessReview).
//! There is no authorization yet: every authenticated user may do everything, and the access
//! review says so.

use serde_json::{json, Value};

use crate::certs::Identity;

pub fn self_subject_review(id: &Identity, api_version: &str) -> Value {
    let mut groups = id.groups.clone();
    if !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".into());
    }
    json!({"kind": "SelfSubjectReview", "apiVersion": api_version, "metadata": {},
        "status": {"userInfo": {"username": id.user, "groups": groups}}})
}

pub fn self_subject_access_review(body: &Value) -> Value {
    let mut out = body.clone();
    out["kind"] = json!("SelfSubjectAccessReview");
    out["apiVersion"] = json!("authorization.k8s.io/v1");
    out["status"] = json!({"allowed": true,
        "reason": "oxlet has no authorization: every authenticated user may do everything"});
    out
}
