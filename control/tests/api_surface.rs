//! What kubectl and API clients see of the API beyond CRUD: OpenAPI documents (`kubectl
//! explain`), server-side field validation, answers to bad input, apply conflicts.

mod common;

use anyhow::Result;
use common::{fails, ok, TestServer};

fn raw(method: &str, path: &str, content_type: &str, body: Vec<u8>) -> http::Request<Vec<u8>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(body)
        .unwrap()
}

async fn send(
    client: &kube::Client,
    req: http::Request<Vec<u8>>,
) -> kube::Result<http::Response<kube::client::Body>> {
    client.send(req.map(kube::client::Body::from)).await
}

/// The Status of a failed request: code, reason, message.
fn status(r: kube::Result<String>) -> (u16, String, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected a Status error, got {other:?}"),
    }
}

async fn explain(v: u32) -> Result<()> {
    let ts = TestServer::start().await?;
    let out = ok(ts.kubectl(v, &["explain", "deployment.spec.strategy.rollingUpdate"]));
    assert!(out.contains("KIND:") && out.contains("Deployment"), "{out}");
    assert!(out.contains("maxSurge\t<IntOrString>"), "{out}");
    assert!(out.contains("maxUnavailable\t<IntOrString>"), "{out}");
    // The field docs of the upstream API.
    assert!(
        out.contains("The maximum number of pods that can be scheduled above the desired"),
        "{out}"
    );
    let out = ok(ts.kubectl(v, &["explain", "pod", "--recursive"]));
    assert!(
        out.contains("Pod is a collection of containers that can run on a host."),
        "{out}"
    );
    assert!(out.contains("  metadata\t<ObjectMeta>\n"), "{out}");
    for field in [
        "imagePullPolicy",
        "readinessProbe",
        "terminationGracePeriodSeconds",
    ] {
        assert!(out.contains(field), "{field} in {out}");
    }
    let out = ok(ts.kubectl(v, &["explain", "pod.spec.containers.resources"]));
    assert!(out.contains("limits\t<map[string]Quantity>"), "{out}");
    let out = ok(ts.kubectl(v, &["explain", "svc.spec.ports.targetPort"]));
    assert!(
        out.contains("Number or name of the port to access on the pods targeted by the service"),
        "{out}"
    );
    let err = fails(ts.kubectl(v, &["explain", "deployment.spec.replicsa"]));
    assert!(err.contains("replicsa"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_1_27() -> Result<()> {
    explain(27).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_1_33() -> Result<()> {
    explain(33).await
}

/// OpenAPI documents are named by hash, cached by ETag and served gzip-compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_are_cacheable() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let root: serde_json::Value = serde_json::from_str(
        &client
            .request_text(raw("GET", "/openapi/v3", "", vec![]))
            .await?,
    )?;
    let url = root["paths"]["apis/apps/v1"]["serverRelativeURL"]
        .as_str()
        .expect("apps/v1 listed")
        .to_string();
    let hash = url.split("hash=").nth(1).expect("hash").to_string();
    let doc: serde_json::Value =
        serde_json::from_str(&client.request_text(raw("GET", &url, "", vec![])).await?)?;
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["io.k8s.api.apps.v1.Deployment"]["x-kubernetes-group-version-kind"][0]["kind"],
        "Deployment"
    );
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut b = http::Request::get(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Vec::new()).unwrap()
    };
    let resp = send(&client, get(&url, &[("accept-encoding", "gzip")])).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(resp.headers()["etag"], format!("\"{hash}\""));
    assert_eq!(resp.headers()["cache-control"], "public, immutable");
    let etag = format!("\"{hash}\"");
    let resp = send(&client, get(&url, &[("if-none-match", etag.as_str())])).await?;
    assert_eq!(resp.status(), 304);
    let resp = send(&client, get("/openapi/v3/apis/apps/v1?hash=0", &[])).await?;
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], url.as_str());
    let v2: serde_json::Value = serde_json::from_str(
        &client
            .request_text(get("/openapi/v2", &[("accept", "application/json")]))
            .await?,
    )?;
    assert!(
        v2["definitions"]["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"]["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("List of containers belonging to the pod."))
    );
    Ok(())
}

