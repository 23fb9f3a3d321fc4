//! `oxlet run` as a user runs it, against the test bed registry (`tests/testbed/up`).

use std::process::{Command, Output};

use oxlet_tests::testbed::{busybox, image};

fn oxlet(data: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oxlet"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .expect("run oxlet")
}

fn run(data: &std::path::Path, extra: &[&str], script: &str) -> Output {
    let state = data.join("state");
    let mut args = vec!["run", "--state-root", state.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[busybox(), "--", "sh", "-c", script]);
    oxlet(data, &args)
}

/// Nothing of a finished `oxlet run` may stay: no container dir, no mount.
fn assert_clean(data: &std::path::Path) {
    let left: Vec<_> = std::fs::read_dir(data.join("containers"))
        .map(|d| d.flatten().count())
        .into_iter()
        .collect();
    assert!(
        left.iter().all(|n| *n == 0),
        "container dirs left: {left:?}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&*data.to_string_lossy()),
        "mounts left:\n{mounts}"
    );
}

#[test]
fn output_and_exit_code_pass_through() {
    let data = tempfile::tempdir().unwrap();
    let out = run(data.path(), &[], "echo hello; echo oops >&2; exit 3");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    assert_clean(data.path());
}

#[test]
fn memory_limit_kills_a_hog_with_137() {
    let data = tempfile::tempdir().unwrap();
    let out = run(
        data.path(),
        &["--memory", "32Mi"],
        "head -c 200000000 /dev/zero | tail -c 200000000 >/dev/null",
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clean(data.path());
}

#[test]
fn cpu_limit_is_the_cfs_quota_seen_inside() {
    let data = tempfile::tempdir().unwrap();
    let out = run(
        data.path(),
        &["--cpus", "0.25"],
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "25000\n");
}

#[test]
fn isolation_defaults() {
    let data = tempfile::tempdir().unwrap();
    let out = run(
        data.path(),
        &[],
        "echo $$; ls /sys/class/net; grep -E '^(CapEff|Seccomp):' /proc/self/status; unshare -n true 2>&1 || echo denied",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1", "PID 1 in its own PID namespace");
    assert_eq!(lines[1], "lo", "only loopback in its own network namespace");
    assert_eq!(
        lines[2], "CapEff:\t00000000a80425fb",
        "containerd's default capabilities"
    );
    assert_eq!(lines[3], "Seccomp:\t2", "RuntimeDefault seccomp filter");
    assert_eq!(lines.last(), Some(&"denied"));
}

#[test]
fn bad_images_give_kubelet_reasons() {
    let data = tempfile::tempdir().unwrap();
    let out = oxlet(data.path(), &["run", "Not/A:Valid:Ref"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InvalidImageName"),
        "{out:?}"
    );
    let out = oxlet(data.path(), &["run", &image("test/missing:latest")]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ErrImagePull"),
        "{out:?}"
    );
    let out = oxlet(data.path(), &["run", "--pull", "Never", busybox()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ErrImageNeverPull"),
        "{out:?}"
    );
    assert_clean(data.path());
}

#[test]
fn sigterm_is_passed_to_the_container_and_cleaned_up() {
    let data = tempfile::tempdir().unwrap();
    let state = data.path().join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxlet"))
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "run",
            "--state-root",
            state.to_str().unwrap(),
            busybox(),
            "--",
            "sh",
            "-c",
        ])
        .arg("trap 'echo got-term; exit 42' TERM; echo up; while :; do sleep 0.1; done")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "up\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(status.code(), Some(42));
    assert_clean(data.path());
}
