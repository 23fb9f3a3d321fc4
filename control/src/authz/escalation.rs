//! Privilege escalation prevention, as kube-apiserver's RBAC storage enforces it: a Role or
//! ClusterRole may only be written with rules its writer already holds (where it is written)
//! unless the writer has the `escalate` verb on it, and a binding may only be written to a role
//! whose rules its writer holds unless the writer has the `bind` verb on that role.

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;

use super::{authorize, groups_of, Attributes, Rbac, Subject, Verb};
use crate::certs::Identity;
use crate::registry::{meta_str, Registry};
use crate::resources::RBAC_GROUP;
use crate::select::FieldSelector;
use crate::status::ApiError;

/// Whether a request writes a role or binding, so that its object must pass `check`.
pub fn applies(id: &Identity, a: &Attributes) -> bool {
    a.group == RBAC_GROUP
        && a.subresource.is_empty()
        && matches!(a.verb, Verb::Create | Verb::Update | Verb::Patch)
        && matches!(
            a.resource.as_str(),
            "roles" | "clusterroles" | "rolebindings" | "clusterrolebindings"
        )
        && Subject::of(id) != Subject::Privileged
}

fn list(v: &[String]) -> &[String] {
    v
}

fn opt(v: &Option<Vec<String>>) -> &[String] {
    v.as_deref().unwrap_or(&[])
}

fn has(set: &[String], x: &str) -> bool {
    set.iter().any(|s| s == x)
}

fn one(s: &str) -> Option<Vec<String>> {
    Some(vec![s.to_string()])
}

/// `rule` split into rules of one group, resource, verb (and name), or one URL and verb.
fn breakdown(rule: &PolicyRule) -> Vec<PolicyRule> {
    let mut out = Vec::new();
    for g in opt(&rule.api_groups) {
        for r in opt(&rule.resources) {
            for v in list(&rule.verbs) {
                let base = PolicyRule {
                    api_groups: one(g),
                    resources: one(r),
                    verbs: vec![v.clone()],
                    ..Default::default()
                };
                let names = opt(&rule.resource_names);
                if names.is_empty() {
                    out.push(base);
                } else {
                    for n in names {
                        out.push(PolicyRule {
                            resource_names: one(n),
                            ..base.clone()
                        });
                    }
                }
            }
        }
    }
    for u in opt(&rule.non_resource_urls) {
        for v in list(&rule.verbs) {
            out.push(PolicyRule {
                non_resource_urls: one(u),
                verbs: vec![v.clone()],
                ..Default::default()
            });
        }
    }
    out
}

fn resource_covers(owner: &[String], wanted: &[String]) -> bool {
    if has(owner, "*") {
        return true;
    }
    wanted.iter().all(|w| {
        has(owner, w)
            || w.split_once('/').is_some_and(|(res, sub)| {
                has(owner, &format!("{res}/*")) || has(owner, &format!("*/{sub}"))
            })
    })
}

fn urls_cover(owner: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|w| {
        owner.iter().any(|o| match o.strip_suffix('*') {
            Some(p) => w.starts_with(p),
            None => o == w,
        })
    })
}

fn covers_one(owner: &PolicyRule, sub: &PolicyRule) -> bool {
    let all = |set: &[String], want: &[String]| has(set, "*") || want.iter().all(|w| has(set, w));
    let names = if opt(&sub.resource_names).is_empty() {
        opt(&owner.resource_names).is_empty()
    } else {
        opt(&owner.resource_names).is_empty()
            || opt(&sub.resource_names)
                .iter()
                .all(|n| has(opt(&owner.resource_names), n))
    };
    all(&owner.verbs, &sub.verbs)
        && all(opt(&owner.api_groups), opt(&sub.api_groups))
        && resource_covers(opt(&owner.resources), opt(&sub.resources))
        && urls_cover(opt(&owner.non_resource_urls), opt(&sub.non_resource_urls))
        && names
}

/// The parts of `wanted` that no rule of `owner` covers.
pub fn missing(owner: &[PolicyRule], wanted: &[PolicyRule]) -> Vec<PolicyRule> {
    wanted
        .iter()
        .flat_map(breakdown)
        .filter(|s| !owner.iter().any(|o| covers_one(o, s)))
        .collect()
}

