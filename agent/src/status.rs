//! Pod status as kubelet reports it, computed as a pure function of the pod (spec and the
//! status last reported) and what the runtime holds for it (`PodSnapshot`).

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeMap;
use std::time::Duration;

/// Now, to the second: API times carry seconds, so finer times would look like changes.
pub fn now() -> Time {
    Time(second(Timestamp::now()))
}

pub fn second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// One run of a container as the runtime records it.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    /// Created, not started yet.
    Created,
    Running {
        started_at: Timestamp,
    },
    Exited {
        exit_code: i32,
        signal: Option<i32>,
        /// Completed, Error or OOMKilled.
        reason: String,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
        /// The termination message (terminationMessagePath, or the log's end).
        message: Option<String>,
    },
}

/// One attempt (kubelet: restart number) of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub id: String,
    pub attempt: u32,
    /// Normalised image reference.
    pub image: String,
    /// `repository@digest`.
    pub image_id: String,
    pub state: RunState,
}

/// The newest attempt of a container and the one before it (for `lastState`).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerRecord {
    pub current: Attempt,
    pub previous: Option<Attempt>,
}

/// Why a container is not running, as the worker saw it (a pull or create failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// What the runtime holds for one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSnapshot {
    /// Sandbox made and network set up.
    pub sandbox_ready: bool,
    pub pod_ips: Vec<String>,
    pub containers: BTreeMap<String, ContainerRecord>,
    /// Failures of the last attempt to start a container, by container name.
    pub waiting: BTreeMap<String, Waiting>,
    /// What the probes found, by container name.
    pub health: BTreeMap<String, crate::probe::Health>,
}

impl PodSnapshot {
    /// Whether any app container of `spec` was made: the pod got past its init containers.
    pub fn app_began(&self, spec: &PodSpec) -> bool {
        spec.containers
            .iter()
            .any(|c| self.containers.contains_key(&c.name))
    }
}

/// Whether attempt `cur` of `c` has started: at once without a startup probe, else once the
/// probe passed for that attempt (`health` by container name).
pub fn started(
    c: &Container,
    cur: &Attempt,
    health: &BTreeMap<String, crate::probe::Health>,
) -> bool {
    let h = health.get(&c.name).filter(|h| h.id == cur.id);
    c.startup_probe.is_none() || h.is_some_and(|h| h.started)
}

/// Restart back-off: none before the first restart, then `base` doubling up to `max`; a run of
/// ten minutes or more starts over (kubelet's CrashLoopBackOff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

const BACKOFF_RESET: Duration = Duration::from_secs(600);

impl Backoff {
    /// The delay before the restart that follows attempt `attempt` ending.
    pub fn delay(&self, attempt: u32, ran: Option<Duration>) -> Duration {
        if attempt == 0 || ran.is_some_and(|r| r >= BACKOFF_RESET) {
            return Duration::ZERO;
        }
        let doubled = self
            .base
            .checked_mul(1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX))
            .unwrap_or(self.max);
        doubled.min(self.max)
    }
}

/// What to do about a container whose current attempt exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    No,
    Now,
    /// In back-off: wait `remaining` of `delay`.
    Later {
        remaining: Duration,
        delay: Duration,
    },
}

/// What a container is to its pod: an init container runs to completion before the next; a
/// sidecar (an init container with `restartPolicy: Always`) starts in the init order, keeps
/// running beside the app containers and is restarted whenever it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Init,
    Sidecar,
    App,
}

impl Role {
    pub fn of(c: &Container, init: bool) -> Role {
        match (init, c.restart_policy.as_deref()) {
            (true, Some("Always")) => Role::Sidecar,
            (true, _) => Role::Init,
            (false, _) => Role::App,
        }
    }
}

