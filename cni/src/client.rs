//! The agent's side of CNI: load a network configuration list, run its plugin chain, cache the
//! result per attachment so DEL and CHECK get it after a restart, and GC stale attachments.
//!
//! Synchronous (plugins are processes); call it from `spawn_blocking` in async code.

use crate::exec::{self, Invocation};
use crate::types::{self, Attachment, CniError, CniResult};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::fs;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_PLUGIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/cni";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no valid network configuration in {0}")]
    NoConfig(PathBuf),
    #[error("network configuration {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("plugin {plugin} {command}: {source}")]
    Plugin {
        plugin: String,
        command: String,
        source: CniError,
    },
    #[error("no cached result for {0} (was it added?)")]
    NoCache(String),
    #[error("result cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A network configuration list (a `.conf` is a list of one).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    pub plugins: Vec<Value>,
    pub source: PathBuf,
}

impl NetworkConfigList {
    /// Parses `.conflist` JSON, or a single plugin's `.conf`/`.json`.
    pub fn parse(bytes: &[u8], source: &Path) -> Result<Self> {
        let bad = |msg: String| ClientError::Config {
            path: source.to_path_buf(),
            msg,
        };
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let name = v["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("no \"name\"".into()))?
            .to_string();
        let cni_version = v["cniVersion"].as_str().unwrap_or("0.4.0").to_string();
        if !types::version_supported(&cni_version) {
            return Err(bad(format!("cniVersion {cni_version} is not supported")));
        }
        let plugins = match v.get("plugins") {
            Some(Value::Array(p)) if !p.is_empty() => p.clone(),
            Some(_) => return Err(bad("\"plugins\" must be a non-empty list".into())),
            None if v["type"].is_string() => vec![v.clone()],
            None => return Err(bad("neither \"plugins\" nor \"type\"".into())),
        };
        if let Some(i) = plugins
            .iter()
            .position(|p| p["type"].as_str().is_none_or(str::is_empty))
        {
            return Err(bad(format!("plugin {i} has no \"type\"")));
        }
        Ok(Self {
            name,
            cni_version,
            disable_check: v["disableCheck"].as_bool().unwrap_or(false),
            disable_gc: v["disableGC"].as_bool().unwrap_or(false),
            plugins,
            source: source.to_path_buf(),
        })
    }

    /// The first valid configuration in `dir` by file name (`.conflist`, `.conf`, `.json`).
    pub fn load_first(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| ClientError::Config {
                path: dir.to_path_buf(),
                msg: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        for f in files {
            match fs::read(&f)
                .map_err(|e| ClientError::Config {
                    path: f.clone(),
                    msg: e.to_string(),
                })
                .and_then(|b| Self::parse(&b, &f))
            {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!("skipping CNI configuration: {e}"),
            }
        }
        Err(ClientError::NoConfig(dir.to_path_buf()))
    }
}

/// What the runtime knows about one attachment.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConf {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` pairs (e.g. `K8S_POD_NAME`).
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `bandwidth`, ...), passed as `runtimeConfig` to
    /// the plugins that declare the capability.
    pub capability_args: Map<String, Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    kind: String,
    #[serde(rename = "containerId")]
    container_id: String,
    #[serde(rename = "ifName")]
    ifname: String,
    #[serde(rename = "networkName")]
    network: String,
    netns: String,
    #[serde(rename = "cniArgs", default)]
    args: Vec<(String, String)>,
    #[serde(rename = "capabilityArgs", default)]
    capability_args: Map<String, Value>,
    result: Value,
}

/// Runs plugin chains.
#[derive(Debug, Clone)]
pub struct Client {
    pub plugin_paths: Vec<PathBuf>,
    pub cache_dir: PathBuf,
}

impl Default for Client {
    fn default() -> Self {
        Self {
            plugin_paths: vec![PathBuf::from(DEFAULT_PLUGIN_DIR)],
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
        }
    }
}

