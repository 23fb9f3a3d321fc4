//! Container lifecycle on the real kernel through libcontainer and oxlet-shim.

mod common;

use common::*;
use runtime::container::{self, State};
use runtime::spec::{Namespaces, Ns};
use std::time::{Duration, Instant};

#[test]
fn create_start_log_exit_and_delete() {
    let env = Env::new();
    let cg = test_cgroup();
    let b = Bundle::new(
        &env,
        &sh("c", "echo out; echo err >&2; exit 3"),
        Namespaces::default(),
        &cg.0,
    );
    b.create();
    assert_eq!(container::state(&env.paths, &b.id).unwrap(), State::Created);
    container::start(&env.paths, &b.id).unwrap();
    let exit = container::wait(&env.paths, &b.id, Duration::from_secs(20)).expect("exited");
    assert_eq!((exit.exit_code, exit.reason()), (3, "Error"));
    assert!(
        matches!(container::state(&env.paths, &b.id).unwrap(), State::Exited(e) if e.exit_code == 3)
    );
    let raw = std::fs::read_to_string(b.log()).unwrap();
    let lines: Vec<&str> = raw.lines().collect();
    assert_eq!(lines.len(), 2, "{raw}");
    assert!(lines.iter().any(|l| l.ends_with(" stdout F out")), "{raw}");
    assert!(lines.iter().any(|l| l.ends_with(" stderr F err")), "{raw}");
    assert!(container::started_at(&env.paths, &b.id).is_some());
    let cgroup_dir = runtime::cgroup::controller_dir("memory", &b.cgroup);
    assert!(cgroup_dir.exists(), "container cgroup lives until delete");
    container::delete(&env.paths, &b.id).unwrap();
    assert!(!cgroup_dir.exists(), "delete removes the cgroup");
    for root in runtime::cgroup::controller_roots() {
        let dir = root.join(&b.cgroup);
        assert!(!dir.exists(), "delete leaves {}", dir.display());
    }
    assert!(!env.paths.state_root.join(&b.id).exists());
    container::delete(&env.paths, &b.id).unwrap();
}

#[test]
fn completed_and_reason() {
    let env = Env::new();
    let cg = test_cgroup();
    let b = Bundle::new(&env, &sh("c", "exit 0"), Namespaces::default(), &cg.0);
    b.create();
    container::start(&env.paths, &b.id).unwrap();
    let exit = container::wait(&env.paths, &b.id, Duration::from_secs(20)).unwrap();
    assert_eq!(
        (exit.exit_code, exit.reason(), exit.oom_killed),
        (0, "Completed", false)
    );
}

#[test]
fn memory_limit_is_set_and_hog_is_oom_killed() {
    let env = Env::new();
    let cg = test_cgroup();
    // tail -c keeps the last 200 MB in memory: far over the 32 MiB limit.
    let c = with_resources(
        sh(
            "hog",
            "head -c 200000000 /dev/zero | tail -c 200000000 > /dev/null",
        ),
        &[("memory", "32Mi")],
    );
    let b = Bundle::new(&env, &c, Namespaces::default(), &cg.0);
    b.create();
    let limit_file = if runtime::cgroup::is_v2() {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    let limit = std::fs::read_to_string(
        runtime::cgroup::controller_dir("memory", &b.cgroup).join(limit_file),
    )
    .unwrap();
    assert_eq!(limit.trim(), (32u64 << 20).to_string());
    container::start(&env.paths, &b.id).unwrap();
    // Generous: under the cgroup v2 VM's emulation the hog takes a minute on a busy host.
    let exit = container::wait(&env.paths, &b.id, Duration::from_secs(240)).unwrap();
    assert_eq!(
        (exit.exit_code, exit.reason()),
        (137, "OOMKilled"),
        "{exit:?}"
    );
}

#[test]
fn cpu_limit_throttles_a_busy_loop() {
    let env = Env::new();
    let cg = test_cgroup();
    let c = with_resources(sh("spin", "while :; do :; done"), &[("cpu", "100m")]);
    let b = Bundle::new(&env, &c, Namespaces::default(), &cg.0);
    b.create();
    let dir = runtime::cgroup::controller_dir("cpu", &b.cgroup);
    if runtime::cgroup::is_v2() {
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap().trim(),
            "10000 100000"
        );
    } else {
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
                .unwrap()
                .trim(),
            "10000"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.cfs_period_us"))
                .unwrap()
                .trim(),
            "100000"
        );
    }
    container::start(&env.paths, &b.id).unwrap();
    // Measure a window after start-up, whose own cpu time is not the loop's.
    std::thread::sleep(Duration::from_millis(500));
    let before = runtime::cgroup::usage(&b.cgroup).cpu_usage_ns;
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let used = runtime::cgroup::usage(&b.cgroup).cpu_usage_ns - before;
    let wall = t.elapsed().as_nanos() as u64;
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap();
    let throttled: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(throttled > 0, "{stat}");
    // 0.1 cpu over the window, with room for period boundaries; unthrottled it would be ~1.0.
    assert!(used < wall * 3 / 10, "used {used} ns of cpu in {wall} ns");
    container::stop(&env.paths, &b.id, Duration::ZERO).unwrap();
}

