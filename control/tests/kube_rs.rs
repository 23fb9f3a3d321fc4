//! The API server driven by kube-rs: CRUD, metadata, concurrency, errors, selectors, paging,
//! watch, status separation, deletion semantics and garbage collection.

mod common;

use std::time::Duration;

use anyhow::Result;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::Status;
use serde_json::json;

use common::TestServer;

fn api_err(e: kube::Error) -> Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, data: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": data})).unwrap()
}

fn pod(name: &str, node: Option<&str>) -> Pod {
    let mut p = json!({"metadata": {"name": name, "labels": {"app": "t"}},
        "spec": {"containers": [{"name": "c", "image": "127.0.0.1:5000/test/busybox:latest"}]}});
    if let Some(n) = node {
        p["spec"]["nodeName"] = json!(n);
    }
    serde_json::from_value(p).unwrap()
}

fn deployment(name: &str, image: &str) -> Deployment {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": image}]}}}}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_metadata_and_conflicts() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms
        .create(&PostParams::default(), &cm("one", json!({"a": "1"})))
        .await?;
    let meta = &created.metadata;
    assert!(meta.uid.as_ref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    let rv1: i64 = meta.resource_version.as_ref().unwrap().parse()?;
    assert!(rv1 > 0);
    let e = api_err(
        cms.create(&PostParams::default(), &cm("one", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

    // Replace with the current version works and moves the global revision forward.
    let mut c = cms.get("one").await?;
    c.data.as_mut().unwrap().insert("b".into(), "2".into());
    let replaced = cms.replace("one", &PostParams::default(), &c).await?;
    let rv2: i64 = replaced
        .metadata
        .resource_version
        .as_ref()
        .unwrap()
        .parse()?;
    assert!(rv2 > rv1);
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    // The stale version is refused.
    let e = api_err(
        cms.replace("one", &PostParams::default(), &c)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));

    // Patches of each kind.
    cms.patch(
        "one",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"c": "3", "a": null}})),
    )
    .await?;
    let p: Patch<()> = Patch::Json(serde_json::from_value(
        json!([{"op": "add", "path": "/data/d", "value": "4"}]),
    )?);
    cms.patch("one", &PatchParams::default(), &p).await?;
    cms.patch(
        "one",
        &PatchParams::default(),
        &Patch::Strategic(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await?;
    let applied = cms
        .patch("two", &PatchParams::apply("test").force(), &Patch::Apply(json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "two"}, "data": {"k": "v"}})))
        .await?;
    assert_eq!(applied.data.unwrap()["k"], "v");
    // Re-applying without a field the same manager applied before removes it.
    let ssa = PatchParams::apply("test").force();
    let cfg = |labels: serde_json::Value| {
        Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "two", "labels": labels}, "data": {"k": "v"}}))
    };
    cms.patch("two", &ssa, &cfg(json!({"a": "1", "b": "2"})))
        .await?;
    cms.patch(
        "two",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"c": "3"}}})),
    )
    .await?;
    let two = cms.patch("two", &ssa, &cfg(json!({"a": "1"}))).await?;
    let labels = two.metadata.labels.unwrap();
    assert_eq!(labels.keys().cloned().collect::<Vec<_>>(), ["a", "c"]);
    let mf = two.metadata.managed_fields.unwrap();
    assert!(mf
        .iter()
        .any(|m| m.manager.as_deref() == Some("test") && m.operation.as_deref() == Some("Apply")));
    let got = cms.get("one").await?;
    let data = got.data.unwrap();
    assert_eq!(data.keys().cloned().collect::<Vec<_>>(), ["b", "c", "d"]);
    assert_eq!(got.metadata.labels.unwrap()["x"], "y");

    // Errors are Status objects.
    let e = api_err(cms.get("missing").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    assert_eq!(e.message, "configmaps \"missing\" not found");
    let e = api_err(
        cms.create(&PostParams::default(), &cm("Bad_Name", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    let nope: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    let e = api_err(
        nope.create(&PostParams::default(), &cm("x", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 404);
    assert!(
        e.message.contains("namespaces \"nope\" not found"),
        "{}",
        e.message
    );

    cms.delete("one", &DeleteParams::default()).await?;
    assert_eq!(api_err(cms.get("one").await.unwrap_err()).code, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaulting_and_allocation() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p = pods
        .create(&PostParams::default(), &pod("p1", None))
        .await?;
    let spec = p.spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirst"));
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    assert_eq!(
        spec.containers[0].image_pull_policy.as_deref(),
        Some("Always")
    );
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Pending"));
    assert_eq!(p.metadata.generation, Some(1));

    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s: Secret =
        serde_json::from_value(json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}))?;
    let s = secrets.create(&PostParams::default(), &s).await?;
    assert_eq!(s.type_.as_deref(), Some("Opaque"));
    assert_eq!(s.data.unwrap()["k"].0, b"v");

    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80}]}}))?;
    let svc = svcs.create(&PostParams::default(), &svc).await?;
    let spec = svc.spec.unwrap();
    let ip: std::net::Ipv4Addr = spec.cluster_ip.unwrap().parse()?;
    assert_eq!(ip.octets()[0], 10);
    let port = &spec.ports.unwrap()[0];
    assert!((30000..=32767).contains(&port.node_port.unwrap()));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
    );
    let k = svcs.get("kubernetes").await?;
    assert_eq!(k.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_and_status_subresource() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d = deps
        .create(&PostParams::default(), &deployment("web", "nginx:1.25"))
        .await?;
    assert_eq!(d.metadata.generation, Some(1));
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    // A label change is not a spec change.
    let d = deps
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await?;
    assert_eq!(d.metadata.generation, Some(1));
    let d = deps
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await?;
    assert_eq!(d.metadata.generation, Some(2));
    // Status written through the main resource is ignored; through /status it sticks and does
    // not bump the generation.
    let d = deps
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 7}})),
        )
        .await?;
    assert!(d.status.as_ref().and_then(|s| s.replicas).is_none());
    let d = deps
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 3, "observedGeneration": 2}})),
        )
        .await?;
    assert_eq!(d.status.unwrap().replicas, Some(3));
    assert_eq!(d.metadata.generation, Some(2));
    let d = deps
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 9}})),
        )
        .await?;
    assert_eq!(d.spec.unwrap().replicas, Some(3));
    // Scale subresource.
    let s = deps.get_scale("web").await?;
    assert_eq!(s.spec.unwrap().replicas, Some(3));
    assert_eq!(s.status.unwrap().selector.as_deref(), Some("app=web"));
    deps.patch_scale(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await?;
    assert_eq!(deps.get("web").await?.spec.unwrap().replicas, Some(5));
    // An unchanged update writes nothing.
    let before = deps.get("web").await?;
    let after = deps.replace("web", &PostParams::default(), &before).await?;
    assert_eq!(
        before.metadata.resource_version,
        after.metadata.resource_version
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_and_pagination() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..7 {
        let node = (i % 2 == 0).then_some("node-a");
        let mut p = pod(&format!("p{i}"), node);
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("idx".into(), i.to_string());
        pods.create(&PostParams::default(), &p).await?;
    }
    let on_a = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await?;
    assert_eq!(on_a.items.len(), 4);
    let unscheduled = pods
        .list(&ListParams::default().fields("spec.nodeName="))
        .await?;
    assert_eq!(unscheduled.items.len(), 3);
    let some = pods
        .list(&ListParams::default().labels("idx in (1,2,3),app=t"))
        .await?;
    assert_eq!(some.items.len(), 3);
    let by_name = pods
        .list(&ListParams::default().fields("metadata.name=p3"))
        .await?;
    assert_eq!(by_name.items.len(), 1);

    // Pages of 3, all at the first page's revision, even with writes in between.
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(3);
    let first = pods.list(&lp).await?;
    let rv = first.metadata.resource_version.clone();
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    names.extend(first.items.iter().map(|p| p.metadata.name.clone().unwrap()));
    pods.create(&PostParams::default(), &pod("p99", None))
        .await?;
    let mut token = first.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        lp = lp.continue_token(&t);
        let page = pods.list(&lp).await?;
        assert_eq!(page.metadata.resource_version, rv);
        names.extend(page.items.iter().map(|p| p.metadata.name.clone().unwrap()));
        token = page.metadata.continue_;
    }
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);
    // Filtered and paged.
    let page = pods
        .list(
            &ListParams::default()
                .fields("spec.nodeName=node-a")
                .limit(2),
        )
        .await?;
    assert_eq!(page.items.len(), 2);
    let rest = pods
        .list(
            &ListParams::default()
                .fields("spec.nodeName=node-a")
                .limit(2)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await?;
    assert_eq!(rest.items.len(), 2);
    let all: Api<Pod> = Api::all(client.clone());
    assert_eq!(all.list(&ListParams::default()).await?.items.len(), 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resume_and_gone() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let a = cms
        .create(&PostParams::default(), &cm("a", json!({"v": "1"})))
        .await?;
    let rv_a = a.metadata.resource_version.clone().unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await?;
    cms.create(&PostParams::default(), &cm("b", json!({})))
        .await?;
    cms.delete("a", &DeleteParams::default()).await?;

    // Resume after `a` was created: the three later changes, in order.
    let mut w = cms.watch(&WatchParams::default(), &rv_a).await?.boxed();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.try_next())
            .await??
            .unwrap();
        seen.push(match ev {
            WatchEvent::Added(c) => format!("ADDED {}", c.metadata.name.unwrap()),
            WatchEvent::Modified(c) => format!("MODIFIED {}", c.metadata.name.unwrap()),
            WatchEvent::Deleted(c) => format!("DELETED {}", c.metadata.name.unwrap()),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(seen, ["MODIFIED a", "ADDED b", "DELETED a"]);
    // Then live events.
    cms.create(&PostParams::default(), &cm("c", json!({})))
        .await?;
    let ev = tokio::time::timeout(Duration::from_secs(5), w.try_next())
        .await??
        .unwrap();
    assert!(matches!(ev, WatchEvent::Added(c) if c.metadata.name.as_deref() == Some("c")));

    // A label-selected watch only sees matching objects.
    let lw = cms
        .watch(&WatchParams::default().labels("pick=yes"), "0")
        .await?;
    let mut lw = lw.boxed();
    let mut d = cm("d", json!({}));
    d.metadata.labels = Some([("pick".to_string(), "yes".to_string())].into());
    cms.create(&PostParams::default(), &cm("e", json!({})))
        .await?;
    cms.create(&PostParams::default(), &d).await?;
    let ev = tokio::time::timeout(Duration::from_secs(5), lw.try_next())
        .await??
        .unwrap();
    assert!(matches!(ev, WatchEvent::Added(c) if c.metadata.name.as_deref() == Some("d")));
    // Leaving the selection is a DELETED event, entering it an ADDED one.
    let label = |v: &str| Patch::Merge(json!({"metadata": {"labels": {"pick": v}}}));
    cms.patch("d", &PatchParams::default(), &label("no"))
        .await?;
    cms.patch("e", &PatchParams::default(), &label("yes"))
        .await?;
    let next = tokio::time::timeout(Duration::from_secs(5), lw.try_next()).await??;
    assert!(
        matches!(next, Some(WatchEvent::Deleted(c)) if c.metadata.name.as_deref() == Some("d"))
    );
    let next = tokio::time::timeout(Duration::from_secs(5), lw.try_next()).await??;
    assert!(matches!(next, Some(WatchEvent::Added(c)) if c.metadata.name.as_deref() == Some("e")));

    // After compaction, an old revision is gone: 410 in the stream, as the real server.
    let store = &ts.server.as_ref().unwrap().registry.store;
    store.compact(store.current_rev()?)?;
    let mut old = cms.watch(&WatchParams::default(), &rv_a).await?.boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), old.try_next())
        .await??
        .unwrap();
    match ev {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    // A watch that times out ends with a bookmark at the newest revision it covered.
    let mut short = cms
        .watch(&WatchParams::default().timeout(1), "0")
        .await?
        .boxed();
    let mut bookmark = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), short.try_next()).await?? {
        if let WatchEvent::Bookmark(b) = ev {
            bookmark = Some(b.metadata.resource_version);
        }
    }
    let newest = cms
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap();
    let bookmark: i64 = bookmark.expect("a closing bookmark").parse()?;
    assert!(bookmark > 0 && bookmark <= newest.parse()?);
    // The streaming list (sendInitialEvents) ends its initial events with a bookmark.
    let cfg = kube::runtime::watcher::Config::default().streaming_lists();
    let mut streamed = Box::pin(kube::runtime::watcher(cms.clone(), cfg));
    let mut names = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), streamed.next())
            .await?
            .unwrap()?;
        match ev {
            kube::runtime::watcher::Event::InitApply(c) => names.push(c.metadata.name.unwrap()),
            kube::runtime::watcher::Event::InitDone => break,
            _ => {}
        }
    }
    names.sort();
    assert_eq!(names, ["b", "c", "d", "e", "kube-root-ca.crt"]);
    // kube-runtime's watcher relists and carries on.
    let stream = kube::runtime::watcher(cms.clone(), Default::default());
    let mut stream = Box::pin(stream);
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await?
        .unwrap()?;
    assert!(matches!(ev, kube::runtime::watcher::Event::Init));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_delete_finalizers_and_gc() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // A pod on a node waits for its kubelet: marked, not removed.
    pods.create(&PostParams::default(), &pod("bound", Some("n1")))
        .await?;
    pods.delete("bound", &DeleteParams::default()).await?;
    let p = pods.get("bound").await?;
    assert!(p.metadata.deletion_timestamp.is_some());
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
    pods.delete(
        "bound",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(api_err(pods.get("bound").await.unwrap_err()).code, 404);
    // Eviction is a delete (no disruption budgets): the bound pod is marked for deletion.
    // (kube-rs 5 sends its options as `delete_options`, which the real server ignores too.)
    pods.create(&PostParams::default(), &pod("evicted", Some("n1")))
        .await?;
    pods.evict("evicted", &Default::default()).await?;
    let p = pods.get("evicted").await?;
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
    // An unscheduled pod goes at once.
    pods.create(&PostParams::default(), &pod("free", None))
        .await?;
    pods.delete("free", &DeleteParams::default()).await?;
    assert_eq!(api_err(pods.get("free").await.unwrap_err()).code, 404);

    // Finalizers hold an object until removed.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut f = cm("held", json!({}));
    f.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &f).await?;
    cms.delete("held", &DeleteParams::default()).await?;
    assert!(cms.get("held").await?.metadata.deletion_timestamp.is_some());
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    assert_eq!(api_err(cms.get("held").await.unwrap_err()).code, 404);

    // Owned objects are collected when their owner goes.
    let owner = cms
        .create(&PostParams::default(), &cm("owner", json!({})))
        .await?;
    let mut dep = cm("dependent", json!({}));
    dep.metadata.owner_references = Some(vec![serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "name": "owner", "uid": owner.metadata.uid.unwrap(), "controller": true}),
    )?]);
    cms.create(&PostParams::default(), &dep).await?;
    cms.delete("owner", &DeleteParams::background()).await?;
    let mut gone = false;
    for _ in 0..50 {
        if cms.get_opt("dependent").await?.is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "dependent collected");

    // Orphan: the dependent stays, without the reference.
    let owner = cms
        .create(&PostParams::default(), &cm("owner2", json!({})))
        .await?;
    let owned_by = |o: &ConfigMap, name: &str| -> Result<ConfigMap> {
        let mut d = cm(name, json!({}));
        d.metadata.owner_references =
            Some(vec![serde_json::from_value(json!({"apiVersion": "v1",
            "kind": "ConfigMap", "name": o.metadata.name, "uid": o.metadata.uid}))?]);
        Ok(d)
    };
    cms.create(&PostParams::default(), &owned_by(&owner, "kept")?)
        .await?;
    cms.delete("owner2", &DeleteParams::orphan()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = cms.get("kept").await?;
    assert!(kept.metadata.owner_references.is_none_or(|r| r.is_empty()));

    // Foreground: the owner waits, marked, until its dependents are gone.
    let owner = cms
        .create(&PostParams::default(), &cm("owner3", json!({})))
        .await?;
    cms.create(&PostParams::default(), &owned_by(&owner, "dep3")?)
        .await?;
    cms.delete("owner3", &DeleteParams::foreground()).await?;
    let mut both_gone = false;
    for _ in 0..50 {
        if cms.get_opt("owner3").await?.is_none() {
            both_gone = cms.get_opt("dep3").await?.is_none();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        both_gone,
        "foreground deletion removed the dependent, then the owner"
    );

    // Deleting a namespace deletes its content, then the namespace.
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "tmp"}}))?,
    )
    .await?;
    let tmp: Api<ConfigMap> = Api::namespaced(client.clone(), "tmp");
    tmp.create(&PostParams::default(), &cm("x", json!({})))
        .await?;
    nss.delete("tmp", &DeleteParams::default()).await?;
    let mut gone = false;
    for _ in 0..50 {
        if nss.get_opt("tmp").await?.is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "namespace finished");
    let e = api_err(
        nss.delete("default", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert!(tmp.list(&ListParams::default()).await?.items.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_is_unauthorized_but_health_is_open() -> Result<()> {
    let ts = TestServer::start().await?;
    let kc = kube::config::Kubeconfig::read_from(&ts.kubeconfig)?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    cfg.auth_info = Default::default();
    let anon = kube::Client::try_from(cfg)?;
    let cms: Api<ConfigMap> = Api::namespaced(anon.clone(), "default");
    let e = api_err(cms.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));
    let v = anon.apiserver_version().await?;
    assert_eq!(v.minor, "33");
    let req = http::Request::get("/readyz").body(Vec::new())?;
    assert_eq!(anon.request_text(req).await?, "ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_authenticate() -> Result<()> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    // Every namespace has its default service account and the root CA config map.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    sas.get("default").await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let ca = cms.get("kube-root-ca.crt").await?;
    assert!(ca.data.unwrap()["ca.crt"].starts_with("-----BEGIN CERTIFICATE-----"));

    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "bot"}}))?,
    )
    .await?;
    let tr: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))?;
    let tr = sas
        .create_token_request("bot", &PostParams::default(), &tr)
        .await?;
    let token = tr.status.unwrap().token;

    let with_token = |t: &str| {
        let kc = ts.kubeconfig.clone();
        let t = t.to_string();
        async move {
            let kc = kube::config::Kubeconfig::read_from(&kc)?;
            let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            cfg.auth_info = serde_json::from_value(json!({"token": t}))?;
            anyhow::Ok(kube::Client::try_from(cfg)?)
        }
    };
    let bot = with_token(&token).await?;
    let pods: Api<Pod> = Api::namespaced(bot.clone(), "default");
    // Authenticated as the service account, which RBAC gives nothing on pods until bound.
    let e = api_err(pods.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(e.code, 403);
    assert!(
        e.message
            .contains("User \"system:serviceaccount:default:bot\" cannot list resource \"pods\""),
        "{}",
        e.message
    );
    let rbs: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(client.clone(), "default");
    rbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "bot-view"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": "default"}]}))?,
    )
    .await?;
    pods.list(&ListParams::default()).await?;
    // A tampered token is refused.
    // (A character in the middle of the signature: every one of its bits counts.)
    let sig_at = token.rfind('.').unwrap() + 10;
    let mut forged = token.clone().into_bytes();
    forged[sig_at] = if forged[sig_at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged)?;
    let bad: Api<Pod> = Api::namespaced(with_token(&forged).await?, "default");
    assert_eq!(
        api_err(bad.list(&ListParams::default()).await.unwrap_err()).code,
        401
    );
    // So is the token of a deleted service account.
    sas.delete("bot", &DeleteParams::default()).await?;
    assert_eq!(
        api_err(pods.list(&ListParams::default()).await.unwrap_err()).code,
        401
    );
    // Too short a lifetime is invalid.
    let short: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 60}}))?;
    let e = api_err(
        sas.create_token_request("default", &PostParams::default(), &short)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_generate_name_collections_and_bad_requests() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let d = cms.create(&dry, &cm("dry", json!({}))).await?;
    assert!(d.metadata.uid.is_some());
    assert!(
        cms.get_opt("dry").await?.is_none(),
        "dry run writes nothing"
    );

    let mut g = cm("", json!({}));
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let made = cms.create(&PostParams::default(), &g).await?;
    let name = made.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    for (n, l) in [("a", "x"), ("b", "x"), ("c", "y")] {
        let mut c = cm(n, json!({}));
        c.metadata.labels = Some([("grp".to_string(), l.to_string())].into());
        cms.create(&PostParams::default(), &c).await?;
    }
    let gone = cms
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("grp=x"),
        )
        .await?;
    // The answer lists the deleted objects, in list order.
    let gone: Vec<String> = gone
        .left()
        .expect("a list of the deleted objects")
        .items
        .into_iter()
        .map(|c| c.metadata.name.unwrap_or_default())
        .collect();
    assert_eq!(gone, ["a", "b"]);
    let left = cms.list(&ListParams::default().labels("grp")).await?;
    assert_eq!(left.items.len(), 1);

    // Raw requests: a malformed body, a wrong kind, an unknown path, a wrong method.
    let raw = |method: &str, path: &str, body: &str| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(body.as_bytes().to_vec())
            .unwrap()
    };
    let status = |r: kube::Result<String>| match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone()),
        other => panic!("expected a Status error, got {other:?}"),
    };
    let base = "/api/v1/namespaces/default/configmaps";
    assert_eq!(
        status(client.request_text(raw("POST", base, "{not json")).await),
        (400, "BadRequest".into())
    );
    let wrong = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"w"}}"#;
    assert_eq!(
        status(client.request_text(raw("POST", base, wrong)).await),
        (400, "BadRequest".into())
    );
    assert_eq!(
        status(client.request_text(raw("GET", "/api/v1/widgets", "")).await),
        (404, "NotFound".into())
    );
    assert_eq!(
        status(
            client
                .request_text(raw(
                    "GET",
                    "/apis/apps/v1/namespaces/default/deployments/x/nope",
                    ""
                ))
                .await
        )
        .0,
        404
    );
    assert_eq!(
        status(client.request_text(raw("PUT", base, "{}")).await).0,
        405
    );
    let bad_sel = format!("{base}?labelSelector=a%20b");
    assert_eq!(
        status(client.request_text(raw("GET", &bad_sel, "")).await).0,
        400
    );
    Ok(())
}

/// Optimistic concurrency under contention: concurrent read-modify-write loops that retry on
/// 409 lose no increment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_lose_nothing() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("counter", json!({"n": "0"})))
        .await?;
    let (workers, per) = (6, 15);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let cms = cms.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..per {
                loop {
                    let mut c = cms.get("counter").await?;
                    let data = c.data.as_mut().unwrap();
                    let n: i64 = data["n"].parse().unwrap();
                    data.insert("n".into(), (n + 1).to_string());
                    match cms.replace("counter", &PostParams::default(), &c).await {
                        Ok(_) => break,
                        Err(kube::Error::Api(s)) if s.code == 409 => conflicts += 1,
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok::<_, kube::Error>(conflicts)
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await??;
    }
    let n = cms.get("counter").await?.data.unwrap()["n"].clone();
    assert_eq!(
        n,
        (workers * per).to_string(),
        "after {conflicts} conflicts"
    );
    Ok(())
}