/// The pod's sidecars: its init containers with `restartPolicy: Always`.
pub fn sidecars(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    (spec.init_containers.iter().flatten()).filter(|c| Role::of(c, true) == Role::Sidecar)
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// Whether (and when) an exited container is restarted, by restart policy and back-off. Init
/// containers follow the same rule, with Always treated as OnFailure (they never rerun on
/// success); sidecars always restart.
pub fn restart(
    pod: &Pod,
    rec: &ContainerRecord,
    role: Role,
    b: Backoff,
    now: Timestamp,
) -> Restart {
    let RunState::Exited {
        exit_code,
        started_at,
        finished_at,
        ..
    } = &rec.current.state
    else {
        return Restart::No;
    };
    let wanted = match (role, restart_policy(pod)) {
        (Role::Sidecar, _) => true,
        (_, "Never") => false,
        (_, "OnFailure") => *exit_code != 0,
        (role, _) => role == Role::App || *exit_code != 0,
    };
    if !wanted {
        return Restart::No;
    }
    let ran = started_at.and_then(|s| Duration::try_from(finished_at.duration_since(s)).ok());
    let delay = b.delay(rec.current.attempt, ran);
    let since = Duration::try_from(now.duration_since(*finished_at)).unwrap_or_default();
    if since >= delay {
        Restart::Now
    } else {
        Restart::Later {
            remaining: delay - since,
            delay,
        }
    }
}

fn time(t: Timestamp) -> Time {
    Time(second(t))
}

fn terminated(a: &Attempt) -> Option<ContainerStateTerminated> {
    match &a.state {
        RunState::Exited {
            exit_code,
            signal,
            reason,
            started_at,
            finished_at,
            message,
        } => Some(ContainerStateTerminated {
            container_id: Some(format!("oxlet://{}", a.id)),
            exit_code: *exit_code,
            signal: *signal,
            reason: Some(reason.clone()),
            started_at: started_at.map(time),
            finished_at: Some(time(*finished_at)),
            message: message.clone().filter(|m| !m.is_empty()),
        }),
        _ => None,
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

/// `name_namespace(uid)`, how kubelet names a pod in messages.
pub fn pod_ref(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.as_deref().unwrap_or(""),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.uid.as_deref().unwrap_or("")
    )
}

#[allow(clippy::too_many_arguments)]
fn container_status(
    pod: &Pod,
    c: &Container,
    snap: &PodSnapshot,
    role: Role,
    default_reason: &str,
    b: Backoff,
    now: Timestamp,
) -> ContainerStatus {
    let rec = snap.containers.get(&c.name);
    let failure = snap.waiting.get(&c.name);
    let mut s = ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: String::new(),
        ready: false,
        started: Some(false),
        restart_count: 0,
        ..Default::default()
    };
    let Some(rec) = rec else {
        s.state = Some(match failure {
            Some(w) => waiting(&w.reason, Some(w.message.clone())),
            None => waiting(default_reason, None),
        });
        return s;
    };
    let cur = &rec.current;
    s.image = cur.image.clone();
    s.image_id = cur.image_id.clone();
    s.container_id = Some(format!("oxlet://{}", cur.id));
    s.restart_count = cur.attempt as i32;
    s.last_state = rec
        .previous
        .as_ref()
        .and_then(terminated)
        .map(|t| ContainerState {
            terminated: Some(t),
            ..Default::default()
        });
    match &cur.state {
        RunState::Created => s.state = Some(waiting(default_reason, None)),
        RunState::Running { started_at } => {
            s.state = Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(time(*started_at)),
                }),
                ..Default::default()
            });
            // Probes hold `started` until the startup probe succeeds and `ready` until the
            // readiness probe does; without them both follow running.
            let health = snap.health.get(&c.name).filter(|h| h.id == cur.id);
            let started = started(c, cur, &snap.health);
            let ready = c.readiness_probe.is_none() || health.is_some_and(|h| h.ready);
            s.ready = role != Role::Init && started && ready;
            s.started = Some(started);
        }
        RunState::Exited { .. } => {
            let done = ContainerState {
                terminated: terminated(cur),
                ..Default::default()
            };
            let restarting = |state: ContainerState| (state, Some(done.clone()));
            let (state, last) = match (restart(pod, rec, role, b, now), failure) {
                (Restart::No, _) => (done.clone(), s.last_state.take()),
                (_, Some(w)) => restarting(waiting(&w.reason, Some(w.message.clone()))),
                (Restart::Later { delay, .. }, None) => restarting(waiting(
                    "CrashLoopBackOff",
                    Some(format!(
                        "back-off {} restarting failed container={} pod={}",
                        fmt_delay(delay),
                        c.name,
                        pod_ref(pod)
                    )),
                )),
                // Restarted on the next sync; until then it shows how it ended.
                (Restart::Now, None) => (done.clone(), s.last_state.take()),
            };
            s.state = Some(state);
            s.last_state = last;
        }
    }
    s
}

/// Go's `time.Duration` formatting for whole seconds and minutes (`10s`, `5m0s`).
fn fmt_delay(d: Duration) -> String {
    let secs = d.as_secs();
    match (secs / 60, secs % 60) {
        (0, s) if d.subsec_millis() == 0 => format!("{s}s"),
        (0, _) => format!("{:.1}s", d.as_secs_f64()),
        (m, s) => format!("{m}m{s}s"),
    }
}

fn phase(
    pod: &Pod,
    init: &[(Role, ContainerStatus)],
    app: &[ContainerStatus],
    app_began: bool,
) -> &'static str {
    let policy = restart_policy(pod);
    // A sidecar that exits is restarted, whatever its code.
    let init_failed = init.iter().filter(|(r, _)| *r == Role::Init).any(|(_, s)| {
        s.state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(|t| t.exit_code != 0)
    });
    if init_failed && policy == "Never" {
        return "Failed";
    }
    if !initialized(init, app_began) {
        return "Pending";
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for s in app {
        let st = s.state.as_ref();
        if st.and_then(|x| x.running.as_ref()).is_some() {
            running += 1;
        } else if let Some(t) = st.and_then(|x| x.terminated.as_ref()) {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if s
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .is_some()
        {
            stopped += 1;
        } else {
            waiting += 1;
        }
    }
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        if policy == "Always" {
            "Running"
        } else if stopped == succeeded {
            "Succeeded"
        } else if policy == "Never" {
            "Failed"
        } else {
            "Running"
        }
    } else {
        "Pending"
    }
}