#[test]
fn exec_returns_output_and_exit_code() {
    let env = Env::new();
    let cg = test_cgroup();
    let b = Bundle::new(
        &env,
        &sh("c", "echo ready > /tmp/ready; exec sleep 1000"),
        Namespaces::default(),
        &cg.0,
    );
    b.create();
    container::start(&env.paths, &b.id).unwrap();
    let args = |s: &str| vec!["sh".to_string(), "-c".to_string(), s.to_string()];
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = container::exec(
            &env.paths,
            &b.id,
            &args("cat /tmp/ready || exit 1; echo e >&2; exit 7"),
            None,
        )
        .unwrap();
        if out.exit_code == 7 || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = runtime::log::read_text(&b.log()).unwrap_or_default();
    let st = container::state(&env.paths, &b.id);
    let cmdline = match &st {
        Ok(State::Running { pid }) => {
            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
        }
        _ => vec![],
    };
    assert_eq!(
        out.exit_code,
        7,
        "stderr: {} log: {log} state: {st:?} init: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&cmdline)
    );
    assert_eq!(out.stdout, b"ready\n");
    assert_eq!(out.stderr, b"e\n");
    let timed = container::exec(
        &env.paths,
        &b.id,
        &args("sleep 30"),
        Some(Duration::from_millis(300)),
    )
    .unwrap();
    assert_eq!(timed.exit_code, 137);
    let stop = container::stop(&env.paths, &b.id, Duration::from_secs(5)).unwrap();
    // `sleep` as PID 1 has no SIGTERM handler: the kernel ignores the signal, SIGKILL ends it.
    assert_eq!((stop.exit_code, stop.signal), (137, Some(9)));
}

#[test]
fn stop_waits_the_grace_period_then_kills() {
    let env = Env::new();
    let cg = test_cgroup();
    let b = Bundle::new(
        &env,
        &sh("c", "exec sleep 1000"),
        Namespaces::default(),
        &cg.0,
    );
    b.create();
    container::start(&env.paths, &b.id).unwrap();
    let t = Instant::now();
    let exit = container::stop(&env.paths, &b.id, Duration::from_millis(800)).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(800));
    assert_eq!(exit.signal, Some(9));

    let b2 = Bundle::new(
        &env,
        &sh("c", "trap 'exit 0' TERM; while :; do sleep 0.1; done"),
        Namespaces::default(),
        &cg.0,
    );
    b2.create();
    container::start(&env.paths, &b2.id).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let exit = container::stop(&env.paths, &b2.id, Duration::from_secs(20)).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a SIGTERM handler ends it early"
    );
    assert_eq!((exit.exit_code, exit.reason()), (0, "Completed"));
}

#[test]
fn containers_outlive_the_runtime_and_are_found_again() {
    let env = Env::new();
    let cg = test_cgroup();
    let long = Bundle::new(
        &env,
        &sh("c", "exec sleep 1000"),
        Namespaces::default(),
        &cg.0,
    );
    let short = Bundle::new(
        &env,
        &sh("c", "sleep 0.3; exit 5"),
        Namespaces::default(),
        &cg.0,
    );
    long.create();
    short.create();
    container::start(&env.paths, &long.id).unwrap();
    container::start(&env.paths, &short.id).unwrap();
    let State::Running { pid } = container::state(&env.paths, &long.id).unwrap() else {
        panic!("not running")
    };
    // The container is not our child: a restarted runtime neither owns nor orphans it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: u32 = stat
        .rsplit(") ")
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, std::process::id());
    std::thread::sleep(Duration::from_millis(800));
    // A "restarted" runtime: only the files, no in-memory state.
    let paths = env.paths.clone();
    let mut ids = container::list(&paths);
    ids.retain(|i| i == &long.id || i == &short.id);
    assert_eq!(ids.len(), 2);
    assert_eq!(
        container::state(&paths, &long.id).unwrap(),
        State::Running { pid }
    );
    assert!(
        matches!(container::state(&paths, &short.id).unwrap(), State::Exited(e) if e.exit_code == 5)
    );
}