/// Merges single-resource rules of one group and resource into one rule with all their verbs.
fn compact(rules: Vec<PolicyRule>) -> Vec<PolicyRule> {
    let mut out: Vec<PolicyRule> = Vec::new();
    for r in rules {
        let simple = opt(&r.resource_names).is_empty() && opt(&r.non_resource_urls).is_empty();
        if simple {
            if let Some(e) = out.iter_mut().find(|e| {
                opt(&e.resource_names).is_empty()
                    && opt(&e.non_resource_urls).is_empty()
                    && e.api_groups == r.api_groups
                    && e.resources == r.resources
            }) {
                e.verbs.extend(r.verbs);
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quoted(v: &[String]) -> String {
    let parts: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", parts.join(" "))
}

/// A rule as upstream's `CompactString` prints it.
pub fn compact_string(r: &PolicyRule) -> String {
    let mut parts = Vec::new();
    let fields = [
        ("APIGroups", opt(&r.api_groups)),
        ("Resources", opt(&r.resources)),
        ("NonResourceURLs", opt(&r.non_resource_urls)),
        ("ResourceNames", opt(&r.resource_names)),
        ("Verbs", list(&r.verbs)),
    ];
    for (name, v) in fields {
        if !v.is_empty() {
            parts.push(format!("{name}:{}", go_quoted(v)));
        }
    }
    format!("{{{}}}", parts.join(", "))
}

fn confirm_no_escalation(
    rbac: &Rbac,
    id: &Identity,
    ns: &str,
    rules: &[PolicyRule],
) -> Result<(), String> {
    let owner = rbac.snapshot().rules_for(id, ns);
    let miss = missing(&owner, rules);
    if miss.is_empty() {
        return Ok(());
    }
    let mut lines: Vec<String> = compact(miss).iter().map(compact_string).collect();
    lines.sort();
    lines.dedup();
    Err(format!(
        "user {:?} (groups={}) is attempting to grant RBAC permissions not currently held:\n{}",
        id.user,
        go_quoted(&groups_of(id)),
        lines.join("\n")
    ))
}

fn allowed(reg: &Registry, rbac: &Rbac, id: &Identity, verb: &str, a: &Attributes) -> bool {
    let attrs = Attributes {
        verb: Verb::parse(verb),
        fields: FieldSelector::default(),
        ..a.clone()
    };
    authorize(reg, rbac, id, &attrs).allowed()
}

/// Refuses the write of `obj` (the role or binding as it would be stored) when it grants more
/// than `id` holds and `id` lacks `escalate` (roles) or `bind` (on the bound role).
pub fn check(
    reg: &Registry,
    rbac: &Rbac,
    id: &Identity,
    a: &Attributes,
    obj: &Value,
) -> Result<(), ApiError> {
    let name = meta_str(obj, "name");
    let forbidden = |why: &str| ApiError::forbidden(RBAC_GROUP, &a.resource, name, why);
    match a.resource.as_str() {
        "roles" | "clusterroles" => {
            if allowed(reg, rbac, id, "escalate", a) {
                return Ok(());
            }
            let rules: Vec<PolicyRule> = obj
                .get("rules")
                .cloned()
                .and_then(|r| serde_json::from_value(r).ok())
                .unwrap_or_default();
            // An aggregated role's rules are the aggregation's to write.
            let aggregated = obj.get("aggregationRule").is_some_and(Value::is_object);
            if !aggregated {
                confirm_no_escalation(rbac, id, &a.namespace, &rules).map_err(|e| forbidden(&e))?;
            } else {
                let full = [
                    PolicyRule {
                        api_groups: one("*"),
                        resources: one("*"),
                        verbs: vec!["*".into()],
                        ..Default::default()
                    },
                    PolicyRule {
                        non_resource_urls: one("*"),
                        verbs: vec!["*".into()],
                        ..Default::default()
                    },
                ];
                if confirm_no_escalation(rbac, id, &a.namespace, &full).is_err() {
                    return Err(forbidden(
                        "must have cluster-admin privileges to use the aggregationRule",
                    ));
                }
            }
            Ok(())
        }
        _ => {
            let role = &obj["roleRef"];
            let rname = role["name"].as_str().unwrap_or("");
            let cluster = role["kind"] == "ClusterRole";
            let bind = Attributes {
                verb: Verb::parse("bind"),
                group: RBAC_GROUP.into(),
                resource: if cluster { "clusterroles" } else { "roles" }.into(),
                subresource: String::new(),
                namespace: a.namespace.clone(),
                name: rname.into(),
                fields: FieldSelector::default(),
            };
            if authorize(reg, rbac, id, &bind).allowed() {
                return Ok(());
            }
            let Some(rules) = rbac.snapshot().role_rules(cluster, &a.namespace, rname) else {
                let kind = if cluster { "clusterrole" } else { "role" };
                return Err(forbidden(&format!(
                    "{kind}.{RBAC_GROUP} {rname:?} not found"
                )));
            };
            confirm_no_escalation(rbac, id, &a.namespace, &rules).map_err(|e| forbidden(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(groups: &[&str], res: &[&str], verbs: &[&str]) -> PolicyRule {
        let v = |x: &[&str]| Some(x.iter().map(|s| s.to_string()).collect());
        PolicyRule {
            api_groups: v(groups),
            resources: v(res),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn coverage() {
        let owner = [
            rule(&[""], &["pods", "pods/*"], &["get", "list"]),
            rule(&["apps"], &["*"], &["*"]),
        ];
        assert!(missing(&owner, &[rule(&[""], &["pods", "pods/log"], &["get"])]).is_empty());
        assert!(missing(&owner, &[rule(&["apps"], &["deployments"], &["delete"])]).is_empty());
        let m = missing(
            &owner,
            &[rule(&[""], &["pods", "secrets"], &["get", "delete"])],
        );
        let lines: Vec<String> = compact(m).iter().map(compact_string).collect();
        assert_eq!(
            lines,
            [
                r#"{APIGroups:[""], Resources:["pods"], Verbs:["delete"]}"#,
                r#"{APIGroups:[""], Resources:["secrets"], Verbs:["get" "delete"]}"#,
            ]
        );
        let urls = PolicyRule {
            non_resource_urls: one("/apis/*"),
            verbs: vec!["get".into()],
            ..Default::default()
        };
        let want = PolicyRule {
            non_resource_urls: one("/apis/apps"),
            verbs: vec!["get".into()],
            ..Default::default()
        };
        assert!(missing(&[urls], std::slice::from_ref(&want)).is_empty());
        assert_eq!(
            compact_string(&want),
            r#"{NonResourceURLs:["/apis/apps"], Verbs:["get"]}"#
        );
    }
}
