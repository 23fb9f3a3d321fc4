//! The cluster DNS server against an in-process API server, queried over loopback with
//! hickory's client; forwarding goes to an upstream of the test's own on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

struct Stack {
    server: Option<control::Server>,
    _dir: tempfile::TempDir,
    /// What cluster DNS runs as (`system:coredns` and its kube-system Role).
    client: kube::Client,
    /// What the tests make objects as.
    admin: kube::Client,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

async fn api_server() -> Result<Stack> {
    let dir = tempfile::tempdir()?;
    let mut cfg = control::Config::new(dir.path().join("data"));
    cfg.controllers = false;
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.kubeconfig = dir.path().join("admin.kubeconfig");
    let server = control::start(cfg).await?;
    let client = server.client(control::certs::Identity {
        user: control::rbac_bootstrap::COREDNS_USER.into(),
        groups: vec![
            "system:serviceaccounts".into(),
            "system:serviceaccounts:kube-system".into(),
            "system:authenticated".into(),
        ],
    });
    let admin = server.client(control::certs::Identity {
        user: "kubernetes-admin".into(),
        groups: vec!["system:masters".into()],
    });
    Ok(Stack {
        server: Some(server),
        _dir: dir,
        client,
        admin,
    })
}

async fn dns_server(
    client: &kube::Client,
    upstreams: Vec<SocketAddr>,
) -> Result<(dns::Running, SocketAddr)> {
    let mut cfg = dns::Config::new(vec!["127.0.0.1:0".parse()?]);
    cfg.upstreams = upstreams;
    let running = dns::start(client.clone(), cfg).await?;
    let addr = running.addrs[0];
    Ok((running, addr))
}

async fn udp_query(addr: SocketAddr, name: &str, t: RecordType, edns: bool) -> Result<Message> {
    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).build();
    let (mut c, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
    if !edns {
        c.disable_edns();
    }
    tokio::spawn(bg);
    let r = c
        .query(Name::from_ascii(name)?, DNSClass::IN, t)
        .await
        .with_context(|| format!("query {name} {t}"))?;
    Ok(r.into_message())
}

async fn query(addr: SocketAddr, name: &str, t: RecordType) -> Result<Message> {
    udp_query(addr, name, t, true).await
}

async fn tcp_query(addr: SocketAddr, name: &str, t: RecordType) -> Result<Message> {
    let (connect, handle) = TcpClientStream::new(addr, None, None, TokioRuntimeProvider::default());
    let (mut c, bg) = Client::<TokioRuntimeProvider>::new(connect.await?, handle);
    tokio::spawn(bg);
    Ok(c.query(Name::from_ascii(name)?, DNSClass::IN, t)
        .await?
        .into_message())
}

/// The answers' data as text, sorted.
fn data(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

async fn namespace(client: &kube::Client, prefix: &str) -> Result<String> {
    let name = unique(prefix);
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await?;
    Ok(name)
}

async fn create<K>(client: &kube::Client, ns: &str, obj: serde_json::Value) -> Result<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    Ok(api
        .create(&PostParams::default(), &serde_json::from_value(obj)?)
        .await?)
}

fn cluster_ip(s: &Service) -> String {
    s.spec.as_ref().unwrap().cluster_ip.clone().unwrap()
}

/// Polls `name` until `ok` holds (the watches deliver within milliseconds), at most `limit`.
async fn until(
    addr: SocketAddr,
    name: &str,
    t: RecordType,
    limit: Duration,
    ok: impl Fn(&Message) -> bool,
) -> Result<(Message, Duration)> {
    let start = Instant::now();
    loop {
        let m = query(addr, name, t).await?;
        if ok(&m) {
            return Ok((m, start.elapsed()));
        }
        if start.elapsed() > limit {
            anyhow::bail!(
                "{name} {t}: still {:?} {:?} after {limit:?}",
                m.metadata.response_code,
                data(&m)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn services_endpoints_and_pods_answer_as_coredns_does() -> Result<()> {
    let stack = api_server().await?;
    let c = &stack.admin;
    let ns = namespace(c, "dns").await?;
    let web: Service = create(
        c,
        &ns,
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                      {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    )
    .await?;
    let web_ip = cluster_ip(&web);
    create::<Service>(
        c,
        &ns,
        json!({"metadata": {"name": "db"}, "spec": {"clusterIP": "None", "selector": {"app": "db"},
            "ports": [{"name": "sql", "port": 3306}]}}),
    )
    .await?;
    create::<EndpointSlice>(
        c,
        &ns,
        json!({"metadata": {"name": "db-abc", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.10"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.11"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.12"], "hostname": "db-2", "conditions": {"ready": false}}],
            "ports": [{"name": "sql", "port": 3306, "protocol": "TCP"}]}),
    )
    .await?;
    create::<Service>(
        c,
        &ns,
        json!({"metadata": {"name": "empty"}, "spec": {"clusterIP": "None", "selector": {"app": "none"}}}),
    )
    .await?;
    create::<Service>(
        c,
        &ns,
        json!({"metadata": {"name": "alias"}, "spec": {"type": "ExternalName",
            "externalName": format!("web.{ns}.svc.cluster.local")}}),
    )
    .await?;
    create::<Pod>(
        c,
        &ns,
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
    )
    .await?;
    Api::<Pod>::namespaced(c.clone(), &ns)
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"podIP": "10.244.1.20", "podIPs": [{"ip": "10.244.1.20"}]}}),
            ),
        )
        .await?;
    let (_dns, addr) = dns_server(&stack.client, vec![]).await?;
    let z = |n: &str| format!("{n}.cluster.local.");

    // A ClusterIP Service: A to its ClusterIP, authoritative, TTL 5; AAAA is no data.
    let m = query(addr, &z(&format!("web.{ns}.svc")), RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(data(&m), vec![web_ip.clone()]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = query(addr, &z(&format!("web.{ns}.svc")), RecordType::AAAA).await?;
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert_eq!(
        m.authorities[0].record_type(),
        RecordType::SOA,
        "no-data carries the SOA"
    );

    // SRV for a named port, with the target's address in the additional section.
    let m = query(
        addr,
        &z(&format!("_http._tcp.web.{ns}.svc")),
        RecordType::SRV,
    )
    .await?;
    assert_eq!(
        data(&m),
        vec![format!("0 100 80 web.{ns}.svc.cluster.local.")]
    );
    assert_eq!(
        m.additionals
            .iter()
            .map(|r| r.data.to_string())
            .collect::<Vec<_>>(),
        vec![web_ip.clone()]
    );
    let m = query(
        addr,
        &z(&format!("_dns._udp.web.{ns}.svc")),
        RecordType::SRV,
    )
    .await?;
    assert_eq!(
        data(&m),
        vec![format!("0 100 53 web.{ns}.svc.cluster.local.")]
    );
    let m = query(
        addr,
        &z(&format!("_http._udp.web.{ns}.svc")),
        RecordType::SRV,
    )
    .await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // PTR of the ClusterIP.
    let ip: std::net::Ipv4Addr = web_ip.parse()?;
    let o = ip.octets();
    let rev = format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0]);
    let m = query(addr, &rev, RecordType::PTR).await?;
    assert_eq!(data(&m), vec![format!("web.{ns}.svc.cluster.local.")]);

    // Headless: the ready endpoints, by name too (hostname, else the dashed address).
    let db = z(&format!("db.{ns}.svc"));
    let m = query(addr, &db, RecordType::A).await?;
    assert_eq!(data(&m), vec!["10.244.1.10", "10.244.1.11"]);
    let m = query(addr, &z(&format!("db-0.db.{ns}.svc")), RecordType::A).await?;
    assert_eq!(data(&m), vec!["10.244.1.10"]);
    let m = query(addr, &z(&format!("10-244-1-11.db.{ns}.svc")), RecordType::A).await?;
    assert_eq!(data(&m), vec!["10.244.1.11"]);
    let m = query(addr, &z(&format!("db-2.db.{ns}.svc")), RecordType::A).await?;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "not ready: not there"
    );
    let m = query(addr, &z(&format!("_sql._tcp.db.{ns}.svc")), RecordType::SRV).await?;
    assert_eq!(
        data(&m),
        vec![
            format!("0 50 3306 10-244-1-11.db.{ns}.svc.cluster.local."),
            format!("0 50 3306 db-0.db.{ns}.svc.cluster.local.")
        ]
    );
    assert_eq!(m.additionals.len(), 2);
    let m = query(addr, "10.1.244.10.in-addr.arpa.", RecordType::PTR).await?;
    assert_eq!(data(&m), vec![format!("db-0.db.{ns}.svc.cluster.local.")]);
    // A headless Service without endpoints is NXDOMAIN, as with CoreDNS.
    let m = query(addr, &z(&format!("empty.{ns}.svc")), RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // ExternalName: CNAME, followed inside the zone.
    let m = query(addr, &z(&format!("alias.{ns}.svc")), RecordType::A).await?;
    assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
    assert_eq!(
        m.answers[0].data.to_string(),
        format!("web.{ns}.svc.cluster.local.")
    );
    assert_eq!(m.answers[1].data.to_string(), web_ip);

    // Pods by dashed address, only where such a pod exists in that namespace.
    let m = query(addr, &z(&format!("10-244-1-20.{ns}.pod")), RecordType::A).await?;
    assert_eq!(data(&m), vec!["10.244.1.20"]);
    let m = query(addr, &z(&format!("10-244-1-21.{ns}.pod")), RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = query(addr, &z("10-244-1-20.default.pod"), RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // NXDOMAIN for what does not exist; NOERROR without data for what exists but has none.
    for name in [
        format!("nope.{ns}.svc"),
        "web.no-such-namespace.svc".to_string(),
        "no-such-namespace.svc".to_string(),
        format!("x.y.web.{ns}.svc.extra"),
        "something.else".to_string(),
    ] {
        let m = query(addr, &z(&name), RecordType::A).await?;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    }
    for name in [format!("{ns}.svc"), "svc".to_string(), format!("{ns}.pod")] {
        let m = query(addr, &z(&name), RecordType::A).await?;
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0),
            "{name}"
        );
    }
    let m = query(addr, "cluster.local.", RecordType::SOA).await?;
    assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    // The `kubernetes` Service of every cluster.
    let m = query(addr, "kubernetes.default.svc.cluster.local.", RecordType::A).await?;
    assert_eq!(data(&m), vec!["10.96.0.1"]);
    Ok(())
}

#[tokio::test]
async fn a_service_change_is_answered_within_a_second() -> Result<()> {
    let stack = api_server().await?;
    let c = &stack.admin;
    let ns = namespace(c, "dns-change").await?;
    let (_dns, addr) = dns_server(&stack.client, vec![]).await?;
    let name = format!("late.{ns}.svc.cluster.local.");
    let m = query(addr, &name, RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let svc: Service = create(
        c,
        &ns,
        json!({"metadata": {"name": "late"}, "spec": {"ports": [{"port": 80}]}}),
    )
    .await?;
    let ip = cluster_ip(&svc);
    let (_, took) = until(addr, &name, RecordType::A, Duration::from_secs(1), |m| {
        data(m) == vec![ip.clone()]
    })
    .await?;
    eprintln!("created Service answered after {took:?}");

    Api::<Service>::namespaced(c.clone(), &ns)
        .delete("late", &DeleteParams::default())
        .await?;
    let (_, took) = until(addr, &name, RecordType::A, Duration::from_secs(1), |m| {
        m.metadata.response_code == ResponseCode::NXDomain
    })
    .await?;
    eprintln!("deleted Service NXDOMAIN after {took:?}");

    // Headless endpoints follow their slice.
    create::<Service>(
        c,
        &ns,
        json!({"metadata": {"name": "hl"}, "spec": {"clusterIP": "None"}}),
    )
    .await?;
    let slice = json!({"metadata": {"name": "hl-1", "labels": {"kubernetes.io/service-name": "hl"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.9.1"]}]});
    create::<EndpointSlice>(c, &ns, slice).await?;
    let hl = format!("hl.{ns}.svc.cluster.local.");
    until(addr, &hl, RecordType::A, Duration::from_secs(1), |m| {
        data(m) == vec!["10.244.9.1"]
    })
    .await?;
    Api::<EndpointSlice>::namespaced(c.clone(), &ns)
        .patch(
            "hl-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"endpoints": [{"addresses": ["10.244.9.2"]}, {"addresses": ["10.244.9.3"]}]})),
        )
        .await?;
    let (_, took) = until(addr, &hl, RecordType::A, Duration::from_secs(1), |m| {
        data(m) == vec!["10.244.9.2", "10.244.9.3"]
    })
    .await?;
    eprintln!("changed endpoints answered after {took:?}");
    Ok(())
}

/// A DNS server of the test's own on loopback (UDP and TCP on one port): `*.upstream.test`
/// has A 192.0.2.1, `big.upstream.test` 100 addresses (truncated over UDP), everything else
/// is NXDOMAIN. `relay` instead sends every query on to that address (a forwarding loop when it
/// is the server under test). Counts the queries it gets.
struct Upstream {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn answer(req: &Message) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = req.queries.clone();
    let q = &req.queries[0];
    let name = q.name().to_ascii().to_ascii_lowercase();
    let up = Name::from_ascii("upstream.test.").unwrap();
    if !up.zone_of(q.name()) {
        resp.metadata.response_code = ResponseCode::NXDomain;
        return resp;
    }
    if q.query_type() == RecordType::A {
        let n = if name == "big.upstream.test." { 100 } else { 1 };
        for i in 0..n {
            resp.answers.push(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A(std::net::Ipv4Addr::new(192, 0, 2, (i % 250 + 1) as u8))),
            ));
        }
    }
    resp
}

async fn upstream(relay: Option<SocketAddr>) -> Result<Upstream> {
    let udp = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
    let addr = udp.local_addr()?;
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    let count = Arc::new(AtomicUsize::new(0));
    let (n1, n2) = (count.clone(), count.clone());
    let u = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((len, from)) = udp.recv_from(&mut buf).await else {
                return;
            };
            n1.fetch_add(1, Ordering::SeqCst);
            let Ok(req) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            if let Some(to) = relay {
                let (udp, raw) = (udp.clone(), buf[..len].to_vec());
                tokio::spawn(async move {
                    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                    let _ = s.send_to(&raw, to).await;
                    let mut b = vec![0u8; 4096];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(3), s.recv(&mut b)).await
                    {
                        let _ = udp.send_to(&b[..n], from).await;
                    }
                });
                continue;
            }
            let mut resp = answer(&req);
            if resp.answers.len() > 20 {
                resp = resp.truncate();
                resp.metadata.truncation = true;
            }
            let _ = udp.send_to(&resp.to_vec().unwrap(), from).await;
        }
    });
    let t = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                return;
            };
            n2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                while s.read_exact(&mut len).await.is_ok() {
                    let mut b = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    let Ok(req) = Message::from_vec(&b) else {
                        return;
                    };
                    let out = answer(&req).to_vec().unwrap();
                    let _ = s.write_all(&(out.len() as u16).to_be_bytes()).await;
                    let _ = s.write_all(&out).await;
                }
            });
        }
    });
    Ok(Upstream {
        addr,
        count,
        tasks: vec![u, t],
    })
}

