//! One worker per pod UID (kubelet's pod workers): fed the newest version of its pod through a
//! coalescing channel, it moves one way through syncing -> terminating -> terminated. Each sync
//! reads container state from the runtime, starts what should run, and reports status when it
//! changed.

use crate::env::{self as container_env, EnvContext};
use crate::events::{self, Recorder};
use crate::objects::Objects;
use crate::pod_runtime::{container_id, PodRuntime};
use crate::probe::{self, Notice, Target};
use crate::status::{self, Backoff, PodSnapshot, Restart, Role, RunState, Waiting};
use crate::volumes::{self, PodVolumes};
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use runtime::image::{DockerConfig, Image};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Why a pull secret gave no credentials (reported as an event, never fatal).
#[derive(Debug, thiserror::Error)]
enum PullSecretError {
    #[error("{0}")]
    Get(#[from] kube::Error),
    #[error("dockercfg: {0}")]
    Json(#[from] serde_json::Error),
    /// The runtime's docker config parser reports its errors as text.
    #[error("{0}")]
    Parse(String),
    #[error("neither .dockerconfigjson nor .dockercfg in the secret")]
    Empty,
}

/// The registry credentials of a pull secret.
fn docker_config(secret: &Secret) -> Result<DockerConfig, PullSecretError> {
    let data = secret.data.clone().unwrap_or_default();
    if let Some(json) = data.get(".dockerconfigjson") {
        return DockerConfig::from_json(&json.0).map_err(PullSecretError::Parse);
    }
    if let Some(old) = data.get(".dockercfg") {
        // The old format is the `auths` map alone.
        let auths: serde_json::Value = serde_json::from_slice(&old.0)?;
        let json = serde_json::json!({ "auths": auths }).to_string();
        return DockerConfig::from_json(json.as_bytes()).map_err(PullSecretError::Parse);
    }
    Err(PullSecretError::Empty)
}

/// What the dispatcher tells a worker: the newest pod, or that the object is gone.
#[derive(Debug, Clone)]
pub enum Update {
    Pod(Arc<Pod>),
    Gone,
}

/// Where a worker is in a pod's life; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Syncing,
    Terminating,
    Terminated,
}

struct PullFailure {
    failures: u32,
    retry_at: Instant,
    message: String,
}

pub struct Worker {
    ctx: Arc<PodRuntime>,
    client: kube::Client,
    uid: String,
    pod: Arc<Pod>,
    rx: watch::Receiver<Update>,
    lifecycle: Lifecycle,
    waiting: BTreeMap<String, Waiting>,
    pulls: HashMap<String, PullFailure>,
    reported: Option<PodStatus>,
    /// The mirror pod the last status went to (static pods).
    reported_mirror: Option<String>,
    events: Recorder,
    /// The restart count each container's last BackOff event was about.
    backed_off: HashMap<String, i32>,
    /// The last sandbox failure reported as an event.
    sandbox_error: Option<String>,
    /// Network and sandbox of a terminal pod are given back.
    sandbox_released: bool,
    objects: Objects,
    volumes: PodVolumes,
    /// The last FailedMount message of each volume and when it was recorded.
    mount_events: HashMap<String, (String, Instant)>,
    probes: probe::Manager,
    notices: mpsc::UnboundedReceiver<Notice>,
}

/// A FailedMount event about the same failure is recorded again after this long.
const MOUNT_EVENT_REPEAT: Duration = Duration::from_secs(60);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> crate::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await?)
}

impl Worker {
    pub fn new(
        ctx: Arc<PodRuntime>,
        client: kube::Client,
        pod: Arc<Pod>,
        rx: watch::Receiver<Update>,
    ) -> Self {
        let events = Recorder::new(client.clone(), &ctx.cfg.node_name);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let objects = Objects::new(client.clone());
        let volumes = PodVolumes::new(
            objects.clone(),
            ctx.pod_dir(&uid),
            ctx.cfg.sync_frequency,
            ctx.allocatable.clone(),
        );
        let (probes, notices) = probe::Manager::new(ctx.rt.clone(), events.clone());
        Self {
            ctx,
            client,
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            pod,
            rx,
            lifecycle: Lifecycle::Syncing,
            waiting: BTreeMap::new(),
            pulls: HashMap::new(),
            reported: None,
            reported_mirror: None,
            events,
            backed_off: HashMap::new(),
            sandbox_error: None,
            sandbox_released: false,
            objects,
            volumes,
            mount_events: HashMap::new(),
            probes,
            notices,
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            base: self.ctx.cfg.backoff_base,
            max: self.ctx.cfg.backoff_max,
        }
    }

