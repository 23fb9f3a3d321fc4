//! Pod and QoS cgroups the way kubelet lays them out (`kubepods/[burstable|besteffort]/pod<uid>`),
//! resource arithmetic from Kubernetes quantities, and usage statistics.
//!
//! Container cgroups below the pod cgroup belong to libcontainer; this module owns the levels above.

use cgroups_rs::fs::{cgroup_builder::CgroupBuilder, hierarchies, Cgroup};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::path::{Path, PathBuf};

/// CFS period kubelet uses for cpu limits, in microseconds.
pub const CFS_PERIOD_US: u64 = 100_000;
/// Smallest cpu.shares value the kernel accepts; kubelet gives it to BestEffort.
pub const MIN_SHARES: u64 = 2;
const MIN_QUOTA_US: i64 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid quantity {0:?} for {1}")]
    Quantity(String, &'static str),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: cgroups_rs::fs::error::Error,
    },
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The name Kubernetes puts in `status.qosClass`.
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }
}

/// CPU and memory of one container, after kubelet's defaulting (a limit without a request
/// requests the limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerResources {
    pub cpu_request_milli: Option<u64>,
    pub cpu_limit_milli: Option<u64>,
    pub memory_request: Option<u64>,
    pub memory_limit: Option<u64>,
}

impl ContainerResources {
    pub fn from_container(c: &Container) -> Result<Self> {
        let res = c.resources.as_ref();
        let get = |which: &str, key: &str| {
            res.and_then(|r| {
                if which == "l" {
                    r.limits.as_ref()
                } else {
                    r.requests.as_ref()
                }
            })
            .and_then(|m| m.get(key))
        };
        let cpu_limit_milli = get("l", "cpu").map(cpu_milli).transpose()?;
        let memory_limit = get("l", "memory").map(memory_bytes).transpose()?;
        let cpu_request_milli = get("r", "cpu")
            .map(cpu_milli)
            .transpose()?
            .or(cpu_limit_milli);
        let memory_request = get("r", "memory")
            .map(memory_bytes)
            .transpose()?
            .or(memory_limit);
        Ok(Self {
            cpu_request_milli,
            cpu_limit_milli,
            memory_request,
            memory_limit,
        })
    }

    /// cpu.shares as kubelet computes it: millicores * 1024 / 1000, at least 2.
    pub fn cpu_shares(&self) -> u64 {
        shares_from_milli(self.cpu_request_milli.unwrap_or(0))
    }

    /// CFS quota in microseconds over [`CFS_PERIOD_US`], if a cpu limit is set.
    pub fn cpu_quota_us(&self) -> Option<i64> {
        self.cpu_limit_milli.map(quota_from_milli)
    }
}

fn shares_from_milli(milli: u64) -> u64 {
    (milli * 1024 / 1000).max(MIN_SHARES)
}

fn quota_from_milli(milli: u64) -> i64 {
    ((milli * CFS_PERIOD_US / 1000) as i64).max(MIN_QUOTA_US)
}

/// The QoS class of a pod, by the rules of `kubectl describe`/kubelet: BestEffort when no
/// container asks for or limits cpu or memory; Guaranteed when every container limits both and
/// requests equal limits; Burstable otherwise.
pub fn qos_class(spec: &PodSpec) -> Result<QosClass> {
    let all: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in all {
        let r = ContainerResources::from_container(c)?;
        if r.cpu_request_milli.is_some() || r.memory_request.is_some() {
            any = true;
        }
        let cpu_ok = r.cpu_limit_milli.is_some() && r.cpu_request_milli == r.cpu_limit_milli;
        let mem_ok = r.memory_limit.is_some() && r.memory_request == r.memory_limit;
        guaranteed &= cpu_ok && mem_ok;
    }
    Ok(match (any, guaranteed) {
        (false, _) => QosClass::BestEffort,
        (true, true) => QosClass::Guaranteed,
        (true, false) => QosClass::Burstable,
    })
}