impl Client {
    pub fn new(plugin_paths: Vec<PathBuf>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            plugin_paths,
            cache_dir: cache_dir.into(),
        }
    }

    fn cache_path(&self, net: &str, cid: &str, ifname: &str) -> PathBuf {
        self.cache_dir
            .join("results")
            .join(format!("{net}-{cid}-{ifname}"))
    }

    /// The cached ADD result of an attachment.
    pub fn cached_result(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<Option<Value>> {
        let p = self.cache_path(&net.name, &rt.container_id, &rt.ifname);
        match fs::read(&p) {
            Ok(b) => Ok(serde_json::from_slice::<CacheEntry>(&b)
                .ok()
                .map(|e| e.result)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::Cache { path: p, source: e }),
        }
    }

    fn build_config(
        net: &NetworkConfigList,
        plugin: &Value,
        prev: Option<&Value>,
        rt: &RuntimeConf,
    ) -> Value {
        let mut c = plugin.clone();
        c["name"] = json!(net.name);
        c["cniVersion"] = json!(net.cni_version);
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            let rc: Map<String, Value> = caps
                .iter()
                .filter(|(_, on)| on.as_bool() == Some(true))
                .filter_map(|(k, _)| rt.capability_args.get(k).map(|v| (k.clone(), v.clone())))
                .collect();
            if !rc.is_empty() {
                c["runtimeConfig"] = Value::Object(rc);
            }
        }
        c
    }

    fn invoke(
        &self,
        command: &str,
        plugin: &Value,
        conf: &Value,
        rt: &RuntimeConf,
    ) -> Result<Option<Value>> {
        let kind = plugin["type"].as_str().unwrap_or_default();
        let err = |source| ClientError::Plugin {
            plugin: kind.to_string(),
            command: command.to_string(),
            source,
        };
        let path = exec::find_plugin(kind, &self.plugin_paths).map_err(err)?;
        let args: Vec<String> = rt.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let args = args.join(";");
        let paths: Vec<String> = self
            .plugin_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let paths = paths.join(":");
        let inv = Invocation {
            command,
            container_id: &rt.container_id,
            netns: &rt.netns,
            ifname: &rt.ifname,
            args: &args,
            path: &paths,
        };
        let stdin = serde_json::to_vec(conf).expect("config serializes");
        exec::invoke(&path, &inv, &stdin).map_err(err)
    }

    /// ADD through the chain, each plugin getting the previous one's result; caches the last.
    pub fn add(&self, net: &NetworkConfigList, rt: &RuntimeConf) -> Result<CniResult> {
        let mut prev: Option<Value> = None;
        for plugin in &net.plugins {
            let conf = Self::build_config(net, plugin, prev.as_ref(), rt);
            let out = self.invoke("ADD", plugin, &conf, rt)?;
            prev = Some(out.ok_or_else(|| ClientError::Plugin {
                plugin: plugin["type"].as_str().unwrap_or_default().to_string(),
                command: "ADD".into(),
                source: CniError::internal("the plugin printed no result"),
            })?);
        }
        let result = prev.unwrap_or_else(|| json!({"cniVersion": net.cni_version}));
        self.write_cache(net, rt, &result)?;
        CniResult::from_value(&result).map_err(|e| ClientError::Plugin {
            plugin: net
                .plugins
                .last()
                .and_then(|p| p["type"].as_str())
                .unwrap_or_default()
                .to_string(),
            command: "ADD".into(),
            source: CniError::new(
                types::code::DECODE_FAILURE,
                "cannot decode the chain's result",
            )
            .with_details(e),
        })
    }

    fn write_cache(&self, net: &NetworkConfigList, rt: &RuntimeConf, result: &Value) -> Result<()> {
        let p = self.cache_path(&net.name, &rt.container_id, &rt.ifname);
        let entry = CacheEntry {
            kind: "cniCacheV1".into(),
            container_id: rt.container_id.clone(),
            ifname: rt.ifname.clone(),
            network: net.name.clone(),
            netns: rt.netns.clone(),
            args: rt.args.clone(),
            capability_args: rt.capability_args.clone(),
            result: result.clone(),
        };
        let dir = p.parent().expect("cache path has a parent");
        let io = |source| ClientError::Cache {
            path: p.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = p.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(&entry).expect("cache serializes")).map_err(io)?;
        fs::rename(&tmp, &p).map_err(io)
    }

    /// DEL through the chain in reverse order, with the cached ADD result as prevResult; then
    /// forgets the attachment. Succeeds when there is nothing to delete.
    pub fn del(&self, net: &NetworkConfigList, rt: &RuntimeConf) -> Result<()> {
        let cached = self.cached_result(net, rt)?;
        // Capability args from the ADD (portMappings) so the plugins remove what they added.
        let mut rt = rt.clone();
        if rt.capability_args.is_empty() {
            if let Ok(b) = fs::read(self.cache_path(&net.name, &rt.container_id, &rt.ifname)) {
                if let Ok(e) = serde_json::from_slice::<CacheEntry>(&b) {
                    rt.capability_args = e.capability_args;
                }
            }
        }
        for plugin in net.plugins.iter().rev() {
            let conf = Self::build_config(net, plugin, cached.as_ref(), &rt);
            self.invoke("DEL", plugin, &conf, &rt)?;
        }
        let p = self.cache_path(&net.name, &rt.container_id, &rt.ifname);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClientError::Cache { path: p, source: e }),
        }
    }

    /// CHECK through the chain with the cached result.
    pub fn check(&self, net: &NetworkConfigList, rt: &RuntimeConf) -> Result<()> {
        if net.disable_check {
            return Ok(());
        }
        let cached = self.cached_result(net, rt)?.ok_or_else(|| {
            ClientError::NoCache(format!("{}/{}/{}", net.name, rt.container_id, rt.ifname))
        })?;
        for plugin in &net.plugins {
            let conf = Self::build_config(net, plugin, Some(&cached), rt);
            self.invoke("CHECK", plugin, &conf, rt)?;
        }
        Ok(())
    }

    /// STATUS of every plugin (spec 1.1; older configurations are assumed ready).
    pub fn status(&self, net: &NetworkConfigList) -> Result<()> {
        if !types::version_at_least(&net.cni_version, "1.1.0") {
            return Ok(());
        }
        for plugin in &net.plugins {
            let conf = Self::build_config(net, plugin, None, &RuntimeConf::default());
            self.invoke("STATUS", plugin, &conf, &RuntimeConf::default())?;
        }
        Ok(())
    }

    /// The cached attachments of a network.
    pub fn cached_attachments(&self, net: &NetworkConfigList) -> Vec<(Attachment, String)> {
        let Ok(rd) = fs::read_dir(self.cache_dir.join("results")) else {
            return Vec::new();
        };
        rd.filter_map(|e| fs::read(e.ok()?.path()).ok())
            .filter_map(|b| serde_json::from_slice::<CacheEntry>(&b).ok())
            .filter(|e| e.network == net.name)
            .map(|e| {
                (
                    Attachment {
                        container_id: e.container_id,
                        ifname: e.ifname,
                    },
                    e.netns,
                )
            })
            .collect()
    }

    /// GC: DEL every cached attachment not in `valid`, then (spec 1.1) GC on every plugin.
    pub fn gc(&self, net: &NetworkConfigList, valid: &[Attachment]) -> Result<()> {
        let mut first_err = None;
        for (a, netns) in self.cached_attachments(net) {
            if valid.contains(&a) {
                continue;
            }
            let rt = RuntimeConf {
                container_id: a.container_id,
                ifname: a.ifname,
                netns,
                ..Default::default()
            };
            if let Err(e) = self.del(net, &rt) {
                first_err.get_or_insert(e);
            }
        }
        if types::version_at_least(&net.cni_version, "1.1.0") && !net.disable_gc {
            for plugin in &net.plugins {
                let mut conf = Self::build_config(net, plugin, None, &RuntimeConf::default());
                conf["cni.dev/valid-attachments"] =
                    serde_json::to_value(valid).expect("attachments serialize");
                if let Err(e) = self.invoke("GC", plugin, &conf, &RuntimeConf::default()) {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_lists_and_single_confs() {
        let p = Path::new("x");
        let l = NetworkConfigList::parse(br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#, p).unwrap();
        assert_eq!(l.plugins.len(), 2);
        let s =
            NetworkConfigList::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#, p)
                .unwrap();
        assert_eq!(s.plugins[0]["type"], "bridge");
        assert!(
            NetworkConfigList::parse(br#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#, p)
                .is_err()
        );
        assert!(
            NetworkConfigList::parse(br#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#, p)
                .is_err()
        );
    }

    #[test]
    fn load_first_skips_bad_files() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("00-bad.conflist"), "{").unwrap();
        fs::write(
            d.path().join("10-good.conf"),
            r#"{"cniVersion":"1.0.0","name":"good","type":"bridge"}"#,
        )
        .unwrap();
        fs::write(
            d.path().join("20-other.conflist"),
            r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        fs::write(d.path().join("README"), "x").unwrap();
        assert_eq!(
            NetworkConfigList::load_first(d.path()).unwrap().name,
            "good"
        );
    }

    #[test]
    fn runtime_config_only_for_declared_capabilities() {
        let net = NetworkConfigList::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"x"}"#,
            Path::new("x"),
        )
        .unwrap();
        let mut rt = RuntimeConf::default();
        rt.capability_args.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        let with = Client::build_config(
            &net,
            &json!({"type":"portmap","capabilities":{"portMappings":true}}),
            None,
            &rt,
        );
        assert_eq!(with["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        let without = Client::build_config(&net, &json!({"type":"bridge"}), None, &rt);
        assert!(without.get("runtimeConfig").is_none());
    }
}
