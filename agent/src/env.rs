//! A container's environment as kubelet builds it: envFrom, then env in order (values with
//! `$(VAR)` expanded, valueFrom resolved), then the Service variables the container did not set;
//! and `$(VAR)` expansion of command, args and subPathExpr with the result.

use crate::fieldpath;
use crate::objects::{ConfigError, Objects};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::{BTreeMap, HashMap};

/// `$(VAR)` references replaced through `mapping` (unknown names stay as written), `$$` is a
/// literal `$`, as Kubernetes' expansion package does.
pub fn expand(input: &str, mut mapping: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if after.is_empty() {
            out.push('$');
            rest = after;
        } else if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match mapping(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// An environment keeping the order in which names were first set.
#[derive(Debug, Default, Clone)]
pub struct Env {
    vars: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl Env {
    pub fn set(&mut self, k: String, v: String) {
        match self.index.get(&k) {
            Some(&i) => self.vars[i].1 = v,
            None => {
                self.index.insert(k.clone(), self.vars.len());
                self.vars.push((k, v));
            }
        }
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.index.get(k).map(|&i| self.vars[i].1.as_str())
    }

    pub fn into_vec(self) -> Vec<(String, String)> {
        self.vars
    }

    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// `expand` over these variables.
    pub fn expand(&self, s: &str) -> String {
        expand(s, |k| self.get(k).map(String::from))
    }
}

/// `my-svc` -> `MY_SVC`.
fn env_name(service: &str) -> String {
    service.to_ascii_uppercase().replace('-', "_")
}

/// The variables kubelet gives for Services: `<NAME>_SERVICE_HOST`, `_SERVICE_PORT` (and one
/// per named port) and the docker-link style `<NAME>_PORT...`. Services without a cluster IP
/// get none. With `links` false only the `kubernetes` Service of `default` counts.
pub fn service_env(ns: &str, services: &[Service], links: bool) -> Env {
    let mut chosen: BTreeMap<String, &Service> = BTreeMap::new();
    for s in services {
        let name = s.metadata.name.clone().unwrap_or_default();
        let sns = s.metadata.namespace.as_deref().unwrap_or("default");
        if sns == "default" && name == "kubernetes" {
            chosen.entry(name).or_insert(s);
        } else if sns == ns && links {
            chosen.insert(name, s);
        }
    }
    let mut env = Env::default();
    for (name, s) in chosen {
        let Some(spec) = s.spec.as_ref() else {
            continue;
        };
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        let ports = spec.ports.clone().unwrap_or_default();
        if ip.is_empty() || ip == "None" || ports.is_empty() {
            continue;
        }
        let prefix = env_name(&name);
        env.set(format!("{prefix}_SERVICE_HOST"), ip.clone());
        env.set(format!("{prefix}_SERVICE_PORT"), ports[0].port.to_string());
        for p in &ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                env.set(
                    format!("{prefix}_SERVICE_PORT_{}", env_name(pn)),
                    p.port.to_string(),
                );
            }
        }
        for (i, p) in ports.iter().enumerate() {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let lower = proto.to_ascii_lowercase();
            let host_port = if ip.contains(':') {
                format!("[{ip}]:{}", p.port)
            } else {
                format!("{ip}:{}", p.port)
            };
            let url = format!("{lower}://{host_port}");
            if i == 0 {
                env.set(format!("{prefix}_PORT"), url.clone());
            }
            let pp = format!("{prefix}_PORT_{}_{}", p.port, proto.to_ascii_uppercase());
            env.set(pp.clone(), url);
            env.set(format!("{pp}_PROTO"), lower);
            env.set(format!("{pp}_PORT"), p.port.to_string());
            env.set(format!("{pp}_ADDR"), ip.clone());
        }
    }
    env
}

/// What besides the API the environment is made from.
pub struct EnvContext<'a> {
    pub host_ip: &'a str,
    pub pod_ips: &'a [String],
    pub allocatable: &'a BTreeMap<String, Quantity>,
}

