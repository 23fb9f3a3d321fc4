//! The runtime as the agent drives it: images from the test bed registry, a pod sandbox, and
//! containers made from Kubernetes specs. Needs `tests/testbed/up`.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{Container, SecurityContext};
use runtime::container::State;
use runtime::cri::{Config, ContainerRequest, Runtime};
use runtime::image::{ImageStore, PullOptions, PullPolicy};
use runtime::sandbox::SandboxConfig;
use std::time::Duration;

struct Pod {
    rt: Runtime,
    tmp: tempfile::TempDir,
    sandbox: String,
    containers: std::cell::RefCell<Vec<String>>,
    cgroup: CgroupGuard,
}

impl Pod {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("oxlet-cri-")
            .tempdir()
            .unwrap();
        let rt = Runtime::new(Config {
            data_dir: tmp.path().join("data"),
            run_dir: tmp.path().join("run"),
            shim: env!("CARGO_BIN_EXE_oxlet-shim").into(),
            log_max_size: 1 << 20,
            log_max_files: 2,
        });
        let sandbox = unique("pod");
        rt.create_sandbox(&SandboxConfig {
            id: sandbox.clone(),
            hostname: "web-0".into(),
            ..Default::default()
        })
        .unwrap();
        Pod {
            rt,
            tmp,
            sandbox,
            containers: Default::default(),
            cgroup: test_cgroup(),
        }
    }

    fn image(&self, reference: &str) -> runtime::image::Image {
        let store = ImageStore::open(self.tmp.path().join("data/images")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(store.ensure(reference, PullPolicy::IfNotPresent, &PullOptions::default()))
            .unwrap()
    }

    /// Creates and starts a container, waits for it to exit, returns (exit code, log text).
    fn run(&self, reference: &str, c: &Container) -> Result<(i32, String), runtime::cri::Error> {
        let id = unique("c");
        self.containers.borrow_mut().push(id.clone());
        let image = self.image(reference);
        let sandbox = self.rt.sandbox(&self.sandbox).unwrap();
        let log = self.tmp.path().join("logs").join(&id).join("0.log");
        self.rt.create_container(&ContainerRequest {
            id: &id,
            sandbox: &sandbox,
            container: c,
            pod_security: None,
            image: &image,
            env: None,
            mounts: vec![],
            hostname: "web-0".into(),
            cgroup_parent: &self.cgroup.0,
            log_path: log.clone(),
            oom_score_adj: None,
        })?;
        self.rt.start_container(&id)?;
        let exit =
            runtime::container::wait(self.rt.paths(), &id, Duration::from_secs(30)).expect("exit");
        Ok((exit.exit_code, runtime::log::read_text(&log).unwrap()))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for id in self.containers.borrow().iter() {
            let _ = self.rt.remove_container(id);
        }
        let _ = self.rt.remove_sandbox(&self.sandbox);
    }
}

use oxlet_tests::testbed::{busybox, image};

#[test]
fn image_entrypoint_user_env_and_workdir() {
    let pod = Pod::new();
    let c = Container {
        name: "e".into(),
        ..Default::default()
    };
    let (code, out) = pod.run(&image("test/entrypoint:latest"), &c).unwrap();
    assert_eq!((code, out.as_str()), (0, "entry default-cmd\n"));
    let c = Container {
        name: "e".into(),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            "id -u; id -g; pwd; echo $GREETING $HOSTNAME; cat /etc/hostname".into(),
        ]),
        ..Default::default()
    };
    let (code, out) = pod.run(&image("test/entrypoint:latest"), &c).unwrap();
    assert_eq!(
        (code, out.as_str()),
        (0, "1000\n1000\n/tmp\nfrom-image web-0\nweb-0\n")
    );
}

#[test]
fn layered_image_content_inside_the_container() {
    let pod = Pod::new();
    let c = sh(
        "l",
        "ls /data; ls /opaque; cat /data/symlink; stat -c %a /data/kept",
    );
    let (code, out) = pod.run(&image("test/layers:latest"), &c).unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "added\nhardlink\nkept\noriginal\nsetuid\nsymlink\nxattr\nnew\nkept\n600\n"
    );
}

#[test]
fn read_only_root_filesystem_and_capabilities() {
    let pod = Pod::new();
    let mut c = sh(
        "ro",
        "touch /x 2>/dev/null && echo writable || echo read-only; grep CapEff /proc/self/status",
    );
    c.security_context = Some(SecurityContext {
        read_only_root_filesystem: Some(true),
        capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    });
    let (code, out) = pod.run(busybox(), &c).unwrap();
    assert_eq!(code, 0);
    assert_eq!(out, "read-only\nCapEff:\t0000000000000000\n");
}

#[test]
fn config_errors_have_kubelet_reasons_and_leave_nothing() {
    let pod = Pod::new();
    let mut c = sh("bad", "true");
    c.security_context = Some(SecurityContext {
        run_as_non_root: Some(true),
        ..Default::default()
    });
    let err = pod.run(busybox(), &c).unwrap_err();
    assert_eq!(err.reason(), "CreateContainerConfigError", "{err}");
    let id = pod.containers.borrow().last().unwrap().clone();
    assert!(!pod.rt.paths().dir(&id).exists());
    assert!(mounts_under(pod.tmp.path())
        .iter()
        .all(|m| !m.contains("/containers/")));
}

#[test]
fn remove_leaves_no_mounts_state_or_cgroups() {
    let pod = Pod::new();
    let (code, _) = pod.run(busybox(), &sh("c", "exit 0")).unwrap();
    assert_eq!(code, 0);
    let id = pod.containers.borrow()[0].clone();
    assert!(matches!(
        pod.rt.container_state(&id).unwrap(),
        State::Exited(_)
    ));
    pod.rt.remove_container(&id).unwrap();
    pod.rt.remove_container(&id).unwrap();
    pod.rt.remove_sandbox(&pod.sandbox).unwrap();
    assert_eq!(mounts_under(pod.tmp.path()), Vec::<String>::new());
    assert!(!pod.rt.paths().state_root.join(&id).exists());
    assert!(!runtime::cgroup::controller_dir("memory", &format!("{}/{id}", pod.cgroup.0)).exists());
}

#[test]
fn usage_of_a_running_container() {
    let pod = Pod::new();
    let id = unique("c");
    pod.containers.borrow_mut().push(id.clone());
    let image = pod.image(busybox());
    let sandbox = pod.rt.sandbox(&pod.sandbox).unwrap();
    // Holds 8 MiB in a tmpfs file (charged to the cgroup) and burns a little cpu.
    let c = sh("u", "head -c 8388608 /dev/zero > /dev/shm/fill; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 1000");
    pod.rt
        .create_container(&ContainerRequest {
            id: &id,
            sandbox: &sandbox,
            container: &c,
            pod_security: None,
            image: &image,
            env: None,
            mounts: vec![],
            hostname: "web-0".into(),
            cgroup_parent: &pod.cgroup.0,
            log_path: pod.tmp.path().join("logs").join(&id).join("0.log"),
            oom_score_adj: None,
        })
        .unwrap();
    pod.rt.start_container(&id).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let usage = loop {
        let u = pod.rt.container_usage(&id).unwrap();
        if (u.memory_working_set >= 8 << 20 && u.cpu_usage_ns > 0)
            || std::time::Instant::now() > deadline
        {
            break u;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(usage.memory_working_set >= 8 << 20, "{usage:?}");
    assert!(usage.cpu_usage_ns > 1_000_000, "{usage:?}");
    assert_eq!(usage.oom_kills, 0);
    pod.rt.stop_container(&id, Duration::ZERO).unwrap();
}