    fn api(&self) -> Api<Pod> {
        let ns = self.pod.metadata.namespace.as_deref().unwrap_or("default");
        Api::namespaced(self.client.clone(), ns)
    }

    /// Runs until the pod is terminated; returns its UID.
    pub async fn run(mut self) -> String {
        let mut object_exists = true;
        loop {
            match self.lifecycle {
                Lifecycle::Syncing => {
                    match self.rx.borrow_and_update().clone() {
                        Update::Pod(p) => self.pod = p,
                        Update::Gone => object_exists = false,
                    }
                    if !object_exists || self.pod.metadata.deletion_timestamp.is_some() {
                        self.lifecycle = Lifecycle::Terminating;
                        continue;
                    }
                    if let Err(e) = self.sync().await {
                        tracing::warn!(pod = %self.uid, error = %e, "sync pod");
                    }
                    let resync = self.ctx.cfg.pod_resync;
                    tokio::select! {
                        changed = self.rx.changed() => if changed.is_err() { return self.uid },
                        Some(n) = self.notices.recv() => self.on_notice(n).await,
                        _ = tokio::time::sleep(resync) => {}
                    }
                }
                Lifecycle::Terminating => {
                    self.terminate(object_exists).await;
                    self.lifecycle = Lifecycle::Terminated;
                }
                Lifecycle::Terminated => return self.uid,
            }
        }
    }

    async fn snapshot(&self) -> crate::Result<PodSnapshot> {
        let ctx = self.ctx.clone();
        let uid = self.uid.clone();
        let mut snap = blocking(move || ctx.snapshot(&uid)).await?;
        snap.waiting = self.waiting.clone();
        snap.health = self.probes.health();
        Ok(snap)
    }

    /// Where the pod's network probes and hooks connect: its IP, the node's for hostNetwork.
    fn pod_host(&self, snap: &PodSnapshot) -> Option<IpAddr> {
        let host_network = self.pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        if host_network {
            return Some(self.ctx.host_ip);
        }
        snap.pod_ips.first().and_then(|ip| ip.parse().ok())
    }

    fn target(&self, c: &Container, id: &str, snap: &PodSnapshot) -> Target {
        Target {
            rt: self.ctx.rt.clone(),
            container_id: id.to_string(),
            container: Arc::new(c.clone()),
            host: self.pod_host(snap),
        }
    }

    /// The grace period of a kill outside pod deletion: the probe's own, else the pod's.
    fn grace(&self, probe_grace: Option<i64>) -> Duration {
        let spec = self.pod.spec.as_ref();
        let secs = probe_grace
            .or(spec.and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30)
            .max(0);
        Duration::from_secs(secs as u64)
    }