/// ConfigMaps and Secrets read once per container, as kubelet does.
struct Cache<'a> {
    objects: &'a Objects,
    ns: &'a str,
    config_maps: HashMap<String, ConfigMap>,
    secrets: HashMap<String, Secret>,
}

impl Cache<'_> {
    /// The ConfigMap, `None` when it is missing and `optional`.
    async fn config_map(
        &mut self,
        name: &str,
        optional: bool,
    ) -> Result<Option<&ConfigMap>, ConfigError> {
        if !self.config_maps.contains_key(name) {
            match self.objects.config_map(self.ns, name).await {
                Ok(cm) => {
                    self.config_maps.insert(name.into(), cm);
                }
                Err(e) if e.is_not_found() && optional => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(self.config_maps.get(name))
    }

    async fn secret(&mut self, name: &str, optional: bool) -> Result<Option<&Secret>, ConfigError> {
        if !self.secrets.contains_key(name) {
            match self.objects.secret(self.ns, name).await {
                Ok(s) => {
                    self.secrets.insert(name.into(), s);
                }
                Err(e) if e.is_not_found() && optional => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(self.secrets.get(name))
    }
}

fn text(b: &k8s_openapi::ByteString) -> String {
    String::from_utf8_lossy(&b.0).into_owned()
}

/// The container's environment (without the image's, which the runtime puts first).
pub async fn container_env(
    objects: &Objects,
    pod: &Pod,
    c: &Container,
    cx: &EnvContext<'_>,
) -> Result<Env, ConfigError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref();
    let links = spec.and_then(|s| s.enable_service_links).unwrap_or(true);
    let services = objects.services(ns).await?;
    let service = service_env(ns, &services, links);
    let mut cache = Cache {
        objects,
        ns,
        config_maps: HashMap::new(),
        secrets: HashMap::new(),
    };
    let mut env = Env::default();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            let Some(cm) = cache.config_map(&r.name, r.optional == Some(true)).await? else {
                continue;
            };
            for (k, v) in cm.data.iter().flatten() {
                env.set(format!("{prefix}{k}"), v.clone());
            }
        } else if let Some(r) = &from.secret_ref {
            let Some(s) = cache.secret(&r.name, r.optional == Some(true)).await? else {
                continue;
            };
            for (k, v) in s.data.iter().flatten() {
                env.set(format!("{prefix}{k}"), text(v));
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) if !v.is_empty() => expand(v, |k| {
                env.get(k).or_else(|| service.get(k)).map(String::from)
            }),
            (_, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    fieldpath::env_field(pod, f, cx.host_ip, cx.pod_ips)?
                } else if let Some(r) = &from.resource_field_ref {
                    match r.container_name.as_deref().filter(|n| !n.is_empty()) {
                        Some(other) if other != c.name => {
                            fieldpath::pod_container_resource(pod, other, r, cx.allocatable)?
                        }
                        _ => fieldpath::container_resource(c, r, cx.allocatable)?,
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional == Some(true);
                    let Some(cm) = cache.config_map(&r.name, optional).await? else {
                        continue;
                    };
                    match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => {
                            return Err(ConfigError::MissingKey {
                                key: r.key.clone(),
                                kind: "ConfigMap",
                                namespace: ns.into(),
                                name: r.name.clone(),
                            })
                        }
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional == Some(true);
                    let Some(s) = cache.secret(&r.name, optional).await? else {
                        continue;
                    };
                    match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                        Some(v) => text(v),
                        None if optional => continue,
                        None => {
                            return Err(ConfigError::MissingKey {
                                key: r.key.clone(),
                                kind: "Secret",
                                namespace: ns.into(),
                                name: r.name.clone(),
                            })
                        }
                    }
                } else {
                    String::new()
                }
            }
            _ => String::new(),
        };
        env.set(e.name.clone(), value);
    }
    for (k, v) in service.into_vec() {
        if env.get(&k).is_none() {
            env.set(k, v);
        }
    }
    Ok(env)
}

