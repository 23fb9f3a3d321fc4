//! Cluster DNS under `oxlet up`: the kube-dns Service at 10.96.0.10 reaches the in-process DNS
//! server through the proxy, and a busybox pod resolves Services by short and full names with
//! the resolv.conf kubelet writes. Names outside the cluster go to an upstream of the test's
//! own on a loopback address (given to `oxlet up` through --resolv-conf), never further.
//!
//! Ignored in the parallel run and run alone by `scripts/test`, as `oxlet up` owns the
//! `oxlet-proxy` table and 10.96.0.0/12.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

const PREFIX: &str = "oxlet-dns-test-";

/// An upstream resolver on a loopback address, port 53 (resolv.conf names no ports):
/// `*.upstream.test` is A 198.51.100.7, everything else NXDOMAIN. Counts queries.
fn upstream() -> (Ipv4Addr, Arc<AtomicUsize>) {
    let (sock, ip) = (0..50)
        .find_map(|_| {
            let ip = Ipv4Addr::new(127, 53, rand::random::<u8>(), rand::random::<u8>().max(1));
            std::net::UdpSocket::bind(SocketAddr::from((ip, 53)))
                .ok()
                .map(|s| (s, ip))
        })
        .expect("a free loopback address for the upstream");
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let zone = Name::from_ascii("upstream.test.").unwrap();
        while let Ok((len, from)) = sock.recv_from(&mut buf) {
            n.fetch_add(1, Ordering::SeqCst);
            let Ok(req) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
            resp.metadata.recursion_desired = req.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.queries = req.queries.clone();
            if let Some(q) = req.queries.first() {
                if !zone.zone_of(q.name()) {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                } else if q.query_type() == RecordType::A {
                    resp.answers.push(Record::from_rdata(
                        q.name().clone(),
                        30,
                        RData::A(A(Ipv4Addr::new(198, 51, 100, 7))),
                    ));
                }
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), from);
        }
    });
    (ip, count)
}

