//! Test bed on the real kernel: a claimed number X gives table `oxlet-proxy-test-X`, service
//! network 10.110.X.0/28 (inside the API server's 10.96.0.0/12), links in 10.242.X.0/24 to
//! network namespaces `oxp-X-*` with busybox httpd backends, and an API server in-process.
//! Every address a test sends to is on this machine or in those namespaces; the service
//! network is routed into the client namespace, so nothing can leave through the default route.
//! Everything is removed on drop, and on the next claim of X after a killed run.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};

const CLAIMS: &str = "/run/oxlet-proxy-tests";

pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh runs")
}

#[track_caller]
pub fn sh_ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// One backend: a network namespace linked to the host with a busybox httpd on port 8080.
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub host_if: String,
    procs: Vec<Child>,
}

pub struct Bed {
    pub x: u8,
    pub table: String,
    pub pods: Vec<Pod>,
    /// A namespace acting as a remote client; its only route leads to the host.
    pub client: Pod,
    dir: tempfile::TempDir,
    server: Option<control::Server>,
    pub kubeconfig: PathBuf,
}

impl Bed {
    /// Claims X, builds `backends` pods and a client namespace, starts an API server.
    pub async fn new(backends: usize) -> Result<Bed> {
        let x = claim()?;
        let dir = tempfile::tempdir()?;
        let mut bed = Bed {
            x,
            table: format!("oxlet-proxy-test-{x}"),
            pods: vec![],
            client: Pod {
                netns: String::new(),
                ip: Ipv4Addr::UNSPECIFIED,
                host_ip: Ipv4Addr::UNSPECIFIED,
                host_if: String::new(),
                procs: vec![],
            },
            dir,
            server: None,
            kubeconfig: PathBuf::new(),
        };
        bed.client = bed.link("c", 32, false)?;
        // The service network goes into the client namespace (which drops it) if no rule DNATs it.
        sh_ok(&format!(
            "ip route replace {} dev {}",
            bed.service_cidr(),
            bed.client.host_if
        ));
        for i in 0..backends {
            let name = format!("b{}", i + 1);
            let pod = bed.link(&name, i as u8 + 1, true)?;
            bed.pods.push(pod);
        }
        let mut cfg = control::Config::new(bed.dir.path().join("data"));
        cfg.listen = "127.0.0.1:0".parse()?;
        cfg.kubeconfig = bed.dir.path().join("admin.kubeconfig");
        let server = control::start(cfg).await?;
        bed.kubeconfig = server.kubeconfig.clone();
        bed.server = Some(server);
        // Its 10.96.0.1 is every bed's: a test's table handles only the test's own addresses.
        let services: Api<Service> = Api::namespaced(bed.client().await?, "default");
        services
            .delete("kubernetes", &Default::default())
            .await
            .context("deleting Service kubernetes")?;
        Ok(bed)
    }

    /// Namespace `oxp-X-name` on link k: host 10.242.X.(4k+1)/30, namespace 10.242.X.(4k+2)/30.
    fn link(&self, name: &str, k: u8, httpd: bool) -> Result<Pod> {
        let x = self.x;
        let netns = format!("oxp-{x}-{name}");
        let host_if = format!("oxp{x}-{name}");
        let host_ip = Ipv4Addr::new(10, 242, x, 4 * k + 1);
        let ip = Ipv4Addr::new(10, 242, x, 4 * k + 2);
        sh_ok(&format!(
            "ip netns add {netns} && ip link add {host_if} type veth peer name {host_if}p && \
             ip link set {host_if}p netns {netns} && \
             ip -n {netns} link set {host_if}p name eth0 && ip -n {netns} link set lo up && \
             ip -n {netns} addr add {ip}/30 dev eth0 && ip -n {netns} link set eth0 up && \
             ip -n {netns} route add default via {host_ip} && \
             ip addr add {host_ip}/30 dev {host_if} && ip link set {host_if} up && \
             echo 1 > /proc/sys/net/ipv4/conf/{host_if}/forwarding"
        ));
        let mut pod = Pod {
            netns: netns.clone(),
            ip,
            host_ip,
            host_if,
            procs: vec![],
        };
        if httpd {
            let www = self.dir.path().join(format!("www-{name}"));
            fs::create_dir_all(&www)?;
            fs::write(www.join("index.html"), name)?;
            let child = Command::new("ip")
                .args([
                    "netns", "exec", &netns, "busybox", "httpd", "-f", "-p", "8080", "-h",
                ])
                .arg(&www)
                .stdin(Stdio::null())
                .spawn()
                .context("busybox httpd")?;
            pod.procs.push(child);
            wait_until(Duration::from_secs(5), || {
                sh(&format!(
                    "ip netns exec {netns} curl -sS -m 1 http://{ip}:8080/"
                ))
                .stdout
                    == name.as_bytes()
            })
            .with_context(|| format!("httpd in {netns} answers"))?;
        }
        Ok(pod)
    }

