//! ADD and DEL of oxlet-bridge against the reference bridge + host-local with the same options,
//! ipMasq off and on, each plugin run as a process the way a runtime runs it. Prints medians and
//! ratios. Root only. `cargo bench -p oxlet-cni --bench cni` (or `cni/bench/run`);
//! OXLET_CNI_BENCH_N sets the iterations (default 200).

use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(plugin: &str, command: &str, id: &str, netns: &str, conf: &str) -> Duration {
    let t = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plugin runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "{plugin} {command}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    d
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn sh(cmd: &str) {
    let _ = Command::new("sh").arg("-c").arg(cmd).status();
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` and `--list`: the benchmark runs under `cargo bench` only.
        return;
    }
    let n: usize = std::env::var("OXLET_CNI_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let oxlet = env!("CARGO_BIN_EXE_oxlet-bridge");
    let data = tempfile::tempdir().unwrap();
    let impls = [
        ("oxlet-bridge", oxlet, "oxbench0", 121u8),
        ("reference", "/usr/lib/cni/bridge", "oxbench1", 122u8),
    ];
    let mut rows = Vec::new();
    // A node has pods: one other pod stays on the network while the measured pod comes and
    // goes. The last row has none, so every ADD is its network's first pod and every DEL its last.
    for (masq, anchor) in [(false, true), (true, true), (true, false)] {
        let mut meds = Vec::new();
        for (label, plugin, bridge, x) in impls {
            let netns = format!("oxbench-{x}");
            sh(&format!(
                "ip netns del {netns} 2>/dev/null; ip netns add {netns}"
            ));
            let path = format!("/run/netns/{netns}");
            let conf = json!({
                "cniVersion": "1.0.0", "name": format!("oxbench{x}"), "type": "bridge", "bridge": bridge,
                "isGateway": true, "isDefaultGateway": true, "hairpinMode": true, "ipMasq": masq,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.243.{x}.0/24")}]], "dataDir": data.path()}
            })
            .to_string();
            let anchor_ns = format!("oxbench-{x}-anchor");
            if anchor {
                sh(&format!(
                    "ip netns del {anchor_ns} 2>/dev/null; ip netns add {anchor_ns}"
                ));
                run(
                    plugin,
                    "ADD",
                    "anchor",
                    &format!("/run/netns/{anchor_ns}"),
                    &conf,
                );
            }
            let (mut adds, mut dels) = (Vec::new(), Vec::new());
            for i in 0..n + 10 {
                let a = run(plugin, "ADD", "bench", &path, &conf);
                let d = run(plugin, "DEL", "bench", &path, &conf);
                if i >= 10 {
                    adds.push(a);
                    dels.push(d);
                }
            }
            if anchor {
                run(
                    plugin,
                    "DEL",
                    "anchor",
                    &format!("/run/netns/{anchor_ns}"),
                    &conf,
                );
                sh(&format!("ip netns del {anchor_ns}"));
            }
            sh(&format!("ip netns del {netns}; ip link del {bridge} 2>/dev/null; nft delete table inet oxlet-cni-oxbench{x} 2>/dev/null"));
            meds.push((label, median(adds), median(dels)));
        }
        rows.push((
            if anchor {
                format!("{masq}")
            } else {
                format!("{masq}, 1st")
            },
            meds,
        ));
    }
    println!("CNI ADD/DEL medians over {n} runs (process per call), bridge + host-local, hairpin, gateway");
    println!("(\"1st\": no other pod on the network, so each ADD creates and each DEL removes its rules)");
    println!(
        "{:<12} {:<14} {:>10} {:>10}",
        "ipMasq", "plugin", "ADD ms", "DEL ms"
    );
    for (masq, meds) in &rows {
        for (label, a, d) in meds {
            println!("{:<12} {:<14} {:>10.2} {:>10.2}", masq, label, a, d);
        }
        let (o, r) = (&meds[0], &meds[1]);
        println!(
            "{:<12} {:<14} {:>10.3} {:>10.3}",
            masq,
            "ratio ox/ref",
            o.1 / r.1,
            o.2 / r.2
        );
    }
}
