//! The kubelet API as users reach it: real kubectl (1.27, which speaks SPDY, and 1.33, which
//! speaks WebSocket) through the API server to the agent's kubelet port: logs, exec (exit codes,
//! stdin, a terminal), cp, attach, port-forward; and the port itself with and without the
//! kubelet-client certificate. Root; needs `tests/testbed/up`.

mod common;

use anyhow::{bail, Context, Result};
use common::*;
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const KUBECTLS: [&str; 2] = ["1.27", "1.33"];

fn kubectl_bin(ver: &str) -> String {
    format!("/usr/lib/google-cloud-sdk/bin/kubectl.{ver}")
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn kubectl(c: &Cluster, ver: &str, args: &[&str], stdin: Option<Vec<u8>>) -> Result<Out> {
    let mut cmd = tokio::process::Command::new(kubectl_bin(ver));
    cmd.arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let Some(data) = stdin {
        let mut w = child.stdin.take().context("stdin")?;
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
    }
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .with_context(|| format!("kubectl.{ver} {args:?} timed out"))??;
    Ok(Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn busybox_pod(name: &str, policy: &str, script: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": policy,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": busybox(), "command": ["sh", "-c", script]}]
        }
    })
}

/// The kubelet API's /metrics, fetched with the API server's kubelet-client certificate.
async fn kubelet_metrics(c: &Cluster) -> Result<String> {
    let pki = c.pki();
    let (body, code) = curl(&[
        "--cert",
        pki.join("kubelet-client.crt").to_str().unwrap(),
        "--key",
        pki.join("kubelet-client.key").to_str().unwrap(),
        &format!("https://127.0.0.1:{}/metrics", c.cfg.kubelet_port),
    ])
    .await?;
    anyhow::ensure!(code == "200", "/metrics: {code} {body}");
    Ok(body)
}

/// Asserts that kubectl 1.27 came over SPDY and 1.33 over WebSocket for sessions of `kind`
/// (kubectl falls back to SPDY when a WebSocket upgrade fails, which would hide a failure).
async fn both_transports_used(c: &Cluster, kind: &str) -> Result<()> {
    let m = kubelet_metrics(c).await?;
    for transport in ["spdy", "websocket"] {
        let line = format!(
            "oxlet_kubelet_streaming_sessions_total{{kind=\"{kind}\",transport=\"{transport}\"}} "
        );
        let n: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(n >= 1, "no {kind} session over {transport}:\n{m}");
    }
    Ok(())
}

