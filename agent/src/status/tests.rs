use super::*;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const B: Backoff = Backoff {
    base: Duration::from_secs(10),
    max: Duration::from_secs(300),
};

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn pod(policy: &str, names: &[&str], init: &[&str]) -> Pod {
    let c = |n: &&str| Container {
        name: n.to_string(),
        image: Some("busybox".into()),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            namespace: Some("ns".into()),
            uid: Some("u1".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some(policy.into()),
            containers: names.iter().map(c).collect(),
            init_containers: (!init.is_empty()).then(|| init.iter().map(c).collect()),
            ..Default::default()
        }),
        status: None,
    }
}

fn attempt(name: &str, n: u32, state: RunState) -> Attempt {
    Attempt {
        id: format!("u1_{name}_{n}"),
        attempt: n,
        image: "127.0.0.1:5000/busybox:latest".into(),
        image_id: "127.0.0.1:5000/busybox@sha256:ab".into(),
        state,
    }
}

fn running() -> RunState {
    RunState::Running { started_at: t(0) }
}

fn exited(code: i32, at: i64) -> RunState {
    RunState::Exited {
        exit_code: code,
        signal: None,
        reason: if code == 0 { "Completed" } else { "Error" }.into(),
        started_at: Some(t(0)),
        finished_at: t(at),
        message: None,
    }
}

fn snap(cs: Vec<(&str, u32, RunState)>) -> PodSnapshot {
    PodSnapshot {
        sandbox_ready: true,
        pod_ips: vec!["10.1.0.5".into()],
        containers: cs
            .into_iter()
            .map(|(n, a, s)| {
                (
                    n.to_string(),
                    ContainerRecord {
                        current: attempt(n, a, s),
                        previous: (a > 0).then(|| attempt(n, a - 1, exited(1, 1))),
                    },
                )
            })
            .collect(),
        waiting: BTreeMap::new(),
        health: BTreeMap::new(),
    }
}

fn status(p: &Pod, s: &PodSnapshot, now: i64) -> PodStatus {
    pod_status(p, s, "192.0.2.1", B, t(now))
}

fn cond<'a>(s: &'a PodStatus, ty: &str) -> &'a PodCondition {
    s.conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_ == ty)
        .unwrap()
}

fn waiting_reason(s: &ContainerStatus) -> Option<&str> {
    s.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
}

#[test]
fn pending_then_running_with_conditions_ips_and_ids() {
    let p = pod("Always", &["c"], &[]);
    let mut sn = PodSnapshot::default();
    let s = status(&p, &sn, 0);
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    let cs = &s.container_statuses.as_ref().unwrap()[0];
    assert_eq!(waiting_reason(cs), Some("ContainerCreating"));
    assert_eq!(cond(&s, "PodReadyToStartContainers").status, "False");
    let ready = cond(&s, "Ready");
    assert_eq!(ready.reason.as_deref(), Some("ContainersNotReady"));
    assert_eq!(
        ready.message.as_deref(),
        Some("containers with unready status: [c]")
    );
    assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));

    sn = snap(vec![("c", 0, running())]);
    let s = status(&p, &sn, 1);
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert_eq!(s.pod_ip.as_deref(), Some("10.1.0.5"));
    assert_eq!(s.host_ip.as_deref(), Some("192.0.2.1"));
    let cs = &s.container_statuses.as_ref().unwrap()[0];
    assert!(cs.ready);
    assert_eq!(cs.started, Some(true));
    assert_eq!(cs.container_id.as_deref(), Some("oxlet://u1_c_0"));
    assert_eq!(cs.image_id, "127.0.0.1:5000/busybox@sha256:ab");
    for c in [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ] {
        assert_eq!(cond(&s, c).status, "True", "{c}");
        assert_eq!(cond(&s, c).reason, None, "{c}");
    }
}

#[test]
fn never_single_container_phases() {
    let p = pod("Never", &["c"], &[]);
    let s = status(&p, &snap(vec![("c", 0, exited(0, 5))]), 6);
    assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    let term = s.container_statuses.as_ref().unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (term.exit_code, term.reason.as_deref()),
        (0, Some("Completed"))
    );
    assert_eq!(cond(&s, "Ready").reason.as_deref(), Some("PodCompleted"));
    let s = status(&p, &snap(vec![("c", 0, exited(1, 5))]), 6);
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    let term = s.container_statuses.as_ref().unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!((term.exit_code, term.reason.as_deref()), (1, Some("Error")));
}

