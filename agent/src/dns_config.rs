//! A pod's /etc/resolv.conf per its dnsPolicy and dnsConfig, as kubelet computes it and the
//! runtime writes it (`search`, `nameserver`, `options` lines), and the names of the pod's own
//! line in /etc/hosts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, PodDNSConfig};

/// kubelet's limits: what the resolvers of common libcs read.
pub const MAX_NAMESERVERS: usize = 3;
pub const MAX_SEARCHES: usize = 32;
pub const MAX_SEARCH_CHARS: usize = 2048;

const STUB: &str = "127.0.0.53";
const SYSTEMD_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// A resolver configuration: what a resolv.conf says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DnsConfig {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl DnsConfig {
    /// Reads a resolv.conf as kubelet does: `nameserver`, the last `search` line, `options`.
    pub fn parse(text: &str) -> DnsConfig {
        let mut c = DnsConfig::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("nameserver") => {
                    if let Some(ip) = fields.next().filter(|f| f.parse::<IpAddr>().is_ok()) {
                        c.nameservers.push(ip.to_string());
                    }
                }
                Some("search") => {
                    c.searches = fields
                        .filter(|s| *s != ".")
                        .map(|s| s.trim_end_matches('.').to_string())
                        .collect();
                }
                Some("options") => c.options = merge_options(&c.options, fields),
                _ => {}
            }
        }
        c
    }

    /// The file the runtime writes (containerd's layout); empty when there is nothing to say.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.searches.is_empty() {
            s.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for n in &self.nameservers {
            s.push_str(&format!("nameserver {n}\n"));
        }
        if !self.options.is_empty() {
            s.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        s
    }
}

/// The node's resolv.conf: /etc/resolv.conf, or systemd-resolved's list of upstreams when the
/// former names only its local stub, which pods cannot reach.
pub fn host_resolv_conf() -> PathBuf {
    choose_host_file(
        Path::new("/etc/resolv.conf"),
        Path::new(SYSTEMD_RESOLV_CONF),
    )
}

fn choose_host_file(etc: &Path, systemd: &Path) -> PathBuf {
    let etc_cfg = DnsConfig::parse(&std::fs::read_to_string(etc).unwrap_or_default());
    let only_stub =
        !etc_cfg.nameservers.is_empty() && etc_cfg.nameservers.iter().all(|n| n == STUB);
    if only_stub && systemd.exists() {
        systemd.to_path_buf()
    } else {
        etc.to_path_buf()
    }
}

/// Options by name: a later `name` or `name:value` replaces an earlier one.
fn merge_options<'a>(base: &[String], more: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = base.to_vec();
    for o in more {
        let key = o.split(':').next().unwrap_or(o);
        match out
            .iter_mut()
            .find(|e| e.split(':').next().unwrap_or(e) == key)
        {
            Some(e) => *e = o.to_string(),
            None => out.push(o.to_string()),
        }
    }
    out
}

fn push_unique(list: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for i in items {
        if !list.contains(&i) {
            list.push(i);
        }
    }
}

/// How a pod's resolver is made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Cluster,
    Host,
    None,
}

/// The pod's resolver configuration: `cluster_dns` and `cluster_domain` are kubelet's
/// `--cluster-dns` and `--cluster-domain`, `host` the node's resolv.conf. A ClusterFirst pod on
/// a node without cluster DNS gets the node's, as kubelet does.
pub fn for_pod(
    pod: &Pod,
    cluster_dns: &[IpAddr],
    cluster_domain: &str,
    host: &DnsConfig,
) -> DnsConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network == Some(true);
    let mut kind = match spec.dns_policy.as_deref() {
        Some("None") => Kind::None,
        Some("Default") => Kind::Host,
        Some("ClusterFirstWithHostNet") => Kind::Cluster,
        // ClusterFirst, the default.
        _ if host_network => Kind::Host,
        _ => Kind::Cluster,
    };
    if kind == Kind::Cluster && cluster_dns.is_empty() {
        tracing::warn!(pod = ?pod.metadata.name, "no --cluster-dns: the pod gets the node's resolvers (dnsPolicy Default)");
        kind = Kind::Host;
    }
    let domain = cluster_domain.trim_matches('.');
    let mut cfg = match kind {
        Kind::None => DnsConfig::default(),
        Kind::Host => host.clone(),
        Kind::Cluster => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            let mut searches = Vec::new();
            if !domain.is_empty() {
                searches = vec![
                    format!("{ns}.svc.{domain}"),
                    format!("svc.{domain}"),
                    domain.to_string(),
                ];
            }
            push_unique(&mut searches, host.searches.iter().cloned());
            DnsConfig {
                nameservers: cluster_dns.iter().map(IpAddr::to_string).collect(),
                searches,
                options: vec!["ndots:5".into()],
            }
        }
    };
    if let Some(extra) = &spec.dns_config {
        append(&mut cfg, extra);
    }
    fit_limits(&mut cfg);
    cfg
}

