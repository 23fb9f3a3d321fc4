//! The ServiceAccount admission plugin on pod creation, driven by the real kubectl: the default
//! service account, the `kube-api-access-<random>` volume in every container, opting out by pod
//! or service account, a missing service account refused with kube-apiserver's message, pull
//! secrets from the service account, and tokens of other audiences refused as credentials.

mod common;

use anyhow::Result;
use common::*;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};

const MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn pod_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{extra}  initContainers:\n  - name: init\n    image: busybox\n  containers:\n  - name: a\n    image: busybox\n  - name: b\n    image: busybox\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_the_default_service_account_and_its_token_volume() -> Result<()> {
    let s = TestServer::start().await?;
    let client = s.client().await?;
    ok(s.kubectl_stdin(33, &["apply", "-f", "-"], &pod_yaml("plain", "")));
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p = pods.get("plain").await?;
    let spec = p.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    assert_eq!(spec.service_account.as_deref(), Some("default"));
    let vols = spec.volumes.unwrap();
    assert_eq!(vols.len(), 1);
    let vol = &vols[0];
    let suffix = vol.name.strip_prefix("kube-api-access-").unwrap();
    assert_eq!(suffix.len(), 5);
    let proj = vol.projected.as_ref().unwrap();
    assert_eq!(proj.default_mode, Some(0o644));
    let sources = proj.sources.as_ref().unwrap();
    let token = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(
        (token.path.as_str(), token.expiration_seconds),
        ("token", Some(3607))
    );
    let cm = sources[1].config_map.as_ref().unwrap();
    assert_eq!(cm.name, "kube-root-ca.crt");
    let ns_item = &sources[2]
        .downward_api
        .as_ref()
        .unwrap()
        .items
        .as_ref()
        .unwrap()[0];
    assert_eq!(ns_item.path, "namespace");
    assert_eq!(
        ns_item.field_ref.as_ref().unwrap().field_path,
        "metadata.namespace"
    );
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let m = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(m.name, vol.name);
        assert_eq!(m.mount_path, MOUNT);
        assert_eq!(m.read_only, Some(true));
    }

    // Opting out on the pod, or on its service account.
    ok(s.kubectl_stdin(
        27,
        &["apply", "-f", "-"],
        &pod_yaml("opt-out", "  automountServiceAccountToken: false\n"),
    ));
    let spec = pods.get("opt-out").await?.spec.unwrap();
    assert!(spec.volumes.unwrap_or_default().is_empty());
    assert!(spec.containers[0]
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .is_empty());
    ok(s.kubectl(33, &["create", "serviceaccount", "builder"]));
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let mut sa = sas.get("builder").await?;
    sa.automount_service_account_token = Some(false);
    sa.image_pull_secrets = Some(vec![k8s_openapi::api::core::v1::LocalObjectReference {
        name: "regcred".into(),
    }]);
    sas.replace("builder", &PostParams::default(), &sa).await?;
    ok(s.kubectl_stdin(
        33,
        &["apply", "-f", "-"],
        &pod_yaml("as-builder", "  serviceAccountName: builder\n"),
    ));
    let spec = pods.get("as-builder").await?.spec.unwrap();
    assert!(spec.volumes.unwrap_or_default().is_empty());
    assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
    // The pod's choice wins over the service account's.
    ok(s.kubectl_stdin(
        33,
        &["apply", "-f", "-"],
        &pod_yaml(
            "builder-in",
            "  serviceAccountName: builder\n  automountServiceAccountToken: true\n",
        ),
    ));
    let spec = pods.get("builder-in").await?.spec.unwrap();
    assert_eq!(spec.volumes.unwrap().len(), 1);

    // A service account that does not exist.
    let err = fails(s.kubectl_stdin(
        27,
        &["apply", "-f", "-"],
        &pod_yaml("nobody", "  serviceAccountName: nobody\n"),
    ));
    assert!(
        err.contains("pods \"nobody\" is forbidden: error looking up service account default/nobody: serviceaccount \"nobody\" not found"),
        "{err}"
    );

    // A new namespace gets its default service account, so its pods are admitted at once.
    ok(s.kubectl(33, &["create", "namespace", "fresh"]));
    ok(s.kubectl_stdin(
        33,
        &["apply", "-n", "fresh", "-f", "-"],
        &pod_yaml("first", ""),
    ));
    let fresh: Api<Pod> = Api::namespaced(client.clone(), "fresh");
    assert_eq!(
        fresh
            .get("first")
            .await?
            .spec
            .unwrap()
            .service_account_name
            .as_deref(),
        Some("default")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_credentials_only_for_the_api_audience() -> Result<()> {
    let s = TestServer::start().await?;
    let port = s.addr().port();
    let status = |token: &str| {
        let o = std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {token}"))
            .arg(format!("https://127.0.0.1:{port}/api"))
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let api = ok(s.kubectl(33, &["create", "token", "default"]));
    assert_eq!(status(api.trim()), "200");
    let other = ok(s.kubectl(33, &["create", "token", "default", "--audience", "vault"]));
    assert_eq!(status(other.trim()), "401");
    Ok(())
}