/// Parses a cpu quantity ("250m", "0.5", "2") into millicores, rounding up as the API server does.
pub fn cpu_milli(q: &Quantity) -> Result<u64> {
    let v = parse_quantity(&q.0).ok_or_else(|| Error::Quantity(q.0.clone(), "cpu"))?;
    Ok((v * 1000.0).ceil() as u64)
}

/// Parses a memory quantity ("128Mi", "1G", "1e6") into bytes.
pub fn memory_bytes(q: &Quantity) -> Result<u64> {
    let v = parse_quantity(&q.0).ok_or_else(|| Error::Quantity(q.0.clone(), "memory"))?;
    Ok(v.ceil() as u64)
}

fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0f64.powi(3),
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    (n >= 0.0).then_some(n * mult)
}

/// The pod cgroup's path relative to the cgroup root, as kubelet's cgroupfs driver names it.
pub fn pod_cgroup_path(qos: QosClass, pod_uid: &str) -> String {
    let uid = pod_uid;
    match qos {
        QosClass::Guaranteed => format!("kubepods/pod{uid}"),
        QosClass::Burstable => format!("kubepods/burstable/pod{uid}"),
        QosClass::BestEffort => format!("kubepods/besteffort/pod{uid}"),
    }
}

/// Limits of a whole pod: shares are the sum of requests; quota and memory limit are set only
/// when every container has one (otherwise one unlimited container makes the pod unlimited).
pub fn pod_resources(spec: &PodSpec) -> Result<(u64, Option<i64>, Option<i64>)> {
    let mut milli = 0;
    let mut quota: Option<u64> = Some(0);
    let mut memory: Option<u64> = Some(0);
    for c in &spec.containers {
        let r = ContainerResources::from_container(c)?;
        milli += r.cpu_request_milli.unwrap_or(0);
        quota = quota.zip(r.cpu_limit_milli).map(|(a, b)| a + b);
        memory = memory.zip(r.memory_limit).map(|(a, b)| a + b);
    }
    Ok((
        shares_from_milli(milli),
        quota.map(quota_from_milli),
        memory.map(|m| m as i64),
    ))
}

/// Creates (or updates) the QoS and pod cgroups for a pod and returns the pod cgroup's path.
/// Safe to call again: existing cgroups are reused and their limits rewritten.
pub fn ensure_pod_cgroup(spec: &PodSpec, pod_uid: &str) -> Result<String> {
    let qos = qos_class(spec)?;
    // Held while the QoS levels may be missing: a removal never takes one from under a new pod.
    let _qos = QOS_LEVELS.lock().unwrap_or_else(|e| e.into_inner());
    let path = pod_cgroup_path(qos, pod_uid);
    if qos == QosClass::BestEffort {
        build(
            "kubepods/besteffort",
            CgroupBuilder::new("kubepods/besteffort")
                .cpu()
                .shares(shares_for_hierarchy(MIN_SHARES))
                .done(),
        )?;
    } else if qos == QosClass::Burstable {
        build(
            "kubepods/burstable",
            CgroupBuilder::new("kubepods/burstable"),
        )?;
    }
    let (shares, quota, memory) = pod_resources(spec)?;
    let mut b = CgroupBuilder::new(&path)
        .cpu()
        .shares(shares_for_hierarchy(shares));
    if let Some(q) = quota {
        b = b.period(CFS_PERIOD_US).quota(q);
    }
    let mut b = b.done();
    if let Some(m) = memory {
        b = b.memory().memory_hard_limit(m).done();
    }
    build(&path, b)?;
    Ok(path)
}

/// cgroups-rs writes the value as is: v2's `cpu.weight` wants kubelet's conversion of shares.
fn shares_for_hierarchy(shares: u64) -> u64 {
    if is_v2() {
        1 + (shares.max(MIN_SHARES) - 2) * 9999 / 262_142
    } else {
        shares
    }
}