fn append(cfg: &mut DnsConfig, extra: &PodDNSConfig) {
    push_unique(
        &mut cfg.nameservers,
        extra.nameservers.iter().flatten().cloned(),
    );
    push_unique(
        &mut cfg.searches,
        extra
            .searches
            .iter()
            .flatten()
            .map(|s| s.trim_end_matches('.').to_string()),
    );
    let opts: Vec<String> = extra
        .options
        .iter()
        .flatten()
        .map(|o| match &o.value {
            Some(v) => format!("{}:{v}", o.name.as_deref().unwrap_or_default()),
            None => o.name.clone().unwrap_or_default(),
        })
        .collect();
    cfg.options = merge_options(&cfg.options, opts.iter().map(String::as_str));
}

/// kubelet's limits: 3 nameservers, 32 search domains of at most 2048 characters in all.
fn fit_limits(cfg: &mut DnsConfig) {
    if cfg.nameservers.len() > MAX_NAMESERVERS {
        tracing::warn!(omitted = ?&cfg.nameservers[MAX_NAMESERVERS..], "nameserver limits exceeded");
        cfg.nameservers.truncate(MAX_NAMESERVERS);
    }
    if cfg.searches.len() > MAX_SEARCHES {
        cfg.searches.truncate(MAX_SEARCHES);
    }
    while cfg.searches.join(" ").len() > MAX_SEARCH_CHARS {
        cfg.searches.pop();
    }
}

/// The content of the pod's /etc/resolv.conf; `None` when the computed configuration is empty,
/// where the runtime copies the node's file (as containerd does).
pub fn resolv_conf(pod: &Pod, cfg: &crate::Config) -> Option<String> {
    let host = DnsConfig::parse(&std::fs::read_to_string(&cfg.resolv_conf).unwrap_or_default());
    let text = for_pod(pod, &cfg.cluster_dns, &cfg.cluster_domain, &host).render();
    (!text.is_empty()).then_some(text)
}