    /// Two namespaces `oxp-X-p1`, `oxp-X-p2` on bridge `oxpXbr` (10.242.X.64/26, gateway .65
    /// on the bridge), as a bridge CNI plugin wires pods; p2 serves HTTP on 8080. Their IPs.
    pub fn bridged_pods(&mut self) -> Result<(Ipv4Addr, Ipv4Addr)> {
        let x = self.x;
        let br = format!("oxp{x}br");
        let gw = Ipv4Addr::new(10, 242, x, 65);
        sh_ok(&format!(
            "ip link add {br} type bridge && ip addr add {gw}/26 dev {br} && ip link set {br} up && \
             echo 1 > /proc/sys/net/ipv4/conf/{br}/forwarding"
        ));
        let mut ips = vec![];
        for (k, name) in ["p1", "p2"].iter().enumerate() {
            let netns = format!("oxp-{x}-{name}");
            let host_if = format!("oxp{x}-{name}");
            let ip = Ipv4Addr::new(10, 242, x, 66 + k as u8);
            sh_ok(&format!(
                "ip netns add {netns} && ip link add {host_if} type veth peer name {host_if}p && \
                 ip link set {host_if}p netns {netns} && \
                 ip -n {netns} link set {host_if}p name eth0 && ip -n {netns} link set lo up && \
                 ip -n {netns} addr add {ip}/26 dev eth0 && ip -n {netns} link set eth0 up && \
                 ip -n {netns} route add default via {gw} && \
                 ip link set {host_if} master {br} && ip link set {host_if} up"
            ));
            ips.push(ip);
        }
        let www = self.dir.path().join("www-p2");
        fs::create_dir_all(&www)?;
        fs::write(www.join("index.html"), "p2")?;
        let netns = format!("oxp-{x}-p2");
        let child = Command::new("ip")
            .args([
                "netns", "exec", &netns, "busybox", "httpd", "-f", "-p", "8080", "-h",
            ])
            .arg(&www)
            .stdin(Stdio::null())
            .spawn()
            .context("busybox httpd")?;
        self.client.procs.push(child);
        let p2 = ips[1];
        wait_until(Duration::from_secs(5), || {
            sh(&format!(
                "ip netns exec {netns} curl -sS -m 1 http://{p2}:8080/"
            ))
            .stdout
                == b"p2"
        })
        .context("httpd in p2 answers")?;
        Ok((ips[0], ips[1]))
    }

    /// A UDP server on `port` in pod `i` that answers every datagram with the pod's name.
    pub fn udp_server(&mut self, i: usize, port: u16) -> Result<()> {
        let name = format!("b{}", i + 1);
        let script = format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0', {port}))\nwhile True:\n    d, a = s.recvfrom(100)\n    s.sendto(b'{name}', a)\n"
        );
        let pod = &mut self.pods[i];
        let child = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "python3", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .context("python3 UDP server")?;
        pod.procs.push(child);
        let (netns, ip) = (pod.netns.clone(), pod.ip);
        wait_until(Duration::from_secs(5), || {
            !sh(&format!("ip netns exec {netns} ss -Hlun 'sport = :{port}'"))
                .stdout
                .is_empty()
        })
        .with_context(|| format!("UDP server on {ip}:{port}"))
    }

    pub fn service_cidr(&self) -> String {
        format!("10.110.{}.0/28", self.x)
    }
    pub fn service_ip(&self, i: u8) -> Ipv4Addr {
        assert!((1..15).contains(&i));
        Ipv4Addr::new(10, 110, self.x, i)
    }
    /// The pods: backends (10.242.X.4-63) and bridged pods (10.242.X.64/26), not the client.
    pub fn cluster_cidr(&self) -> String {
        format!("10.242.{}.0/25", self.x)
    }
    /// A node address that serves NodePorts: the host side of the client's link.
    pub fn node_ip(&self) -> Ipv4Addr {
        self.client.host_ip
    }
    /// A NodePort of this bed's own (30000-32767).
    pub fn node_port(&self, i: u16) -> u16 {
        30000 + self.x as u16 * 10 + i
    }

    pub fn config(&self) -> proxy::Config {
        let mut cfg = proxy::Config::new("node-a");
        cfg.table = self.table.clone();
        cfg.service_cidr = self.service_cidr().parse().unwrap();
        cfg.cluster_cidr = self.cluster_cidr().parse().unwrap();
        cfg.nodeport_addresses = format!("{}/32", self.node_ip()).parse().unwrap();
        cfg.min_sync_period = Duration::from_millis(50);
        // Beds run side by side: their servers take free ports (tests that read them set them).
        cfg.metrics_bind_address = Some("127.0.0.1:0".parse().unwrap());
        cfg.healthz_bind_address = Some("127.0.0.1:0".parse().unwrap());
        cfg
    }

    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// Starts the proxy in this process; it stops when the handle is dropped.
    pub async fn start_proxy(&self) -> Result<ProxyTask> {
        let client = self.client().await?;
        Ok(ProxyTask(tokio::spawn(proxy::run(client, self.config()))))
    }

    /// `nft list table` of this bed's table (empty when there is none).
    pub fn table_text(&self) -> String {
        String::from_utf8_lossy(&sh(&format!("nft list table ip {}", self.table)).stdout)
            .into_owned()
    }
    /// `nft list map` of one map of this bed's table.
    pub fn map(&self, map: &str) -> String {
        String::from_utf8_lossy(&sh(&format!("nft list map ip {} {map}", self.table)).stdout)
            .into_owned()
    }
    /// `nft list set` of one set of this bed's table.
    pub fn set(&self, set: &str) -> String {
        String::from_utf8_lossy(&sh(&format!("nft list set ip {} {set}", self.table)).stdout)
            .into_owned()
    }
    /// Waits until map `map` has an element for `ip . tcp . port` (nft lists `ip . tcp . port`).
    pub async fn wait_element(&self, map: &str, key: &str) -> Result<()> {
        wait_for(Duration::from_secs(10), || self.map(map).contains(key))
            .await
            .with_context(|| format!("{map} has {key}:\n{}", self.table_text()))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        for p in self
            .pods
            .iter_mut()
            .chain(std::iter::once(&mut self.client))
        {
            for mut c in p.procs.drain(..) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        remove(self.x);
        let _ = fs::remove_file(Path::new(CLAIMS).join(self.x.to_string()));
    }
}