#[tokio::test]
async fn other_names_are_forwarded_upstream_over_udp_and_tcp() -> Result<()> {
    let stack = api_server().await?;
    let up = upstream(None).await?;
    let (_dns, addr) = dns_server(&stack.client, vec![up.addr]).await?;

    let m = query(addr, "www.upstream.test.", RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_available && !m.metadata.authoritative);
    assert_eq!(data(&m), vec!["192.0.2.1"]);
    let m = query(addr, "missing.example.", RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // A reverse name that is no Service's falls through to the upstream.
    let before = up.count.load(Ordering::SeqCst);
    let m = query(addr, "1.2.0.192.in-addr.arpa.", RecordType::PTR).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(up.count.load(Ordering::SeqCst) > before);
    // Cluster names never leave.
    let before = up.count.load(Ordering::SeqCst);
    query(addr, "nope.default.svc.cluster.local.", RecordType::A).await?;
    assert_eq!(up.count.load(Ordering::SeqCst), before);

    // Truncated by the upstream over UDP: fetched again over TCP, all 100 answers.
    let m = tcp_query(addr, "big.upstream.test.", RecordType::A).await?;
    assert_eq!(m.answers.len(), 100);
    // To a UDP client without EDNS (512 bytes) the same answer is truncated, as it must be.
    let m = udp_query(addr, "big.upstream.test.", RecordType::A, false).await?;
    assert!(m.metadata.truncation, "TC set");
    assert!(m.answers.len() < 100);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    Ok(())
}

#[tokio::test]
async fn loop_guard_never_forwards_to_this_server() -> Result<()> {
    let stack = api_server().await?;

    // An upstream that is this server's own listening address is dropped at start.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let own: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut cfg = dns::Config::new(vec![own]);
    cfg.upstreams = vec![own];
    let running = dns::start(stack.client.clone(), cfg).await?;
    let start = Instant::now();
    let m = query(own, "www.upstream.test.", RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "answered at once, no loop"
    );
    running.stop().await;

    // An upstream that sends queries back here is found by the probe and dropped.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let own: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let relay = upstream(Some(own)).await?;
    let good = upstream(None).await?;
    let mut cfg = dns::Config::new(vec![own]);
    cfg.upstreams = vec![relay.addr, good.addr];
    let _running = dns::start(stack.client.clone(), cfg).await?;
    let m = query(own, "www.upstream.test.", RecordType::A).await?;
    assert_eq!(
        data(&m),
        vec!["192.0.2.1"],
        "answered by the upstream that does not loop"
    );
    let relayed = relay.count.load(Ordering::SeqCst);
    assert_eq!(relayed, 1, "the looping upstream got the probe only");
    for _ in 0..3 {
        query(own, "www.upstream.test.", RecordType::A).await?;
    }
    assert_eq!(relay.count.load(Ordering::SeqCst), relayed);
    Ok(())
}

#[tokio::test]
async fn large_cluster_answers_are_truncated_over_udp_and_whole_over_tcp() -> Result<()> {
    let stack = api_server().await?;
    let c = &stack.admin;
    let ns = namespace(c, "dns-big").await?;
    create::<Service>(
        c,
        &ns,
        json!({"metadata": {"name": "many"}, "spec": {"clusterIP": "None"}}),
    )
    .await?;
    let eps: Vec<_> = (1..=60)
        .map(|i| json!({"addresses": [format!("10.244.7.{i}")]}))
        .collect();
    create::<EndpointSlice>(
        c,
        &ns,
        json!({"metadata": {"name": "many-1", "labels": {"kubernetes.io/service-name": "many"}},
            "addressType": "IPv4", "endpoints": eps}),
    )
    .await?;
    let (_dns, addr) = dns_server(&stack.client, vec![]).await?;
    let name = format!("many.{ns}.svc.cluster.local.");
    let m = udp_query(addr, &name, RecordType::A, false).await?;
    assert!(m.metadata.truncation);
    let m = tcp_query(addr, &name, RecordType::A).await?;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 60);
    Ok(())
}
