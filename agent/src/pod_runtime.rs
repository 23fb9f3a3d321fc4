//! What the runtime holds for each pod, and the steps that change it: the pod cgroup, sandbox
//! and network; pulling images (one pull per image at a time); creating, starting and stopping
//! containers; tearing a pod down. Pod records on disk make all of it findable after a restart.
//!
//! Container ids are `<pod uid>_<container name>_<attempt>`, so the runtime's own list says
//! which containers a pod has and how often each was restarted.

use crate::status::{Attempt, ContainerRecord, PodSnapshot, RunState};
use crate::{Config, Error, Result};
use cni::client::{Client as CniClient, NetworkConfigList, RuntimeConf};
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::jiff::Timestamp;
use runtime::container::State;
use runtime::cri::{ContainerRequest, Runtime};
use runtime::image::{DockerConfig, Image, ImageStore, PullOptions, PullPolicy};
use runtime::sandbox::SandboxConfig;
use runtime::spec::Mount;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The pod interface name inside the sandbox.
pub const IFNAME: &str = "eth0";

/// What the agent made for a pod, kept in `<data>/pods/<uid>/pod.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub cgroup: String,
    pub host_network: bool,
    /// The CNI network the pod is attached to, once ADD succeeded.
    pub network: Option<String>,
    /// The network an ADD was started on and has not finished: a DEL undoes whatever it made
    /// (IP, veth, hostPort rules) if the agent was killed meanwhile.
    #[serde(default)]
    pub network_pending: Option<String>,
    pub pod_ips: Vec<String>,
}

/// The image a container attempt was made from, kept next to the pod record, with where its
/// termination message comes from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ImageRecord {
    image: String,
    image_id: String,
    /// terminationMessagePolicy FallbackToLogsOnError: this log's end when the file is empty.
    #[serde(default)]
    fallback_log: Option<PathBuf>,
}

/// Most of a termination message file kubelet reads (its end).
const MAX_TERMINATION_MESSAGE: u64 = 4096;
/// The log tail kubelet reports for FallbackToLogsOnError: lines, then bytes.
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;

/// The last `max` bytes of a file.
fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// The end of a CRI log as `kubectl logs --tail` shows it: the last 80 lines, at most 2048
/// bytes.
fn log_tail(path: &Path) -> Option<String> {
    // Generous for 80 lines of records; the limits below cut it to size.
    let raw = read_tail(path, 256 * 1024).ok()?;
    let mut text = Vec::new();
    for line in raw.split(|&b| b == b'\n') {
        if let Some(r) = runtime::log::parse_record(line) {
            text.extend_from_slice(&r.message);
            if !r.partial {
                text.push(b'\n');
            }
        }
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut tail = lines[lines.len().saturating_sub(FALLBACK_LOG_LINES)..].concat();
    if tail.len() > FALLBACK_LOG_BYTES {
        let mut cut = tail.len() - FALLBACK_LOG_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = tail[cut..].to_string();
    }
    Some(tail)
}

pub struct PodRuntime {
    pub cfg: Config,
    pub rt: Arc<Runtime>,
    pub images: ImageStore,
    pub cni: CniClient,
    pub host_ip: IpAddr,
    /// The node's allocatable resources: limits a container leaves unset, for the downward API
    /// and memory-backed volumes.
    pub allocatable: BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    pull_opts: PullOptions,
    pulls: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The pods being worked on, by uid, as last seen from the API (the kubelet API's /pods).
    pods: Mutex<BTreeMap<String, Arc<Pod>>>,
    /// The UID of each static pod's mirror in the API, by static pod UID.
    mirrors: Mutex<HashMap<String, String>>,
}

/// A container id for attempt `attempt` of container `name` of pod `uid`.
pub fn container_id(uid: &str, name: &str, attempt: u32) -> String {
    format!("{uid}_{name}_{attempt}")
}

/// `(uid, name, attempt)` of an id made by `container_id`.
pub fn parse_container_id(id: &str) -> Option<(&str, &str, u32)> {
    let mut parts = id.splitn(3, '_');
    let (uid, name, attempt) = (parts.next()?, parts.next()?, parts.next()?);
    Some((uid, name, attempt.parse().ok()?))
}

/// `repository@digest`, the imageID kubelet reports.
pub fn image_id(img: &Image) -> String {
    let r = img.reference.split('@').next().unwrap_or(&img.reference);
    let repo = match r.rfind(':') {
        Some(i) if !r[i..].contains('/') => &r[..i],
        _ => r,
    };
    format!("{repo}@{}", img.digest)
}

/// The container's imagePullPolicy, defaulted as the API server does (Always for `:latest`
/// or no tag).
pub fn pull_policy(c: &Container) -> PullPolicy {
    let reference = c.image.as_deref().unwrap_or_default();
    let last = reference.rsplit('/').next().unwrap_or(reference);
    match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        Some(_) => PullPolicy::IfNotPresent,
        None if reference.contains('@') => PullPolicy::IfNotPresent,
        None if last.ends_with(":latest") || !last.contains(':') => PullPolicy::Always,
        None => PullPolicy::IfNotPresent,
    }
}

fn ts(rfc3339: &str) -> Option<Timestamp> {
    rfc3339.trim().parse().ok()
}

fn meta(pod: &Pod) -> (String, String, String) {
    let m = &pod.metadata;
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
        m.uid.clone().unwrap_or_default(),
    )
}

