//! Fixtures for the runtime's real-kernel tests: a busybox rootfs, unique ids, and bundles
//! whose cleanup runs even when a test fails.
#![allow(dead_code)]

use k8s_openapi::api::core::v1::Container;
use runtime::container::{self, Paths};
use runtime::oci_spec::image::ImageConfiguration;
use runtime::spec::{self, Namespaces, SpecInput};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A name no other test (or earlier killed run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A rootfs with busybox-static and its applets, as the test image has.
pub fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8(out.stdout).unwrap().split_whitespace() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
}

pub fn image_config() -> ImageConfiguration {
    serde_json::from_str(
        r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
            "config":{"Env":["PATH=/bin"],"Cmd":["sh"]}}"#,
    )
    .unwrap()
}

/// Test-private runtime directories and shim.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub paths: Paths,
}

impl Env {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("oxlet-rt-")
            .tempdir()
            .unwrap();
        let paths = Paths {
            containers: tmp.path().join("containers"),
            state_root: tmp.path().join("state"),
            shim: PathBuf::from(env!("CARGO_BIN_EXE_oxlet-shim")),
        };
        Env { tmp, paths }
    }

    pub fn log_options(&self, id: &str) -> container::LogOptions {
        container::LogOptions {
            path: self.tmp.path().join("logs").join(id).join("0.log"),
            max_size: 1 << 20,
            max_files: 2,
        }
    }
}

/// A container bundle: rootfs directory plus config.json, removed (container first) on drop.
pub struct Bundle<'a> {
    pub env: &'a Env,
    pub id: String,
    pub cgroup: String,
}

impl<'a> Bundle<'a> {
    pub fn new(env: &'a Env, c: &Container, namespaces: Namespaces, cgroup_parent: &str) -> Self {
        let id = unique("ct");
        let dir = env.paths.dir(&id);
        let rootfs = dir.join("rootfs");
        busybox_rootfs(&rootfs);
        let cgroup = format!("{cgroup_parent}/{id}");
        let image = image_config();
        let input = SpecInput {
            container: c,
            pod_security: None,
            image: &image,
            rootfs: &rootfs,
            env: None,
            mounts: vec![],
            namespaces,
            hostname: Some("testhost".into()),
            cgroups_path: cgroup.clone(),
            oom_score_adj: None,
            default_seccomp: true,
        };
        let spec = spec::generate(&input).unwrap();
        spec.save(dir.join("config.json")).unwrap();
        Bundle { env, id, cgroup }
    }

    pub fn create(&self) {
        container::create(
            &self.env.paths,
            &self.id,
            &self.env.log_options(&self.id),
            Default::default(),
        )
        .unwrap();
    }

    pub fn log(&self) -> PathBuf {
        self.env.log_options(&self.id).path
    }
}

impl Drop for Bundle<'_> {
    fn drop(&mut self) {
        let _ = container::delete(&self.env.paths, &self.id);
        let _ = runtime::cgroup::remove_cgroup(&self.cgroup);
        let _ = std::fs::remove_dir_all(self.env.paths.dir(&self.id));
    }
}

pub fn sh(name: &str, script: &str) -> Container {
    Container {
        name: name.into(),
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        ..Default::default()
    }
}

/// Removes a cgroup tree on drop.
pub struct CgroupGuard(pub String);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = runtime::cgroup::remove_cgroup(&self.0);
    }
}

/// A unique cgroup parent for one test, removed on drop.
pub fn test_cgroup() -> CgroupGuard {
    CgroupGuard(unique("oxlet-test"))
}

pub fn with_resources(mut c: Container, limits: &[(&str, &str)]) -> Container {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let map = limits
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect();
    c.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
        limits: Some(map),
        ..Default::default()
    });
    c
}

/// Mounts still present under `dir` (a test must leave none).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
        .filter(|m| m.starts_with(&d))
        .collect()
}