fn build(path: &str, b: CgroupBuilder) -> Result<Cgroup> {
    b.build(hierarchies::auto())
        .map_err(|source| Error::Cgroup {
            path: path.to_string(),
            source,
        })
}

/// Serializes creating the node-wide QoS levels with removing them once empty.
static QOS_LEVELS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Removes a pod cgroup (see `remove_cgroup`), then the QoS levels above it that no pod uses
/// any more (`kubepods/burstable`, `kubepods/besteffort`, `kubepods`): a node without pods
/// leaves no cgroups behind.
pub fn remove_pod_cgroup(path: &str) -> Result<()> {
    remove_cgroup(path)?;
    let _qos = QOS_LEVELS.lock().unwrap_or_else(|e| e.into_inner());
    let mut parent = Path::new(path).parent();
    while let Some(p) = parent.filter(|p| p.starts_with("kubepods")) {
        for root in controller_roots() {
            // Fails (busy, not empty) while another pod or level is below: then it stays.
            let _ = std::fs::remove_dir(root.join(p));
        }
        parent = p.parent();
    }
    Ok(())
}

/// Removes a cgroup and everything left below it (leaf first), in every hierarchy.
/// A missing cgroup is not an error.
pub fn remove_cgroup(path: &str) -> Result<()> {
    for root in controller_roots() {
        let dir = root.join(path);
        if dir.exists() {
            remove_tree(&dir)?;
        }
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.file_type().map_err(io)?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    // Processes left in the cgroup (a container without its own pid namespace) would keep it.
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // A cgroup whose last task just exited can be busy for a moment.
    for attempt in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => return Err(io(e)),
        }
    }
    Ok(())
}

/// True on pure cgroup v2 (most users' VMs); false on v1 or hybrid (this project's CI host).
pub fn is_v2() -> bool {
    hierarchies::is_cgroup2_unified_mode()
}

/// The directories a cgroup path is found under: `/sys/fs/cgroup` on v2, each v1 controller's
/// mount otherwise.
pub fn controller_roots() -> Vec<PathBuf> {
    if is_v2() {
        return vec![PathBuf::from("/sys/fs/cgroup")];
    }
    let mut roots = Vec::new();
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() > 2 && f[2] == "cgroup" {
                roots.push(PathBuf::from(f[1]));
            }
        }
    }
    roots
}

/// The directory of `path` for one v1 controller (`memory`, `cpu`, ...) or the v2 directory.
pub fn controller_dir(controller: &str, path: &str) -> PathBuf {
    if is_v2() {
        return Path::new("/sys/fs/cgroup").join(path);
    }
    v1_dir(&controller_roots(), controller, path)
}

/// The directory of `path` for v1 `controller` among the hierarchy `roots`.
fn v1_dir(roots: &[PathBuf], controller: &str, path: &str) -> PathBuf {
    roots
        .iter()
        .find(|r| {
            r.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.split(',').any(|c| c == controller))
        })
        .cloned()
        .unwrap_or_else(|| Path::new("/sys/fs/cgroup").join(controller))
        .join(path)
}

/// Usage of a container or pod cgroup, as kubelet's summary API reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Total CPU time consumed, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory usage minus inactive file pages: what eviction and `kubectl top` use.
    pub memory_working_set: u64,
    /// Times the OOM killer killed a task in this cgroup.
    pub oom_kills: u64,
}