#[test]
fn pod_sandbox_shares_namespaces_between_containers() {
    let env = Env::new();
    let cg = test_cgroup();
    let root = env.tmp.path().join("sandboxes");
    let id = unique("sb");
    let cfg = runtime::sandbox::SandboxConfig {
        id: id.clone(),
        hostname: "podhost".into(),
        ..Default::default()
    };
    let sb = runtime::sandbox::create(&root, &cfg).unwrap();
    let _guard = SandboxGuard(root.clone(), id.clone());
    let ns: Namespaces = sb.namespaces();
    assert!(matches!(ns.network, Ns::Path(_)));
    let script =
        "readlink /proc/self/ns/net; readlink /proc/self/ns/ipc; hostname; cat /etc/hostname";
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let b = Bundle::new(&env, &sh("c", script), ns.clone(), &cg.0);
        // Sandbox files are mounts handed in by the caller; rewrite the bundle with them.
        let mut spec =
            runtime::oci_spec::runtime::Spec::load(env.paths.dir(&b.id).join("config.json"))
                .unwrap();
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for m in sb.mounts() {
            mounts.push(serde_json::from_value(serde_json::json!({
                "destination": m.destination, "type": "bind", "source": m.source, "options": ["rbind"]})).unwrap());
        }
        spec.set_mounts(Some(mounts));
        spec.save(env.paths.dir(&b.id).join("config.json")).unwrap();
        b.create();
        container::start(&env.paths, &b.id).unwrap();
        assert_eq!(
            container::wait(&env.paths, &b.id, Duration::from_secs(20))
                .unwrap()
                .exit_code,
            0
        );
        outputs.push(runtime::log::read_text(&b.log()).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
    assert!(outputs[0].ends_with("podhost\npodhost\n"), "{}", outputs[0]);
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert!(!outputs[0].contains(&*host_net.to_string_lossy()));
    runtime::sandbox::remove(&root, &id).unwrap();
    runtime::sandbox::remove(&root, &id).unwrap();
    assert!(mounts_under(&root).is_empty());
    assert!(!root.join(&id).exists());
}

#[test]
fn failed_create_leaves_nothing() {
    let env = Env::new();
    let cg = test_cgroup();
    let b = Bundle::new(&env, &sh("c", "true"), Namespaces::default(), &cg.0);
    // A bind mount of a missing source makes libcontainer fail inside create.
    let mut spec =
        runtime::oci_spec::runtime::Spec::load(env.paths.dir(&b.id).join("config.json")).unwrap();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(serde_json::from_value(serde_json::json!({
        "destination": "/missing", "type": "bind", "source": "/nonexistent/oxlet", "options": ["rbind"]})).unwrap());
    spec.set_mounts(Some(mounts));
    spec.save(env.paths.dir(&b.id).join("config.json")).unwrap();
    let err = container::create(
        &env.paths,
        &b.id,
        &env.log_options(&b.id),
        Default::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("shim"), "{err}");
    assert!(
        !env.paths.state_root.join(&b.id).exists(),
        "state dir removed"
    );
    assert!(
        !runtime::cgroup::controller_dir("memory", &b.cgroup).exists(),
        "cgroup removed"
    );
}

struct SandboxGuard(std::path::PathBuf, String);

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        let _ = runtime::sandbox::remove(&self.0, &self.1);
    }
}

