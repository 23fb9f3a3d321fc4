//! Authorization cost: the same load (GET of one ConfigMap, 8 concurrent clients over the real
//! HTTPS path with kube-rs) as the admin (`system:masters`, no RBAC evaluation) and as a user
//! whose access comes from RBAC, with 300 ClusterRoles, 300 RoleBindings and 100
//! ClusterRoleBindings in the store (20 of the bindings the user's own). Rounds alternate to
//! even out the shared machine's noise; prints requests/s of each and their ratio
//! (`cargo test --release --workspace --test bench_rbac -- --nocapture`).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::api::{Api, PostParams};
use serde_json::json;

const ROLES: usize = 300;
const BINDINGS: usize = 300;
const CLUSTER_BINDINGS: usize = 100;
const OWN_BINDINGS: usize = 20;
const CLIENTS: usize = 8;
const ROUND: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

async fn round(cms: &Api<ConfigMap>) -> Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (cms, count) = (cms.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < ROUND {
                cms.get("target").await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, kube::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_rbac_against_admin() -> Result<()> {
    let ts = common::TestServer::start().await?;
    let admin = ts.client().await?;
    let pp = PostParams::default();
    let ns = "bench";
    ts.kubectl(33, &["create", "namespace", ns]);
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), ns);
    cms.create(
        &pp,
        &obj(json!({"metadata": {"name": "target"}, "data": {"k": "v"}})),
    )
    .await?;
    let croles: Api<ClusterRole> = Api::all(admin.clone());
    for i in 0..ROLES {
        let r = json!({"metadata": {"name": format!("bench-role-{i}")}, "rules": [
            {"apiGroups": ["example.com"], "resources": [format!("things{i}"), "others"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods"], "resourceNames": [format!("p{i}")], "verbs": ["get"]}]});
        croles.create(&pp, &obj(r)).await?;
    }
    croles
        .create(
            &pp,
            &obj(json!({"metadata": {"name": "bench-cm-reader"}, "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]})),
        )
        .await?;
    let rbs: Api<RoleBinding> = Api::namespaced(admin.clone(), ns);
    for i in 0..BINDINGS {
        // The user's own bindings come first among them, to unrelated roles: every request
        // scans their rules before the one that allows it.
        let user = if i < OWN_BINDINGS {
            "bench-user".to_string()
        } else {
            format!("user-{i}")
        };
        let b = json!({"metadata": {"name": format!("bench-rb-{i}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("bench-role-{}", i % ROLES)},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user},
                         {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": format!("group-{}", i % 17)}]});
        rbs.create(&pp, &obj(b)).await?;
    }
    rbs.create(&pp, &obj(json!({"metadata": {"name": "bench-user-cm"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "bench-cm-reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bench-user"}]})))
        .await?;
    let crbs: Api<ClusterRoleBinding> = Api::all(admin.clone());
    for i in 0..CLUSTER_BINDINGS {
        let b = json!({"metadata": {"name": format!("bench-crb-{i}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("bench-role-{i}")},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": format!("cluster-user-{i}")}]});
        crbs.create(&pp, &obj(b)).await?;
    }
    let user_kc = ts.user_kubeconfig("bench-user", &["bench-group"])?;
    let user = common::client_for(&user_kc).await?;
    let user_cms: Api<ConfigMap> = Api::namespaced(user, ns);
    // Warm both paths (connections, TLS sessions).
    round(&cms).await?;
    round(&user_cms).await?;
    let (mut a, mut r) = (0.0, 0.0);
    for _ in 0..ROUNDS {
        a += round(&cms).await?;
        r += round(&user_cms).await?;
    }
    let (a, r) = (a / ROUNDS as f64, r / ROUNDS as f64);
    println!(
        "GET configmap, {CLIENTS} clients, {ROUNDS} x {}s each: admin (system:masters) {a:.0} req/s, \
         RBAC user ({} roles, {} bindings) {r:.0} req/s, ratio {:.3}",
        ROUND.as_secs(),
        ROLES + 1,
        BINDINGS + CLUSTER_BINDINGS + 1,
        r / a
    );
    Ok(())
}