#[test]
fn multi_container_fails_only_when_all_ended() {
    let p = pod("Never", &["a", "b"], &[]);
    let s = status(
        &p,
        &snap(vec![("a", 0, exited(1, 5)), ("b", 0, running())]),
        6,
    );
    assert_eq!(s.phase.as_deref(), Some("Running"));
    let s = status(
        &p,
        &snap(vec![("a", 0, exited(1, 5)), ("b", 0, exited(0, 5))]),
        6,
    );
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    let p = pod("OnFailure", &["a", "b"], &[]);
    let s = status(
        &p,
        &snap(vec![("a", 0, exited(0, 5)), ("b", 0, exited(0, 5))]),
        6,
    );
    assert_eq!(s.phase.as_deref(), Some("Succeeded"));
}

#[test]
fn crash_loop_back_off_doubles_from_the_second_restart() {
    assert_eq!(B.delay(0, None), Duration::ZERO);
    assert_eq!(B.delay(1, None), Duration::from_secs(10));
    assert_eq!(B.delay(2, None), Duration::from_secs(20));
    assert_eq!(B.delay(9, None), Duration::from_secs(300));
    assert_eq!(B.delay(9, Some(Duration::from_secs(601))), Duration::ZERO);
    let p = pod("Always", &["c"], &[]);
    let rec = |n| ContainerRecord {
        current: attempt("c", n, exited(1, 100)),
        previous: None,
    };
    assert_eq!(restart(&p, &rec(0), Role::App, B, t(100)), Restart::Now);
    assert!(matches!(
        restart(&p, &rec(2), Role::App, B, t(105)),
        Restart::Later { .. }
    ));
    assert_eq!(restart(&p, &rec(2), Role::App, B, t(120)), Restart::Now);

    let s = status(&p, &snap(vec![("c", 2, exited(1, 100))]), 105);
    assert_eq!(s.phase.as_deref(), Some("Running"));
    let cs = &s.container_statuses.as_ref().unwrap()[0];
    assert_eq!(waiting_reason(cs), Some("CrashLoopBackOff"));
    assert_eq!(
        cs.state
            .as_ref()
            .unwrap()
            .waiting
            .as_ref()
            .unwrap()
            .message
            .as_deref(),
        Some("back-off 20s restarting failed container=c pod=p_ns(u1)")
    );
    assert_eq!(cs.restart_count, 2);
    let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(
        (last.exit_code, last.container_id.as_deref()),
        (1, Some("oxlet://u1_c_2"))
    );
    assert_eq!(cond(&s, "Ready").status, "False");
}

#[test]
fn image_errors_show_as_waiting_reasons() {
    let p = pod("Always", &["c"], &[]);
    let mut sn = PodSnapshot::default();
    sn.waiting.insert(
        "c".into(),
        Waiting {
            reason: "ErrImagePull".into(),
            message: "pull x: not found".into(),
        },
    );
    let s = status(&p, &sn, 0);
    let cs = &s.container_statuses.as_ref().unwrap()[0];
    assert_eq!(waiting_reason(cs), Some("ErrImagePull"));
    assert_eq!(s.phase.as_deref(), Some("Pending"));
}

#[test]
fn init_containers_gate_app_containers() {
    let p = pod("Always", &["app"], &["i1", "i2"]);
    let s = status(&p, &snap(vec![("i1", 0, running())]), 1);
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    assert_eq!(
        cond(&s, "Initialized").message.as_deref(),
        Some("containers with incomplete status: [i1 i2]")
    );
    let app = &s.container_statuses.as_ref().unwrap()[0];
    assert_eq!(waiting_reason(app), Some("PodInitializing"));
    let s = status(
        &p,
        &snap(vec![
            ("i1", 0, exited(0, 1)),
            ("i2", 0, exited(0, 2)),
            ("app", 0, running()),
        ]),
        3,
    );
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert_eq!(cond(&s, "Initialized").status, "True");
    let p = pod("Never", &["app"], &["i1"]);
    let s = status(&p, &snap(vec![("i1", 0, exited(2, 1))]), 3);
    assert_eq!(s.phase.as_deref(), Some("Failed"));
}

