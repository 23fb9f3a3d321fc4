//! Authorization: who may do what, decided before a request's body is read or stored, as
//! kube-apiserver's `--authorization-mode=Node,RBAC` decides it.
//!
//! Members of `system:masters` may do everything (kube-apiserver's privileged-group
//! authorizer). A client certificate with user `system:node:<name>` in group `system:nodes`
//! is decided first by the Node authorizer (see `node`): it reads what its pods need and
//! writes its own Node, Lease, its pods' status and events. What the Node authorizer does not
//! allow, and every other identity's request, is decided by RBAC (see `rbac`): Roles,
//! ClusterRoles and their bindings, with the bootstrap policy of `crate::rbac_bootstrap`.
//! Writes of roles and bindings are checked for privilege escalation (see `escalation`).
//!
//! Decisions come in two kinds, because kube-apiserver words them differently: what its
//! authorizer refuses (`User "system:node:n1" cannot get resource "secrets" ...`) and what the
//! NodeRestriction admission plugin refuses after reading the object (`nodes "n2" is forbidden:
//! node "n1" is not allowed to modify node "n2"`). Both answer 403 Forbidden.

pub mod escalation;
pub mod impersonation;
mod node;
mod pod_refs;
pub mod rbac;

use std::fmt;

use hyper::Method;
use serde_json::Value;
use tracing::debug;

use crate::certs::{Identity, NODES_GROUP, NODE_USER_PREFIX};
use crate::http;
use crate::registry::Registry;
use crate::rest::Call;
use crate::select::FieldSelector;
use crate::status::ApiError;

pub use pod_refs::PodRefs;
pub use rbac::Rbac;

/// What a request outside the resource paths asks for: `get` of `/apis`, say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonResource {
    pub verb: String,
    pub path: String,
}

impl NonResource {
    /// The attributes of a request on `path`: the verb is the method's, lower case (`head`
    /// counts as `get`, as in kube-apiserver).
    pub fn of_request(method: &Method, path: &str) -> NonResource {
        let verb = match *method {
            Method::GET | Method::HEAD => "get".to_string(),
            ref m => m.as_str().to_ascii_lowercase(),
        };
        NonResource {
            verb,
            path: path.to_string(),
        }
    }
}

/// A request verb, as authorization sees it (not the HTTP method).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    /// Anything else a SelfSubjectAccessReview may ask about (`*`, `use`, `escalate`...).
    Other(String),
}

impl Verb {
    pub fn parse(s: &str) -> Verb {
        match s {
            "get" => Verb::Get,
            "list" => Verb::List,
            "watch" => Verb::Watch,
            "create" => Verb::Create,
            "update" => Verb::Update,
            "patch" => Verb::Patch,
            "delete" => Verb::Delete,
            "deletecollection" => Verb::DeleteCollection,
            other => Verb::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Other(v) => v,
        }
    }