const TYPO: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: typo
spec:
  replicsa: 2
  selector:
    matchLabels: {app: typo}
  template:
    metadata:
      labels: {app: typo}
    spec:
      containers:
      - name: web
        image: nginx
";

async fn field_validation(v: u32) -> Result<()> {
    let ts = TestServer::start().await?;
    // kubectl's default, --validate=strict: refused with the decoder's words.
    let err = fails(ts.kubectl_stdin(v, &["apply", "-f", "-"], TYPO));
    assert!(
        err.contains(r#"Deployment in version "v1" cannot be handled as a Deployment: strict decoding error: unknown field "spec.replicsa""#),
        "{err}"
    );
    fails(ts.kubectl(v, &["get", "deploy", "typo"]));
    // --validate=warn: created, the field dropped, and a warning printed.
    let o = ts.kubectl_stdin(v, &["apply", "--validate=warn", "-f", "-"], TYPO);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    ok(o);
    assert!(
        stderr.contains(r#"Warning: unknown field "spec.replicsa""#),
        "{stderr}"
    );
    // A re-apply is a patch: refused under strict validation too.
    let typo2 = TYPO.replace("replicsa", "replicass");
    let err = fails(ts.kubectl_stdin(v, &["apply", "-f", "-"], &typo2));
    assert!(
        err.contains(r#"strict decoding error: unknown field "spec.replicass""#),
        "{err}"
    );
    // --validate=false sends fieldValidation=Ignore: accepted without a word.
    let o = ts.kubectl_stdin(v, &["apply", "--validate=false", "-f", "-"], &typo2);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    ok(o);
    assert!(!stderr.contains("Warning"), "{stderr}");
    // Server-side apply checks the configuration against the schema.
    let err = fails(ts.kubectl_stdin(v, &["apply", "--server-side", "-f", "-"], TYPO));
    assert!(
        err.contains(".spec.replicsa: field not declared in schema"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_validation_1_27() -> Result<()> {
    field_validation(27).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_validation_1_33() -> Result<()> {
    field_validation(33).await
}

/// Duplicate fields, which kubectl cannot send, from a raw client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_fields_by_directive() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let base = "/api/v1/namespaces/default/configmaps";
    let body = |name: &str| {
        format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}},"data":{{"a":"1"}},"data":{{"b":"2"}}}}"#)
            .into_bytes()
    };
    let (code, reason, msg) = status(
        client
            .request_text(raw(
                "POST",
                &format!("{base}?fieldValidation=Strict"),
                "application/json",
                body("dup"),
            ))
            .await,
    );
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));
    assert_eq!(
        msg,
        r#"ConfigMap in version "v1" cannot be handled as a ConfigMap: strict decoding error: duplicate field "data""#
    );
    // Warn, the default: created, with a Warning header.
    let resp = send(&client, raw("POST", base, "application/json", body("dup"))).await?;
    assert_eq!(resp.status(), 201);
    assert_eq!(
        resp.headers()["warning"],
        r#"299 - "duplicate field \"data\"""#
    );
    let resp = send(
        &client,
        raw(
            "POST",
            &format!("{base}?fieldValidation=Ignore"),
            "application/json",
            body("dup2"),
        ),
    )
    .await?;
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().get("warning").is_none());
    Ok(())
}