/// The container with `$(VAR)` in command and args expanded from `env`.
pub fn expand_command(c: &Container, env: &Env) -> Container {
    let mut c = c.clone();
    for list in [&mut c.command, &mut c.args].into_iter().flatten() {
        for s in list.iter_mut() {
            *s = env.expand(s);
        }
    }
    c
}

/// A subPathExpr expanded from `env`; a reference to a variable that is unset or empty is an
/// error, as in kubelet.
pub fn expand_sub_path(expr: &str, env: &Env) -> Result<String, ConfigError> {
    let mut missing: Vec<String> = Vec::new();
    let out = expand(expr, |k| match env.get(k) {
        Some(v) if !v.is_empty() => Some(v.to_string()),
        _ => {
            missing.push(k.to_string());
            Some(String::new())
        }
    });
    if missing.is_empty() {
        Ok(out)
    } else {
        missing.sort();
        missing.dedup();
        Err(ConfigError::SubPath(format!(
            "missing value for {}",
            missing.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_as_kubernetes_does_it() {
        let m = |k: &str| match k {
            "A" => Some("x".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(expand("$(A)-$(A)", m), "x-x");
        assert_eq!(expand("$(B)", m), "$(B)");
        assert_eq!(expand("$$(A)", m), "$(A)");
        assert_eq!(expand("$$$(A)", m), "$x");
        assert_eq!(expand("a$b", m), "a$b");
        assert_eq!(expand("$(A", m), "$(A");
        assert_eq!(expand("tail$", m), "tail$");
        assert_eq!(expand("$(EMPTY)|", m), "|");
        assert_eq!(expand("ü$(A)ü", m), "üxü");
    }

    #[test]
    fn service_variables_and_links() {
        let svc: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "kubernetes", "namespace": "default"},
             "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}},
            {"metadata": {"name": "redis-primary", "namespace": "app"},
             "spec": {"clusterIP": "10.96.3.4", "ports": [{"port": 6379, "protocol": "TCP"}, {"name": "metrics", "port": 9121, "protocol": "TCP"}]}},
            {"metadata": {"name": "headless", "namespace": "app"},
             "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}
        ]))
        .unwrap();
        let env = service_env("app", &svc, true);
        let get = |k: &str| env.get(k).map(String::from);
        assert_eq!(get("KUBERNETES_SERVICE_HOST").as_deref(), Some("10.96.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT").as_deref(), Some("443"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT_HTTPS").as_deref(), Some("443"));
        assert_eq!(
            get("KUBERNETES_PORT").as_deref(),
            Some("tcp://10.96.0.1:443")
        );
        assert_eq!(
            get("REDIS_PRIMARY_PORT_6379_TCP_ADDR").as_deref(),
            Some("10.96.3.4")
        );
        assert_eq!(
            get("REDIS_PRIMARY_SERVICE_PORT_METRICS").as_deref(),
            Some("9121")
        );
        assert_eq!(get("HEADLESS_SERVICE_HOST"), None);
        let env = service_env("app", &svc, false);
        assert!(env.get("KUBERNETES_SERVICE_HOST").is_some());
        assert!(env.get("REDIS_PRIMARY_SERVICE_HOST").is_none());
    }

    #[test]
    fn sub_path_expr_needs_every_variable() {
        let mut env = Env::default();
        env.set("POD".into(), "p-1".into());
        env.set("EMPTY".into(), String::new());
        assert_eq!(expand_sub_path("logs/$(POD)", &env).unwrap(), "logs/p-1");
        let e = expand_sub_path("$(EMPTY)/$(NONE)", &env).unwrap_err();
        assert_eq!(e.to_string(), "missing value for EMPTY, NONE");
    }
}