/// The names on the pod's own /etc/hosts line: `hostname`, preceded by its fully qualified
/// name `<hostname>.<subdomain>.<ns>.svc.<domain>` when the pod has a subdomain (kubelet's
/// line is `IP<TAB>FQDN<TAB>hostname`).
pub fn hosts_names(pod: &Pod, hostname: &str, cluster_domain: &str) -> String {
    let spec = pod.spec.as_ref();
    let domain = cluster_domain.trim_matches('.');
    match spec.and_then(|s| s.subdomain.as_deref()) {
        Some(sub) if !sub.is_empty() && !domain.is_empty() => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            format!("{hostname}.{sub}.{ns}.svc.{domain}\t{hostname}")
        }
        _ => hostname.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodDNSConfigOption, PodSpec};

    fn pod(ns: &str, policy: Option<&str>, host_network: bool, dns: Option<PodDNSConfig>) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("p".into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                dns_policy: policy.map(Into::into),
                host_network: Some(host_network),
                dns_config: dns,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn host() -> DnsConfig {
        DnsConfig::parse(
            "# comment\nnameserver 192.0.2.53\nnameserver bogus\nnameserver 2001:db8::53 ; v6\n\
             search old.example\nsearch corp.example. lan\noptions edns0 ndots:2\noptions timeout:3\n",
        )
    }

    const DNS: &[IpAddr] = &[IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10))];

    #[test]
    fn host_file_is_read_as_kubelet_reads_it() {
        assert_eq!(
            host(),
            DnsConfig {
                nameservers: vec!["192.0.2.53".into(), "2001:db8::53".into()],
                searches: vec!["corp.example".into(), "lan".into()],
                options: vec!["edns0".into(), "ndots:2".into(), "timeout:3".into()],
            }
        );
    }

    #[test]
    fn cluster_first() {
        let text = for_pod(
            &pod("web", None, false, None),
            DNS,
            "cluster.local",
            &host(),
        )
        .render();
        assert_eq!(
            text,
            "search web.svc.cluster.local svc.cluster.local cluster.local corp.example lan\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
        let explicit = for_pod(
            &pod("web", Some("ClusterFirst"), false, None),
            DNS,
            "cluster.local",
            &host(),
        );
        assert_eq!(explicit.render(), text);
    }

    #[test]
    fn default_and_host_network() {
        let want = "search corp.example lan\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n\
                    options edns0 ndots:2 timeout:3\n";
        let d = for_pod(
            &pod("a", Some("Default"), false, None),
            DNS,
            "cluster.local",
            &host(),
        );
        assert_eq!(d.render(), want);
        // ClusterFirst on the host network falls back to the node's resolvers...
        let hn = for_pod(&pod("a", None, true, None), DNS, "cluster.local", &host());
        assert_eq!(hn.render(), want);
        // ...unless asked for with ClusterFirstWithHostNet.
        let cw = for_pod(
            &pod("a", Some("ClusterFirstWithHostNet"), true, None),
            DNS,
            "cluster.local",
            &host(),
        );
        assert_eq!(cw.nameservers, vec!["10.96.0.10"]);
        assert_eq!(cw.searches[0], "a.svc.cluster.local");
        // Without cluster DNS, ClusterFirst is Default.
        let none = for_pod(&pod("a", None, false, None), &[], "cluster.local", &host());
        assert_eq!(none.render(), want);
    }

    #[test]
    fn none_with_dns_config() {
        let cfg = PodDNSConfig {
            nameservers: Some(vec!["192.0.2.1".into()]),
            searches: Some(vec![
                "ns1.svc.cluster-domain.example".into(),
                "my.dns.search.suffix".into(),
            ]),
            options: Some(vec![
                PodDNSConfigOption {
                    name: Some("ndots".into()),
                    value: Some("2".into()),
                },
                PodDNSConfigOption {
                    name: Some("edns0".into()),
                    value: None,
                },
            ]),
        };
        // The example of the Kubernetes documentation.
        let c = for_pod(
            &pod("a", Some("None"), false, Some(cfg)),
            DNS,
            "cluster.local",
            &host(),
        );
        assert_eq!(
            c.render(),
            "search ns1.svc.cluster-domain.example my.dns.search.suffix\nnameserver 192.0.2.1\n\
             options ndots:2 edns0\n"
        );
        // None without dnsConfig says nothing: the runtime copies the node's file.
        let empty = for_pod(
            &pod("a", Some("None"), false, None),
            DNS,
            "cluster.local",
            &host(),
        );
        assert_eq!(empty.render(), "");
    }

    #[test]
    fn dns_config_merges_into_cluster_first() {
        let cfg = PodDNSConfig {
            nameservers: Some(vec!["10.96.0.10".into(), "192.0.2.7".into()]),
            searches: Some(vec!["svc.cluster.local".into(), "extra.example".into()]),
            options: Some(vec![
                PodDNSConfigOption {
                    name: Some("ndots".into()),
                    value: Some("1".into()),
                },
                PodDNSConfigOption {
                    name: Some("single-request-reopen".into()),
                    value: None,
                },
            ]),
        };
        let c = for_pod(
            &pod("web", None, false, Some(cfg)),
            DNS,
            "cluster.local.",
            &host(),
        );
        assert_eq!(c.nameservers, vec!["10.96.0.10", "192.0.2.7"]);
        assert_eq!(
            c.searches,
            vec![
                "web.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
                "lan",
                "extra.example"
            ]
        );
        assert_eq!(c.options, vec!["ndots:1", "single-request-reopen"]);
    }

    #[test]
    fn limits() {
        let cfg = PodDNSConfig {
            nameservers: Some((1..=5).map(|i| format!("192.0.2.{i}")).collect()),
            searches: Some((0..40).map(|i| format!("s{i}.example")).collect()),
            options: None,
        };
        let c = for_pod(
            &pod("a", Some("None"), false, Some(cfg)),
            DNS,
            "cluster.local",
            &host(),
        );
        assert_eq!(c.nameservers, vec!["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert_eq!(c.searches.len(), MAX_SEARCHES);
        assert_eq!(c.searches[31], "s31.example");
        let long = PodDNSConfig {
            searches: Some((0..20).map(|i| format!("{i:0>200}")).collect()),
            ..Default::default()
        };
        let c = for_pod(
            &pod("a", Some("None"), false, Some(long)),
            DNS,
            "cluster.local",
            &host(),
        );
        assert!(c.searches.join(" ").len() <= MAX_SEARCH_CHARS);
        assert_eq!(c.searches.len(), 10);
    }

    #[test]
    fn stub_resolver_means_systemd_file() {
        let dir = tempfile::tempdir().unwrap();
        let (etc, sd) = (dir.path().join("etc"), dir.path().join("sd"));
        std::fs::write(&etc, "nameserver 127.0.0.53\noptions edns0 trust-ad\n").unwrap();
        assert_eq!(choose_host_file(&etc, &sd), etc);
        std::fs::write(&sd, "nameserver 192.0.2.53\n").unwrap();
        assert_eq!(choose_host_file(&etc, &sd), sd);
        std::fs::write(&etc, "nameserver 127.0.0.53\nnameserver 192.0.2.9\n").unwrap();
        assert_eq!(choose_host_file(&etc, &sd), etc);
    }

    #[test]
    fn hosts_line_names() {
        let mut p = pod("web", None, false, None);
        assert_eq!(hosts_names(&p, "h", "cluster.local"), "h");
        p.spec.as_mut().unwrap().subdomain = Some("sub".into());
        assert_eq!(
            hosts_names(&p, "h", "cluster.local"),
            "h.sub.web.svc.cluster.local\th"
        );
    }
}
