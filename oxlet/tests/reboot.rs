//! `oxlet up` after a reboot, simulated: with `oxlet up` stopped, every container and shim is
//! killed, the pods' cgroups, mounts and network namespaces, the bridge and the nftables tables
//! go, and the run dir is emptied, as a reboot leaves the machine; the data dir and the CNI
//! cache (with its now stale IP leases) stay. The next `oxlet up` runs the same pods again in
//! fresh sandboxes, the Service reaches them, and the stale IPs are released.
//!
//! Ignored in the parallel run and run alone by `scripts/test`: its kube-proxy owns the
//! `oxlet-proxy` table and 10.96.0.0/12.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PREFIX: &str = "oxlet-reboot-test-";

/// Pod name -> (uid, IP) of the Deployment's pods.
fn pods(kc: &Path) -> std::collections::BTreeMap<String, (String, String)> {
    ok(kubectl(
        kc,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.status.podIP}{\"\\n\"}{end}",
        ],
        None,
    ))
    .lines()
    .filter_map(|l| {
        let mut f = l.split_whitespace();
        Some((
            f.next()?.to_string(),
            (f.next()?.to_string(), f.next()?.to_string()),
        ))
    })
    .collect()
}

/// The IPs host-local IPAM holds leases for.
fn leases(dir: &Path) -> Vec<String> {
    let mut ips: Vec<String> = std::fs::read_dir(dir.join("cni-cache/networks/oxlet"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    ips.sort();
    ips
}

fn kill_cgroup_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            kill_cgroup_tree(&e.path());
        }
    }
    for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// What a reboot takes from the machine, for what oxlet up made below `d`.
fn simulate_reboot(d: &Path, uids: &[String]) {
    // Shims: `oxlet-shim ... --root <run>/libcontainer`.
    let root = d.join("run/libcontainer").display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.contains(&root) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // Containers, then their cgroups.
    let mut cgroups = Vec::new();
    for uid in uids {
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.join(format!("data/pods/{uid}/pod.json"))).unwrap(),
        )
        .unwrap();
        let cg = rec["cgroup"].as_str().unwrap().to_string();
        kill_cgroup_tree(&runtime::cgroup::controller_dir("memory", &cg));
        kill_cgroup_tree(&runtime::cgroup::controller_dir("pids", &cg));
        cgroups.push(cg);
    }
    std::thread::sleep(Duration::from_millis(500));
    for cg in &cgroups {
        runtime::cgroup::remove_pod_cgroup(cg).unwrap();
    }
    // Mounts (rootfs overlays, volumes, namespace bind mounts: the namespaces and their veths
    // go with the last reference), deepest first.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mut below: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(d))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in below {
        nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    std::fs::remove_dir_all(d.join("run")).unwrap();
    // The kernel's network state: bridge and tables.
    let _ = Command::new("ip").args(["link", "del", "oxlet0"]).status();
    for t in [["ip", "oxlet-proxy"], ["inet", "oxlet-cni-oxlet"]] {
        let _ = Command::new("nft")
            .args(["delete", "table", t[0], t[1]])
            .status();
    }
}

#[test]
#[ignore = "run alone by scripts/test (owns the oxlet-proxy table and 10.96.0.0/12)"]
fn up_after_a_reboot_runs_the_pods_in_fresh_sandboxes_and_frees_stale_ips() {
    let mut up = Cluster::start(PREFIX);
    let kc = up.kubeconfig();
    up.wait_ready(Duration::from_secs(60));
    let web = format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: {}
        command: [sh, -c, 'mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www']
        ports: [{{containerPort: 8080}}]
        readinessProbe:
          httpGet: {{path: /, port: 8080}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
",
        busybox()
    );
    ok(kubectl(&kc, &["apply", "-f", "-"], Some(&web)));
    ok(kubectl(
        &kc,
        &["rollout", "status", "deploy/web", "--timeout=120s"],
        None,
    ));
    let before = pods(&kc);
    assert_eq!(before.len(), 2, "{before:?}");
    let mut ips: Vec<String> = before.values().map(|(_, ip)| ip.clone()).collect();
    ips.sort();
    assert_eq!(leases(up.path()), ips);
    up.stop();
    let uids: Vec<String> = before.values().map(|(uid, _)| uid.clone()).collect();
    simulate_reboot(up.path(), &uids);
    assert!(!up.path().join("run").exists());
    assert_eq!(leases(up.path()), ips, "the leases outlive the reboot");

    up.restart();
    up.wait_ready(Duration::from_secs(60));
    // The same pods run again, in new sandboxes: their containers started again (kubelet
    // counts that as a restart) and Ready.
    until(
        "both pods restarted and Ready again",
        Duration::from_secs(120),
        || {
            let out = ok(kubectl(
                &kc,
                &[
                    "get",
                    "pods",
                    "-l",
                    "app=web",
                    "-o",
                    "jsonpath={range .items[*]}{.status.containerStatuses[0].restartCount}/{.status.containerStatuses[0].ready} {end}",
                ],
                None,
            ));
            let pods: Vec<&str> = out.split_whitespace().collect();
            pods.len() == 2
                && pods
                    .iter()
                    .all(|p| !p.starts_with("0/") && p.ends_with("/true"))
        },
    );
    let after = pods(&kc);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same pods"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for (uid, _) in after.values() {
        let ns = up.path().join(format!("run/sandboxes/{uid}/ns/net"));
        assert!(
            mounts.contains(&format!(" {} nsfs ", ns.display())),
            "a fresh network namespace for {uid}"
        );
    }
    let mut ips_after: Vec<String> = after.values().map(|(_, ip)| ip.clone()).collect();
    ips_after.sort();
    assert_eq!(
        leases(up.path()),
        ips_after,
        "only the running pods hold leases: the stale ones were released"
    );

    // The Service reaches both pods again.
    let ip = ok(kubectl(
        &kc,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
        None,
    ));
    until(
        "the rule for the web Service with two endpoints",
        Duration::from_secs(20),
        || {
            let text = proxy_table();
            text.contains(&format!("{ip} . tcp . 80"))
                && after
                    .values()
                    .all(|(_, pod_ip)| text.contains(&format!("{pod_ip} . 8080")))
        },
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", &format!("http://{ip}/")])
            .output()
            .unwrap();
        seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    let want: std::collections::BTreeSet<String> = after.keys().cloned().collect();
    assert_eq!(seen, want, "both pods answer on the ClusterIP");

    ok(kubectl(&kc, &["delete", "-f", "-"], Some(&web)));
    until("the pods gone", Duration::from_secs(60), || {
        let out = kubectl(&kc, &["get", "pods", "-o", "name"], None);
        out.status.success() && out.stdout.is_empty()
    });
    assert_eq!(leases(up.path()), Vec::<String>::new());
}