/// Reads usage from the cgroup files (cgroups-rs has no stats for the v1 `oom_kill` counter or
/// the v2 `memory.events`, so these are read directly).
pub fn usage(path: &str) -> Usage {
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    if is_v2() {
        let dir = Path::new("/sys/fs/cgroup").join(path);
        let cpu = field(&read(dir.join("cpu.stat")), "usage_usec ") * 1000;
        let current: u64 = read(dir.join("memory.current")).trim().parse().unwrap_or(0);
        let inactive = field(&read(dir.join("memory.stat")), "inactive_file ");
        let oom = field(&read(dir.join("memory.events")), "oom_kill ");
        Usage {
            cpu_usage_ns: cpu,
            memory_working_set: current.saturating_sub(inactive),
            oom_kills: oom,
        }
    } else {
        let roots = controller_roots();
        let cpu = read(v1_dir(&roots, "cpuacct", path).join("cpuacct.usage"))
            .trim()
            .parse()
            .unwrap_or(0);
        let mem = v1_dir(&roots, "memory", path);
        let current: u64 = read(mem.join("memory.usage_in_bytes"))
            .trim()
            .parse()
            .unwrap_or(0);
        let inactive = field(&read(mem.join("memory.stat")), "total_inactive_file ");
        let oom = field(&read(mem.join("memory.oom_control")), "oom_kill ");
        Usage {
            cpu_usage_ns: cpu,
            memory_working_set: current.saturating_sub(inactive),
            oom_kills: oom,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use std::collections::BTreeMap;

    fn container(req: &[(&str, &str)], lim: &[(&str, &str)]) -> Container {
        let map = |v: &[(&str, &str)]| {
            (!v.is_empty()).then(|| {
                v.iter()
                    .map(|(k, q)| (k.to_string(), Quantity(q.to_string())))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: map(req),
                limits: map(lim),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(cs: Vec<Container>) -> PodSpec {
        PodSpec {
            containers: cs,
            ..Default::default()
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_milli(&Quantity("250m".into())).unwrap(), 250);
        assert_eq!(cpu_milli(&Quantity("0.5".into())).unwrap(), 500);
        assert_eq!(cpu_milli(&Quantity("2".into())).unwrap(), 2000);
        assert_eq!(memory_bytes(&Quantity("128Mi".into())).unwrap(), 128 << 20);
        assert_eq!(memory_bytes(&Quantity("1G".into())).unwrap(), 1_000_000_000);
        assert_eq!(memory_bytes(&Quantity("1e3".into())).unwrap(), 1000);
        assert!(memory_bytes(&Quantity("12XB".into())).is_err());
    }

    #[test]
    fn qos_classes() {
        assert_eq!(
            qos_class(&pod(vec![container(&[], &[])])).unwrap(),
            QosClass::BestEffort
        );
        let g = container(&[], &[("cpu", "500m"), ("memory", "64Mi")]);
        assert_eq!(
            qos_class(&pod(vec![g.clone()])).unwrap(),
            QosClass::Guaranteed
        );
        let b = container(&[("cpu", "100m")], &[("cpu", "500m"), ("memory", "64Mi")]);
        assert_eq!(qos_class(&pod(vec![b])).unwrap(), QosClass::Burstable);
        assert_eq!(
            qos_class(&pod(vec![g, container(&[], &[])])).unwrap(),
            QosClass::Burstable
        );
    }

    #[test]
    fn shares_and_quota() {
        let r =
            ContainerResources::from_container(&container(&[("cpu", "250m")], &[("cpu", "1500m")]))
                .unwrap();
        assert_eq!(r.cpu_shares(), 256);
        assert_eq!(r.cpu_quota_us(), Some(150_000));
        assert_eq!(ContainerResources::default().cpu_shares(), 2);
        let (shares, quota, mem) = pod_resources(&pod(vec![
            container(&[("cpu", "100m")], &[("cpu", "200m"), ("memory", "10Mi")]),
            container(&[("cpu", "100m")], &[("memory", "10Mi")]),
        ]))
        .unwrap();
        assert_eq!((shares, quota, mem), (204, None, Some(20 << 20)));
    }

    #[test]
    fn pod_paths() {
        assert_eq!(
            pod_cgroup_path(QosClass::Guaranteed, "a-b"),
            "kubepods/poda-b"
        );
        assert_eq!(
            pod_cgroup_path(QosClass::BestEffort, "x"),
            "kubepods/besteffort/podx"
        );
    }
}