    /// Stops one container attempt as kubelet kills it: the preStop hook within the grace
    /// period, then SIGTERM, the rest of the grace period (at least 2 s after a hook), SIGKILL.
    /// The returned future owns what it needs, so several run at once.
    fn stopper(
        &self,
        c: Option<Container>,
        target: Target,
        grace: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (pod, events) = (self.pod.clone(), self.events.clone());
        async move {
            let began = Instant::now();
            let mut remaining = grace;
            let hook = c
                .as_ref()
                .and_then(|c| c.lifecycle.as_ref())
                .and_then(|l| l.pre_stop.clone());
            if let (Some(hook), Some(c)) = (hook, &c) {
                if let Err(msg) = crate::lifecycle::run(&hook, &target, &pod, Some(grace)).await {
                    let path = Some(events::field_path(false, &c.name));
                    events.pod(
                        &pod,
                        path,
                        events::WARNING,
                        "FailedPreStopHook",
                        msg.to_string(),
                    );
                }
                remaining = grace
                    .saturating_sub(began.elapsed())
                    .max(Duration::from_secs(2));
            }
            let (rt, id) = (target.rt.clone(), target.container_id.clone());
            match blocking(move || rt.stop_container(&id, remaining)).await {
                Ok(Err(e)) => {
                    tracing::warn!(container = %target.container_id, error = %e, "stop container")
                }
                Err(e) => {
                    tracing::warn!(container = %target.container_id, error = %e, "stop container")
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Kills a running attempt of app container `c` with a Killing event saying why.
    async fn kill(&mut self, c: &Container, id: &str, message: String, grace: Duration) {
        self.probes.forget(&c.name);
        self.event(Some((false, &c.name)), events::NORMAL, "Killing", message);
        let snap = match self.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pod = %self.uid, error = %e, "snapshot before kill");
                PodSnapshot::default()
            }
        };
        let target = self.target(c, id, &snap);
        self.stopper(Some(c.clone()), target, grace).await;
    }

    async fn on_notice(&mut self, n: Notice) {
        let Notice::Kill {
            container,
            id,
            kind,
        } = n
        else {
            return;
        };
        let spec = self.pod.spec.clone().unwrap_or_default();
        let Some(c) = spec
            .containers
            .iter()
            .chain(status::sidecars(&spec))
            .find(|c| c.name == container)
        else {
            return;
        };
        let running = self.snapshot().await.ok().and_then(|s| {
            let cur = &s.containers.get(&container)?.current;
            (cur.id == id && matches!(cur.state, RunState::Running { .. })).then_some(())
        });
        if running.is_none() {
            return;
        }
        let mut message = format!("Container {container} failed {} probe", kind.lower());
        if spec.restart_policy.as_deref() != Some("Never") {
            message.push_str(", will be restarted");
        }
        let probe_grace = match kind {
            probe::Kind::Liveness => c.liveness_probe.as_ref(),
            probe::Kind::Startup => c.startup_probe.as_ref(),
            probe::Kind::Readiness => None,
        }
        .and_then(|p| p.termination_grace_period_seconds);
        let grace = self.grace(probe_grace);
        tracing::info!(pod = %self.uid, %container, ?kind, "probe failed; killing container");
        let c = c.clone();
        self.kill(&c, &id, message, grace).await;
    }

    /// kubelet's admission rejection: the pod fails without running (Failed, `reason`).
    async fn reject(&mut self, reason: &str, message: String) {
        self.event(None, events::WARNING, reason, message.clone());
        let status = PodStatus {
            phase: Some("Failed".into()),
            reason: Some(reason.into()),
            message: Some(format!("Pod was rejected: {message}")),
            ..Default::default()
        };
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({ "status": status });
        match self
            .api()
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.reported = Some(status),
            Err(e) => tracing::warn!(pod = %self.uid, error = %e, "patch pod status"),
        }
    }