#[test]
fn pod_cgroups_follow_qos() {
    use k8s_openapi::api::core::v1::PodSpec;
    let uid = unique("uid");
    let c1 = with_resources(sh("a", "true"), &[("cpu", "200m"), ("memory", "16Mi")]);
    let mut c2 = with_resources(sh("b", "true"), &[("cpu", "300m"), ("memory", "16Mi")]);
    // A request below the limit makes the pod Burstable.
    c2.resources.as_mut().unwrap().requests = Some(
        [(
            "cpu".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("100m".into()),
        )]
        .into(),
    );
    let pod = PodSpec {
        containers: vec![c1.clone(), c2],
        ..Default::default()
    };
    assert_eq!(
        runtime::cgroup::qos_class(&pod).unwrap(),
        runtime::cgroup::QosClass::Burstable
    );
    let path = runtime::cgroup::ensure_pod_cgroup(&pod, &uid).unwrap();
    let _guard = CgroupGuard(path.clone());
    assert_eq!(path, format!("kubepods/burstable/pod{uid}"));
    // Idempotent: a second call reuses the cgroup.
    assert_eq!(
        runtime::cgroup::ensure_pod_cgroup(&pod, &uid).unwrap(),
        path
    );
    let cpu = runtime::cgroup::controller_dir("cpu", &path);
    let mem = runtime::cgroup::controller_dir("memory", &path);
    if runtime::cgroup::is_v2() {
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.max")).unwrap().trim(),
            "50000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(mem.join("memory.max"))
                .unwrap()
                .trim(),
            (32u64 << 20).to_string()
        );
        // shares 307 (200m + 100m requests) as cgroup v2 weight: 1 + (307-2)*9999/262142.
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.weight"))
                .unwrap()
                .trim(),
            "12"
        );
    } else {
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.shares"))
                .unwrap()
                .trim(),
            "307"
        );
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
                .unwrap()
                .trim(),
            "50000"
        );
        assert_eq!(
            std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
                .unwrap()
                .trim(),
            (32u64 << 20).to_string()
        );
    }
    // A container runs inside the pod cgroup.
    let env = Env::new();
    let b = Bundle::new(&env, &c1, Namespaces::default(), &path);
    b.create();
    container::start(&env.paths, &b.id).unwrap();
    assert_eq!(
        container::wait(&env.paths, &b.id, Duration::from_secs(30))
            .unwrap()
            .exit_code,
        0
    );
    container::delete(&env.paths, &b.id).unwrap();
    runtime::cgroup::remove_pod_cgroup(&path).unwrap();
    assert!(!cpu.exists() && !mem.exists());
}

/// A caller killed while its shim was still building the container leaves no state behind:
/// the container shows as created (it never ran), and `delete` must end that shim, or it
/// would finish a container no one owns.
#[test]
fn delete_ends_a_shim_still_building_the_container() {
    let env = Env::new();
    let cg = test_cgroup();
    let b = Bundle::new(&env, &sh("c", "true"), Namespaces::default(), &cg.0);
    // Opening a FIFO for writing blocks until a reader comes: the shim stalls before building.
    let log = env.tmp.path().join(format!("{}.fifo", b.id));
    nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut first = std::process::Command::new(&env.paths.shim)
        .args(["create", "--id", &b.id, "--bundle"])
        .arg(env.paths.dir(&b.id))
        .arg("--root")
        .arg(&env.paths.state_root)
        .arg("--log")
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    first.wait().unwrap();
    // The forked shim, found as delete finds it: by its command line.
    let shim = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&b.id))
            })
    };
    let t = Instant::now();
    let pid = loop {
        if let Some(pid) = shim() {
            break pid;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no shim");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Never started: the caller makes it again rather than counting an exit.
    assert_eq!(
        container::state(&env.paths, &b.id).unwrap(),
        container::State::Created
    );
    let alive = || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty());
    assert!(alive(), "the shim waits on its log");
    // Should the assertion below fail, the shim goes anyway.
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let _kill = Kill(pid);
    container::delete(&env.paths, &b.id).unwrap();
    assert!(!alive(), "delete left the building shim running");
    assert!(!env.paths.state_root.join(&b.id).exists());
}

/// A caller killed inside `start`, after libcontainer truncated state.json and before it wrote
/// it again, leaves a running container with an empty state: it shows as created (never
/// reported started), and `delete` ends its process, shim and cgroup.
#[test]
fn an_empty_state_left_by_a_start_cut_short_is_made_again_and_deleted() {
    let env = Env::new();
    let cg = test_cgroup();
    let b = Bundle::new(&env, &sh("c", "sleep 600"), Namespaces::default(), &cg.0);
    b.create();
    container::start(&env.paths, &b.id).unwrap();
    let State::Running { pid } = container::state(&env.paths, &b.id).unwrap() else {
        panic!("not running");
    };
    std::fs::remove_file(env.paths.dir(&b.id).join("started_at")).unwrap();
    std::fs::write(env.paths.state_root.join(&b.id).join("state.json"), "").unwrap();
    assert_eq!(container::state(&env.paths, &b.id).unwrap(), State::Created);
    container::delete(&env.paths, &b.id).unwrap();
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"));
        if zombie {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the process survived delete"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!env.paths.state_root.join(&b.id).exists());
    assert!(!runtime::cgroup::controller_dir("memory", &b.cgroup).exists());
}
