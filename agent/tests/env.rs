//! Container environments as kubelet makes them, read back from the containers' own output:
//! secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef, envFrom with a prefix, `$(VAR)`
//! expansion, Service variables; a missing key is CreateContainerConfigError until it is added.
//! Objects are made with the real kubectl. Root; needs `tests/testbed/up`.

mod common;

use anyhow::Result;
use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// `NAME=value` lines of an `env` dump between the markers the container prints.
fn env_of(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .skip_while(|l| *l != "--env--")
        .skip(1)
        .take_while(|l| *l != "--end--")
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_from_secrets_config_maps_fields_resources_and_services() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.kubectl(
        33,
        &[
            "create",
            "secret",
            "generic",
            "backend-user",
            "--from-literal=backend-username=backend-admin",
        ],
        None,
    )?;
    c.kubectl(
        33,
        &[
            "create",
            "configmap",
            "special-config",
            "--from-literal=special.how=very",
            "--from-literal=SPECIAL_TYPE=charm",
        ],
        None,
    )?;
    c.kubectl(
        33,
        &[
            "create",
            "service",
            "clusterip",
            "redis-primary",
            "--tcp=6379:6379",
        ],
        None,
    )?;
    let svc = c.kubectl(
        33,
        &[
            "get",
            "service",
            "redis-primary",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    )?;
    let pod = json!({
        "metadata": {"name": "envars", "labels": {"app": "envars-demo"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "serviceAccountName": "default",
            "containers": [{
                "name": "c",
                "image": busybox(),
                "command": ["sh", "-c", "echo --env--; env; echo --end--; echo \"$(MESSAGE) via $(MY_POD_NAME)\"; sleep 3600"],
                "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "250m", "memory": "32Mi"}},
                "envFrom": [{"configMapRef": {"name": "special-config"}, "prefix": "CONFIG_"},
                            {"secretRef": {"name": "not-there", "optional": true}}],
                "env": [
                    {"name": "SECRET_USERNAME", "valueFrom": {"secretKeyRef": {"name": "backend-user", "key": "backend-username"}}},
                    {"name": "SPECIAL_LEVEL_KEY", "valueFrom": {"configMapKeyRef": {"name": "special-config", "key": "special.how"}}},
                    {"name": "OPTIONAL_MISSING", "valueFrom": {"configMapKeyRef": {"name": "special-config", "key": "nope", "optional": true}}},
                    {"name": "MY_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "MY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "MY_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "MY_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                    {"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "MY_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                    {"name": "MY_POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                    {"name": "MY_APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "MY_CPU_REQUEST", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
                    {"name": "MY_CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                    {"name": "MY_MEM_LIMIT", "valueFrom": {"resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}}},
                    {"name": "MY_MEM_REQUEST", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory"}}},
                    {"name": "GREETING", "value": "Warm greetings to"},
                    {"name": "HONORIFIC", "value": "The Most Honorable"},
                    {"name": "NAME", "value": "Kubernetes"},
                    {"name": "MESSAGE", "value": "$(GREETING) $(HONORIFIC) $(NAME)"},
                    {"name": "UNCHANGED_REFERENCE", "value": "$(PROTOCOL)://172.17.0.1:80"},
                    {"name": "PROTOCOL", "value": "https"},
                    {"name": "ESCAPED_REFERENCE", "value": "$$(PROTOCOL)://172.17.0.1:80"},
                    {"name": "SERVICE_ADDRESS", "value": "$(REDIS_PRIMARY_SERVICE_HOST):$(REDIS_PRIMARY_SERVICE_PORT)"}
                ]
            }]
        }
    });
    c.create_pod(pod).await?;
    let running = c
        .wait_pod("envars", Duration::from_secs(60), "Running", |p| {
            phase(p) == "Running"
        })
        .await?;
    let log = c
        .wait_log("envars", "c", Duration::from_secs(20), |l| {
            l.contains(" via ")
        })
        .await?;
    let env = env_of(&log);
    let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("<unset>");
    assert_eq!(get("SECRET_USERNAME"), "backend-admin");
    assert_eq!(get("SPECIAL_LEVEL_KEY"), "very");
    assert_eq!(get("CONFIG_SPECIAL_TYPE"), "charm");
    assert_eq!(get("OPTIONAL_MISSING"), "<unset>");
    assert_eq!(get("MY_NODE_NAME"), c.node);
    assert_eq!(get("MY_POD_NAME"), "envars");
    assert_eq!(get("MY_POD_NAMESPACE"), "default");
    assert_eq!(get("MY_POD_UID"), running.metadata.uid.as_deref().unwrap());
    let status = running.status.clone().unwrap();
    assert_eq!(get("MY_POD_IP"), status.pod_ip.as_deref().unwrap());
    assert_eq!(get("MY_HOST_IP"), status.host_ip.as_deref().unwrap());
    assert_eq!(get("MY_POD_SERVICE_ACCOUNT"), "default");
    assert_eq!(get("MY_APP"), "envars-demo");
    assert_eq!(get("MY_CPU_REQUEST"), "250");
    assert_eq!(get("MY_CPU_LIMIT"), "1", "500m rounded up to whole cores");
    assert_eq!(get("MY_MEM_LIMIT"), "64");
    assert_eq!(get("MY_MEM_REQUEST"), (32u64 << 20).to_string());
    assert_eq!(
        get("MESSAGE"),
        "Warm greetings to The Most Honorable Kubernetes"
    );
    assert_eq!(get("UNCHANGED_REFERENCE"), "$(PROTOCOL)://172.17.0.1:80");
    assert_eq!(get("ESCAPED_REFERENCE"), "$(PROTOCOL)://172.17.0.1:80");
    assert_eq!(get("SERVICE_ADDRESS"), format!("{svc}:6379"));
    assert_eq!(get("REDIS_PRIMARY_SERVICE_HOST"), svc);
    assert_eq!(
        get("REDIS_PRIMARY_PORT"),
        format!("tcp://{svc}:6379").as_str()
    );
    assert_eq!(get("REDIS_PRIMARY_PORT_6379_TCP_PROTO"), "tcp");
    assert_eq!(get("KUBERNETES_SERVICE_HOST"), "10.96.0.1");
    assert_eq!(get("KUBERNETES_SERVICE_PORT"), "443");
    assert!(
        log.contains("Warm greetings to The Most Honorable Kubernetes via envars"),
        "command expanded: {log}"
    );

    // Without service links only the API server's Service is announced.
    c.create_pod(json!({
        "metadata": {"name": "no-links"},
        "spec": {
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": busybox(),
                "command": ["sh", "-c", "echo --env--; env; echo --end--; sleep 3600"]}]
        }
    }))
    .await?;
    let log = c
        .wait_log("no-links", "c", Duration::from_secs(60), |l| {
            l.contains("--end--")
        })
        .await?;
    let env = env_of(&log);
    assert!(env.contains_key("KUBERNETES_SERVICE_HOST"), "{env:?}");
    assert!(!env.contains_key("REDIS_PRIMARY_SERVICE_HOST"), "{env:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_or_object_is_create_container_config_error_until_it_appears() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.kubectl(
        27,
        &[
            "create",
            "configmap",
            "app-config",
            "--from-literal=other=1",
        ],
        None,
    )?;
    let pod = |name: &str, cm: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": busybox(),
                    "command": ["sh", "-c", "echo level=$LOG_LEVEL; sleep 3600"],
                    "env": [{"name": "LOG_LEVEL", "valueFrom": {"configMapKeyRef": {"name": cm, "key": "log_level"}}}]}]
            }
        })
    };
    c.create_pod(pod("missing-key", "app-config")).await?;
    c.create_pod(pod("missing-map", "later-config")).await?;
    let waiting_with = |msg: String| {
        move |p: &k8s_openapi::api::core::v1::Pod| {
            let w = container(p).state.and_then(|s| s.waiting);
            w.as_ref().and_then(|w| w.reason.as_deref()) == Some("CreateContainerConfigError")
                && w.and_then(|w| w.message).as_deref() == Some(msg.as_str())
        }
    };
    let p = c
        .wait_pod(
            "missing-key",
            Duration::from_secs(60),
            "CreateContainerConfigError",
            waiting_with("couldn't find key log_level in ConfigMap default/app-config".into()),
        )
        .await?;
    assert_eq!(phase(&p), "Pending");
    c.wait_pod(
        "missing-map",
        Duration::from_secs(60),
        "CreateContainerConfigError",
        waiting_with("configmap \"later-config\" not found".into()),
    )
    .await?;
    let events = c.events("missing-key").await?;
    assert!(
        events.iter().any(|(r, m)| r == "Failed"
            && m == "Error: couldn't find key log_level in ConfigMap default/app-config"),
        "{events:?}"
    );
    // The key and the map appear: both pods start with them.
    c.kubectl(
        27,
        &[
            "patch",
            "configmap",
            "app-config",
            "-p",
            r#"{"data":{"log_level":"debug"}}"#,
        ],
        None,
    )?;
    c.kubectl(
        27,
        &[
            "create",
            "configmap",
            "later-config",
            "--from-literal=log_level=trace",
        ],
        None,
    )?;
    for (name, level) in [("missing-key", "debug"), ("missing-map", "trace")] {
        c.wait_pod(name, Duration::from_secs(30), "Running", |p| {
            phase(p) == "Running"
        })
        .await?;
        let want = format!("level={level}");
        c.wait_log(name, "c", Duration::from_secs(20), |l| l.contains(&want))
            .await?;
    }
    Ok(())
}