/// Everything X may have left: table, namespaces (their veths go with them), bridge.
fn remove(x: u8) {
    let _ = sh(&format!(
        "nft delete table ip oxlet-proxy-test-{x} 2>/dev/null; \
         for n in $(ip netns list | awk '{{print $1}}' | grep '^oxp-{x}-'); do ip netns pids $n | xargs -r kill -9; ip netns del $n; done; \
         for l in $(ip -o link show | awk -F': ' '{{print $2}}' | cut -d@ -f1 | grep '^oxp{x}-'); do ip link del $l; done; \
         ip link del oxp{x}br 2>/dev/null; true"
    ));
}

fn claim() -> Result<u8> {
    fs::create_dir_all(CLAIMS)?;
    let start = (std::process::id() as usize * 7 + rand::random::<u8>() as usize) % 200;
    for i in 0..200 {
        let x = (1 + (start + i) % 200) as u8;
        let path = Path::new(CLAIMS).join(x.to_string());
        let took = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                write!(f, "{}", std::process::id())?;
                true
            }
            Err(_) => {
                let pid: i32 = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                let old = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60))
                    .unwrap_or(true);
                if (pid == 0 && old) || (pid != 0 && !pid_alive(pid)) {
                    fs::write(&path, std::process::id().to_string())?;
                    true
                } else {
                    false
                }
            }
        };
        if took {
            remove(x);
            return Ok(x);
        }
    }
    bail!("no free test number in 1-200 under {CLAIMS}")
}

pub struct ProxyTask(pub tokio::task::JoinHandle<Result<(), proxy::Error>>);

impl Drop for ProxyTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not within {limit:?}")
}

pub async fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("not within {limit:?}")
}

/// What a GET of http://ip:port/ from the host returns: Ok(body) or the connect/read error.
pub async fn get(ip: Ipv4Addr, port: u16) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect((ip, port)).await?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        Ok::<_, std::io::Error>(buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), io)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
}

/// curl of http://ip:port/ run inside network namespace `netns`: Ok(body) or curl's message
/// (busybox's static wget crashes here).
pub async fn get_from(netns: &str, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "-m", "3"])
        .arg(format!("http://{ip}:{port}/"))
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn service(v: serde_json::Value) -> Service {
    serde_json::from_value(v).expect("a Service")
}

pub fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).expect("an EndpointSlice")
}

/// Sends one datagram from the node's `local` socket to ip:port; the answer, if any in 2 s.
pub async fn udp_ask(local: &tokio::net::UdpSocket, ip: Ipv4Addr, port: u16) -> Option<String> {
    local.send_to(b"?", (ip, port)).await.ok()?;
    let mut buf = [0u8; 100];
    let n = tokio::time::timeout(Duration::from_secs(2), local.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

pub async fn create_service(client: &kube::Client, v: serde_json::Value) -> Result<Service> {
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    Ok(api.create(&PostParams::default(), &service(v)).await?)
}

pub async fn create_slice(client: &kube::Client, v: serde_json::Value) -> Result<EndpointSlice> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    Ok(api.create(&PostParams::default(), &slice(v)).await?)
}