fn nft_service_ips() -> String {
    let out = Command::new("nft")
        .args(["list", "map", "ip", "oxlet-proxy", "service-ips"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "run alone by scripts/test (owns the oxlet-proxy table and 10.96.0.0/12)"]
fn pods_resolve_services_through_the_cluster_dns() {
    let (upstream_ip, upstream_count) = upstream();
    let mut up = Cluster::new(PREFIX);
    let resolv = up.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {upstream_ip}\nsearch upstream.test\noptions edns0\n"),
    )
    .unwrap();
    let kc = up.kubeconfig();
    up.restart_with(&["--resolv-conf", resolv.to_str().unwrap()]);
    until("the API server", Duration::from_secs(30), || {
        kc.exists()
            && kubectl(&kc, &["get", "--raw", "/readyz"], None)
                .status
                .success()
    });
    until("the node Ready", Duration::from_secs(30), || {
        let out = kubectl(
            &kc,
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[0].status.conditions[?(@.type=='Ready')].status}",
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout) == "True"
    });
    let node_ip = ok(kubectl(
        &kc,
        &[
            "get",
            "nodes",
            "-o",
            "jsonpath={.items[0].status.addresses[?(@.type=='InternalIP')].address}",
        ],
        None,
    ));

    // kube-dns as kubeadm's CoreDNS addon has it, with a slice to the node's address port 53.
    until("the kube-dns slice", Duration::from_secs(20), || {
        let out = kubectl(
            &kc,
            &[
                "-n",
                "kube-system",
                "get",
                "endpointslice",
                "kube-dns",
                "-o",
                "jsonpath={.endpoints[0].addresses[0]} {.ports[*].port}",
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout) == format!("{node_ip} 53 53")
    });
    let svc = ok(kubectl(
        &kc,
        &[
            "-n",
            "kube-system",
            "get",
            "svc",
            "kube-dns",
            "-o",
            "jsonpath={.spec.clusterIP} {.metadata.labels.k8s-app} {.spec.ports[*].name} {.spec.ports[*].protocol}",
        ],
        None,
    ));
    assert_eq!(svc, "10.96.0.10 kube-dns dns dns-tcp UDP TCP");

    // Deleted, it comes back (level-triggered), with its slice.
    ok(kubectl(
        &kc,
        &["-n", "kube-system", "delete", "svc", "kube-dns"],
        None,
    ));
    until("kube-dns made again", Duration::from_secs(20), || {
        let out = kubectl(
            &kc,
            &[
                "-n",
                "kube-system",
                "get",
                "svc",
                "kube-dns",
                "-o",
                "jsonpath={.spec.clusterIP}",
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout) == "10.96.0.10"
    });

    // No packet goes to 10.96.0.10 (nor 10.96.0.1) before the proxy's rules for it exist.
    until("the rules for 10.96.0.10", Duration::from_secs(20), || {
        let m = nft_service_ips();
        m.contains("10.96.0.10 . udp . 53")
            && m.contains("10.96.0.10 . tcp . 53")
            && m.contains("10.96.0.1 . tcp . 443")
    });

    let web_ip = {
        ok(kubectl(
            &kc,
            &["create", "service", "clusterip", "dns-web", "--tcp=80:8080"],
            None,
        ));
        ok(kubectl(
            &kc,
            &["get", "svc", "dns-web", "-o", "jsonpath={.spec.clusterIP}"],
            None,
        ))
    };
    // busybox nslookup applies the search list to dotless names only (unlike libc's ndots), so
    // `kubernetes.default` is also resolved through libc, by ping (whose ICMP the proxy's
    // reject rule for ClusterIPs answers on this machine).
    let script = "cat /etc/resolv.conf; echo ===; nslookup kubernetes; echo ===; \
                  nslookup kubernetes.default.svc.cluster.local; echo ===; \
                  nslookup dns-web.default.svc.cluster.local; echo ===; \
                  nslookup www.upstream.test; echo ===; \
                  ping -c 1 -W 1 kubernetes.default; echo ===; \
                  ping -c 1 -W 1 dns-web; echo ===";
    let image = busybox();
    let pod = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: dns-client}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 0
  containers:
  - name: c
    image: {image}
    command: [sh, -c, '{script}']
"
    );
    ok(kubectl(&kc, &["apply", "-f", "-"], Some(&pod)));
    until("the pod finished", Duration::from_secs(120), || {
        let out = kubectl(
            &kc,
            &["get", "pod", "dns-client", "-o", "jsonpath={.status.phase}"],
            None,
        );
        matches!(
            String::from_utf8_lossy(&out.stdout).as_ref(),
            "Succeeded" | "Failed"
        )
    });
    let uid = ok(kubectl(
        &kc,
        &["get", "pod", "dns-client", "-o", "jsonpath={.metadata.uid}"],
        None,
    ));
    let log_path = up
        .path()
        .join(format!("logs/default_dns-client_{uid}/c/0.log"));
    let log = std::fs::read_to_string(&log_path).unwrap();
    // CRI log lines: `<time> <stream> <P|F> <text>`.
    let out: String = log
        .lines()
        .map(|l| l.splitn(4, ' ').nth(3).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let parts: Vec<&str> = out.split("===").map(str::trim).collect();
    assert_eq!(
        parts[0],
        "search default.svc.cluster.local svc.cluster.local cluster.local upstream.test\n\
         nameserver 10.96.0.10\noptions ndots:5",
        "the pod's resolv.conf, as kubelet writes it\n{out}"
    );
    let address_of = |part: &str, ip: &str| {
        part.lines()
            .any(|l| l.starts_with("Address") && l.split_whitespace().last() == Some(ip))
    };
    assert!(address_of(parts[1], "10.96.0.1"), "kubernetes:\n{out}");
    assert!(
        address_of(parts[2], "10.96.0.1"),
        "kubernetes.default.svc.cluster.local:\n{out}"
    );
    assert!(address_of(parts[3], &web_ip), "dns-web full name:\n{out}");
    assert!(
        address_of(parts[4], "198.51.100.7"),
        "forwarded name:\n{out}"
    );
    assert!(
        parts[5].starts_with("PING kubernetes.default (10.96.0.1)"),
        "kubernetes.default through libc:\n{out}"
    );
    assert!(
        parts[6].starts_with(&format!("PING dns-web ({web_ip})")),
        "dns-web through libc:\n{out}"
    );
    assert!(upstream_count.load(Ordering::SeqCst) > 0);

    ok(kubectl(
        &kc,
        &["delete", "pod", "dns-client", "--wait"],
        None,
    ));
    ok(kubectl(&kc, &["delete", "svc", "dns-web"], None));
}