/// Bad input gets kube-apiserver's Status: a body over the limit, a kind the endpoint does not
/// take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_statuses() -> Result<()> {
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    let base = "/api/v1/namespaces/default/configmaps";
    let big = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"a":"{}"}}}}"#,
        "x".repeat(3 * 1024 * 1024 + 10)
    );
    let (code, reason, msg) = status(
        client
            .request_text(raw(
                "POST",
                base,
                "application/json",
                big.clone().into_bytes(),
            ))
            .await,
    );
    assert_eq!(
        (code, reason.as_str(), msg.as_str()),
        (
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728"
        )
    );
    // kubectl sees the same.
    let err = fails(ts.kubectl_stdin(33, &["create", "-f", "-"], &big));
    assert!(
        err.contains("Request entity too large: limit is 3145728"),
        "{err}"
    );
    let secret =
        br#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"},"stringData":{"a":"b"}}"#;
    let (code, _, msg) = status(
        client
            .request_text(raw("POST", base, "application/json", secret.to_vec()))
            .await,
    );
    assert_eq!(code, 400);
    assert_eq!(
        msg,
        r#"Secret in version "v1" cannot be handled as a ConfigMap: converting (v1.Secret) to (core.ConfigMap): unknown conversion"#
    );
    // The server still serves after both.
    ok(ts.kubectl(33, &["get", "cm"]));
    Ok(())
}

fn web(replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: owned
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: owned}}
  template:
    metadata:
      labels: {{app: owned}}
    spec:
      containers:
      - name: web
        image: nginx
"
    )
}