impl PodRuntime {
    pub fn new(cfg: &Config, host_ip: IpAddr) -> Result<Self> {
        let rt = Runtime::new(runtime::cri::Config {
            data_dir: cfg.data_dir.clone(),
            run_dir: cfg.run_dir.clone(),
            shim: cfg.shim.clone(),
            log_max_size: 10 << 20,
            log_max_files: 5,
        });
        let images = ImageStore::open(cfg.data_dir.join("images"))?;
        Ok(Self {
            cfg: cfg.clone(),
            rt: Arc::new(rt),
            images,
            cni: CniClient::new(cfg.cni_bin_dirs.clone(), cfg.cni_cache_dir.clone()),
            host_ip,
            allocatable: crate::node::allocatable(&crate::node::capacity(cfg), &cfg.reserved),
            pull_opts: PullOptions {
                insecure_registries: cfg.insecure_registries.clone(),
                ..Default::default()
            },
            pulls: Mutex::new(HashMap::new()),
            pods: Mutex::new(BTreeMap::new()),
            mirrors: Mutex::new(HashMap::new()),
        })
    }

    /// Records the newest version of a pod being worked on.
    pub fn set_pod(&self, pod: Arc<Pod>) {
        if let Some(uid) = pod.metadata.uid.clone() {
            self.pods.lock().expect("pods lock").insert(uid, pod);
        }
    }

    /// Records the mirror pod `mirror_uid` of static pod `static_uid`, or its deletion.
    pub fn set_mirror(&self, static_uid: &str, mirror_uid: Option<&str>) {
        let mut m = self.mirrors.lock().expect("mirrors lock");
        match mirror_uid {
            Some(u) => {
                m.insert(static_uid.to_string(), u.to_string());
            }
            None => {
                m.remove(static_uid);
            }
        }
    }

    /// The UID of static pod `static_uid`'s mirror pod, as last seen.
    pub fn mirror_uid(&self, static_uid: &str) -> Option<String> {
        self.mirrors
            .lock()
            .expect("mirrors lock")
            .get(static_uid)
            .cloned()
    }

    /// Forgets a pod whose worker finished.
    pub fn forget_pod(&self, uid: &str) {
        self.pods.lock().expect("pods lock").remove(uid);
    }

    /// The pods being worked on.
    pub fn running_pods(&self) -> Vec<Arc<Pod>> {
        self.pods
            .lock()
            .expect("pods lock")
            .values()
            .cloned()
            .collect()
    }

    /// The pod `ns/name` being worked on.
    pub fn pods_by_name(&self, ns: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods
            .lock()
            .expect("pods lock")
            .values()
            .find(|p| {
                p.metadata.namespace.as_deref().unwrap_or("default") == ns
                    && p.metadata.name.as_deref() == Some(name)
            })
            .cloned()
    }