    /// The verb of an HTTP request on a resource path, as kube-apiserver derives it.
    pub fn of_request(method: &Method, named: bool, watch: bool) -> Verb {
        match *method {
            Method::GET | Method::HEAD if named => Verb::Get,
            Method::GET | Method::HEAD if watch => Verb::Watch,
            Method::GET | Method::HEAD => Verb::List,
            Method::POST => Verb::Create,
            Method::PUT => Verb::Update,
            Method::PATCH => Verb::Patch,
            Method::DELETE if named => Verb::Delete,
            Method::DELETE => Verb::DeleteCollection,
            ref other => Verb::Other(other.as_str().to_ascii_lowercase()),
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a resource request asks for. Empty strings stand for "none", as in Kubernetes'
/// authorizer attributes (no namespace = cluster scope, no name = a list or a create).
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    pub verb: Verb,
    pub group: String,
    /// The plural resource name: `pods`, `leases`.
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub fields: FieldSelector,
}

impl Attributes {
    /// The attributes of a routed request.
    pub fn of_call(c: &Call) -> Attributes {
        let watch = http::flag(&c.query, "watch");
        // A malformed selector is refused later, by the list itself, with 400.
        let fields = c
            .query
            .get("fieldSelector")
            .and_then(|s| FieldSelector::parse(s).ok())
            .unwrap_or_default();
        let verb = Verb::of_request(&c.method, c.name.is_some(), watch);
        // A list or watch pinned to one name by `metadata.name=` is about that object, as
        // kube-apiserver's request info has it.
        let name = match (&c.name, &verb) {
            (Some(n), _) => n.clone(),
            (None, Verb::List | Verb::Watch) => fields.pinned_name().unwrap_or("").to_string(),
            (None, _) => String::new(),
        };
        Attributes {
            verb,
            group: c.rt.group.to_string(),
            resource: c.rt.plural.to_string(),
            subresource: c.sub.clone().unwrap_or_default(),
            namespace: c.ns.clone().filter(|_| c.rt.namespaced).unwrap_or_default(),
            name,
            fields,
        }
    }

    /// The attributes a SelfSubjectAccessReview asks about (`spec.resourceAttributes`).
    pub fn of_review(ra: &Value) -> Attributes {
        let s = |k: &str| ra[k].as_str().unwrap_or("").to_string();
        let fs = &ra["fieldSelector"];
        let mut raw = fs["rawSelector"].as_str().unwrap_or("").to_string();
        for r in fs["requirements"].as_array().into_iter().flatten() {
            // Only single-value In / NotIn requirements say something a selector string can.
            let (Some(key), Some([value])) =
                (r["key"].as_str(), r["values"].as_array().map(Vec::as_slice))
            else {
                continue;
            };
            let op = match r["operator"].as_str() {
                Some("In") => "=",
                Some("NotIn") => "!=",
                _ => continue,
            };
            if !raw.is_empty() {
                raw.push(',');
            }
            raw.push_str(&format!("{key}{op}{}", value.as_str().unwrap_or("")));
        }
        Attributes {
            verb: Verb::parse(&s("verb")),
            group: s("group"),
            resource: s("resource"),
            subresource: s("subresource"),
            namespace: s("namespace"),
            name: s("name"),
            fields: FieldSelector::parse(&raw).unwrap_or_default(),
        }
    }

    /// `resource[/subresource]`, as in messages.
    fn full_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// Whom a request is decided for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// A member of `system:masters`: allowed everything, whatever RBAC says.
    Privileged,
    /// A node, by name: the Node authorizer first, then RBAC.
    Node(&'a str),
    /// In group `system:nodes` without a `system:node:<name>` user: RBAC alone.
    UnknownNode,
    /// Everyone else: RBAC alone.
    Other,
}

impl<'a> Subject<'a> {
    pub fn of(id: &'a Identity) -> Subject<'a> {
        let in_group = |g: &str| id.groups.iter().any(|x| x == g);
        if in_group("system:masters") {
            return Subject::Privileged;
        }
        if !in_group(NODES_GROUP) {
            return Subject::Other;
        }
        match id.user.strip_prefix(NODE_USER_PREFIX) {
            Some(node) if !node.is_empty() => Subject::Node(node),
            _ => Subject::UnknownNode,
        }
    }
}

/// The groups of an authenticated identity, `system:authenticated` included (as
/// kube-apiserver's authentication adds it).
pub fn groups_of(id: &Identity) -> Vec<String> {
    let mut g = id.groups.clone();
    if !g.iter().any(|x| x == "system:authenticated") {
        g.push("system:authenticated".into());
    }
    g
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused as kube-apiserver's authorizer refuses: `User ... cannot <verb> resource ...`,
    /// then `: <reason>` when there is one.
    Deny {
        reason: String,
    },
    /// Refused as the NodeRestriction admission plugin refuses: `<resource> "<name>" is
    /// forbidden: <reason>`.
    Restrict {
        reason: String,
    },
}

impl Decision {
    pub fn deny(reason: impl Into<String>) -> Decision {
        Decision::Deny {
            reason: reason.into(),
        }
    }

    pub fn restrict(reason: impl Into<String>) -> Decision {
        Decision::Restrict {
            reason: reason.into(),
        }
    }

    pub fn allowed(&self) -> bool {
        *self == Decision::Allow
    }

    /// Why it was refused (empty when allowed or when no rule says more).
    pub fn reason(&self) -> &str {
        match self {
            Decision::Allow => "",
            Decision::Deny { reason } | Decision::Restrict { reason } => reason,
        }
    }
}

/// A refused request, worded as kube-apiserver words it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Forbidden {
    pub group: String,
    pub resource: String,
    pub name: String,
    /// What follows `is forbidden: `.
    pub message: String,
}

impl Forbidden {
    fn new(user: &str, attrs: &Attributes, decision: &Decision) -> Forbidden {
        let message = match decision {
            Decision::Restrict { reason } => reason.clone(),
            _ => {
                let scope = if attrs.namespace.is_empty() {
                    "at the cluster scope".to_string()
                } else {
                    format!("in the namespace {:?}", attrs.namespace)
                };
                let mut m = format!(
                    "User {user:?} cannot {} resource {:?} in API group {:?} {scope}",
                    attrs.verb,
                    attrs.full_resource(),
                    attrs.group
                );
                if !decision.reason().is_empty() {
                    m = format!("{m}: {}", decision.reason());
                }
                m
            }
        };
        Forbidden {
            group: attrs.group.clone(),
            resource: attrs.resource.clone(),
            name: attrs.name.clone(),
            message,
        }
    }
}

impl From<Forbidden> for ApiError {
    fn from(f: Forbidden) -> ApiError {
        ApiError::forbidden(&f.group, &f.resource, &f.name, &f.message)
    }
}

/// Decides a request from its attributes alone: Node (for nodes), then RBAC. A refusal carries
/// the reasons both gave, one per line, as kube-apiserver's union of authorizers.
pub fn authorize(reg: &Registry, rbac: &Rbac, id: &Identity, attrs: &Attributes) -> Decision {
    let node_reason = match Subject::of(id) {
        Subject::Privileged => return Decision::Allow,
        Subject::Other => String::new(),
        Subject::UnknownNode => format!("unknown node for user {:?}", id.user),
        Subject::Node(node) => match node::authorize(reg, node, attrs) {
            // NodeRestriction's refusals stand whatever RBAC grants, as admission follows
            // authorization.
            d @ (Decision::Allow | Decision::Restrict { .. }) => return d,
            d => d.reason().to_string(),
        },
    };
    match rbac.authorize(id, attrs) {
        Ok(()) => Decision::Allow,
        Err(r) => Decision::deny(
            [node_reason, r]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    }
}

/// Decides a request outside the resource paths: RBAC's `nonResourceURLs` rules.
pub fn authorize_path(rbac: &Rbac, id: &Identity, n: &NonResource) -> Decision {
    if Subject::of(id) == Subject::Privileged {
        return Decision::Allow;
    }
    match rbac.authorize_path(id, n) {
        Ok(()) => Decision::Allow,
        Err(r) => Decision::deny(r),
    }
}

/// Authorizes a request outside the resource paths: `Err` is the 403 to answer, worded as
/// kube-apiserver's `forbidden: User "x" cannot get path "/apis"`.
pub fn check_path(rbac: &Rbac, id: &Identity, n: &NonResource) -> Result<(), ApiError> {
    let d = authorize_path(rbac, id, n);
    if d.allowed() {
        return Ok(());
    }
    let mut m = format!("User {:?} cannot {} path {:?}", id.user, n.verb, n.path);
    if !d.reason().is_empty() {
        m = format!("{m}: {}", d.reason());
    }
    debug!(user = id.user, verb = n.verb, path = n.path, "forbidden");
    Err(ApiError {
        details: Some(serde_json::json!({})),
        ..ApiError::new(403, "Forbidden", format!("forbidden: {m}"))
    })
}

/// Whether `admit` must see the request's object: a node's creates whose name or binding is
/// only in the body (its Node, its Lease, a TokenRequest).
pub fn needs_object(id: &Identity, attrs: &Attributes) -> bool {
    matches!(Subject::of(id), Subject::Node(_)) && node::needs_object(attrs)
}

/// Decides what depends on the request's object, once authorized (NodeRestriction's part).
pub fn admit(reg: &Registry, id: &Identity, attrs: &Attributes, obj: &Value) -> Decision {
    match Subject::of(id) {
        Subject::Node(node) => node::admit(reg, node, attrs, obj),
        _ => Decision::Allow,
    }
}

/// `decision` as a result: the 403 to answer, logged, when refused.
pub fn enforce(id: &Identity, attrs: &Attributes, decision: Decision) -> Result<(), Forbidden> {
    if decision.allowed() {
        return Ok(());
    }
    debug!(
        user = id.user,
        verb = %attrs.verb,
        resource = attrs.full_resource(),
        namespace = attrs.namespace,
        name = attrs.name,
        reason = decision.reason(),
        "forbidden"
    );
    Err(Forbidden::new(&id.user, attrs, &decision))
}

/// Authorizes a request: `Err` is the 403 to answer.
pub fn check(
    reg: &Registry,
    rbac: &Rbac,
    id: &Identity,
    attrs: &Attributes,
) -> Result<(), Forbidden> {
    enforce(id, attrs, authorize(reg, rbac, id, attrs))
}

/// Admits a request's object: `Err` is the 403 to answer. The name in the message is the
/// object's when the request's path has none (a create), as kube-apiserver's admission does.
pub fn check_object(
    reg: &Registry,
    id: &Identity,
    attrs: &Attributes,
    obj: &Value,
) -> Result<(), Forbidden> {
    let decision = admit(reg, id, attrs, obj);
    if attrs.name.is_empty() && !decision.allowed() {
        let mut named = attrs.clone();
        named.name = crate::registry::meta_str(obj, "name").to_string();
        return enforce(id, &named, decision);
    }
    enforce(id, attrs, decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(user: &str, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn subjects() {
        assert_eq!(
            Subject::of(&id("system:node:n1", &["system:nodes"])),
            Subject::Node("n1")
        );
        assert_eq!(
            Subject::of(&id("kubernetes-admin", &["system:masters"])),
            Subject::Privileged
        );
        // A node name without the group is not a node; the group without a name is no node.
        assert_eq!(Subject::of(&id("system:node:n1", &[])), Subject::Other);
        assert_eq!(
            Subject::of(&id("someone", &["system:nodes"])),
            Subject::UnknownNode
        );
        assert_eq!(
            Subject::of(&id("system:node:n1", &["system:nodes", "system:masters"])),
            Subject::Privileged
        );
    }

    #[test]
    fn verbs_of_requests() {
        assert_eq!(Verb::of_request(&Method::GET, true, false), Verb::Get);
        assert_eq!(Verb::of_request(&Method::GET, false, true), Verb::Watch);
        assert_eq!(Verb::of_request(&Method::GET, false, false), Verb::List);
        assert_eq!(
            Verb::of_request(&Method::DELETE, false, false),
            Verb::DeleteCollection
        );
        assert_eq!(Verb::parse("*"), Verb::Other("*".into()));
    }

    #[test]
    fn messages_are_kube_apiservers() {
        let attrs = Attributes {
            verb: Verb::Get,
            group: String::new(),
            resource: "pods".into(),
            subresource: String::new(),
            namespace: "default".into(),
            name: "x".into(),
            fields: FieldSelector::default(),
        };
        let d = Decision::deny("no relationship found between node 'n1' and this object");
        let e = ApiError::from(Forbidden::new("system:node:n1", &attrs, &d));
        assert_eq!(e.code, 403);
        assert_eq!(e.reason, "Forbidden");
        assert_eq!(
            e.message,
            "pods \"x\" is forbidden: User \"system:node:n1\" cannot get resource \"pods\" in API \
             group \"\" in the namespace \"default\": no relationship found between node 'n1' \
             and this object"
        );
        assert_eq!(
            e.details.unwrap(),
            serde_json::json!({"name": "x", "kind": "pods"})
        );
        let nodes = Attributes {
            verb: Verb::Delete,
            resource: "nodes".into(),
            namespace: String::new(),
            subresource: "status".into(),
            name: "n2".into(),
            ..attrs.clone()
        };
        let e = Forbidden::new("system:node:n1", &nodes, &Decision::deny(""));
        assert_eq!(
            e.message,
            "User \"system:node:n1\" cannot delete resource \"nodes/status\" in API group \"\" \
             at the cluster scope"
        );
        let r = Forbidden::new(
            "system:node:n1",
            &nodes,
            &Decision::restrict("node \"n1\" is not allowed to modify node \"n2\""),
        );
        assert_eq!(
            ApiError::from(r).message,
            "nodes \"n2\" is forbidden: node \"n1\" is not allowed to modify node \"n2\""
        );
    }

    #[test]
    fn review_attributes() {
        let a = Attributes::of_review(&serde_json::json!({"verb": "list", "resource": "pods",
            "namespace": "default", "fieldSelector": {"requirements": [
                {"key": "spec.nodeName", "operator": "In", "values": ["n1"]}]}}));
        assert_eq!(a.verb, Verb::List);
        assert!(a.fields.requires("spec.nodeName", "n1"));
        let a = Attributes::of_review(&serde_json::json!({"verb": "watch", "resource": "pods",
            "fieldSelector": {"rawSelector": "spec.nodeName=n2"}}));
        assert!(a.fields.requires("spec.nodeName", "n2"));
    }
}
