//! Impersonation (`kubectl --as`, `--as-group`): the `Impersonate-User`, `Impersonate-Group`,
//! `Impersonate-Uid` and `Impersonate-Extra-<key>` headers make a request act as someone else,
//! when the requester holds the `impersonate` verb on each of them, as kube-apiserver's
//! impersonation filter checks it: `users`, `groups` and `serviceaccounts` in the core group,
//! `uids` and `userextras/<key>` in `authentication.k8s.io`.

use hyper::HeaderMap;

use super::{authorize, enforce, Attributes, Rbac, Verb};
use crate::certs::Identity;
use crate::registry::Registry;
use crate::select::FieldSelector;
use crate::status::ApiError;

const EXTRA_PREFIX: &str = "impersonate-extra-";
const SA_PREFIX: &str = "system:serviceaccount:";

fn attrs(group: &str, resource: &str, sub: &str, ns: &str, name: &str) -> Attributes {
    Attributes {
        verb: Verb::parse("impersonate"),
        group: group.into(),
        resource: resource.into(),
        subresource: sub.into(),
        namespace: ns.into(),
        name: name.into(),
        fields: FieldSelector::default(),
    }
}

/// The identity a request acts as: `None` when it asks for no impersonation, else the
/// impersonated identity once `id` is allowed each part of it.
pub fn impersonated(
    reg: &Registry,
    rbac: &Rbac,
    id: &Identity,
    headers: &HeaderMap,
) -> Result<Option<Identity>, ApiError> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let user = values("impersonate-user").into_iter().next();
    let groups = values("impersonate-group");
    let uid = values("impersonate-uid").into_iter().next();
    let extras: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| {
            let key = k.as_str().strip_prefix(EXTRA_PREFIX)?;
            Some((key.to_string(), v.to_str().ok()?.to_string()))
        })
        .collect();
    let Some(user) = user else {
        if groups.is_empty() && uid.is_none() && extras.is_empty() {
            return Ok(None);
        }
        return Err(ApiError::new(
            500,
            "InternalError",
            "Internal error occurred: requested impersonation of groups, uid or extra \
             without impersonating a user",
        ));
    };
    let mut checks = Vec::new();
    match user.strip_prefix(SA_PREFIX).and_then(|r| r.split_once(':')) {
        Some((ns, name)) => checks.push(attrs("", "serviceaccounts", "", ns, name)),
        None => checks.push(attrs("", "users", "", "", &user)),
    }
    for g in &groups {
        checks.push(attrs("", "groups", "", "", g));
    }
    if let Some(uid) = &uid {
        checks.push(attrs("authentication.k8s.io", "uids", "", "", uid));
    }
    for (key, value) in &extras {
        checks.push(attrs("authentication.k8s.io", "userextras", key, "", value));
    }
    for a in &checks {
        enforce(id, a, authorize(reg, rbac, id, a))?;
    }
    let mut out_groups = groups;
    if out_groups.is_empty() {
        if let Some((ns, _)) = user.strip_prefix(SA_PREFIX).and_then(|r| r.split_once(':')) {
            out_groups.push("system:serviceaccounts".into());
            out_groups.push(format!("system:serviceaccounts:{ns}"));
        }
    }
    let implied = if user == "system:anonymous" {
        "system:unauthenticated"
    } else {
        "system:authenticated"
    };
    if !out_groups.iter().any(|g| g == implied) {
        out_groups.push(implied.into());
    }
    Ok(Some(Identity {
        user,
        groups: out_groups,
    }))
}
