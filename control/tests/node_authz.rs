//! Node authorization through the real server, with kube-rs and kubectl clients holding node
//! certificates for "n1" and "n2": a node reads what its pods need and writes its own Node,
//! Lease, pods' status and events; everything else is 403, worded as kube-apiserver words it,
//! and a refused write changes nothing.

mod common;

use std::fmt::Debug;

use anyhow::Result;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Event, Namespace, Node, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::Status;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use common::TestServer;

fn obj<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

/// The Status of a refused request, checked to be kube-apiserver's 403 with `message`.
#[track_caller]
fn forbidden<T: Debug>(r: kube::Result<T>, message: &str) -> Status {
    let s = match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected 403 {message:?}, got {other:?}"),
    };
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"), "{s:?}");
    assert_eq!(s.message, message);
    s
}

#[track_caller]
fn not_found<T: Debug>(r: kube::Result<T>) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        other => panic!("expected 404, got {other:?}"),
    }
}

/// kube-apiserver's authorizer message for a refused request.
fn cannot(node: &str, verb: &str, resource: &str, ns: Option<&str>, why: &str) -> String {
    let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
    let scope = match ns {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".into(),
    };
    let mut m = format!(
        "User \"system:node:{node}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}"
    );
    if !why.is_empty() {
        m = format!("{m}: {why}");
    }
    m
}

fn no_relationship(node: &str) -> String {
    format!("no relationship found between node '{node}' and this object")
}

/// A pod bound to `node`; `spec` may hold `envFrom` for its one container.
fn pod(name: &str, node: &str, mut spec: Value) -> Pod {
    let mut c = json!({"name": "c", "image": "127.0.0.1:5000/test/busybox:latest"});
    if let Some(env_from) = spec.as_object_mut().and_then(|s| s.remove("envFrom")) {
        c["envFrom"] = env_from;
    }
    spec["nodeName"] = json!(node);
    spec["containers"] = json!([c]);
    obj(json!({"metadata": {"name": name}, "spec": spec}))
}

