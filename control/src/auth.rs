//! The review APIs: `kubectl auth whoami` (SelfSubjectReview), `kubectl auth can-i`
//! (SelfSubjectAccessReview), `kubectl auth can-i --list` (SelfSubjectRulesReview), and
//! SubjectAccessReview, which components use to ask about someone else. Access reviews are
//! answered by the same authorizers as requests (`crate::authz`: Node, then RBAC).

use serde_json::{json, Value};

use crate::authz::{self, Attributes, NonResource, Rbac, Subject};
use crate::certs::Identity;
use crate::registry::Registry;

pub fn self_subject_review(id: &Identity, api_version: &str) -> Value {
    json!({"kind": "SelfSubjectReview", "apiVersion": api_version, "metadata": {},
        "status": {"userInfo": {"username": id.user, "groups": authz::groups_of(id)}}})
}

fn access_review(reg: &Registry, rbac: &Rbac, id: &Identity, body: &Value, kind: &str) -> Value {
    let spec = &body["spec"];
    let decision = if let Some(ra) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        authz::authorize(reg, rbac, id, &Attributes::of_review(ra))
    } else {
        let n = &spec["nonResourceAttributes"];
        let req = NonResource {
            verb: n["verb"].as_str().unwrap_or("").to_string(),
            path: n["path"].as_str().unwrap_or("").to_string(),
        };
        authz::authorize_path(rbac, id, &req)
    };
    let mut status = json!({"allowed": decision.allowed()});
    let reason = decision.reason();
    if !reason.is_empty() {
        status["reason"] = json!(reason);
    }
    let mut out = body.clone();
    out["kind"] = json!(kind);
    out["apiVersion"] = json!("authorization.k8s.io/v1");
    out["status"] = status;
    out
}

/// Answers `spec.resourceAttributes` or `spec.nonResourceAttributes` of a review for `id`.
pub fn self_subject_access_review(
    reg: &Registry,
    rbac: &Rbac,
    id: &Identity,
    body: &Value,
) -> Value {
    access_review(reg, rbac, id, body, "SelfSubjectAccessReview")
}

/// Answers a SubjectAccessReview: the same question for the user and groups in its spec.
pub fn subject_access_review(reg: &Registry, rbac: &Rbac, body: &Value) -> Value {
    let spec = &body["spec"];
    let subject = Identity {
        user: spec["user"].as_str().unwrap_or("").to_string(),
        groups: spec["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect(),
    };
    access_review(reg, rbac, &subject, body, "SubjectAccessReview")
}

/// What `id` may do in `spec.namespace`: RBAC's rules, or everything for `system:masters`.
/// A node's rules depend on its pods, so for a node the list is marked incomplete.
pub fn self_subject_rules_review(rbac: &Rbac, id: &Identity, body: &Value) -> Value {
    let ns = body["spec"]["namespace"].as_str().unwrap_or("");
    let rules = match Subject::of(id) {
        Subject::Privileged => vec![
            k8s_openapi::api::rbac::v1::PolicyRule {
                api_groups: Some(vec!["*".into()]),
                resources: Some(vec!["*".into()]),
                verbs: vec!["*".into()],
                ..Default::default()
            },
            k8s_openapi::api::rbac::v1::PolicyRule {
                non_resource_urls: Some(vec!["*".into()]),
                verbs: vec!["*".into()],
                ..Default::default()
            },
        ],
        _ => rbac.snapshot().rules_for(id, ns),
    };
    let mut resource_rules = Vec::new();
    let mut non_resource_rules = Vec::new();
    for r in rules {
        let urls = r.non_resource_urls.clone().unwrap_or_default();
        if !urls.is_empty() {
            non_resource_rules.push(json!({"verbs": r.verbs, "nonResourceURLs": urls}));
        }
        if r.resources.as_ref().is_some_and(|v| !v.is_empty()) {
            let mut rr = json!({"verbs": r.verbs, "apiGroups": r.api_groups.unwrap_or_default(),
                "resources": r.resources.unwrap_or_default()});
            if let Some(n) = r.resource_names.filter(|n| !n.is_empty()) {
                rr["resourceNames"] = json!(n);
            }
            resource_rules.push(rr);
        }
    }
    let incomplete = matches!(Subject::of(id), Subject::Node(_));
    let mut out = body.clone();
    out["kind"] = json!("SelfSubjectRulesReview");
    out["apiVersion"] = json!("authorization.k8s.io/v1");
    out["status"] = json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules,
        "incomplete": incomplete});
    out
}
