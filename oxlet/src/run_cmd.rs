//! `oxlet run`: one container outside Kubernetes, output streamed, exit code passed on. The way a
//! user checks that the runtime works, and what the runtime benchmark drives.

use anyhow::{Context, Result};
use clap::Args;
use k8s_openapi::api::core::v1::{Container, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use runtime::image::{ImageStore, PullOptions, PullPolicy};
use runtime::spec::{Namespaces, Ns, SpecInput};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct RunArgs {
    /// CPU limit in cores (e.g. 0.5): a CFS quota over 100 ms.
    #[arg(long)]
    cpus: Option<String>,
    /// Memory limit (e.g. 64Mi, 1G).
    #[arg(long)]
    memory: Option<String>,
    /// `host` shares the host's network; the default is a network namespace with only loopback.
    #[arg(long, default_value = "none", value_parser = ["none", "host"])]
    net: String,
    /// When to pull the image.
    #[arg(long, default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    pull: String,
    /// Run an existing OCI bundle (its config.json) instead of an image, as `runc run` does.
    #[arg(long, conflicts_with = "image")]
    bundle: Option<PathBuf>,
    /// Where libcontainer keeps state for `oxlet run` containers.
    #[arg(long, default_value = "/run/oxlet/run")]
    state_root: PathBuf,
    /// Image reference, e.g. 127.0.0.1:5000/test/busybox:latest.
    #[arg(required_unless_present = "bundle")]
    image: Option<String>,
    /// Command and arguments (replace the image's Entrypoint and Cmd).
    #[arg(last = true)]
    command: Vec<String>,
}

pub fn run(data_dir: &Path, args: RunArgs) -> Result<i32> {
    let id = format!("oxlet-run-{}", std::process::id());
    if let Some(bundle) = &args.bundle {
        return Ok(runtime::container::run_foreground(
            &args.state_root,
            &id,
            bundle,
            None,
        )?);
    }
    let reference = args
        .image
        .clone()
        .expect("clap requires image without bundle");
    let policy = match args.pull.as_str() {
        "Always" => PullPolicy::Always,
        "Never" => PullPolicy::Never,
        _ => PullPolicy::IfNotPresent,
    };
    let store = ImageStore::open(data_dir.join("images"))?;
    // The pull's runtime is gone before libcontainer forks: no threads but this one remain.
    let image = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let image = rt.block_on(store.ensure(&reference, policy, &PullOptions::default()));
        rt.shutdown_background();
        image.map_err(|e| anyhow::anyhow!("{}: {e}", e.reason()))?
    };
    let dir = data_dir.join("containers").join(&id);
    let _ = runtime::image::unmount_rootfs(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let result = (|| {
        let rootfs = runtime::image::mount_rootfs(&image, &dir)?;
        let container = Container {
            name: "run".into(),
            command: (!args.command.is_empty()).then(|| args.command.clone()),
            resources: Some(limits(&args)),
            ..Default::default()
        };
        let net = if args.net == "host" {
            Ns::Host
        } else {
            Ns::New
        };
        let uts = if args.net == "host" {
            Ns::Host
        } else {
            Ns::New
        };
        let spec = runtime::spec::generate(&SpecInput {
            container: &container,
            pod_security: None,
            image: &image.config,
            rootfs: &rootfs,
            env: None,
            mounts: vec![],
            namespaces: Namespaces {
                network: net,
                ipc: Ns::New,
                uts,
                pid: Ns::New,
            },
            hostname: Some(id.clone()),
            cgroups_path: id.clone(),
            oom_score_adj: None,
            default_seccomp: true,
        })?;
        spec.save(dir.join("config.json"))
            .context("write config.json")?;
        Ok::<_, anyhow::Error>(runtime::container::run_foreground(
            &args.state_root,
            &id,
            &dir,
            None,
        )?)
    })();
    let unmounted = runtime::image::unmount_rootfs(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let code = result?;
    unmounted?;
    Ok(code)
}

fn limits(args: &RunArgs) -> ResourceRequirements {
    let mut limits = std::collections::BTreeMap::new();
    if let Some(c) = &args.cpus {
        limits.insert("cpu".to_string(), Quantity(c.clone()));
    }
    if let Some(m) = &args.memory {
        limits.insert("memory".to_string(), Quantity(m.clone()));
    }
    ResourceRequirements {
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    }
}