    /// kubelet's NodePorts admission: a pod not yet admitted (nothing of it in the runtime)
    /// whose hostPorts another running pod of this node holds. Of two new pods the older one
    /// (creation time, then UID) is admitted, as kubelet admits them in creation order.
    async fn host_ports_taken(&self) -> crate::Result<bool> {
        let Some(spec) = self.pod.spec.as_ref() else {
            return Ok(false);
        };
        let (ctx, uid) = (self.ctx.clone(), self.uid.clone());
        if crate::network::port_mappings(spec).is_empty()
            || blocking(move || ctx.record(&uid).is_some()).await?
        {
            return Ok(false);
        }
        let key = |p: &Pod| {
            (
                p.metadata.creation_timestamp.clone().map(|t| t.0),
                p.metadata.uid.clone(),
            )
        };
        let mine = key(&self.pod);
        for other in self.ctx.running_pods() {
            if other.metadata.uid.as_deref() == Some(self.uid.as_str())
                || other.status.as_ref().is_some_and(status::is_terminal)
            {
                continue;
            }
            let Some(theirs) = other.spec.as_ref() else {
                continue;
            };
            if !crate::network::host_ports_conflict(spec, theirs) {
                continue;
            }
            let ouid = other.metadata.uid.clone().unwrap_or_default();
            let ctx = self.ctx.clone();
            let admitted = blocking(move || ctx.record(&ouid).is_some()).await?;
            if admitted || key(&other) < mine {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn sync(&mut self) -> crate::Result<()> {
        let terminal = |s: Option<&PodStatus>| s.is_some_and(status::is_terminal);
        if terminal(self.pod.status.as_ref()) || terminal(self.reported.as_ref()) {
            // A Succeeded or Failed pod never runs again; it keeps its containers until deleted.
            if !self.sandbox_released {
                let (ctx, uid) = (self.ctx.clone(), self.uid.clone());
                blocking(move || ctx.release_sandbox(&uid)).await??;
                self.sandbox_released = true;
            }
            return Ok(());
        }
        if let Some(msg) = crate::security::forbidden_sysctl(&self.pod) {
            self.reject("SysctlForbidden", msg).await;
            return Ok(());
        }
        if self.host_ports_taken().await? {
            self.reject(
                "NodePorts",
                "Predicate NodePorts failed: node(s) didn't have free ports for the requested pod ports".into(),
            )
            .await;
            return Ok(());
        }
        // As kubelet: no sandbox and no container before every volume is set up.
        let began = Instant::now();
        let failures = self.volumes.sync(&self.pod).await;
        let volumes_done = began.elapsed();
        self.mount_failed(failures).await;
        if !self.volumes.all_ready(&self.pod) {
            let snap = self.snapshot().await?;
            self.report(snap).await;
            return Ok(());
        }
        let mut snap = self.snapshot().await?;
        if !snap.sandbox_ready {
            let (ctx, pod) = (self.ctx.clone(), self.pod.clone());
            if let Err(e) = blocking(move || ctx.ensure_pod(&pod)).await? {
                let msg = format!("Failed to create pod sandbox: {e}");
                if self.sandbox_error.as_ref() != Some(&msg) {
                    self.event(None, events::WARNING, "FailedCreatePodSandBox", msg.clone());
                    self.sandbox_error = Some(msg);
                }
                self.report(snap).await;
                return Err(e);
            }
            self.sandbox_error = None;
            snap = self.snapshot().await?;
        }
        let sandbox_done = began.elapsed();
        let before = self.compute(&snap);
        if status::is_terminal(&before) {
            self.report(snap).await;
            return Ok(());
        }
        self.start_containers(&snap).await?;
        let containers_done = began.elapsed();
        let mut snap = self.snapshot().await?;
        let host = self.pod_host(&snap);
        self.probes.sync(&self.pod, &snap, host);
        snap.health = self.probes.health();
        self.report(snap).await;
        // Where a pod's start spends its time, for tracing startup latency.
        tracing::debug!(pod = %self.uid, ?volumes_done, ?sandbox_done, ?containers_done, reported = ?began.elapsed(), "pod synced");
        Ok(())
    }

    /// Starts init containers one at a time in order, then every app container that is not
    /// there yet or whose restart is due.
    async fn start_containers(&mut self, snap: &PodSnapshot) -> crate::Result<()> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let now = Timestamp::now();
        let b = self.backoff();
        // Once app containers began, sidecars restart beside them and hold nothing back.
        let app_began = snap.app_began(&spec);
        for c in spec.init_containers.iter().flatten() {
            let role = Role::of(c, true);
            match snap.containers.get(&c.name) {
                None if role == Role::Sidecar && app_began => self.start(c, true, 0).await?,
                None => return self.start(c, true, 0).await,
                Some(rec) => match &rec.current.state {
                    RunState::Exited { exit_code: 0, .. } if role == Role::Init => continue,
                    RunState::Exited { .. } => {
                        if status::restart(&self.pod, rec, role, b, now) == Restart::Now {
                            self.start(c, true, rec.current.attempt + 1).await?;
                        }
                        if !(role == Role::Sidecar && app_began) {
                            return Ok(());
                        }
                    }
                    RunState::Created => return self.start(c, true, rec.current.attempt).await,
                    // The next one starts once a sidecar has started (its startup probe passed).
                    RunState::Running { .. } if role == Role::Sidecar => {
                        let started = status::started(c, &rec.current, &self.probes.health());
                        if !started && !app_began {
                            return Ok(());
                        }
                    }
                    RunState::Running { .. } => return Ok(()),
                },
            }
        }
        for c in &spec.containers {
            match snap.containers.get(&c.name) {
                None => self.start(c, false, 0).await?,
                // Created but never started: an agent killed between the two; made again.
                Some(rec) if rec.current.state == RunState::Created => {
                    self.start(c, false, rec.current.attempt).await?
                }
                Some(rec) => {
                    if status::restart(&self.pod, rec, Role::App, b, now) == Restart::Now {
                        self.start(c, false, rec.current.attempt + 1).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// FailedMount events for volumes that could not be set up or refreshed.
    async fn mount_failed(&mut self, failures: Vec<(String, volumes::VolumeError)>) {
        for (volume, e) in failures {
            let msg = format!("MountVolume.SetUp failed for volume {volume:?} : {e}");
            tracing::warn!(pod = %self.uid, %volume, error = %e, "mount volume");
            let repeat = self
                .mount_events
                .get(&volume)
                .is_none_or(|(m, at)| *m != msg || at.elapsed() >= MOUNT_EVENT_REPEAT);
            if repeat {
                self.event(None, events::WARNING, "FailedMount", msg.clone());
                self.mount_events.insert(volume, (msg, Instant::now()));
            }
        }
    }

    /// The container's environment, `$(VAR)`-expanded command and args, and mounts; the error
    /// is kubelet's CreateContainerConfigError message.
    async fn container_config(
        &self,
        c: &Container,
    ) -> Result<(Container, Vec<(String, String)>, Vec<runtime::spec::Mount>), String> {
        let (ctx, uid) = (self.ctx.clone(), self.uid.clone());
        let pod_ips = blocking(move || ctx.record(&uid))
            .await
            .ok()
            .flatten()
            .map(|r| r.pod_ips)
            .unwrap_or_default();
        let host_ip = self.ctx.host_ip.to_string();
        let cx = EnvContext {
            host_ip: &host_ip,
            pod_ips: &pod_ips,
            allocatable: &self.ctx.allocatable,
        };
        let env = container_env::container_env(&self.objects, &self.pod, c, &cx)
            .await
            .map_err(|e| e.to_string())?;
        let expanded = container_env::expand_command(c, &env);
        let (c2, ready, env2) = (c.clone(), self.volumes.ready().clone(), env.clone());
        let view = volumes::PrivateView::of(&self.pod, &self.ctx.pod_dir(&self.uid));
        let mounts = blocking(move || volumes::container_mounts(&c2, &ready, &env2, view.as_ref()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok((expanded, env.into_vec(), mounts))
    }

    fn event(&self, init: Option<(bool, &str)>, type_: &str, reason: &str, msg: String) {
        let path = init.map(|(i, name)| events::field_path(i, name));
        self.events.pod(&self.pod, path, type_, reason, msg);
    }

    /// Records a waiting reason; a Warning event `Error: <reason>` when it is new.
    async fn wait_on(&mut self, init: bool, c: &Container, reason: String, message: String) {
        let new = self.waiting.get(&c.name).is_none_or(|w| w.reason != reason);
        if new {
            let at = Some((init, c.name.as_str()));
            // kubelet names image failures by reason and creation failures by message.
            let shown = match reason.as_str() {
                "CreateContainerConfigError" | "CreateContainerError" => &message,
                _ => &reason,
            };
            self.event(at, events::WARNING, "Failed", format!("Error: {shown}"));
        }
        self.waiting
            .insert(c.name.clone(), Waiting { reason, message });
    }

    async fn start(&mut self, c: &Container, init: bool, attempt: u32) -> crate::Result<()> {
        let Some(image) = self.image(c, init).await else {
            return Ok(());
        };
        let (c2, env, mounts) = match self.container_config(c).await {
            Ok(cfg) => cfg,
            Err(message) => {
                tracing::warn!(pod = %self.uid, container = %c.name, %message, "container config");
                self.wait_on(init, c, "CreateContainerConfigError".into(), message)
                    .await;
                return Ok(());
            }
        };
        let (ctx, pod) = (self.ctx.clone(), self.pod.clone());
        let at = Some((init, c.name.as_str()));
        match blocking(move || ctx.start_container(&pod, &c2, attempt, &image, env, mounts)).await?
        {
            Ok(()) => {
                tracing::info!(pod = %self.uid, container = %c.name, attempt, "started container");
                self.waiting.remove(&c.name);
                let created = format!("Created container: {}", c.name);
                self.event(at, events::NORMAL, "Created", created);
                let started = format!("Started container {}", c.name);
                self.event(at, events::NORMAL, "Started", started);
                self.post_start(c, init, attempt).await?;
            }
            Err((reason, message)) => {
                tracing::warn!(pod = %self.uid, container = %c.name, %reason, %message, "start container");
                self.wait_on(init, c, reason, message).await;
            }
        }
        Ok(())
    }

    /// Runs the postStart hook of a started container; a failure kills it (the restart policy
    /// decides what follows). Deletion of the pod ends the wait.
    async fn post_start(&mut self, c: &Container, init: bool, attempt: u32) -> crate::Result<()> {
        let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.post_start.clone()) else {
            return Ok(());
        };
        let id = container_id(&self.uid, &c.name, attempt);
        let snap = self.snapshot().await?;
        let target = self.target(c, &id, &snap);
        let mut rx = self.rx.clone();
        let deleted = async move {
            let _ = rx
                .wait_for(|u| match u {
                    Update::Gone => true,
                    Update::Pod(p) => p.metadata.deletion_timestamp.is_some(),
                })
                .await;
        };
        let pod = self.pod.clone();
        let result = tokio::select! {
            r = crate::lifecycle::run(&hook, &target, &pod, None) => r,
            _ = deleted => Ok(()),
        };
        if let Err(msg) = result {
            let at = Some((init, c.name.as_str()));
            self.event(at, events::WARNING, "FailedPostStartHook", msg.to_string());
            let grace = self.grace(None);
            self.kill(c, &id, "FailedPostStartHook".into(), grace).await;
        }
        Ok(())
    }

    /// The container's image, or `None` with the reason recorded (and image pull back-off).
    async fn image(&mut self, c: &Container, init: bool) -> Option<Image> {
        let reference = c.image.clone().unwrap_or_default();
        let at = Some((init, c.name.as_str()));
        if let Some(f) = self.pulls.get(&reference) {
            if Instant::now() < f.retry_at {
                let message = format!("Back-off pulling image {reference:?}: {}", f.message);
                if self
                    .waiting
                    .get(&c.name)
                    .is_none_or(|w| w.reason != "ImagePullBackOff")
                {
                    let msg = format!("Back-off pulling image {reference:?}");
                    self.event(at, events::NORMAL, "BackOff", msg);
                }
                self.wait_on(init, c, "ImagePullBackOff".into(), message)
                    .await;
                return None;
            }
        }
        let (ctx, c2) = (self.ctx.clone(), c.clone());
        let pulls = blocking(move || ctx.will_pull(&c2)).await.unwrap_or(true);
        let began = Instant::now();
        if pulls {
            let msg = format!("Pulling image {reference:?}");
            self.event(at, events::NORMAL, "Pulling", msg);
        }
        let auth = self.pull_auth().await;
        match self.ctx.ensure_image(c, auth).await {
            Ok(img) => {
                self.pulls.remove(&reference);
                let msg = if pulls {
                    let secs = began.elapsed().as_secs_f64();
                    format!("Successfully pulled image {reference:?} in {secs:.3}s. Image size: {} bytes.", img.size)
                } else {
                    format!("Container image {reference:?} already present on machine")
                };
                self.event(at, events::NORMAL, "Pulled", msg);
                Some(img)
            }
            Err(e) => {
                let reason = e.reason().to_string();
                let message = e.to_string();
                tracing::warn!(pod = %self.uid, image = %reference, %reason, %message, "image");
                if reason == "ErrImagePull" {
                    let failures = self.pulls.get(&reference).map_or(0, |f| f.failures) + 1;
                    let delay = self.backoff().delay(failures, None);
                    self.pulls.insert(
                        reference.clone(),
                        PullFailure {
                            failures,
                            retry_at: Instant::now() + delay,
                            message: format!("{reason}: {message}"),
                        },
                    );
                    let msg = format!("Failed to pull image {reference:?}: {message}");
                    self.event(at, events::WARNING, "Failed", msg);
                }
                self.wait_on(init, c, reason, message).await;
                None
            }
        }
    }

    /// Credentials from the pod's imagePullSecrets (`kubernetes.io/dockerconfigjson` or
    /// `dockercfg`); a secret that cannot be read is an event, and the pull goes on without it.
    async fn pull_auth(&self) -> DockerConfig {
        let mut auth = DockerConfig::default();
        let spec = self.pod.spec.clone().unwrap_or_default();
        let ns = self.pod.metadata.namespace.as_deref().unwrap_or("default");
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        for r in spec.image_pull_secrets.iter().flatten() {
            let parsed = match api.get(&r.name).await {
                Ok(secret) => docker_config(&secret),
                Err(e) => Err(e.into()),
            };
            match parsed {
                Ok(cfg) => auth.merge(cfg),
                Err(e) => {
                    let msg = format!(
                        "Unable to retrieve some image pull secrets ({}); attempting to pull the image may not succeed: {e}",
                        r.name
                    );
                    self.event(
                        None,
                        events::WARNING,
                        "FailedToRetrieveImagePullSecret",
                        msg,
                    );
                }
            }
        }
        auth
    }

    /// A BackOff event when a container is first seen waiting in CrashLoopBackOff after an
    /// attempt.
    async fn announce_back_off(&mut self, status: &PodStatus) {
        let statuses = status
            .init_container_statuses
            .iter()
            .flatten()
            .map(|s| (true, s))
            .chain(
                status
                    .container_statuses
                    .iter()
                    .flatten()
                    .map(|s| (false, s)),
            );
        let mut due = Vec::new();
        for (init, s) in statuses {
            let waiting = s.state.as_ref().and_then(|st| st.waiting.as_ref());
            if waiting.and_then(|w| w.reason.as_deref()) == Some("CrashLoopBackOff")
                && self.backed_off.get(&s.name) != Some(&s.restart_count)
            {
                due.push((init, s.name.clone(), s.restart_count));
            }
        }
        for (init, name, count) in due {
            self.backed_off.insert(name.clone(), count);
            let msg = format!(
                "Back-off restarting failed container {name} in pod {}",
                status::pod_ref(&self.pod)
            );
            self.event(Some((init, &name)), events::WARNING, "BackOff", msg);
        }
    }

    fn compute(&self, snap: &PodSnapshot) -> PodStatus {
        // Times are carried over from what was last reported, which the watch may not show yet.
        let mut pod = (*self.pod).clone();
        if let Some(r) = &self.reported {
            pod.status = Some(r.clone());
        }
        let host_ip = self.ctx.host_ip.to_string();
        status::pod_status(&pod, snap, &host_ip, self.backoff(), Timestamp::now())
    }

    /// Patches `pods/status` when the status differs from the last one reported.
    async fn report(&mut self, snap: PodSnapshot) {
        let status = self.compute(&snap);
        self.announce_back_off(&status).await;
        // A static pod reports to its mirror: a new mirror (the old one was deleted) gets the
        // status again.
        let mirror = crate::static_pods::is_static(&self.pod)
            .then(|| self.ctx.mirror_uid(&self.uid))
            .flatten();
        if self.reported.as_ref() == Some(&status) && mirror == self.reported_mirror {
            return;
        }
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({ "status": status });
        match self
            .api()
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.reported = Some(status);
                self.reported_mirror = mirror;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(pod = %self.uid, error = %e, "patch pod status"),
        }
    }

    /// Stops the containers with the grace period, removes network, sandbox and cgroup, then
    /// deletes the pod object (the API server waits for this to finish graceful deletion).
    async fn terminate(&mut self, object_exists: bool) {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or(spec.termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0) as u64;
        tracing::info!(pod = %self.uid, grace, "killing pod");
        self.probes.clear();
        let mut stoppers = Vec::new();
        if let Ok(snap) = self.snapshot().await {
            for (name, rec) in &snap.containers {
                if matches!(rec.current.state, RunState::Running { .. }) {
                    let init = spec
                        .init_containers
                        .iter()
                        .flatten()
                        .any(|c| &c.name == name);
                    let msg = format!("Stopping container {name}");
                    self.event(Some((init, name)), events::NORMAL, "Killing", msg);
                    let app = spec.containers.iter().find(|c| &c.name == name);
                    let fallback = Container {
                        name: name.clone(),
                        ..Default::default()
                    };
                    let target = self.target(app.unwrap_or(&fallback), &rec.current.id, &snap);
                    stoppers.push(self.stopper(
                        app.cloned().filter(|_| !init),
                        target,
                        Duration::from_secs(grace),
                    ));
                }
            }
        }
        // preStop hooks and graceful stops of all containers at once.
        futures_util::future::join_all(stoppers).await;
        let mut delay = Duration::from_millis(200);
        loop {
            let ctx = self.ctx.clone();
            let uid = self.uid.clone();
            let done = blocking(move || {
                ctx.stop_all(&uid, Duration::from_secs(grace));
                ctx.teardown(&uid)
            })
            .await;
            match done {
                Ok(Ok(())) => break,
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!(pod = %self.uid, error = %e, "tear down pod; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        if !object_exists {
            return;
        }
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        for _ in 0..10 {
            match self.api().delete(&name, &params).await {
                Ok(_) => return,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return,
                Err(e) => {
                    tracing::warn!(pod = %self.uid, error = %e, "delete pod");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
