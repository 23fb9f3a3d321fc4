//! Test harness: a server on a free 127.0.0.1 port with a temporary data dir and kubeconfig,
//! clients for it (kube-rs and the real kubectl binaries).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context, Result};

pub struct TestServer {
    pub server: Option<control::Server>,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl TestServer {
    /// The API server alone.
    pub async fn start() -> Result<TestServer> {
        Self::start_with(false).await
    }

    /// The API server with the controllers and the scheduler.
    pub async fn start_with_controllers() -> Result<TestServer> {
        Self::start_with(true).await
    }

    /// The API server with the controllers, configured by `f`.
    pub async fn start_with_config(
        f: impl FnOnce(&mut control::controllers::Config),
    ) -> Result<TestServer> {
        Self::start_configured(true, f).await
    }

    async fn start_with(controllers: bool) -> Result<TestServer> {
        Self::start_configured(controllers, |_| {}).await
    }

    async fn start_configured(
        controllers: bool,
        f: impl FnOnce(&mut control::controllers::Config),
    ) -> Result<TestServer> {
        Self::start_server_config(|cfg| {
            cfg.controllers = controllers;
            f(&mut cfg.controller_cfg);
        })
        .await
    }

    /// The server configured by `f` (listen address and kubeconfig are the harness's).
    pub async fn start_server_config(f: impl FnOnce(&mut control::Config)) -> Result<TestServer> {
        let dir = tempfile::tempdir()?;
        let mut cfg = control::Config::new(dir.path().join("data"));
        cfg.controllers = false;
        f(&mut cfg);
        cfg.listen = "127.0.0.1:0".parse()?;
        cfg.kubeconfig = dir.path().join("admin.kubeconfig");
        let server = control::start(cfg).await?;
        let kubeconfig = server.kubeconfig.clone();
        Ok(TestServer {
            server: Some(server),
            dir,
            kubeconfig,
        })
    }

    pub async fn client(&self) -> Result<kube::Client> {
        client_for(&self.kubeconfig).await
    }

    pub fn kubectl(&self, version: u32, args: &[&str]) -> Output {
        kubectl(&self.kubeconfig, version, args, None)
    }

    pub fn kubectl_stdin(&self, version: u32, args: &[&str], stdin: &str) -> Output {
        kubectl(&self.kubeconfig, version, args, Some(stdin))
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().expect("running").addr
    }

    /// A kubeconfig for node `node` (user `system:node:<node>`, group `system:nodes`), with a
    /// client certificate issued by the server's CA.
    pub fn node_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        let pki = control::certs::Pki::new(&self.dir.path().join("data"));
        let to = self.dir.path().join(format!("node-{node}.kubeconfig"));
        let server = format!("https://127.0.0.1:{}", self.addr().port());
        pki.write_node_kubeconfig(node, &server, &to)?;
        Ok(to)
    }

    /// A kubeconfig for user `user` in `groups`, with a client certificate issued by the
    /// server's CA.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let pki = control::certs::Pki::new(&self.dir.path().join("data"));
        let file = format!("user-{}", user.replace(':', "-"));
        pki.issue_client(&file, user, groups)?;
        let to = self.dir.path().join(format!("{file}.kubeconfig"));
        let server = format!("https://127.0.0.1:{}", self.addr().port());
        pki.write_kubeconfig(&file, user, &server, &to)?;
        Ok(to)
    }

    /// A kubeconfig that authenticates with bearer token `token` (and no client certificate).
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        use base64::Engine;
        let pki = control::certs::Pki::new(&self.dir.path().join("data"));
        let ca = base64::engine::general_purpose::STANDARD.encode(pki.ca_pem()?);
        let to = self.dir.path().join(format!("token-{name}.kubeconfig"));
        let port = self.addr().port();
        std::fs::write(
            &to,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: oxlet\n  cluster:\n    \
                 server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\n\
                 users:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: \
                 {name}\n  context:\n    cluster: oxlet\n    user: {name}\n\
                 current-context: {name}\n"
            ),
        )?;
        Ok(to)
    }

    /// A kube-rs client authenticated as node `node`.
    pub async fn node_client(&self, node: &str) -> Result<kube::Client> {
        client_for(&self.node_kubeconfig(node)?).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

pub const KUBECTL_VERSIONS: &[u32] = &[27, 30, 33];

pub fn kubectl_path(version: u32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/google-cloud-sdk/bin/kubectl.1.{version}"))
}

/// Runs kubectl 1.`version`; its output is printed when a test fails.
pub fn kubectl(kubeconfig: &Path, version: u32, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(kubectl_path(version));
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    cmd.env("HOME", kubeconfig.parent().unwrap_or(Path::new("/tmp")));
    cmd.stdin(std::process::Stdio::piped());
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running kubectl 1.{version}"))
        .expect("kubectl runs");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("kubectl finishes")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "kubectl failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

#[track_caller]
pub fn fails(o: Output) -> String {
    assert!(
        !o.status.success(),
        "kubectl should fail; stdout: {}",
        stdout(&o)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The server as a child process; killed with SIGKILL when dropped.
pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `oxlet-apiserver` on a free loopback port with its data in `dir/data` and the admin
/// kubeconfig at `dir/admin.kubeconfig`, once it listens.
pub fn spawn_apiserver(dir: &Path) -> Result<Proc> {
    let kc = dir.join("admin.kubeconfig");
    let _ = std::fs::remove_file(&kc);
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxlet-apiserver"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--kubeconfig")
        .arg(&kc)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn oxlet-apiserver")?;
    // The server prints one line once it listens and the kubeconfig is written.
    let stderr = child.stderr.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line)?;
    if !line.contains("oxlet API server on") {
        let _ = child.kill();
        bail!("server did not start: {line}");
    }
    Ok(Proc(child))
}
