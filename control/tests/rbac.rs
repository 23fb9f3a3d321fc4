//! RBAC as users meet it through kubectl 1.27 and 1.33 and kube-rs: service account tokens
//! see only what bindings grant, namespace admins cannot grant what they do not hold,
//! aggregation, `kubectl auth can-i` (also `--list` and `--as`), impersonation, bound tokens
//! and the bootstrap policy across restarts.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::{fails, kubectl, ok, TestServer};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

/// Waits for the namespace controller to make `ns`'s default service account.
async fn default_sa(s: &TestServer, ns: &str) -> Result<()> {
    let t = Instant::now();
    while !s
        .kubectl(33, &["get", "sa", "default", "-n", ns])
        .status
        .success()
    {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("no default service account in {ns}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn forbidden_list(user: &str, resource: &str, ns: &str) -> String {
    format!(
        "Error from server (Forbidden): {resource} is forbidden: User \"{user}\" cannot list \
         resource \"{resource}\" in API group \"\" in the namespace \"{ns}\""
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_sees_only_what_its_bindings_grant() -> Result<()> {
    let s = TestServer::start_with_controllers().await?;
    for v in [27, 33] {
        let ns = format!("team-{v}");
        ok(s.kubectl(v, &["create", "namespace", &ns]));
        default_sa(&s, &ns).await?;
        let user = format!("system:serviceaccount:{ns}:default");
        let token = ok(s.kubectl(v, &["create", "token", "default", "-n", &ns]));
        let kc = s.token_kubeconfig(&ns, token.trim())?;
        let err = fails(kubectl(&kc, v, &["get", "secrets", "-n", &ns], None));
        assert!(
            err.contains(&forbidden_list(&user, "secrets", &ns)),
            "{err}"
        );
        let err = fails(kubectl(&kc, v, &["get", "pods", "-n", &ns], None));
        assert!(err.contains(&forbidden_list(&user, "pods", &ns)), "{err}");

        // kube-rs sees the same Status.
        let client = common::client_for(&kc).await?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        match secrets.list(&ListParams::default()).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 403);
                assert_eq!(e.reason, "Forbidden");
                assert_eq!(
                    e.message,
                    format!(
                        "secrets is forbidden: User \"{user}\" cannot list resource \
                         \"secrets\" in API group \"\" in the namespace \"{ns}\""
                    )
                );
            }
            other => bail!("listing secrets as {user}: {other:?}"),
        }

        ok(s.kubectl(
            v,
            &[
                "create",
                "rolebinding",
                "default-view",
                "--clusterrole=view",
                &format!("--serviceaccount={ns}:default"),
                "-n",
                &ns,
            ],
        ));
        let out = ok(kubectl(&kc, v, &["get", "pods", "-n", &ns], None));
        assert!(!out.contains("Forbidden"), "{out}");
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.list(&ListParams::default()).await?;
        let err = fails(kubectl(&kc, v, &["get", "secrets", "-n", &ns], None));
        assert!(
            err.contains(&forbidden_list(&user, "secrets", &ns)),
            "{err}"
        );
        // The binding is namespaced: other namespaces stay closed.
        let err = fails(kubectl(&kc, v, &["get", "pods", "-n", "default"], None));
        assert!(
            err.contains(&forbidden_list(&user, "pods", "default")),
            "{err}"
        );
        ok(s.kubectl(v, &["delete", "namespace", &ns, "--wait=false"]));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_admin_cannot_grant_what_it_does_not_hold() -> Result<()> {
    let s = TestServer::start().await?;
    ok(s.kubectl(33, &["create", "namespace", "shop"]));
    ok(s.kubectl(
        33,
        &[
            "create",
            "rolebinding",
            "alice-admin",
            "--clusterrole=admin",
            "--user=alice",
            "-n",
            "shop",
        ],
    ));
    // kubectl 1.27 with alice's own certificate, 1.33 as the admin impersonating alice.
    let alice = s.user_kubeconfig("alice", &["shoppers"])?;
    let as_alice = |v: u32, args: &[&str]| {
        if v == 27 {
            kubectl(&alice, v, args, None)
        } else {
            let mut a = args.to_vec();
            a.extend(["--as=alice", "--as-group=shoppers"]);
            s.kubectl(v, &a)
        }
    };
    for v in [27, 33] {
        let name = format!("bob-view-{v}");
        ok(as_alice(
            v,
            &[
                "create",
                "rolebinding",
                &name,
                "--clusterrole=view",
                "--user=bob",
                "-n",
                "shop",
            ],
        ));
        let name = format!("bob-root-{v}");
        let err = fails(as_alice(
            v,
            &[
                "create",
                "rolebinding",
                &name,
                "--clusterrole=cluster-admin",
                "--user=bob",
                "-n",
                "shop",
            ],
        ));
        let groups = r#"["shoppers" "system:authenticated"]"#;
        let want = format!(
            "rolebindings.rbac.authorization.k8s.io \"{name}\" \
             is forbidden: user \"alice\" (groups={groups}) is attempting to grant RBAC \
             permissions not currently held:\n{{APIGroups:[\"*\"], Resources:[\"*\"], \
             Verbs:[\"*\"]}}\n{{NonResourceURLs:[\"*\"], Verbs:[\"*\"]}}"
        );
        assert!(err.contains(&want), "{err}\nwanted: {want}");
        // A Role with rules alice lacks (nodes are not in admin) is escalation too.
        let role = format!("node-reader-{v}");
        let err = fails(as_alice(
            v,
            &[
                "create",
                "role",
                &role,
                "--verb=get",
                "--resource=nodes",
                "-n",
                "shop",
            ],
        ));
        assert!(
            err.contains(&format!(
                "roles.rbac.authorization.k8s.io \"{role}\" is forbidden: user \"alice\" \
                 (groups={groups}) is attempting to grant RBAC permissions not currently \
                 held:\n{{APIGroups:[\"\"], Resources:[\"nodes\"], Verbs:[\"get\"]}}"
            )),
            "{err}"
        );
        // Rules alice holds are hers to grant.
        let role = format!("pod-reader-{v}");
        ok(as_alice(
            v,
            &[
                "create",
                "role",
                &role,
                "--verb=get,list",
                "--resource=pods",
                "-n",
                "shop",
            ],
        ));
        // Outside her namespace she holds nothing.
        let err = fails(as_alice(v, &["get", "pods", "-n", "default"]));
        assert!(
            err.contains(&forbidden_list("alice", "pods", "default")),
            "{err}"
        );
    }
    // The escalate verb lifts the check for roles.
    ok(s.kubectl(
        33,
        &[
            "create",
            "role",
            "escalator",
            "--verb=escalate",
            "--resource=roles.rbac.authorization.k8s.io",
            "-n",
            "shop",
        ],
    ));
    ok(s.kubectl(
        33,
        &[
            "create",
            "rolebinding",
            "alice-escalate",
            "--role=escalator",
            "--user=alice",
            "-n",
            "shop",
        ],
    ));
    ok(as_alice(
        33,
        &[
            "create",
            "role",
            "node-reader",
            "--verb=get",
            "--resource=nodes",
            "-n",
            "shop",
        ],
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregated_cluster_role_adds_its_rules_to_view() -> Result<()> {
    let s = TestServer::start().await?;
    let sa = "--as=system:serviceaccount:default:default";
    ok(s.kubectl(
        33,
        &[
            "create",
            "rolebinding",
            "default-view",
            "--clusterrole=view",
            "--serviceaccount=default:default",
        ],
    ));
    let can = |v: u32| stdout_trim(s.kubectl(v, &["auth", "can-i", "list", "secrets", sa]));
    assert_eq!(can(33), "no");
    let role = r#"{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "widget-viewer", "labels": {"rbac.authorization.k8s.io/aggregate-to-view": "true"}},
        "rules": [{"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": ["get", "list", "watch"]},
                  {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]}"#;
    ok(s.kubectl_stdin(33, &["apply", "-f", "-"], role));
    // Aggregation shows in view's rules, and edit and admin get them through view.
    let t = Instant::now();
    loop {
        let view = ok(s.kubectl(33, &["get", "clusterrole", "view", "-o", "json"]));
        let admin = ok(s.kubectl(27, &["get", "clusterrole", "admin", "-o", "json"]));
        if view.contains("widgets") && admin.contains("widgets") {
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("view was not aggregated: {view}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(can(27), "yes");
    assert_eq!(can(33), "yes");
    ok(s.kubectl(33, &["delete", "clusterrole", "widget-viewer"]));
    let t = Instant::now();
    while can(33) != "no" {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("view kept the rules of a deleted ClusterRole");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = ok(s.kubectl(33, &["get", "clusterrole", "view", "-o", "json"]));
    assert!(!view.contains("widgets"), "{view}");
    Ok(())
}

fn stdout_trim(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn can_i_answers_from_rbac() -> Result<()> {
    let s = TestServer::start().await?;
    let sa = "--as=system:serviceaccount:default:default";
    for v in [27, 33] {
        let list = ok(s.kubectl(v, &["auth", "can-i", "--list", sa]));
        let lines: Vec<Vec<&str>> = list
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "Resources",
                "Non-Resource",
                "URLs",
                "Resource",
                "Names",
                "Verbs"
            ],
            "{list}"
        );
        let has = |row: &[&str]| lines.iter().any(|l| l.as_slice() == row);
        assert!(
            has(&[
                "selfsubjectaccessreviews.authorization.k8s.io",
                "[]",
                "[]",
                "[create]"
            ]),
            "{list}"
        );
        assert!(
            has(&[
                "selfsubjectrulesreviews.authorization.k8s.io",
                "[]",
                "[]",
                "[create]"
            ]),
            "{list}"
        );
        assert!(
            has(&[
                "selfsubjectreviews.authentication.k8s.io",
                "[]",
                "[]",
                "[create]"
            ]),
            "{list}"
        );
        for url in ["/api/*", "/apis", "/healthz", "/version"] {
            let row = lines.iter().any(|l| {
                l.iter().any(|t| t.trim_matches(['[', ']']) == url) && l.last() == Some(&"[get]")
            });
            assert!(row, "{url}: {list}");
        }
        assert!(!list.contains("secrets"), "{list}");
        assert_eq!(
            stdout_trim(s.kubectl(v, &["auth", "can-i", "list", "secrets", sa])),
            "no"
        );
        assert_eq!(
            stdout_trim(s.kubectl(
                v,
                &["auth", "can-i", "create", "selfsubjectaccessreviews", sa]
            )),
            "yes"
        );
        assert_eq!(
            stdout_trim(s.kubectl(v, &["auth", "can-i", "get", "/apis", sa])),
            "yes"
        );
        assert_eq!(
            stdout_trim(s.kubectl(v, &["auth", "can-i", "delete", "/apis", sa])),
            "no"
        );
        assert_eq!(
            stdout_trim(s.kubectl(v, &["auth", "can-i", "*", "*"])),
            "yes"
        );
    }
    // A namespace's bindings show in --list for that namespace only.
    ok(s.kubectl(
        33,
        &[
            "create",
            "rolebinding",
            "sa-edit",
            "--clusterrole=edit",
            "--serviceaccount=default:default",
        ],
    ));
    let list = ok(s.kubectl(33, &["auth", "can-i", "--list", sa]));
    assert!(list.contains("secrets"), "{list}");
    let list = ok(s.kubectl(33, &["auth", "can-i", "--list", sa, "-n", "kube-system"]));
    assert!(!list.contains("secrets"), "{list}");

    // SubjectAccessReview, for components: the admin asks about someone else.
    let client = s.client().await?;
    let sars: Api<SubjectAccessReview> = Api::all(client);
    let ask = |verb: &str, resource: &str| -> Result<SubjectAccessReview> {
        Ok(serde_json::from_value(json!({"spec": {
            "user": "system:serviceaccount:default:default",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"],
            "resourceAttributes": {"verb": verb, "resource": resource, "namespace": "default"}}}))?)
    };
    let r = sars
        .create(&PostParams::default(), &ask("delete", "secrets")?)
        .await?;
    assert!(r.status.expect("status").allowed);
    let r = sars
        .create(&PostParams::default(), &ask("create", "nodes")?)
        .await?;
    assert!(!r.status.expect("status").allowed);
    // Asking needs the right to ask.
    let bob = s.user_kubeconfig("bob", &[])?;
    let bob_sars: Api<SubjectAccessReview> = Api::all(common::client_for(&bob).await?);
    match bob_sars
        .create(&PostParams::default(), &ask("get", "pods")?)
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!(
            e.message,
            "subjectaccessreviews.authorization.k8s.io is forbidden: User \"bob\" cannot \
             create resource \"subjectaccessreviews\" in API group \"authorization.k8s.io\" at \
             the cluster scope"
        ),
        other => bail!("bob's SubjectAccessReview: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_needs_the_impersonate_verb() -> Result<()> {
    let s = TestServer::start().await?;
    let carol = s.user_kubeconfig("carol", &[])?;
    for v in [27, 33] {
        // As on a machine where kubectl has run before: discovery is cached (kubectl reports a
        // refused discovery request only as "unknown").
        ok(s.kubectl(v, &["api-resources"]));
        let err = fails(kubectl(&carol, v, &["get", "pods", "--as=dave"], None));
        assert!(
            err.contains(
                "Error from server (Forbidden): users \"dave\" is forbidden: User \"carol\" \
                 cannot impersonate resource \"users\" in API group \"\" at the cluster scope"
            ),
            "{err}"
        );
    }
    ok(s.kubectl(
        33,
        &[
            "create",
            "clusterrole",
            "impersonate-dave",
            "--verb=impersonate",
            "--resource=users",
            "--resource-name=dave",
        ],
    ));
    ok(s.kubectl(
        33,
        &[
            "create",
            "clusterrolebinding",
            "carol-impersonates",
            "--clusterrole=impersonate-dave",
            "--user=carol",
        ],
    ));
    for v in [27, 33] {
        // carol may act as dave, who may not list pods.
        let err = fails(kubectl(&carol, v, &["get", "pods", "--as=dave"], None));
        assert!(
            err.contains(&forbidden_list("dave", "pods", "default")),
            "{err}"
        );
        let who = ok(kubectl(
            &carol,
            v,
            &["auth", "can-i", "get", "/apis", "--as=dave"],
            None,
        ));
        assert_eq!(who.trim(), "yes");
        // Not as anyone else, nor with a group.
        let err = fails(kubectl(&carol, v, &["get", "pods", "--as=erin"], None));
        assert!(err.contains("users \"erin\" is forbidden"), "{err}");
        let err = fails(kubectl(
            &carol,
            v,
            &["get", "pods", "--as=dave", "--as-group=system:masters"],
            None,
        ));
        assert!(
            err.contains(
                "groups \"system:masters\" is forbidden: User \"carol\" cannot impersonate \
                 resource \"groups\" in API group \"\" at the cluster scope"
            ),
            "{err}"
        );
    }
    // whoami reports the impersonated identity.
    let who = ok(s.kubectl(33, &["auth", "whoami", "--as=dave", "-o", "json"]));
    let who: serde_json::Value = serde_json::from_str(&who)?;
    assert_eq!(who["status"]["userInfo"]["username"], "dave");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_to_a_deleted_pod_stops_working() -> Result<()> {
    let s = TestServer::start().await?;
    let pod = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "holder"},
        "spec": {"automountServiceAccountToken": false, "containers": [{"name": "c", "image": "busybox"}]}}"#;
    ok(s.kubectl_stdin(33, &["create", "-f", "-"], pod));
    let token = ok(s.kubectl(
        33,
        &[
            "create",
            "token",
            "default",
            "--bound-object-kind=Pod",
            "--bound-object-name=holder",
        ],
    ));
    let kc = s.token_kubeconfig("bound", token.trim())?;
    let who = ok(kubectl(
        &kc,
        33,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
        None,
    ));
    assert_eq!(who, "system:serviceaccount:default:default");
    ok(s.kubectl(
        33,
        &["delete", "pod", "holder", "--grace-period=0", "--force"],
    ));
    let err = fails(kubectl(&kc, 33, &["auth", "whoami"], None));
    assert!(err.contains("Unauthorized"), "{err}");
    // A token bound to a secret, likewise.
    ok(s.kubectl(33, &["create", "secret", "generic", "anchor"]));
    let token = ok(s.kubectl(
        33,
        &[
            "create",
            "token",
            "default",
            "--bound-object-kind=Secret",
            "--bound-object-name=anchor",
        ],
    ));
    let kc = s.token_kubeconfig("secret-bound", token.trim())?;
    ok(kubectl(&kc, 33, &["auth", "whoami"], None));
    ok(s.kubectl(33, &["delete", "secret", "anchor"]));
    let err = fails(kubectl(&kc, 33, &["auth", "whoami"], None));
    assert!(err.contains("Unauthorized"), "{err}");
    Ok(())
}

async fn start_on(dir: &std::path::Path) -> Result<control::Server> {
    let mut cfg = control::Config::new(dir.join("data"));
    cfg.controllers = false;
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.kubeconfig = dir.join("admin.kubeconfig");
    Ok(control::start(cfg).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_policy_comes_back_unless_autoupdate_is_off() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kc = dir.path().join("admin.kubeconfig");
    let server = start_on(dir.path()).await?;
    let k = |args: &[&str]| kubectl(&kc, 33, args, None);
    ok(k(&["delete", "clusterrole", "view"]));
    ok(k(&["delete", "clusterrolebinding", "system:basic-user"]));
    // Rules removed from a role come back; a role its owner froze stays as it is.
    ok(k(&[
        "patch",
        "clusterrole",
        "system:node-proxier",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/rules", "value": []}]"#,
    ]));
    ok(k(&[
        "annotate",
        "clusterrole",
        "system:public-info-viewer",
        "--overwrite",
        "rbac.authorization.kubernetes.io/autoupdate=false",
    ]));
    ok(k(&[
        "patch",
        "clusterrole",
        "system:public-info-viewer",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/rules", "value": [{"nonResourceURLs": ["/healthz"], "verbs": ["get"]}]}]"#,
    ]));
    fails(k(&["get", "clusterrole", "view"]));
    server.stop();

    let server = start_on(dir.path()).await?;
    let view = ok(k(&["get", "clusterrole", "view", "-o", "json"]));
    let view: serde_json::Value = serde_json::from_str(&view)?;
    assert_eq!(
        view["aggregationRule"]["clusterRoleSelectors"][0]["matchLabels"]
            ["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    ok(k(&["get", "clusterrolebinding", "system:basic-user"]));
    let proxier = ok(k(&[
        "get",
        "clusterrole",
        "system:node-proxier",
        "-o",
        "json",
    ]));
    assert!(proxier.contains("endpointslices"), "{proxier}");
    let frozen = ok(k(&[
        "get",
        "clusterrole",
        "system:public-info-viewer",
        "-o",
        "json",
    ]));
    let frozen: serde_json::Value = serde_json::from_str(&frozen)?;
    assert_eq!(
        frozen["rules"],
        json!([{"nonResourceURLs": ["/healthz"], "verbs": ["get"]}])
    );
    server.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bindings_role_cannot_change() -> Result<()> {
    let s = TestServer::start().await?;
    ok(s.kubectl(
        33,
        &[
            "create",
            "rolebinding",
            "pinned",
            "--clusterrole=view",
            "--user=frank",
        ],
    ));
    let err = fails(s.kubectl(
        27,
        &[
            "patch",
            "rolebinding",
            "pinned",
            "--type=merge",
            "-p",
            r#"{"roleRef": {"name": "edit"}}"#,
        ],
    ));
    assert!(
        err.contains(
            "The RoleBinding \"pinned\" is invalid: roleRef: Invalid value: \
             rbac.RoleRef{APIGroup:\"rbac.authorization.k8s.io\", Kind:\"ClusterRole\", \
             Name:\"edit\"}: cannot change roleRef"
        ),
        "{err}"
    );
    Ok(())
}
