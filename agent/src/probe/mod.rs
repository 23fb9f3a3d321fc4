//! Container probes as kubelet runs them: liveness, readiness and startup probes with exec,
//! httpGet, tcpSocket and grpc actions, one tokio task per probe of a running container.
//!
//! A [`Manager`] per pod starts the tasks of each container attempt it sees running and drops
//! them (aborting the tasks) when the attempt ends. The tasks keep each container's [`Health`]
//! (started, ready) and tell the pod worker through [`Notice`]s when health changed or a
//! container must be killed (a failed liveness or startup probe).

pub mod action;
pub mod exec;
pub mod grpc;
pub mod http;
pub mod tcp;

pub use action::{Action, ActionError, Outcome, Target};

use crate::events::{self, Recorder};
use crate::status::{PodSnapshot, RunState};
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::jiff::Timestamp;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// The three kinds of probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Liveness,
    Readiness,
    Startup,
}

impl Kind {
    /// As kubelet writes it at the start of an event message.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
            Kind::Startup => "Startup",
        }
    }

    /// As kubelet writes it inside a message (`failed liveness probe`).
    pub fn lower(self) -> &'static str {
        match self {
            Kind::Liveness => "liveness",
            Kind::Readiness => "readiness",
            Kind::Startup => "startup",
        }
    }

    fn of(self, c: &Container) -> Option<&Probe> {
        match self {
            Kind::Liveness => c.liveness_probe.as_ref(),
            Kind::Readiness => c.readiness_probe.as_ref(),
            Kind::Startup => c.startup_probe.as_ref(),
        }
    }
}

/// What the probes found about one container attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The attempt (container id) this is about.
    pub id: String,
    /// The startup probe succeeded (true at once without one).
    pub started: bool,
    /// The readiness probe's verdict (kubelet starts at not ready).
    pub ready: bool,
}

/// What probe tasks tell the pod worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A container's health changed: status is due.
    Changed,
    /// A liveness or startup probe failed `failureThreshold` times: the attempt must be killed.
    Kill {
        container: String,
        id: String,
        kind: Kind,
    },
}

/// kubelet's probe settings with its defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(kind: Kind, p: &Probe) -> Self {
        let secs = |v: Option<i32>, default: i32, min: i32| {
            Duration::from_secs(v.unwrap_or(default).max(min) as u64)
        };
        let success = match kind {
            // The API server allows only 1 for these.
            Kind::Liveness | Kind::Startup => 1,
            Kind::Readiness => p.success_threshold.unwrap_or(1).max(1) as u32,
        };
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success_threshold: success,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

type HealthMap = Arc<Mutex<BTreeMap<String, Health>>>;

fn lock(h: &HealthMap) -> std::sync::MutexGuard<'_, BTreeMap<String, Health>> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops a probe task when dropped.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Probing {
    id: String,
    _tasks: Vec<TaskGuard>,
}

/// The probes of one pod's containers.
pub struct Manager {
    rt: Arc<runtime::cri::Runtime>,
    events: Recorder,
    tx: mpsc::UnboundedSender<Notice>,
    health: HealthMap,
    probing: HashMap<String, Probing>,
}

impl Manager {
    pub fn new(
        rt: Arc<runtime::cri::Runtime>,
        events: Recorder,
    ) -> (Self, mpsc::UnboundedReceiver<Notice>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let m = Self {
            rt,
            events,
            tx,
            health: Arc::default(),
            probing: HashMap::new(),
        };
        (m, rx)
    }

    /// Health of the containers being probed, by container name.
    pub fn health(&self) -> BTreeMap<String, Health> {
        lock(&self.health).clone()
    }

    /// Stops every probe (the pod is being stopped).
    pub fn clear(&mut self) {
        self.probing.clear();
        lock(&self.health).clear();
    }

    /// Stops probing `container` (it is being killed).
    pub fn forget(&mut self, container: &str) {
        self.probing.remove(container);
        lock(&self.health).remove(container);
    }

    /// Starts the probes of every app container attempt that runs and is not probed yet, and
    /// stops those of attempts that ended. `host` is the address httpGet, tcpSocket and grpc
    /// probes connect to by default (the pod IP, the node's for hostNetwork pods).
    pub fn sync(&mut self, pod: &Arc<Pod>, snap: &PodSnapshot, host: Option<IpAddr>) {
        let spec = pod.spec.clone().unwrap_or_default();
        let mut live = Vec::new();
        // Sidecars are probed as app containers are.
        for c in spec.containers.iter().chain(crate::status::sidecars(&spec)) {
            let Some(rec) = snap.containers.get(&c.name) else {
                continue;
            };
            let RunState::Running { started_at } = rec.current.state else {
                continue;
            };
            live.push(c.name.clone());
            let id = rec.current.id.clone();
            if self.probing.get(&c.name).is_some_and(|p| p.id == id) {
                continue;
            }
            self.start(pod, c, &id, started_at, host);
        }
        self.probing.retain(|name, _| live.contains(name));
        lock(&self.health).retain(|name, _| live.contains(name));
    }