async fn running(c: &Cluster, name: &str) -> Result<()> {
    c.wait_pod(name, Duration::from_secs(90), "Running", |p| {
        phase(p) == "Running" && container(p).ready
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_follow_tail_previous_timestamps_and_limits() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.cfg.backoff_base = Duration::from_secs(1);
    c.start_agent().await?;
    let script = "echo run $(cat /proc/sys/kernel/random/uuid); i=1; \
                  while [ $i -le 8 ]; do echo line $i; i=$((i+1)); sleep 0.5; done; exit 1";
    c.create_pod(busybox_pod("logger", "Always", script))
        .await?;
    running(&c, "logger").await?;

    // No restart yet: --previous is refused in kubelet's words.
    for ver in KUBECTLS {
        let o = kubectl(&c, ver, &["logs", "--previous", "logger"], None).await?;
        assert_ne!(o.code, 0, "{ver}: {}", o.stdout);
        assert!(
            o.stderr
                .contains(r#"previous terminated container "c" in pod "logger" not found"#),
            "{ver}: {}",
            o.stderr
        );
    }

    // -f while the container writes: both clients get every line and end when it exits.
    let started = Instant::now();
    let (a, b) = tokio::join!(
        kubectl(&c, "1.27", &["logs", "-f", "logger"], None),
        kubectl(&c, "1.33", &["logs", "-f", "logger"], None)
    );
    let took = started.elapsed();
    let mut first_run = String::new();
    for o in [a?, b?] {
        assert_eq!(o.code, 0, "{}", o.stderr);
        let lines: Vec<&str> = o.stdout.lines().collect();
        assert!(lines[0].starts_with("run "), "{}", o.stdout);
        assert_eq!(lines.last(), Some(&"line 8"), "{}", o.stdout);
        assert_eq!(lines.len(), 9, "{}", o.stdout);
        first_run = lines[0].to_string();
    }
    assert!(
        took > Duration::from_secs(1),
        "-f returned at once ({took:?}) instead of following"
    );

    c.wait_pod("logger", Duration::from_secs(60), "a restart", |p| {
        container(p).restart_count >= 1 && phase(p) == "Running"
    })
    .await?;
    for ver in KUBECTLS {
        let prev = kubectl(&c, ver, &["logs", "--previous", "logger"], None).await?;
        assert_eq!(prev.code, 0, "{ver}: {}", prev.stderr);
        assert!(
            prev.stdout.starts_with(&first_run),
            "{ver}: {}",
            prev.stdout
        );
        assert!(prev.stdout.ends_with("line 8\n"), "{ver}: {}", prev.stdout);

        let now = kubectl(&c, ver, &["logs", "logger"], None).await?;
        assert!(now.stdout.starts_with("run "), "{ver}: {}", now.stdout);
        assert!(
            !now.stdout.starts_with(&first_run),
            "{ver}: current log is the previous run's"
        );

        let tail = kubectl(&c, ver, &["logs", "--previous", "--tail=2", "logger"], None).await?;
        assert_eq!(tail.stdout, "line 7\nline 8\n", "{ver}");

        let ts = kubectl(
            &c,
            ver,
            &["logs", "--previous", "--tail=1", "--timestamps", "logger"],
            None,
        )
        .await?;
        let (stamp, rest) = ts
            .stdout
            .trim_end()
            .split_once(' ')
            .context("no timestamp")?;
        assert!(
            chrono::DateTime::parse_from_rfc3339(stamp).is_ok(),
            "{ver}: {}",
            ts.stdout
        );
        assert_eq!(rest, "line 8", "{ver}");

        let limited = kubectl(
            &c,
            ver,
            &["logs", "--previous", "--limit-bytes=4", "logger"],
            None,
        )
        .await?;
        assert_eq!(limited.stdout, "run ", "{ver}");

        let since = kubectl(
            &c,
            ver,
            &["logs", "--previous", "--since=1h", "logger"],
            None,
        )
        .await?;
        assert!(
            since.stdout.ends_with("line 8\n"),
            "{ver}: {}",
            since.stdout
        );
    }

    let missing = kubectl(&c, "1.33", &["logs", "logger", "-c", "nope"], None).await?;
    assert_ne!(missing.code, 0);
    assert!(missing.stderr.contains("nope"), "{}", missing.stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_passes_exit_codes_stdin_and_a_terminal_and_cp_copies_both_ways() -> Result<()>
{
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.create_pod(busybox_pod("shell", "Always", "exec sleep 3600"))
        .await?;
    running(&c, "shell").await?;
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let local = c.dir.path().join("payload");
    std::fs::write(&local, &data)?;

    for ver in KUBECTLS {
        let o = kubectl(
            &c,
            ver,
            &[
                "exec",
                "shell",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 3",
            ],
            None,
        )
        .await?;
        assert_eq!(o.code, 3, "{ver}: exit code; stderr {}", o.stderr);
        assert_eq!(o.stdout, "out\n", "{ver}");
        assert!(o.stderr.contains("err"), "{ver}: {}", o.stderr);

        let ok = kubectl(&c, ver, &["exec", "shell", "--", "true"], None).await?;
        assert_eq!(ok.code, 0, "{ver}: {}", ok.stderr);

        let piped = kubectl(
            &c,
            ver,
            &["exec", "-i", "shell", "--", "sh", "-c", "cat; echo done"],
            Some(b"hello\nworld\n".to_vec()),
        )
        .await?;
        assert_eq!(piped.code, 0, "{ver}: {}", piped.stderr);
        assert_eq!(piped.stdout, "hello\nworld\ndone\n", "{ver}");

        // kubectl cp is tar through exec, with stdin one way and stdout the other.
        let remote = format!("shell:/tmp/payload-{ver}");
        let up = kubectl(&c, ver, &["cp", local.to_str().unwrap(), &remote], None).await?;
        assert_eq!(up.code, 0, "{ver}: cp to pod: {}", up.stderr);
        let size = kubectl(
            &c,
            ver,
            &[
                "exec",
                "shell",
                "--",
                "wc",
                "-c",
                &format!("/tmp/payload-{ver}"),
            ],
            None,
        )
        .await?;
        assert!(size.stdout.starts_with("300000 "), "{ver}: {}", size.stdout);
        let back = c.dir.path().join(format!("back-{ver}"));
        let down = kubectl(&c, ver, &["cp", &remote, back.to_str().unwrap()], None).await?;
        assert_eq!(down.code, 0, "{ver}: cp from pod: {}", down.stderr);
        assert!(std::fs::read(&back)? == data, "{ver}: copied file differs");

        // -it on a terminal: the command sees a tty and its exit code comes back.
        let cmd = format!(
            "{} --kubeconfig {} exec -it shell -- sh -c 'tty; stty size; exit 4'",
            kubectl_bin(ver),
            c.kubeconfig().display()
        );
        let tty = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("script")
                .args(["-qec", &cmd, "/dev/null"])
                .stdin(Stdio::piped())
                .output(),
        )
        .await??;
        let text = String::from_utf8_lossy(&tty.stdout);
        assert_eq!(tty.status.code(), Some(4), "{ver}: {text}");
        assert!(text.contains("/dev/pts/"), "{ver}: {text}");
    }

    let stopped = kubectl(
        &c,
        "1.33",
        &["exec", "shell", "-c", "nope", "--", "true"],
        None,
    )
    .await?;
    assert_ne!(stopped.code, 0);
    both_transports_used(&c, "exec").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_attach_shows_output_until_the_container_exits() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.create_pod(busybox_pod(
        "talker",
        "Never",
        "sleep 2; for i in 1 2 3 4; do echo tick $i; sleep 0.5; done",
    ))
    .await?;
    running(&c, "talker").await?;
    let (a, b) = tokio::join!(
        kubectl(&c, "1.27", &["attach", "talker"], None),
        kubectl(&c, "1.33", &["attach", "talker"], None)
    );
    for o in [a?, b?] {
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(o.stdout.contains("tick 4\n"), "{}", o.stdout);
    }
    both_transports_used(&c, "attach").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_reaches_a_server_inside_the_pod() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    // Listening on the pod's loopback only: reachable through its network namespace alone.
    let script = "mkdir -p /www && echo hello-from-pod > /www/index.html && \
                  exec httpd -f -p 127.0.0.1:8080 -h /www";
    c.create_pod(busybox_pod("web", "Always", script)).await?;
    running(&c, "web").await?;
    for ver in KUBECTLS {
        let port = free_port()?;
        let mut pf = tokio::process::Command::new(kubectl_bin(ver))
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .args(["port-forward", "pod/web", &format!("{port}:8080")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(pf.stdout.take().context("stdout")?).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(l) = lines.next_line().await? {
                if l.contains("Forwarding from") {
                    return Ok(());
                }
            }
            bail!("port-forward ended")
        })
        .await;
        if !matches!(ready, Ok(Ok(()))) {
            let _ = pf.kill().await;
            let out = pf.wait_with_output().await?;
            bail!(
                "{ver}: port-forward not ready: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for _ in 0..2 {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "--max-time", "10"])
                .arg(format!("http://127.0.0.1:{port}/"))
                .output()
                .await?;
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "hello-from-pod\n",
                "{ver}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        pf.kill().await?;
    }
    both_transports_used(&c, "portforward").await
}

async fn curl(args: &[&str]) -> Result<(String, String)> {
    let out = tokio::process::Command::new("curl")
        .args(["-sk", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((body.to_string(), code.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_port_refuses_anonymous_and_serves_pods_stats_and_metrics() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    c.create_pod(busybox_pod("idle", "Always", "exec sleep 3600"))
        .await?;
    running(&c, "idle").await?;
    let base = format!("https://127.0.0.1:{}", c.cfg.kubelet_port);
    for path in ["/healthz", "/pods", "/stats/summary", "/metrics"] {
        let (body, code) = curl(&[&format!("{base}{path}")]).await?;
        assert_eq!(
            (body.as_str(), code.as_str()),
            ("Unauthorized", "401"),
            "{path}"
        );
    }
    let pki = c.pki();
    let (crt, key) = (
        pki.join("kubelet-client.crt"),
        pki.join("kubelet-client.key"),
    );
    let get = |path: &str| {
        let url = format!("{base}{path}");
        let (crt, key) = (crt.clone(), key.clone());
        async move {
            curl(&[
                "--cert",
                crt.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                &url,
            ])
            .await
        }
    };
    assert_eq!(
        get("/healthz").await?,
        ("ok".to_string(), "200".to_string())
    );

    // A certificate of another CA is refused at the handshake.
    let (fk, fc) = (
        c.dir.path().join("foreign.key"),
        c.dir.path().join("foreign.crt"),
    );
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=system:admin",
            "-keyout",
        ])
        .arg(&fk)
        .arg("-out")
        .arg(&fc)
        .output()?;
    anyhow::ensure!(made.status.success(), "openssl: {made:?}");
    let (body, code) = curl(&[
        "--cert",
        fc.to_str().unwrap(),
        "--key",
        fk.to_str().unwrap(),
        &format!("{base}/healthz"),
    ])
    .await?;
    assert_eq!(code, "000", "a foreign certificate got an answer: {body}");

    let (pods, code) = get("/pods").await?;
    assert_eq!(code, "200");
    let pods: Value = serde_json::from_str(&pods)?;
    assert_eq!(pods["kind"], "PodList");
    let names: Vec<&str> = pods["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["idle"]);

    let (summary, code) = get("/stats/summary").await?;
    assert_eq!(code, "200");
    let s: Value = serde_json::from_str(&summary)?;
    assert_eq!(s["node"]["nodeName"], c.node.as_str());
    assert!(s["node"]["memory"]["workingSetBytes"].as_u64() > Some(0));
    let pod = &s["pods"][0];
    assert_eq!(pod["podRef"]["name"], "idle", "{summary}");
    assert_eq!(pod["containers"][0]["name"], "c");
    assert!(
        pod["containers"][0]["memory"]["workingSetBytes"].as_u64() > Some(0),
        "{summary}"
    );
    assert!(pod["cpu"]["usageCoreNanoSeconds"].as_u64().is_some());
    assert_eq!(pod["network"]["name"], "eth0", "{summary}");

    let (metrics, code) = get("/metrics").await?;
    assert_eq!(code, "200");
    for want in [
        format!("kubelet_node_name{{node=\"{}\"}} 1", c.node),
        "kubelet_running_pods 1".to_string(),
        "kubelet_running_containers{container_state=\"running\"} 1".to_string(),
        "process_resident_memory_bytes ".to_string(),
    ] {
        assert!(metrics.contains(&want), "{want} missing:\n{metrics}");
    }
    let (_, code) = get("/nothing").await?;
    assert_eq!(code, "404");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_run_i_feeds_stdin_and_run_it_a_terminal() -> Result<()> {
    let mut c = Cluster::new().await?;
    c.start_agent().await?;
    let image = format!("--image={}", busybox());
    for ver in ["1.27", "1.33"] {
        // stdinOnce: what kubectl sends ends with EOF, after which the shell's loop ends.
        let name = format!("stdin-{}", ver.replace('.', "-"));
        let out = kubectl(
            &c,
            ver,
            &[
                "run",
                "-i",
                "--rm",
                "--restart=Never",
                &name,
                &image,
                "--",
                "sh",
                "-c",
                "while read x; do echo got-$x; done; echo eof",
            ],
            Some(b"one\ntwo\n".to_vec()),
        )
        .await?;
        assert_eq!(out.code, 0, "{ver}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains("got-one\ngot-two\neof\n"),
            "{ver}: {}{}",
            out.stdout,
            out.stderr
        );
        c.wait_gone(&name, Duration::from_secs(30)).await?;

        // -it: a terminal in the container, typed into through kubectl's own terminal.
        let name = format!("tty-{}", ver.replace('.', "-"));
        let cmd = format!(
            "{} --kubeconfig {} run -it --rm --restart=Never {name} {image} -- sh -c 'read x; tty; echo got-$x; exit 3'",
            kubectl_bin(ver),
            c.kubeconfig().display()
        );
        let mut child = tokio::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        // Kept open until kubectl ends: EOF here would end script's session first.
        let mut input = child.stdin.take().context("stdin")?;
        input.write_all(b"hello\n").await?;
        let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
            .await
            .with_context(|| format!("{ver}: kubectl run -it timed out"))??;
        drop(input);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("/dev/pts/0"), "{ver}: {text}");
        assert!(text.contains("got-hello"), "{ver}: {text}");
        c.wait_gone(&name, Duration::from_secs(30)).await?;
    }
    both_transports_used(&c, "attach").await
}