#[test]
fn unchanged_conditions_keep_their_transition_time() {
    let mut p = pod("Always", &["c"], &[]);
    let sn = snap(vec![("c", 0, running())]);
    let first = status(&p, &sn, 1);
    p.status = Some(first.clone());
    let again = status(&p, &sn, 50);
    assert_eq!(first, again);
}

#[test]
fn probes_hold_started_and_ready() {
    use k8s_openapi::api::core::v1::Probe;
    let mut p = pod("Always", &["c"], &[]);
    let c = &mut p.spec.as_mut().unwrap().containers[0];
    c.readiness_probe = Some(Probe::default());
    c.startup_probe = Some(Probe::default());
    let mut sn = snap(vec![("c", 0, running())]);
    let health = |started, ready| crate::probe::Health {
        id: "u1_c_0".into(),
        started,
        ready,
    };
    let first = |s: &PodStatus| s.container_statuses.as_ref().unwrap()[0].clone();
    // Not probed yet: neither started nor ready.
    let s = status(&p, &sn, 1);
    assert_eq!((first(&s).started, first(&s).ready), (Some(false), false));
    assert_eq!(cond(&s, "ContainersReady").status, "False");
    // Ready alone does not count before the startup probe succeeded.
    sn.health.insert("c".into(), health(false, true));
    assert!(!first(&status(&p, &sn, 1)).ready);
    sn.health.insert("c".into(), health(true, false));
    let s = status(&p, &sn, 1);
    assert_eq!((first(&s).started, first(&s).ready), (Some(true), false));
    assert_eq!(s.phase.as_deref(), Some("Running"));
    sn.health.insert("c".into(), health(true, true));
    let s = status(&p, &sn, 1);
    assert!(first(&s).ready);
    assert_eq!(cond(&s, "Ready").status, "True");
    // Health of an earlier attempt says nothing about this one.
    sn.health.insert(
        "c".into(),
        crate::probe::Health {
            id: "u1_c_7".into(),
            started: true,
            ready: true,
        },
    );
    assert!(!first(&status(&p, &sn, 1)).ready);
}

#[test]
fn sidecars_start_in_order_restart_always_and_do_not_decide_the_phase() {
    let mut p = pod("Never", &["app"], &["side", "i2"]);
    p.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0].restart_policy =
        Some("Always".into());
    // Running and started: it counts as initialized, and as a container to be ready.
    let s = status(&p, &snap(vec![("side", 0, running())]), 1);
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    assert_eq!(
        cond(&s, "Initialized").message.as_deref(),
        Some("containers with incomplete status: [i2]")
    );
    let side = &s.init_container_statuses.as_ref().unwrap()[0];
    assert!(side.ready && side.started == Some(true), "{side:?}");
    // With restartPolicy Never, a sidecar that failed is restarted and fails nothing.
    let rec = |state| ContainerRecord {
        current: attempt("side", 0, state),
        previous: None,
    };
    assert_eq!(
        restart(&p, &rec(exited(0, 1)), Role::Sidecar, B, t(100)),
        Restart::Now
    );
    let sn = snap(vec![
        ("side", 1, exited(1, 10)),
        ("i2", 0, exited(0, 2)),
        ("app", 0, running()),
    ]);
    let s = status(&p, &sn, 10);
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert_eq!(cond(&s, "Initialized").status, "True");
    assert_eq!(cond(&s, "Ready").status, "False");
    let side = &s.init_container_statuses.as_ref().unwrap()[0];
    assert_eq!(waiting_reason(side), Some("CrashLoopBackOff"));
    // The app container's end decides: Succeeded though the sidecar still runs.
    let sn = snap(vec![
        ("side", 0, running()),
        ("i2", 0, exited(0, 2)),
        ("app", 0, exited(0, 5)),
    ]);
    assert_eq!(status(&p, &sn, 6).phase.as_deref(), Some("Succeeded"));
}
