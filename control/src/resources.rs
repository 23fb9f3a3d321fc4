//! The resource types the server knows: names, kinds, scope, subresources, discovery hints.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lower case, as in URLs.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub subresources: &'static [&'static str],
    /// Whether metadata.generation is kept (bumped on spec change).
    pub generation: bool,
    /// Whether `status` is only written through the status subresource.
    pub status_sub: bool,
    /// A review: only `create`, answered from the request and not stored.
    pub review: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The group-qualified resource, as in error messages: `deployments.apps`, `pods`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Store key prefix for all objects of this type.
    pub fn prefix(&self) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/{g}/{}/", self.plural)
    }

    /// Store key prefix for one namespace (or all, for cluster-scoped types).
    pub fn ns_prefix(&self, ns: Option<&str>) -> String {
        match ns {
            Some(ns) if self.namespaced => format!("{}{ns}/", self.prefix()),
            _ => self.prefix(),
        }
    }

    pub fn key(&self, ns: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.ns_prefix(ns))
    }

    pub fn verbs(&self) -> &'static [&'static str] {
        if self.review {
            return &["create"];
        }
        &[
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

const NONE: &[&str] = &[];
const ALL: &[&str] = &["all"];

macro_rules! rt {
    ($g:expr, $v:expr, $p:expr, $s:expr, $k:expr, $ns:expr, $short:expr, $cat:expr, $sub:expr, $gen:expr, $st:expr) => {
        ResourceType {
            group: $g,
            version: $v,
            plural: $p,
            singular: $s,
            kind: $k,
            namespaced: $ns,
            short_names: $short,
            categories: $cat,
            subresources: $sub,
            generation: $gen,
            status_sub: $st,
            review: false,
        }
    };
}

pub static TYPES: &[ResourceType] = &[
    rt!(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        false,
        &["ns"],
        NONE,
        &["status", "finalize"],
        false,
        true
    ),
    rt!(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        true,
        &["po"],
        ALL,
        &[
            "status",
            "log",
            "exec",
            "attach",
            "portforward",
            "binding",
            "eviction"
        ],
        true,
        true
    ),
    rt!(
        "",
        "v1",
        "services",
        "service",
        "Service",
        true,
        &["svc"],
        ALL,
        &["status"],
        false,
        true
    ),
    rt!(
        "",
        "v1",
        "endpoints",
        "endpoints",
        "Endpoints",
        true,
        &["ep"],
        NONE,
        NONE,
        false,
        false
    ),
    rt!(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        &["cm"],
        NONE,
        NONE,
        false,
        false
    ),
    rt!("", "v1", "secrets", "secret", "Secret", true, NONE, NONE, NONE, false, false),
    rt!(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        NONE,
        &["token"],
        false,
        false
    ),
    rt!(
        "",
        "v1",
        "nodes",
        "node",
        "Node",
        false,
        &["no"],
        NONE,
        &["status"],
        false,
        true
    ),
    rt!(
        "",
        "v1",
        "events",
        "event",
        "Event",
        true,
        &["ev"],
        NONE,
        NONE,
        false,
        false
    ),
    rt!(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        true,
        &["deploy"],
        ALL,
        &["status", "scale"],
        true,
        true
    ),
    rt!(
        "apps",
        "v1",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        true,
        &["rs"],
        ALL,
        &["status", "scale"],
        true,
        true
    ),
    rt!(
        "apps",
        "v1",
        "daemonsets",
        "daemonset",
        "DaemonSet",
        true,
        &["ds"],
        ALL,
        &["status"],
        true,
        true
    ),
    rt!(
        "batch",
        "v1",
        "jobs",
        "job",
        "Job",
        true,
        NONE,
        ALL,
        &["status"],
        true,
        true
    ),
    rt!(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
        NONE,
        NONE,
        NONE,
        false,
        false
    ),
    rt!(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        NONE,
        NONE,
        NONE,
        false,
        false
    ),
    rt!(RBAC_GROUP, "v1", "roles", "role", "Role", true, NONE, NONE, NONE, false, false),
    rt!(
        RBAC_GROUP,
        "v1",
        "rolebindings",
        "rolebinding",
        "RoleBinding",
        true,
        NONE,
        NONE,
        NONE,
        false,
        false
    ),
    rt!(
        RBAC_GROUP,
        "v1",
        "clusterroles",
        "clusterrole",
        "ClusterRole",
        false,
        NONE,
        NONE,
        NONE,
        false,
        false
    ),
    rt!(
        RBAC_GROUP,
        "v1",
        "clusterrolebindings",
        "clusterrolebinding",
        "ClusterRoleBinding",
        false,
        NONE,
        NONE,
        NONE,
        false,
        false
    ),
];

pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// Groups in discovery order (the core group is served under /api, not listed here).
pub static GROUPS: &[(&str, &str)] = &[
    ("apps", "v1"),
    ("batch", "v1"),
    ("discovery.k8s.io", "v1"),
    ("coordination.k8s.io", "v1"),
    (RBAC_GROUP, "v1"),
];

const fn review(group: &'static str, plural: &'static str, kind: &'static str) -> ResourceType {
    ResourceType {
        group,
        version: "v1",
        plural,
        singular: "",
        kind,
        namespaced: false,
        short_names: NONE,
        categories: NONE,
        subresources: NONE,
        generation: false,
        status_sub: false,
        review: true,
    }
}

/// Reviews served for `kubectl auth whoami` and `kubectl auth can-i`.
pub static REVIEWS: &[ResourceType] = &[
    review(
        "authentication.k8s.io",
        "selfsubjectreviews",
        "SelfSubjectReview",
    ),
    review(
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
    ),
    review(
        "authorization.k8s.io",
        "selfsubjectrulesreviews",
        "SelfSubjectRulesReview",
    ),
    review(
        "authorization.k8s.io",
        "subjectaccessreviews",
        "SubjectAccessReview",
    ),
];

/// All groups in discovery: those with stored types, then the review groups.
pub fn discovery_groups() -> impl Iterator<Item = (&'static str, &'static str)> {
    let reviews = REVIEWS
        .iter()
        .enumerate()
        .filter(|(i, r)| !REVIEWS[..*i].iter().any(|p| p.group == r.group))
        .map(|(_, r)| (r.group, r.version));
    GROUPS.iter().copied().chain(reviews)
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    TYPES
        .iter()
        .find(|t| t.group == group && t.version == version && t.plural == plural)
}

pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    TYPES
        .iter()
        .find(|t| t.kind == kind && t.api_version() == api_version)
}

pub fn in_group_version(group: &str, version: &str) -> impl Iterator<Item = &'static ResourceType> {
    let (g, v) = (group.to_string(), version.to_string());
    TYPES
        .iter()
        .chain(REVIEWS)
        .filter(move |t| t.group == g && t.version == v)
}

pub fn namespaces() -> &'static ResourceType {
    &TYPES[0]
}

pub fn get(group: &str, plural: &str) -> &'static ResourceType {
    TYPES
        .iter()
        .find(|t| t.group == group && t.plural == plural)
        .expect("known resource type")
}
