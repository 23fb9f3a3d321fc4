//! pods/log and pods/exec forwarded to the pod's kubelet, here a fake kubelet on 127.0.0.1
//! that answers logs and a WebSocket exec (v5.channel.k8s.io) in the kubelet's API.

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::Result;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, LogParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

use common::{ok, TestServer};

fn ws_frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x82, (data.len() + 1) as u8, channel];
    f.extend_from_slice(data);
    f
}

async fn kubelet(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path == "/containerLogs/default/p/c" {
        return Ok(Response::new(Full::new(Bytes::from(format!(
            "hello\nworld\nquery={query}\n"
        )))));
    }
    if path == "/exec/default/p/c" && req.headers().contains_key("upgrade") {
        let key = req.headers()["sec-websocket-key"]
            .to_str()
            .unwrap()
            .to_string();
        let protocol = req.headers()["sec-websocket-protocol"]
            .to_str()
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim()
            .to_string();
        let digest = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
        );
        let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
        tokio::spawn(async move {
            let Ok(up) = hyper::upgrade::on(req).await else {
                return;
            };
            let mut io = TokioIo::new(up);
            let out = format!("hello from exec: {query}\n");
            let status = br#"{"metadata":{},"status":"Success"}"#;
            let mut frames = ws_frame(1, out.as_bytes());
            frames.extend(ws_frame(3, status));
            frames.extend([0x88, 0x02, 0x03, 0xe8]);
            let _ = io.write_all(&frames).await;
            let mut buf = [0u8; 1024];
            while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        return Ok(Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", accept)
            .header("sec-websocket-protocol", protocol)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    Ok(Response::builder()
        .status(404)
        .body(Full::new(Bytes::from("not found")))
        .unwrap())
}

/// A fake kubelet with a self-signed certificate that requires a client certificate from the
/// cluster CA at `ca`; returns its port.
async fn start_kubelet(ca: &std::path::Path) -> Result<u16> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?.self_signed(&key)?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // The API server authenticates with its kubelet-client certificate.
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .expect("client certificate")[0]
                    .clone();
                let id = control::certs::identity(&cert).expect("readable subject");
                assert_eq!(id.user, "kube-apiserver-kubelet-client");
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hyper::service::service_fn(kubelet))
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_exec_reach_the_kubelet() -> Result<()> {
    let ts = TestServer::start().await?;
    let port = start_kubelet(&ts.dir.path().join("data/pki/ca.crt")).await?;
    let client = ts.client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}}))?,
        )
        .await?;
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
    nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(status))
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(pod)?)
        .await?;
    pods.patch_status(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await?;

    let logs = pods
        .logs(
            "p",
            &LogParams {
                tail_lines: Some(5),
                ..Default::default()
            },
        )
        .await?;
    assert!(logs.starts_with("hello\nworld\n"), "{logs}");
    assert!(logs.contains("tailLines=5"), "{logs}");
    for v in common::KUBECTL_VERSIONS {
        let out = ok(ts.kubectl(*v, &["logs", "p"]));
        assert!(out.starts_with("hello\nworld"), "kubectl 1.{v}: {out}");
    }
    let out = ok(ts.kubectl(33, &["exec", "p", "--", "echo", "hi"]));
    assert!(
        out.starts_with("hello from exec: ")
            && out.contains("command=echo")
            && out.contains("command=hi"),
        "{out}"
    );

    // A pod without a node, and an unknown container, are refused with a Status.
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "q"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))?,
    )
    .await?;
    let err = pods.logs("q", &LogParams::default()).await.unwrap_err();
    assert!(
        err.to_string().contains("does not have a host assigned"),
        "{err}"
    );
    Ok(())
}