    fn pods_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("pods")
    }

    /// The pod's own directory: its record, and its volumes below `volumes/`.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.pods_dir().join(uid)
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.pod_dir(uid).join("pod.json")
    }

    pub fn record(&self, uid: &str) -> Option<PodRecord> {
        serde_json::from_slice(&std::fs::read(self.record_path(uid)).ok()?).ok()
    }

    fn write_record(&self, rec: &PodRecord) -> Result<()> {
        let path = self.record_path(&rec.uid);
        let dir = path.parent().expect("record has a dir");
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(rec).expect("record serializes"))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(Error::io(format!("write {}", path.display())))
    }

    /// The file mounted at a container attempt's terminationMessagePath.
    fn termination_log(&self, uid: &str, id: &str) -> PathBuf {
        self.pods_dir()
            .join(uid)
            .join(format!("{id}.termination-log"))
    }

    /// Creates the termination message file of an attempt, writable by any container user.
    fn termination_mount(&self, uid: &str, id: &str, c: &Container) -> Result<Option<Mount>> {
        use std::os::unix::fs::PermissionsExt;
        let dest = c
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into());
        if dest.is_empty() {
            return Ok(None);
        }
        let file = self.termination_log(uid, id);
        std::fs::write(&file, b"")
            .and_then(|_| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)))
            .map_err(Error::io(format!("create {}", file.display())))?;
        Ok(Some(Mount {
            source: file,
            destination: dest.into(),
            read_only: false,
            propagation: Default::default(),
        }))
    }

    /// Where the logs of pod `ns/name` with `uid` are written.
    pub fn log_dir(&self, ns: &str, name: &str, uid: &str) -> PathBuf {
        self.cfg.log_dir.join(format!("{ns}_{name}_{uid}"))
    }

    /// The pod cgroup, sandbox and network (blocking). Safe to call on every sync: what exists
    /// is kept, so a restarted agent adopts a running pod as is.
    pub fn ensure_pod(&self, pod: &Pod) -> Result<PodRecord> {
        let (namespace, name, uid) = meta(pod);
        let spec = pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network == Some(true);
        let cgroup = runtime::cgroup::ensure_pod_cgroup(&spec, &uid)?;
        let mut rec = self.record(&uid).unwrap_or(PodRecord {
            namespace,
            name: name.clone(),
            uid: uid.clone(),
            cgroup: cgroup.clone(),
            host_network,
            ..Default::default()
        });
        rec.cgroup = cgroup;
        if rec.network.is_some() && !self.rt.list_sandboxes().contains(&uid) {
            // The sandbox went with its namespace (a reboot emptied the run dir): the old
            // attachment's IP is released before the new sandbox gets one.
            let network = rec.network.clone().unwrap_or_default();
            tracing::info!(pod = %uid, "sandbox gone; releasing its network attachment");
            self.cni_del(&rec, &network)?;
            rec.network = None;
            rec.pod_ips.clear();
        }
        self.write_record(&rec)?;
        let hostname = spec.hostname.clone().unwrap_or_else(|| name.clone());
        let sandbox = self.rt.create_sandbox(&SandboxConfig {
            id: uid.clone(),
            hostname: hostname.clone(),
            host_network,
            host_ipc: spec.host_ipc == Some(true),
            host_pid: spec.host_pid == Some(true),
            pid_holder: (spec.share_process_namespace == Some(true)).then(|| self.cfg.shim.clone()),
            resolv_conf: crate::dns_config::resolv_conf(pod, &self.cfg),
            host_aliases: Vec::new(),
        })?;
        if host_network || rec.network.is_some() {
            return Ok(rec);
        }
        let net = NetworkConfigList::load_first(&self.cfg.cni_conf_dir)?;
        let netns = sandbox.netns().expect("pod network namespace");
        rec.network_pending = Some(net.name.clone());
        self.write_record(&rec)?;
        let mut rt = self.cni_conf(&rec, &netns);
        let ports = crate::network::port_mappings(&spec);
        if !ports.is_empty() {
            rt.capability_args
                .insert("portMappings".into(), serde_json::Value::Array(ports));
        }
        let result = self.cni.add(&net, &rt)?;
        rec.pod_ips = result
            .ips
            .iter()
            .map(|ip| ip.address.split('/').next().unwrap_or("").to_string())
            .collect();
        rec.network = Some(net.name.clone());
        rec.network_pending = None;
        self.write_record(&rec)?;
        let names = crate::dns_config::hosts_names(pod, &hostname, &self.cfg.cluster_domain);
        sandbox.write_hosts(&names, rec.pod_ips.first().map(String::as_str), &[])?;
        Ok(rec)
    }

    fn cni_conf(&self, rec: &PodRecord, netns: &Path) -> RuntimeConf {
        RuntimeConf {
            container_id: rec.uid.clone(),
            netns: netns.display().to_string(),
            ifname: IFNAME.into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), rec.namespace.clone()),
                ("K8S_POD_NAME".into(), rec.name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), rec.uid.clone()),
                ("K8S_POD_UID".into(), rec.uid.clone()),
            ],
            ..Default::default()
        }
    }

    /// The attempts of each container of pod `uid`, newest first (blocking).
    pub fn attempts(&self, uid: &str) -> BTreeMap<String, Vec<(u32, String)>> {
        let mut by_name: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
        for id in self.rt.list_containers() {
            if let Some((u, name, attempt)) = parse_container_id(&id) {
                if u == uid {
                    by_name
                        .entry(name.to_string())
                        .or_default()
                        .push((attempt, id.clone()));
                }
            }
        }
        for v in by_name.values_mut() {
            v.sort_by_key(|a| std::cmp::Reverse(a.0));
        }
        by_name
    }

    fn attempt(&self, uid: &str, id: &str, attempt: u32) -> Option<Attempt> {
        let state = match self.rt.container_state(id).ok()? {
            State::Created => RunState::Created,
            State::Running { .. } => RunState::Running {
                started_at: runtime::container::started_at(self.rt.paths(), id)
                    .as_deref()
                    .and_then(ts)
                    .unwrap_or_else(Timestamp::now),
            },
            State::Exited(e) => RunState::Exited {
                exit_code: e.exit_code,
                signal: e.signal,
                reason: e.reason().into(),
                started_at: runtime::container::started_at(self.rt.paths(), id)
                    .as_deref()
                    .and_then(ts),
                finished_at: ts(&e.finished_at).unwrap_or_else(Timestamp::now),
                message: None,
            },
        };
        let img: Option<ImageRecord> =
            std::fs::read(self.pods_dir().join(uid).join(format!("{id}.image")))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
        let img = img.unwrap_or_default();
        let mut state = state;
        if let RunState::Exited {
            message, exit_code, ..
        } = &mut state
        {
            let file = self.termination_log(uid, id);
            let written = read_tail(&file, MAX_TERMINATION_MESSAGE)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            *message = match &img.fallback_log {
                Some(log) if written.is_empty() && *exit_code != 0 => log_tail(log),
                _ => Some(written),
            };
        }
        Some(Attempt {
            id: id.to_string(),
            attempt,
            image: img.image,
            image_id: img.image_id,
            state,
        })
    }

    /// What the runtime holds for pod `uid` right now (blocking).
    pub fn snapshot(&self, uid: &str) -> PodSnapshot {
        let rec = self.record(uid);
        let sandbox_ready = rec.as_ref().is_some_and(|r| {
            (r.host_network || r.network.is_some())
                && self.rt.list_sandboxes().iter().any(|s| s == uid)
        });
        let mut containers = BTreeMap::new();
        for (name, attempts) in self.attempts(uid) {
            let mut it = attempts.iter();
            let Some(current) = it.next().and_then(|(n, id)| self.attempt(uid, id, *n)) else {
                continue;
            };
            let previous = it.next().and_then(|(n, id)| self.attempt(uid, id, *n));
            containers.insert(name, ContainerRecord { current, previous });
        }
        PodSnapshot {
            sandbox_ready,
            pod_ips: rec.map(|r| r.pod_ips).unwrap_or_default(),
            containers,
            waiting: BTreeMap::new(),
            health: BTreeMap::new(),
        }
    }

    /// Whether ensuring `c`'s image will contact the registry (blocking: reads the store).
    pub fn will_pull(&self, c: &Container) -> bool {
        let reference = c.image.clone().unwrap_or_default();
        match pull_policy(c) {
            PullPolicy::Always => true,
            PullPolicy::Never => false,
            PullPolicy::IfNotPresent => !matches!(self.images.get(&reference), Ok(Some(_))),
        }
    }

    /// The image for `c`, pulled as its pull policy says; one pull of an image at a time.
    pub async fn ensure_image(
        &self,
        c: &Container,
        auth: DockerConfig,
    ) -> Result<Image, runtime::image::Error> {
        let reference = c.image.clone().unwrap_or_default();
        let policy = pull_policy(c);
        let lock = self
            .pulls
            .lock()
            .expect("pull map lock")
            .entry(reference.clone())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        let mut opts = self.pull_opts.clone();
        opts.auth.merge(auth);
        self.images.ensure(&reference, policy, &opts).await
    }

    /// Creates and starts attempt `attempt` of container `c` (blocking) with its resolved
    /// environment and volume mounts. On failure nothing of the attempt is left and the error
    /// carries kubelet's reason.
    pub fn start_container(
        &self,
        pod: &Pod,
        c: &Container,
        attempt: u32,
        image: &Image,
        env: Vec<(String, String)>,
        mounts: Vec<runtime::spec::Mount>,
    ) -> std::result::Result<(), (String, String)> {
        let (ns, name, uid) = meta(pod);
        let id = container_id(&uid, &c.name, attempt);
        let rec = self.record(&uid).ok_or_else(|| {
            (
                "CreateContainerError".to_string(),
                "pod record missing".to_string(),
            )
        })?;
        let sandbox = self
            .rt
            .sandbox(&uid)
            .map_err(|e| (e.reason().to_string(), e.to_string()))?;
        let spec = pod.spec.clone().unwrap_or_default();
        let image_user = image
            .config
            .config()
            .as_ref()
            .and_then(|cfg| cfg.user().clone())
            .unwrap_or_default();
        crate::security::verify_run_as_non_root(pod, c, &image_user)
            .map_err(|e| ("CreateContainerConfigError".to_string(), e.to_string()))?;
        let log_path = self
            .log_dir(&ns, &name, &uid)
            .join(&c.name)
            .join(format!("{attempt}.log"));
        let fallback = c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
        let img = ImageRecord {
            image: image.reference.clone(),
            image_id: image_id(image),
            fallback_log: fallback.then(|| log_path.clone()),
        };
        let img_path = self.pods_dir().join(&uid).join(format!("{id}.image"));
        let _ = std::fs::write(&img_path, serde_json::to_vec(&img).expect("serializes"));
        // A leftover of an attempt that failed half-way (agent killed) is replaced.
        let _ = self.rt.remove_container(&id);
        let mut mounts = mounts;
        mounts.extend(
            self.termination_mount(&uid, &id, c)
                .map_err(|e| ("CreateContainerError".to_string(), e.to_string()))?,
        );
        self.rt
            .create_container(&ContainerRequest {
                id: &id,
                sandbox: &sandbox,
                container: c,
                pod_security: spec.security_context.as_ref(),
                image,
                env: Some(env),
                mounts,
                hostname: spec.hostname.clone().unwrap_or(name),
                cgroup_parent: &rec.cgroup,
                log_path,
                oom_score_adj: None,
            })
            .map_err(|e| (e.reason().to_string(), e.to_string()))?;
        if let Err(e) = self.rt.start_container(&id) {
            let _ = self.rt.remove_container(&id);
            return Err(("RunContainerError".into(), e.to_string()));
        }
        // Only the attempt before this one is kept, for lastState.
        for (n, old) in self.attempts(&uid).remove(&c.name).unwrap_or_default() {
            if n + 1 < attempt {
                let _ = self.rt.remove_container(&old);
                let _ =
                    std::fs::remove_file(self.pods_dir().join(&uid).join(format!("{old}.image")));
                let _ = std::fs::remove_file(self.termination_log(&uid, &old));
            }
        }
        Ok(())
    }

    /// Stops every container of pod `uid`: SIGTERM, up to `grace`, SIGKILL (blocking; the
    /// containers stop in parallel).
    pub fn stop_all(&self, uid: &str, grace: Duration) {
        let ids: Vec<String> = self
            .attempts(uid)
            .into_values()
            .flatten()
            .map(|(_, id)| id)
            .collect();
        std::thread::scope(|s| {
            for id in &ids {
                s.spawn(move || {
                    if let Err(e) = self.rt.stop_container(id, grace) {
                        tracing::warn!(container = %id, error = %e, "stop container");
                    }
                });
            }
        });
    }

    /// Releases the network and sandbox of a pod that will run nothing more (Succeeded or
    /// Failed), keeping its containers for status and logs until the pod is deleted (blocking).
    pub fn release_sandbox(&self, uid: &str) -> Result<()> {
        self.stop_all(uid, Duration::ZERO);
        let dir = self.pod_dir(uid);
        crate::volumes::tear_down(&dir)
            .map_err(Error::io(format!("tear down volumes of {}", dir.display())))?;
        if let Some(mut rec) = self.record(uid) {
            if let Some(network) = rec.network.clone().or(rec.network_pending.clone()) {
                self.cni_del(&rec, &network)?;
                rec.network = None;
                rec.network_pending = None;
                self.write_record(&rec)?;
            }
        }
        Ok(self.rt.remove_sandbox(uid)?)
    }

    /// Removes everything of pod `uid` (blocking): containers, network attachment, sandbox,
    /// cgroup, logs and record. Idempotent; works from the record alone (the pod object may be
    /// gone).
    pub fn teardown(&self, uid: &str) -> Result<()> {
        self.teardown_with(uid, true)
    }

    /// `teardown`, also when the network cannot be told (its configuration or plugin gone):
    /// removing the namespace still removes the pod's interface; its IP lease may stay.
    pub fn teardown_regardless_of_network(&self, uid: &str) -> Result<()> {
        self.teardown_with(uid, false)
    }

    fn teardown_with(&self, uid: &str, network_must_detach: bool) -> Result<()> {
        self.stop_all(uid, Duration::ZERO);
        for id in self.attempts(uid).into_values().flatten().map(|(_, id)| id) {
            self.rt.remove_container(&id)?;
        }
        let rec = self.record(uid);
        if let Some(rec) = &rec {
            if let Some(network) = rec.network.as_ref().or(rec.network_pending.as_ref()) {
                match self.cni_del(rec, network) {
                    Err(e) if !network_must_detach => {
                        tracing::warn!(pod = %uid, error = %e, "CNI DEL failed; removing the namespace anyway")
                    }
                    r => r?,
                }
            }
        }
        self.rt.remove_sandbox(uid)?;
        if let Some(rec) = &rec {
            runtime::cgroup::remove_pod_cgroup(&rec.cgroup)?;
            let logs = self.log_dir(&rec.namespace, &rec.name, uid);
            let _ = std::fs::remove_dir_all(logs);
        }
        let dir = self.pod_dir(uid);
        // Volumes (tmpfs mounts among them) go first: nothing is deleted through a mount.
        crate::volumes::tear_down(&dir)
            .map_err(Error::io(format!("tear down volumes of {}", dir.display())))?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("remove {}", dir.display()))(e))
            }
            _ => Ok(()),
        }
    }

    fn cni_del(&self, rec: &PodRecord, network: &str) -> Result<()> {
        let net = match NetworkConfigList::load_first(&self.cfg.cni_conf_dir) {
            Ok(net) if net.name == *network => net,
            other => {
                tracing::warn!(pod = %rec.uid, network, "network configuration changed or gone; DEL with the current one");
                other?
            }
        };
        let netns = self.rt.sandbox(&rec.uid)?.dir.join("ns/net");
        self.cni.del(&net, &self.cni_conf(rec, &netns))?;
        Ok(())
    }

    /// Uids of every pod the runtime holds something of (blocking).
    pub fn local_pods(&self) -> Vec<String> {
        let mut uids: Vec<String> = std::fs::read_dir(self.pods_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        uids.extend(self.rt.list_sandboxes());
        uids.extend(
            self.rt
                .list_containers()
                .iter()
                .filter_map(|id| parse_container_id(id).map(|(u, _, _)| u.to_string())),
        );
        uids.sort();
        uids.dedup();
        uids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_round_trip() {
        let id = container_id("0b1e-77", "web-x", 12);
        assert_eq!(parse_container_id(&id), Some(("0b1e-77", "web-x", 12)));
        assert_eq!(parse_container_id("other"), None);
    }
}