/// The workload of the read tests: pod `<p>-1` on n1 uses secret `<p>-tls`, config map
/// `<p>-settings` and service account `<p>-runner`; pod `<p>-2` on n2 uses nothing.
async fn workload(admin: &kube::Client, p: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "default");
    for s in [format!("{p}-tls"), format!("{p}-other")] {
        secrets
            .create(
                &PostParams::default(),
                &obj(json!({"metadata": {"name": s}, "stringData": {"k": "v"}})),
            )
            .await?;
    }
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), "default");
    cms.create(
        &PostParams::default(),
        &obj(json!({"metadata": {"name": format!("{p}-settings")}, "data": {"a": "1"}})),
    )
    .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
    sas.create(
        &PostParams::default(),
        &obj(json!({"metadata": {"name": format!("{p}-runner")}})),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let spec = json!({"serviceAccountName": format!("{p}-runner"),
        "volumes": [{"name": "tls", "secret": {"secretName": format!("{p}-tls")}}],
        "envFrom": [{"configMapRef": {"name": format!("{p}-settings")}}]});
    pods.create(&PostParams::default(), &pod(&format!("{p}-1"), "n1", spec))
        .await?;
    pods.create(
        &PostParams::default(),
        &pod(&format!("{p}-2"), "n2", json!({})),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reads_only_what_its_pods_need() -> Result<()> {
    let ts = TestServer::start().await?;
    let admin = ts.client().await?;
    let (n1, n2) = (ts.node_client("n1").await?, ts.node_client("n2").await?);
    let p = "rd";
    workload(&admin, p).await?;
    let (p1, p2) = (format!("{p}-1"), format!("{p}-2"));

    // Cluster-wide reads a node's agent and proxy need.
    Api::<Node>::all(n1.clone())
        .list(&ListParams::default())
        .await?;
    Api::<Namespace>::all(n1.clone())
        .list(&ListParams::default())
        .await?;
    Api::<Namespace>::all(n1.clone()).get("default").await?;
    let svcs = Api::<Service>::all(n1.clone())
        .list(&ListParams::default())
        .await?;
    assert!(svcs
        .items
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some("kubernetes")));
    Api::<Endpoints>::all(n1.clone())
        .list(&ListParams::default())
        .await?;
    Api::<EndpointSlice>::all(n1.clone())
        .list(&ListParams::default())
        .await?;

    // Pods: its own, and lists only with the spec.nodeName selector.
    let pods1: Api<Pod> = Api::namespaced(n1.clone(), "default");
    pods1.get(&p1).await?;
    let s = forbidden(
        pods1.get(&p2).await,
        &format!(
            "pods \"{p2}\" is forbidden: User \"system:node:n1\" cannot get resource \"pods\" in API \
             group \"\" in the namespace \"default\": no relationship found between node 'n1' and \
             this object"
        ),
    );
    let d = s.details.expect("details");
    assert_eq!((d.name.as_str(), d.kind.as_str()), (p2.as_str(), "pods"));
    let all1: Api<Pod> = Api::all(n1.clone());
    let why = "can only list/watch pods with spec.nodeName field selector";
    let s = forbidden(
        all1.list(&ListParams::default()).await,
        &format!(
            "pods is forbidden: {}",
            cannot("n1", "list", "pods", None, why)
        ),
    );
    assert_eq!(s.details.expect("details").kind, "pods");
    forbidden(
        pods1.list(&ListParams::default()).await,
        &format!(
            "pods is forbidden: {}",
            cannot("n1", "list", "pods", Some("default"), why)
        ),
    );
    forbidden(
        all1.list(&ListParams::default().fields("spec.nodeName=n2"))
            .await,
        &format!(
            "pods is forbidden: {}",
            cannot("n1", "list", "pods", None, why)
        ),
    );
    let mine = all1
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await?;
    let names: Vec<_> = mine
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, [p1.as_str()]);
    // A list pinned to one pod by name is a read of that pod.
    let one = pods1
        .list(&ListParams::default().fields(&format!("metadata.name={p1}")))
        .await?;
    assert_eq!(one.items.len(), 1);
    forbidden(
        pods1
            .list(&ListParams::default().fields(&format!("metadata.name={p2}")))
            .await,
        &format!(
            "pods \"{p2}\" is forbidden: {}",
            cannot(
                "n1",
                "list",
                "pods",
                Some("default"),
                &no_relationship("n1")
            )
        ),
    );
    forbidden(
        all1.watch(&WatchParams::default(), "0").await.map(|_| ()),
        &format!(
            "pods is forbidden: {}",
            cannot("n1", "watch", "pods", None, why)
        ),
    );
    let mut w = all1
        .watch(&WatchParams::default().fields("spec.nodeName=n1"), "0")
        .await?
        .boxed();
    match w.try_next().await? {
        Some(WatchEvent::Added(p)) => assert_eq!(p.metadata.name.as_deref(), Some(p1.as_str())),
        other => panic!("expected the pod on n1, got {other:?}"),
    }
    drop(w);

    // Secrets, config maps and service accounts: those its pods use, one at a time.
    let secrets1: Api<Secret> = Api::namespaced(n1.clone(), "default");
    let secrets2: Api<Secret> = Api::namespaced(n2.clone(), "default");
    let tls = format!("{p}-tls");
    let got = secrets1.get(&tls).await?;
    assert_eq!(got.data.unwrap()["k"].0, b"v");
    let msg = |node: &str, name: &str, verb: &str, res: &str, why: &str| {
        let (plural, _) = res.split_once('.').unwrap_or((res, ""));
        let who = if name.is_empty() {
            format!("{plural} is forbidden")
        } else {
            format!("{plural} \"{name}\" is forbidden")
        };
        format!("{who}: {}", cannot(node, verb, res, Some("default"), why))
    };
    forbidden(
        secrets2.get(&tls).await,
        &msg("n2", &tls, "get", "secrets", &no_relationship("n2")),
    );
    let other = format!("{p}-other");
    forbidden(
        secrets1.get(&other).await,
        &msg("n1", &other, "get", "secrets", &no_relationship("n1")),
    );
    forbidden(
        secrets1.list(&ListParams::default()).await,
        &msg("n1", "", "list", "secrets", "No Object name found"),
    );
    // The kubelet's watch-based secret manager: a list and watch pinned to one referenced name.
    let pinned = ListParams::default().fields(&format!("metadata.name={tls}"));
    let listed = secrets1.list(&pinned).await?;
    assert_eq!(listed.items.len(), 1);
    let mut events = secrets1
        .watch(
            &WatchParams::default().fields(&format!("metadata.name={tls}")),
            "0",
        )
        .await?
        .boxed();
    match events.try_next().await? {
        Some(WatchEvent::Added(s)) => assert_eq!(s.metadata.name.as_deref(), Some(tls.as_str())),
        other => panic!("expected the pinned secret, got {other:?}"),
    }
    forbidden(
        secrets2.list(&pinned).await,
        &msg("n2", &tls, "list", "secrets", &no_relationship("n2")),
    );
    let settings = format!("{p}-settings");
    Api::<ConfigMap>::namespaced(n1.clone(), "default")
        .get(&settings)
        .await?;
    forbidden(
        Api::<ConfigMap>::namespaced(n2.clone(), "default")
            .get(&settings)
            .await,
        &msg("n2", &settings, "get", "configmaps", &no_relationship("n2")),
    );
    let runner = format!("{p}-runner");
    let sas1: Api<ServiceAccount> = Api::namespaced(n1.clone(), "default");
    let sas2: Api<ServiceAccount> = Api::namespaced(n2.clone(), "default");
    sas1.get(&runner).await?;
    forbidden(
        sas2.get(&runner).await,
        &msg(
            "n2",
            &runner,
            "get",
            "serviceaccounts",
            &no_relationship("n2"),
        ),
    );

    // Tokens for the service accounts of its pods, bound to those pods only.
    let pod1 = Api::<Pod>::namespaced(admin.clone(), "default")
        .get(&p1)
        .await?;
    let bound = |pod: &str, uid: &str| -> TokenRequest {
        obj(json!({"spec": {"audiences": [], "boundObjectRef":
            {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}}}))
    };
    let uid1 = pod1.metadata.uid.clone().unwrap();
    let tr = sas1
        .create_token_request(&runner, &PostParams::default(), &bound(&p1, &uid1))
        .await?;
    assert!(!tr.status.unwrap().token.is_empty());
    let unbound: TokenRequest = obj(json!({"spec": {"audiences": []}}));
    sas1.create_token_request(&runner, &PostParams::default(), &unbound)
        .await?;
    forbidden(
        sas2.create_token_request(&runner, &PostParams::default(), &unbound)
            .await,
        &msg(
            "n2",
            &runner,
            "create",
            "serviceaccounts/token",
            &no_relationship("n2"),
        )
        .replace("serviceaccounts/token \"", "serviceaccounts \""),
    );
    // n2's pod runs as `default`, but a token bound to n1's pod is not n2's to ask for.
    sas2.create_token_request("default", &PostParams::default(), &unbound)
        .await?;
    forbidden(
        sas2.create_token_request("default", &PostParams::default(), &bound(&p1, &uid1))
            .await,
        "serviceaccounts \"default\" is forbidden: node requested token bound to a pod scheduled \
         on a different node",
    );

    // Once the pod is gone, so is the node's access to what it used.
    Api::<Pod>::namespaced(admin.clone(), "default")
        .delete(&p1, &DeleteParams::default().grace_period(0))
        .await?;
    not_found(
        Api::<Pod>::namespaced(admin.clone(), "default")
            .get(&p1)
            .await,
    );
    forbidden(
        secrets1.get(&tls).await,
        &msg("n1", &tls, "get", "secrets", &no_relationship("n1")),
    );
    forbidden(
        pods1.get(&p1).await,
        &msg("n1", &p1, "get", "pods", &no_relationship("n1")),
    );
    Api::<Pod>::namespaced(admin.clone(), "default")
        .delete(&p2, &DeleteParams::default().grace_period(0))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_writes_only_its_own_objects() -> Result<()> {
    let ts = TestServer::start().await?;
    let admin = ts.client().await?;
    let n1 = ts.node_client("n1").await?;
    let p = "wr";

    // Its Node and the node's status; not another's.
    let nodes1: Api<Node> = Api::all(n1.clone());
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes1
        .create(
            &PostParams::default(),
            &obj(json!({"metadata": {"name": "n1"}})),
        )
        .await?;
    let other = format!("{p}-n3");
    forbidden(
        nodes1
            .create(
                &PostParams::default(),
                &obj(json!({"metadata": {"name": other}})),
            )
            .await,
        &format!(
            "nodes \"{other}\" is forbidden: node \"n1\" is not allowed to modify node \"{other}\""
        ),
    );
    not_found(nodes.get(&other).await);
    nodes1
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"ready": "yes"}}})),
        )
        .await?;
    let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    nodes1
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(&ready))
        .await?;
    nodes
        .create(
            &PostParams::default(),
            &obj(json!({"metadata": {"name": "n2"}})),
        )
        .await?;
    let before = nodes.get("n2").await?;
    let not_yours = "nodes \"n2\" is forbidden: node \"n1\" is not allowed to modify node \"n2\"";
    forbidden(
        nodes1
            .patch(
                "n2",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
        not_yours,
    );
    forbidden(
        nodes1
            .patch_status("n2", &PatchParams::default(), &Patch::Merge(&ready))
            .await,
        not_yours,
    );
    let after = nodes.get("n2").await?;
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert_eq!(after.metadata.labels, None);
    forbidden(
        nodes1.delete("n1", &DeleteParams::default()).await,
        &format!(
            "nodes \"n1\" is forbidden: {}",
            cannot("n1", "delete", "nodes", None, "")
        ),
    );
    assert_eq!(
        nodes.get("n1").await?.metadata.labels.unwrap()["ready"],
        "yes"
    );

    // Its Lease, in kube-node-lease.
    let leases1: Api<Lease> = Api::namespaced(n1.clone(), "kube-node-lease");
    let lease = |name: &str| -> Lease {
        obj(
            json!({"metadata": {"name": name}, "spec": {"holderIdentity": name, "leaseDurationSeconds": 40}}),
        )
    };
    leases1.create(&PostParams::default(), &lease("n1")).await?;
    leases1
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"renewTime": "2026-01-01T00:00:00.000000Z"}})),
        )
        .await?;
    let same_name = "can only access node lease with the same name as the requesting node";
    forbidden(
        leases1.create(&PostParams::default(), &lease("n2")).await,
        &format!("leases.coordination.k8s.io \"n2\" is forbidden: {same_name}"),
    );
    not_found(
        Api::<Lease>::namespaced(admin.clone(), "kube-node-lease")
            .get("n2")
            .await,
    );
    forbidden(
        Api::<Lease>::namespaced(n1.clone(), "default")
            .create(&PostParams::default(), &lease("n1"))
            .await,
        &format!(
            "leases.coordination.k8s.io is forbidden: {}",
            cannot(
                "n1",
                "create",
                "leases.coordination.k8s.io",
                Some("default"),
                "can only access leases in the \"kube-node-lease\" system namespace"
            )
        ),
    );
    leases1.delete("n1", &DeleteParams::default()).await?;

    // Its pods' status, and deleting its pods; never another node's, never creating one.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let pods1: Api<Pod> = Api::namespaced(n1.clone(), "default");
    let (p1, p2) = (format!("{p}-1"), format!("{p}-2"));
    pods.create(&PostParams::default(), &pod(&p1, "n1", json!({})))
        .await?;
    pods.create(&PostParams::default(), &pod(&p2, "n2", json!({})))
        .await?;
    let running = Patch::Merge(json!({"status": {"phase": "Running"}}));
    let r = pods1
        .patch_status(&p1, &PatchParams::default(), &running)
        .await?;
    assert_eq!(r.status.unwrap().phase.as_deref(), Some("Running"));
    let before = pods.get(&p2).await?;
    forbidden(
        pods1
            .patch_status(&p2, &PatchParams::default(), &running)
            .await,
        &format!(
            "pods \"{p2}\" is forbidden: node \"n1\" can only update pod status for pods with \
             spec.nodeName set to itself"
        ),
    );
    forbidden(
        pods1
            .patch(
                &p1,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
        &format!(
            "pods \"{p1}\" is forbidden: {}",
            cannot("n1", "patch", "pods", Some("default"), "")
        ),
    );
    let fresh = format!("{p}-new");
    forbidden(
        pods1
            .create(&PostParams::default(), &pod(&fresh, "n1", json!({})))
            .await,
        // NodeRestriction's words: a node creates mirror pods only.
        &format!(
            "pods \"{fresh}\" is forbidden: pod does not have \"kubernetes.io/config.mirror\" \
             annotation, node \"n1\" can only create mirror pods"
        ),
    );
    not_found(pods.get(&fresh).await);
    forbidden(
        pods1
            .delete(&p2, &DeleteParams::default().grace_period(0))
            .await,
        &format!(
            "pods \"{p2}\" is forbidden: node \"n1\" can only delete pods with spec.nodeName set \
             to itself"
        ),
    );
    let after = pods.get(&p2).await?;
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert!(after.metadata.deletion_timestamp.is_none());
    assert_eq!(after.status.unwrap().phase.as_deref(), Some("Pending"));
    pods1
        .delete(&p1, &DeleteParams::default().grace_period(0))
        .await?;
    not_found(pods.get(&p1).await);
    pods.delete(&p2, &DeleteParams::default().grace_period(0))
        .await?;

    // Events: written, not read.
    let events1: Api<Event> = Api::namespaced(n1.clone(), "default");
    let ev = format!("{p}-event");
    events1
        .create(
            &PostParams::default(),
            &obj(json!({"metadata": {"name": ev},
                "involvedObject": {"kind": "Node", "name": "n1"},
                "reason": "Starting", "message": "kubelet started", "type": "Normal"})),
        )
        .await?;
    events1
        .patch(
            &ev,
            &PatchParams::default(),
            &Patch::Merge(json!({"count": 2})),
        )
        .await?;
    forbidden(
        events1.get(&ev).await,
        &format!(
            "events \"{ev}\" is forbidden: {}",
            cannot("n1", "get", "events", Some("default"), "")
        ),
    );

    // Nothing else.
    let secret = format!("{p}-secret");
    forbidden(
        Api::<Secret>::namespaced(n1.clone(), "default")
            .create(
                &PostParams::default(),
                &obj(json!({"metadata": {"name": secret}})),
            )
            .await,
        &format!(
            "secrets is forbidden: {}",
            cannot(
                "n1",
                "create",
                "secrets",
                Some("default"),
                "can only read resources of this type"
            )
        ),
    );
    not_found(
        Api::<Secret>::namespaced(admin.clone(), "default")
            .get(&secret)
            .await,
    );
    let deploy = format!("{p}-deploy");
    let d: Deployment = obj(json!({"metadata": {"name": deploy}, "spec": {
        "selector": {"matchLabels": {"app": "x"}},
        "template": {"metadata": {"labels": {"app": "x"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}}}}));
    let deploys1: Api<Deployment> = Api::namespaced(n1.clone(), "default");
    forbidden(
        deploys1.create(&PostParams::default(), &d).await,
        &format!(
            "deployments.apps is forbidden: {}",
            cannot("n1", "create", "deployments.apps", Some("default"), "")
        ),
    );
    not_found(
        Api::<Deployment>::namespaced(admin.clone(), "default")
            .get(&deploy)
            .await,
    );
    forbidden(
        deploys1.list(&ListParams::default()).await,
        &format!(
            "deployments.apps is forbidden: {}",
            cannot("n1", "list", "deployments.apps", Some("default"), "")
        ),
    );
    forbidden(
        Api::<Service>::namespaced(n1.clone(), "default")
            .delete("kubernetes", &DeleteParams::default())
            .await,
        &format!(
            "services \"kubernetes\" is forbidden: {}",
            cannot("n1", "delete", "services", Some("default"), "")
        ),
    );
    Api::<Service>::namespaced(admin.clone(), "default")
        .get("kubernetes")
        .await?;
    nodes.delete("n1", &DeleteParams::default()).await?;
    nodes.delete("n2", &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_can_i_answers_for_a_node() -> Result<()> {
    let ts = TestServer::start().await?;
    let admin = ts.client().await?;
    workload(&admin, "ci").await?;
    let kc = ts.node_kubeconfig("n1")?;
    let can_i = |args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let out = common::kubectl(&kc, 33, &all, None);
        let text = common::stdout(&out).trim().to_string();
        // kubectl exits 0 for yes and 1 for no.
        assert_eq!(
            out.status.success(),
            text == "yes",
            "{text}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    assert_eq!(can_i(&["get", "nodes"]), "yes");
    assert_eq!(can_i(&["list", "services"]), "yes");
    let no = can_i(&["get", "secrets"]);
    assert!(no.starts_with("no"), "{no}");
    assert_eq!(can_i(&["get", "secrets/ci-tls"]), "yes");
    assert!(can_i(&["get", "secrets/ci-other"]).starts_with("no"));
    assert_eq!(can_i(&["get", "pods/ci-1"]), "yes");
    assert!(can_i(&["get", "pods/ci-2"]).starts_with("no"));
    assert!(can_i(&["list", "pods"]).starts_with("no"));
    assert!(can_i(&["create", "deployments"]).starts_with("no"));
    assert_eq!(
        can_i(&["update", "leases/n1", "-n", "kube-node-lease"]),
        "yes"
    );
    assert!(can_i(&["update", "leases/n2", "-n", "kube-node-lease"]).starts_with("no"));
    // The admin is still allowed everything.
    let out = ts.kubectl(33, &["auth", "can-i", "get", "secrets"]);
    assert_eq!(common::ok(out).trim(), "yes");
    Ok(())
}

#[tokio::test]
async fn node_kubeconfig_needs_a_ca_and_a_valid_name() -> Result<()> {
    let empty = tempfile::tempdir()?;
    let err = control::certs::Pki::new(empty.path())
        .write_node_kubeconfig("n1", "https://127.0.0.1:6443", &empty.path().join("kc"))
        .unwrap_err();
    assert!(err.to_string().contains("run `oxlet up`"), "{err}");
    assert!(!empty.path().join("kc").exists());
    let ts = TestServer::start().await?;
    let pki = control::certs::Pki::new(&ts.dir.path().join("data"));
    let to = ts.dir.path().join("bad.kubeconfig");
    let err = pki
        .write_node_kubeconfig("Node_1", "https://127.0.0.1:6443", &to)
        .unwrap_err();
    assert!(err.to_string().contains("invalid node name"), "{err}");
    assert!(!to.exists());
    Ok(())
}