fn initialized(init: &[(Role, ContainerStatus)], app_began: bool) -> bool {
    init.iter().all(|(r, s)| init_done(*r, s, app_began))
}

/// An init container is done when it completed, a sidecar once it has started; once app
/// containers began, a sidecar's later restarts do not undo the pod's initialization.
fn init_done(role: Role, s: &ContainerStatus, app_began: bool) -> bool {
    let st = s.state.as_ref();
    match role {
        Role::Sidecar => {
            app_began || st.and_then(|st| st.running.as_ref()).is_some() && s.started == Some(true)
        }
        _ => st
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0),
    }
}

fn cond(type_: &str, ok: bool, reason: Option<&str>, message: Option<String>) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.filter(|_| !ok).map(String::from),
        message: message.filter(|_| !ok),
        ..Default::default()
    }
}

fn names(v: Vec<&ContainerStatus>) -> String {
    let n: Vec<&str> = v.iter().map(|s| s.name.as_str()).collect();
    format!("[{}]", n.join(" "))
}

fn conditions(
    snap: &PodSnapshot,
    phase: &str,
    init: &[(Role, ContainerStatus)],
    app: &[ContainerStatus],
    app_began: bool,
) -> Vec<PodCondition> {
    let completed = phase == "Succeeded";
    let pending_init: Vec<&ContainerStatus> = init
        .iter()
        .filter(|(r, s)| !init_done(*r, s, app_began))
        .map(|(_, s)| s)
        .collect();
    let initialized = if completed || pending_init.is_empty() {
        let mut c = cond("Initialized", true, None, None);
        if completed && !init.is_empty() {
            c.reason = Some("PodCompleted".into());
        }
        c
    } else {
        cond(
            "Initialized",
            false,
            Some("ContainersNotInitialized"),
            Some(format!(
                "containers with incomplete status: {}",
                names(pending_init.clone())
            )),
        )
    };
    // Sidecars count for readiness as app containers do.
    let sidecars = init.iter().filter(|(r, _)| *r == Role::Sidecar);
    let unready: Vec<&ContainerStatus> = sidecars
        .map(|(_, s)| s)
        .chain(app)
        .filter(|s| !s.ready)
        .collect();
    let ready_cond = |type_: &str| {
        if completed {
            let mut c = cond(type_, false, Some("PodCompleted"), None);
            c.message = None;
            c
        } else {
            cond(
                type_,
                unready.is_empty() && pending_init.is_empty(),
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: {}",
                    names(unready.clone())
                )),
            )
        }
    };
    vec![
        cond("PodReadyToStartContainers", snap.sandbox_ready, None, None),
        initialized,
        ready_cond("Ready"),
        ready_cond("ContainersReady"),
        cond("PodScheduled", true, None, None),
    ]
}

/// The status to report for `pod` given what the runtime holds. Times of conditions that did
/// not change, and the start time, are kept from the pod's current status.
pub fn pod_status(
    pod: &Pod,
    snap: &PodSnapshot,
    host_ip: &str,
    b: Backoff,
    now: Timestamp,
) -> PodStatus {
    let old = pod.status.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let init_specs = spec.init_containers.clone().unwrap_or_default();
    let init: Vec<(Role, ContainerStatus)> = init_specs
        .iter()
        .map(|c| {
            let role = Role::of(c, true);
            (
                role,
                container_status(pod, c, snap, role, "PodInitializing", b, now),
            )
        })
        .collect();
    let app_default = if init_specs.is_empty() {
        "ContainerCreating"
    } else {
        "PodInitializing"
    };
    let app: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| container_status(pod, c, snap, Role::App, app_default, b, now))
        .collect();
    let app_began = snap.app_began(&spec);
    let phase = phase(pod, &init, &app, app_began);
    let mut conds = conditions(snap, phase, &init, &app, app_began);
    let t = time(now);
    for c in &mut conds {
        let kept = old
            .conditions
            .iter()
            .flatten()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
            .and_then(|o| o.last_transition_time.clone());
        c.last_transition_time = Some(kept.unwrap_or_else(|| t.clone()));
    }
    let host_network = spec.host_network == Some(true);
    let pod_ips: Vec<String> = if host_network {
        vec![host_ip.to_string()]
    } else {
        snap.pod_ips.clone()
    };
    let qos = runtime::cgroup::qos_class(&spec)
        .map(|q| q.as_str().to_string())
        .ok()
        .or(old.qos_class.clone());
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conds),
        host_ip: Some(host_ip.into()),
        host_ips: Some(vec![HostIP { ip: host_ip.into() }]),
        pod_ip: pod_ips.first().cloned(),
        pod_ips: (!pod_ips.is_empty())
            .then(|| pod_ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
        start_time: old.start_time.clone().or(Some(t)),
        qos_class: qos,
        init_container_statuses: (!init.is_empty())
            .then(|| init.into_iter().map(|(_, s)| s).collect()),
        container_statuses: Some(app),
        ..Default::default()
    }
}

/// Whether the pod will run nothing more: Succeeded or Failed.
pub fn is_terminal(status: &PodStatus) -> bool {
    matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
}

#[cfg(test)]
mod tests;