    fn start(
        &mut self,
        pod: &Arc<Pod>,
        c: &Container,
        id: &str,
        started_at: Timestamp,
        host: Option<IpAddr>,
    ) {
        // An attempt the agent reported before (it restarted) keeps what was reported.
        let reported = pod
            .status
            .as_ref()
            .and_then(|s| {
                let all = s.container_statuses.iter().flatten();
                all.chain(s.init_container_statuses.iter().flatten())
                    .find(|s| s.name == c.name)
            })
            .filter(|s| s.container_id.as_deref() == Some(&format!("oxlet://{id}")));
        let started =
            c.startup_probe.is_none() || reported.is_some_and(|s| s.started == Some(true));
        let ready = reported.is_some_and(|s| s.ready);
        lock(&self.health).insert(
            c.name.clone(),
            Health {
                id: id.to_string(),
                started,
                ready,
            },
        );
        let target = Target {
            rt: self.rt.clone(),
            container_id: id.to_string(),
            container: Arc::new(c.clone()),
            host,
        };
        let mut tasks = Vec::new();
        for kind in [Kind::Startup, Kind::Liveness, Kind::Readiness] {
            let Some(p) = kind.of(c) else { continue };
            if kind == Kind::Startup && started {
                continue;
            }
            let Some(action) = Action::of_probe(p) else {
                continue;
            };
            let w = ProbeWorker {
                kind,
                timing: Timing::of(kind, p),
                action,
                target: target.clone(),
                started_at,
                health: self.health.clone(),
                tx: self.tx.clone(),
                events: self.events.clone(),
                pod: pod.clone(),
            };
            tasks.push(TaskGuard(tokio::spawn(w.run())));
        }
        self.probing.insert(
            c.name.clone(),
            Probing {
                id: id.to_string(),
                _tasks: tasks,
            },
        );
    }
}

struct ProbeWorker {
    kind: Kind,
    timing: Timing,
    action: Action,
    target: Target,
    started_at: Timestamp,
    health: HealthMap,
    tx: mpsc::UnboundedSender<Notice>,
    events: Recorder,
    pod: Arc<Pod>,
}

impl ProbeWorker {
    fn name(&self) -> &str {
        &self.target.container.name
    }

    /// Applies `f` to this attempt's health; false when the attempt is no longer tracked.
    fn with_health<T>(&self, f: impl FnOnce(&mut Health) -> T) -> Option<T> {
        let mut map = lock(&self.health);
        map.get_mut(self.name())
            .filter(|h| h.id == self.target.container_id)
            .map(f)
    }

    fn event(&self, type_: &str, reason: &str, message: String) {
        let spec = self.pod.spec.as_ref();
        let inits = spec.and_then(|s| s.init_containers.as_ref());
        let sidecar = inits.is_some_and(|v| v.iter().any(|c| c.name == self.name()));
        let path = Some(events::field_path(sidecar, self.name()));
        self.events.pod(&self.pod, path, type_, reason, message);
    }

    async fn run(self) {
        // The initial delay counts from the container's start, so an adopted container is not
        // held back again.
        let since = Timestamp::now().duration_since(self.started_at);
        let since = Duration::try_from(since).unwrap_or_default();
        if since < self.timing.initial_delay {
            tokio::time::sleep(self.timing.initial_delay - since).await;
        }
        let mut tick = tokio::time::interval(self.timing.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut successes, mut failures) = (0u32, 0u32);
        loop {
            tick.tick().await;
            if self.kind != Kind::Startup {
                match self.with_health(|h| h.started) {
                    None => return,
                    // Held back until the startup probe succeeds.
                    Some(false) => continue,
                    Some(true) => {}
                }
            }
            let outcome = self.action.run(&self.target, self.timing.timeout).await;
            tracing::debug!(container = %self.target.container_id, kind = ?self.kind, ?outcome, "probe");
            match outcome {
                Outcome::Success => {
                    successes += 1;
                    failures = 0;
                }
                Outcome::Warning(msg) => {
                    successes += 1;
                    failures = 0;
                    let msg = format!("{} probe warning: {msg}", self.kind.title());
                    self.event(events::WARNING, "ProbeWarning", msg);
                }
                Outcome::Failure(msg) => {
                    failures += 1;
                    successes = 0;
                    let msg = format!("{} probe failed: {msg}", self.kind.title());
                    self.event(events::WARNING, "Unhealthy", msg);
                }
            }
            match self.kind {
                Kind::Startup if successes >= 1 => {
                    if self.with_health(|h| h.started = true).is_some() {
                        let _ = self.tx.send(Notice::Changed);
                    }
                    return;
                }
                Kind::Startup | Kind::Liveness if failures >= self.timing.failure_threshold => {
                    let _ = self.tx.send(Notice::Kill {
                        container: self.name().to_string(),
                        id: self.target.container_id.clone(),
                        kind: self.kind,
                    });
                    return;
                }
                Kind::Readiness => {
                    let verdict = if successes >= self.timing.success_threshold {
                        Some(true)
                    } else if failures >= self.timing.failure_threshold {
                        Some(false)
                    } else {
                        None
                    };
                    if let Some(ready) = verdict {
                        let changed =
                            self.with_health(|h| std::mem::replace(&mut h.ready, ready) != ready);
                        match changed {
                            None => return,
                            Some(true) => {
                                let _ = self.tx.send(Notice::Changed);
                            }
                            Some(false) => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_defaults() {
        let t = Timing::of(Kind::Readiness, &Probe::default());
        assert_eq!(
            t,
            Timing {
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3,
            }
        );
        let p = Probe {
            success_threshold: Some(3),
            period_seconds: Some(2),
            ..Default::default()
        };
        assert_eq!(Timing::of(Kind::Liveness, &p).success_threshold, 1);
        assert_eq!(Timing::of(Kind::Readiness, &p).success_threshold, 3);
        assert_eq!(
            Timing::of(Kind::Readiness, &p).period,
            Duration::from_secs(2)
        );
    }
}
