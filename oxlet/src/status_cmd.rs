//! `oxlet status`: what of `oxlet up` runs and what is unhealthy, each part with the reason: the
//! API server, the controllers, the node agent, the proxy, the cluster DNS and the CNI network.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

#[derive(Args)]
pub struct StatusArgs {
    /// The admin kubeconfig `oxlet up` wrote.
    #[arg(long, default_value = "/etc/oxlet/admin.kubeconfig")]
    kubeconfig: PathBuf,
    /// The node (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The proxy's health endpoint.
    #[arg(long, default_value = "127.0.0.1:10256")]
    proxy_healthz: SocketAddr,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    #[command(flatten)]
    cni: crate::node_dirs::CniDirs,
}

/// A Lease older than this (kubelet renews every 10 s; the node controller's grace is 40 s)
/// means the agent stopped.
const LEASE_STALE: i64 = 40;

struct Report(Vec<(&'static str, Result<String>)>);

impl Report {
    fn print(&self) -> bool {
        let mut healthy = true;
        for (part, r) in &self.0 {
            match r {
                Ok(detail) => println!("{part:<12} ok         {detail}"),
                Err(e) => {
                    healthy = false;
                    println!("{part:<12} unhealthy  {e:#}");
                }
            }
        }
        healthy
    }
}

async fn api(client: &kube::Client) -> Result<String> {
    let req = http::Request::get("/readyz").body(Vec::new())?;
    let text = client.request_text(req).await.context("GET /readyz")?;
    let version = client.apiserver_version().await?;
    Ok(format!("{} ({})", text.trim(), version.git_version))
}

async fn node(client: &kube::Client, name: &str) -> Result<Node> {
    Api::<Node>::all(client.clone())
        .get_opt(name)
        .await?
        .with_context(|| format!("node {name:?} is not registered"))
}

/// The controllers run when the node got a pod range from node IPAM and the node lifecycle
/// controller agrees the node is alive (it would taint it otherwise).
fn controllers(n: &Node) -> Result<String> {
    let cidr = n
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.clone())
        .context("the node has no pod range: node IPAM has not run")?;
    let taints = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    if let Some(t) = taints
        .iter()
        .find(|t| t.key.starts_with("node.kubernetes.io/unreachable"))
    {
        bail!("the node lifecycle controller marks the node {}", t.key);
    }
    Ok(format!("node IPAM gave {cidr}"))
}

async fn agent(client: &kube::Client, n: &Node) -> Result<String> {
    let name = n.metadata.name.clone().unwrap_or_default();
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready").cloned())
        .context("the node reports no Ready condition")?;
    let lease = Api::<Lease>::namespaced(client.clone(), "kube-node-lease")
        .get_opt(&name)
        .await?
        .context("the node has no Lease")?;
    let renewed = lease
        .spec
        .and_then(|s| s.renew_time)
        .context("the node's Lease was never renewed")?;
    let age = k8s_openapi::jiff::Timestamp::now()
        .duration_since(renewed.0)
        .as_secs();
    if age > LEASE_STALE {
        bail!("the node's Lease was last renewed {age} s ago: the agent is not running");
    }
    if ready.status != "True" {
        bail!(
            "node {name} is not Ready: {} ({})",
            ready.reason.unwrap_or_default(),
            ready.message.unwrap_or_default()
        );
    }
    let pods = n
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.kubelet_version.clone())
        .unwrap_or_default();
    Ok(format!(
        "node {name} Ready, Lease renewed {age} s ago ({pods})"
    ))
}

async fn proxy(addr: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .context("timed out")?
        .with_context(|| format!("no kube-proxy health endpoint on {addr}"))?;
    s.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut answer))
        .await
        .context("timed out")??;
    let status = answer.lines().next().unwrap_or_default().to_string();
    if !status.contains(" 200 ") {
        bail!("/healthz on {addr} answers {status:?}: syncs are not keeping up");
    }
    Ok("syncs up to date (nftables table ip oxlet-proxy)".into())
}

/// Asks the DNS server on the node's address for the `kubernetes` Service.
async fn dns(n: &Node, domain: &str) -> Result<String> {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    let ip: IpAddr = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
        .context("the node has no InternalIP")?
        .address
        .parse()?;
    let name = Name::from_ascii(format!("kubernetes.default.svc.{domain}."))?;
    let mut q = Message::query();
    q.add_query(Query::query(name.clone(), RecordType::A));
    q.metadata.recursion_desired = true;
    let sock =
        tokio::net::UdpSocket::bind(if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).await?;
    sock.send_to(&q.to_vec()?, (ip, 53)).await?;
    let mut buf = vec![0; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .with_context(|| format!("no answer from {ip}:53"))??;
    let a = Message::from_vec(&buf[..len])?;
    if a.metadata.response_code != ResponseCode::NoError || a.answers.is_empty() {
        bail!("{ip}:53 answers {name} with {}", a.metadata.response_code);
    }
    Ok(format!("{ip}:53 resolves {name}"))
}

fn cni(args: &StatusArgs) -> Result<String> {
    let net =
        cni::client::NetworkConfigList::load_first(&args.cni.cni_conf_dir).with_context(|| {
            format!(
                "no network configuration in {}",
                args.cni.cni_conf_dir.display()
            )
        })?;
    for plugin in &net.plugins {
        let ty = plugin["type"].as_str().unwrap_or_default();
        if !args.cni.cni_bin_dir.iter().any(|d| d.join(ty).is_file()) {
            bail!(
                "network {}: plugin {ty:?} is in none of the plugin directories",
                net.name
            );
        }
    }
    Ok(format!(
        "network {} from {}",
        net.name,
        args.cni.cni_conf_dir.display()
    ))
}

pub fn run(args: StatusArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let healthy = rt.block_on(async {
        let node_name = match &args.node_name {
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()?.to_string_lossy().to_lowercase(),
        };
        let mut report = Report(Vec::new());
        let client = async {
            let kc = kube::config::Kubeconfig::read_from(&args.kubeconfig)
                .with_context(|| format!("read {}", args.kubeconfig.display()))?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            anyhow::Ok(kube::Client::try_from(cfg)?)
        }
        .await;
        let api_result = match &client {
            Ok(c) => api(c).await,
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        let api_up = api_result.is_ok();
        report.0.push(("api", api_result));
        let n = match (&client, api_up) {
            (Ok(c), true) => node(c, &node_name).await,
            _ => Err(anyhow::anyhow!("the API server does not answer")),
        };
        match (&client, &n) {
            (Ok(c), Ok(n)) => {
                report.0.push(("controllers", controllers(n)));
                report.0.push(("agent", agent(c, n).await));
            }
            (_, n) => {
                let why = n
                    .as_ref()
                    .err()
                    .map_or("no client".into(), |e| format!("{e:#}"));
                report
                    .0
                    .push(("controllers", Err(anyhow::anyhow!("{why}"))));
                report.0.push(("agent", Err(anyhow::anyhow!("{why}"))));
            }
        }
        report.0.push(("proxy", proxy(args.proxy_healthz).await));
        let dns_result = match &n {
            Ok(n) => dns(n, &args.cluster_domain).await,
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        report.0.push(("dns", dns_result));
        report.0.push(("cni", cni(&args)));
        anyhow::Ok(report.print())
    })?;
    if !healthy {
        std::process::exit(1);
    }
    Ok(())
}
