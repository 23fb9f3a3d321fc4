//! `kubectl auth whoami` (SelfSubjectReview) and `kubectl auth can-i` (SelfSubjectAccessReview).
//! Access reviews are answered by the same authorizer as requests (`crate::authz`): nodes get
//! honest answers, everyone else is allowed everything (there is no RBAC yet).

use serde_json::{json, Value};

use crate::authz::{self, Attributes, Decision, Subject};
use crate::certs::Identity;
use crate::registry::Registry;

pub fn self_subject_review(id: &Identity, api_version: &str) -> Value {
    let mut groups = id.groups.clone();
    if !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".into());
    }
    json!({"kind": "SelfSubjectReview", "apiVersion": api_version, "metadata": {},
        "status": {"userInfo": {"username": id.user, "groups": groups}}})
}

/// Answers `spec.resourceAttributes` or `spec.nonResourceAttributes` of a review for `id`.
pub fn self_subject_access_review(reg: &Registry, id: &Identity, body: &Value) -> Value {
    let spec = &body["spec"];
    let decision = if let Some(ra) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        authz::authorize(reg, id, &Attributes::of_review(ra))
    } else {
        // The paths served outside resources (discovery, OpenAPI, health, version) are open to
        // every authenticated user, for reading.
        let verb = spec
            .pointer("/nonResourceAttributes/verb")
            .and_then(Value::as_str)
            .unwrap_or("");
        match (Subject::of(id), verb) {
            (Subject::Unrestricted, _) | (Subject::Node(_), "get" | "head") => Decision::Allow,
            _ => Decision::deny(""),
        }
    };
    let mut status = json!({"allowed": decision.allowed()});
    let reason = match (&decision, Subject::of(id)) {
        (Decision::Allow, Subject::Unrestricted) => {
            "oxlet has no RBAC: every authenticated user but nodes may do everything"
        }
        (d, _) => d.reason(),
    };
    if !reason.is_empty() {
        status["reason"] = json!(reason);
    }
    let mut out = body.clone();
    out["kind"] = json!("SelfSubjectAccessReview");
    out["apiVersion"] = json!("authorization.k8s.io/v1");
    out["status"] = status;
    out
}