/// The managers owning `.spec.replicas` of deployment `owned`.
fn replica_owners(ts: &TestServer, v: u32) -> Result<Vec<String>> {
    let d: serde_json::Value = serde_json::from_str(&ok(ts.kubectl(
        v,
        &[
            "get",
            "deploy",
            "owned",
            "-o",
            "json",
            "--show-managed-fields",
        ],
    )))?;
    let mut out: Vec<String> = d["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["fieldsV1"]["f:spec"].get("f:replicas").is_some())
        .map(|e| e["manager"].as_str().unwrap_or("").to_string())
        .collect();
    out.sort();
    Ok(out)
}

async fn apply_conflicts(v: u32) -> Result<()> {
    let ts = TestServer::start().await?;
    let ssa = |manager: &str, extra: &[&str], body: &str| {
        let mut args = vec!["apply", "--server-side", "--field-manager", manager];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-f", "-"]);
        ts.kubectl_stdin(v, &args, body)
    };
    // A client-side apply owns what it created, as an update.
    ok(ts.kubectl_stdin(v, &["apply", "-f", "-"], &web(2)));
    assert_eq!(replica_owners(&ts, v)?, ["kubectl-client-side-apply"]);
    let err = fails(ssa("beta", &[], &web(3)));
    assert!(
        err.contains(r#"Apply failed with 1 conflict: conflict with "kubectl-client-side-apply" using apps/v1: .spec.replicas"#),
        "{err}"
    );
    // The same value is shared ownership, not a conflict; kubectl then moves the client-side
    // apply's fields to the applier.
    ok(ssa("alpha", &[], &web(2)));
    assert_eq!(replica_owners(&ts, v)?, ["alpha"]);
    let err = fails(ssa("beta", &[], &web(3)));
    assert!(
        err.contains(r#"Apply failed with 1 conflict: conflict with "alpha": .spec.replicas"#),
        "{err}"
    );
    // --force-conflicts takes the field over.
    ok(ssa("beta", &["--force-conflicts"], &web(3)));
    assert_eq!(
        ok(ts.kubectl(
            v,
            &["get", "deploy", "owned", "-o", "jsonpath={.spec.replicas}"]
        )),
        "3"
    );
    assert_eq!(replica_owners(&ts, v)?, ["beta"]);
    // An update takes ownership of what it changes; the applier then conflicts with it.
    ok(ts.kubectl(
        v,
        &[
            "patch",
            "deploy",
            "owned",
            "--type=merge",
            "-p",
            r#"{"spec":{"replicas":5}}"#,
        ],
    ));
    assert_eq!(replica_owners(&ts, v)?, ["kubectl-patch"]);
    let err = fails(ssa("beta", &[], &web(3)));
    assert!(
        err.contains(r#"conflict with "kubectl-patch" using apps/v1: .spec.replicas"#),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_conflicts_1_27() -> Result<()> {
    apply_conflicts(27).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_conflicts_1_33() -> Result<()> {
    apply_conflicts(33).await
}

/// A protobuf body: the magic, then runtime.Unknown; its type and message.
fn unwrap_unknown(b: &[u8]) -> (String, Vec<u8>) {
    use prost::Message;
    let inner = b.strip_prefix(b"k8s\0").expect("protobuf magic");
    let u = k8s_pb::apimachinery::pkg::runtime::Unknown::decode(inner).expect("Unknown");
    let tm = u.type_meta.unwrap_or_default();
    (
        format!(
            "{}/{}",
            tm.api_version.unwrap_or_default(),
            tm.kind.unwrap_or_default()
        ),
        u.raw.unwrap_or_default(),
    )
}

/// client-go's protobuf negotiation: lists, gets and watches decode with the k8s-pb types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_list_get_and_watch() -> Result<()> {
    use http_body_util::BodyExt;
    use prost::Message;
    let ts = TestServer::start().await?;
    let client = ts.client().await?;
    ok(ts.kubectl_stdin(33, &["apply", "-f", "-"], &web(3)));
    let cm =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: pb\n  labels: {a: b}\ndata:\n  k: v\n";
    ok(ts.kubectl_stdin(33, &["apply", "-f", "-"], cm));
    let get = |path: &str| {
        http::Request::get(path)
            .header("accept", "application/vnd.kubernetes.protobuf, */*")
            .body(Vec::new())
            .unwrap()
    };
    let body = |resp: http::Response<kube::client::Body>| async move {
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        (
            ct,
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
    };

    let (ct, b) =
        body(send(&client, get("/apis/apps/v1/namespaces/default/deployments")).await?).await;
    assert_eq!(ct, "application/vnd.kubernetes.protobuf");
    let (kind, msg) = unwrap_unknown(&b);
    assert_eq!(kind, "apps/v1/DeploymentList");
    let list = k8s_pb::api::apps::v1::DeploymentList::decode(&msg[..])?;
    assert!(list.metadata.unwrap().resource_version.is_some());
    let d = &list.items[0];
    assert_eq!(d.metadata.as_ref().unwrap().name.as_deref(), Some("owned"));
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.template
            .as_ref()
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .image
            .as_deref(),
        Some("nginx")
    );

    let (_, b) = body(send(&client, get("/api/v1/namespaces/default/configmaps/pb")).await?).await;
    let (kind, msg) = unwrap_unknown(&b);
    assert_eq!(kind, "v1/ConfigMap");
    let cmv = k8s_pb::api::core::v1::ConfigMap::decode(&msg[..])?;
    assert_eq!(cmv.data.get("k").map(String::as_str), Some("v"));
    assert!(
        cmv.metadata
            .unwrap()
            .creation_timestamp
            .unwrap()
            .seconds
            .unwrap()
            > 0
    );

    // A watch: length-prefixed WatchEvents, each object a protobuf body of its own.
    let (ct, b) = body(
        send(&client, get("/api/v1/namespaces/default/configmaps?watch=true&labelSelector=a%3Db&resourceVersion=0&timeoutSeconds=1"))
            .await?,
    )
    .await;
    assert_eq!(ct, "application/vnd.kubernetes.protobuf;stream=watch");
    let mut rest = &b[..];
    let mut events = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[..4].try_into()?) as usize;
        let ev = k8s_pb::apimachinery::pkg::apis::meta::v1::WatchEvent::decode(&rest[4..4 + len])?;
        rest = &rest[4 + len..];
        let (kind, msg) = unwrap_unknown(&ev.object.unwrap().raw.unwrap());
        assert_eq!(kind, "v1/ConfigMap");
        let cm = k8s_pb::api::core::v1::ConfigMap::decode(&msg[..])?;
        events.push((ev.r#type.unwrap(), cm.metadata.unwrap().name.unwrap()));
    }
    assert_eq!(events, [("ADDED".to_string(), "pb".to_string())]);

    // JSON stays the default.
    let plain = client
        .request_text(raw(
            "GET",
            "/api/v1/namespaces/default/configmaps/pb",
            "",
            vec![],
        ))
        .await?;
    assert!(plain.starts_with('{'), "{plain}");
    Ok(())
}
