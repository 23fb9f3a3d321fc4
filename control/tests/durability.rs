//! kill -9 of the server process loses nothing it acknowledged; a restart resumes with the same
//! resourceVersions, the same CA and a revision counter that keeps going up.

mod common;

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_every_acknowledged_write() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kc = dir.path().join("admin.kubeconfig");
    let ca_before;
    let mut acked = Vec::new();
    {
        let proc = common::spawn_apiserver(dir.path())?;
        ca_before = std::fs::read(dir.path().join("data/pki/ca.crt"))?;
        let client = common::client_for(&kc).await?;
        let cms: Api<ConfigMap> = Api::namespaced(client, "default");
        // Writers run concurrently; the kill lands while some are in flight.
        let mut tasks = Vec::new();
        for w in 0..4 {
            let cms = cms.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0..1000 {
                    let name = format!("w{w}-{i}");
                    let cm: ConfigMap = serde_json::from_value(
                        json!({"metadata": {"name": name}, "data": {"i": i.to_string()}}),
                    )
                    .unwrap();
                    match cms.create(&PostParams::default(), &cm).await {
                        Ok(c) => done.push((name, c.metadata.resource_version.unwrap())),
                        Err(_) => break,
                    }
                }
                done
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(proc); // SIGKILL
        for t in tasks {
            acked.extend(t.await?);
        }
    }
    eprintln!("{} writes acknowledged before the kill", acked.len());
    assert!(
        acked.len() > 20,
        "some writes were acknowledged before the kill ({})",
        acked.len()
    );

    let _proc = common::spawn_apiserver(dir.path())?;
    assert_eq!(
        std::fs::read(dir.path().join("data/pki/ca.crt"))?,
        ca_before,
        "CA kept"
    );
    let client = common::client_for(&kc).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let list = cms.list(&ListParams::default()).await?;
    let stored: std::collections::HashMap<String, String> = list
        .items
        .iter()
        .map(|c| {
            (
                c.metadata.name.clone().unwrap(),
                c.metadata.resource_version.clone().unwrap(),
            )
        })
        .collect();
    let mut max_rv = 0i64;
    for (name, rv) in &acked {
        assert_eq!(
            stored.get(name),
            Some(rv),
            "{name} survives with its resourceVersion"
        );
        max_rv = max_rv.max(rv.parse()?);
    }
    let after = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "after"}}))?,
        )
        .await?;
    assert!(after.metadata.resource_version.unwrap().parse::<i64>()? > max_rv);
    Ok(())
}
