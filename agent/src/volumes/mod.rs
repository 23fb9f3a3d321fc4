//! A pod's volumes as kubelet's volume manager keeps them: set up below
//! `<data>/pods/<uid>/volumes/kubernetes.io~<kind>/<name>` before the pod's containers start,
//! contents of configMap, secret, downwardAPI and projected volumes refreshed when the objects
//! or the pod's metadata change, and everything unmounted and removed with the pod. Secret,
//! downwardAPI and projected contents live on a per-volume tmpfs, never on the node's disk.

pub mod atomic_writer;
pub mod config_map;
pub mod downward_api;
pub mod empty_dir;
pub mod host_path;
pub mod mounts;
pub mod projected;
pub mod secret;
pub mod token;

use crate::env::{expand_sub_path, Env};
use crate::objects::{ConfigError, Objects};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use runtime::spec::{Mount, Propagation};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Field(#[from] crate::fieldpath::Error),
    #[error("configmap references non-existent config key: {0}")]
    MissingConfigKey(String),
    #[error("references non-existent secret key: {0}")]
    MissingSecretKey(String),
    #[error("hostPath type check failed: {path} is not {what}")]
    HostPathType { path: String, what: &'static str },
    #[error("{0} is an invalid volume type")]
    HostPathTypeInvalid(String),
    #[error("unsupported emptyDir medium {0:?}")]
    Medium(String),
    #[error("no volume plugin matched")]
    Unsupported,
    #[error(transparent)]
    Write(#[from] atomic_writer::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", aggregate(.0))]
    Aggregate(Vec<VolumeError>),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn aggregate(errs: &[VolumeError]) -> String {
    let v: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    format!("[{}]", v.join(", "))
}

/// A volume ready to be mounted into containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedVolume {
    pub path: PathBuf,
    /// Volumes the node writes (configMap, secret, downwardAPI, projected) are read-only in
    /// containers whatever the mount says.
    pub read_only: bool,
}

/// The directory kubelet's plugin of `v` would use, and whether its content is refreshed.
fn plugin_dir(v: &Volume) -> Option<(&'static str, bool)> {
    Some(if v.empty_dir.is_some() {
        ("kubernetes.io~empty-dir", false)
    } else if v.config_map.is_some() {
        ("kubernetes.io~configmap", true)
    } else if v.secret.is_some() {
        ("kubernetes.io~secret", true)
    } else if v.downward_api.is_some() {
        ("kubernetes.io~downward-api", true)
    } else if v.projected.is_some() {
        ("kubernetes.io~projected", true)
    } else {
        return None;
    })
}

type Meta = (
    Option<BTreeMap<String, String>>,
    Option<BTreeMap<String, String>>,
);

/// The volumes of one pod (owned by its worker).
pub struct PodVolumes {
    objects: Objects,
    pod_dir: PathBuf,
    sync_frequency: Duration,
    allocatable: BTreeMap<String, Quantity>,
    ready: BTreeMap<String, MountedVolume>,
    tokens: token::Tokens,
    refreshed_at: Option<Instant>,
    meta: Option<Meta>,
    /// Whether the volumes dir is a shared mount (pods with mount propagation).
    shared: bool,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, VolumeError> {
    tokio::task::spawn_blocking(f).await?
}

impl PodVolumes {
    pub fn new(
        objects: Objects,
        pod_dir: PathBuf,
        sync_frequency: Duration,
        allocatable: BTreeMap<String, Quantity>,
    ) -> Self {
        Self {
            objects,
            pod_dir,
            sync_frequency,
            allocatable,
            ready: BTreeMap::new(),
            tokens: token::Tokens::default(),
            refreshed_at: None,
            meta: None,
            shared: false,
        }
    }

    pub fn ready(&self) -> &BTreeMap<String, MountedVolume> {
        &self.ready
    }

    /// Whether every volume of the pod is set up.
    pub fn all_ready(&self, pod: &Pod) -> bool {
        pod.spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .all(|v| self.ready.contains_key(&v.name))
    }

    /// Sets up the volumes that are not yet and refreshes contents when due; the failures, by
    /// volume. A volume whose refresh fails keeps its last content.
    pub async fn sync(&mut self, pod: &Pod) -> Vec<(String, VolumeError)> {
        let meta: Meta = (
            pod.metadata.labels.clone(),
            pod.metadata.annotations.clone(),
        );
        let refresh = self
            .refreshed_at
            .is_none_or(|t| t.elapsed() >= self.sync_frequency)
            || self.meta.as_ref() != Some(&meta)
            || self.tokens.due();
        let mut failures = Vec::new();
        if wants_propagation(pod) && !self.shared {
            let dir = self.pod_dir.join("volumes");
            match blocking(move || {
                mounts::ensure_shared(&dir).map_err(|source| VolumeError::Io {
                    what: format!("make {} a shared mount", dir.display()),
                    source,
                })
            })
            .await
            {
                Ok(()) => self.shared = true,
                Err(e) => {
                    // Every volume waits for it; it is reported once, on the first.
                    let first = pod
                        .spec
                        .iter()
                        .flat_map(|s| s.volumes.iter().flatten())
                        .map(|v| v.name.clone())
                        .next()
                        .unwrap_or_default();
                    return vec![(first, e)];
                }
            }
        }
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for v in &volumes {
            let refreshed = plugin_dir(v).is_some_and(|(_, r)| r);
            if self.ready.contains_key(&v.name) && !(refresh && refreshed) {
                continue;
            }
            match self.set_up(pod, v).await {
                Ok(m) => {
                    self.ready.insert(v.name.clone(), m);
                }
                Err(e) => failures.push((v.name.clone(), e)),
            }
        }
        if refresh {
            self.refreshed_at = Some(Instant::now());
            self.meta = Some(meta);
        }
        failures
    }

    fn dir(&self, kind: &str, name: &str) -> PathBuf {
        self.pod_dir.join("volumes").join(kind).join(name)
    }

    async fn set_up(&mut self, pod: &Pod, v: &Volume) -> Result<MountedVolume, VolumeError> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        if let Some(hp) = &v.host_path {
            let (path, type_) = (hp.path.clone(), hp.type_.clone());
            blocking(move || host_path::check(&path, type_.as_deref())).await?;
            return Ok(MountedVolume {
                path: PathBuf::from(&hp.path),
                read_only: false,
            });
        }
        let Some((kind, _)) = plugin_dir(v) else {
            return Err(VolumeError::Unsupported);
        };
        let dir = self.dir(kind, &v.name);
        if let Some(src) = &v.empty_dir {
            let (d, src, p, alloc) = (
                dir.clone(),
                src.clone(),
                pod.clone(),
                self.allocatable.clone(),
            );
            let policy = crate::security::fs_group_change_policy(pod);
            blocking(move || {
                empty_dir::set_up(&d, &src, &p, &alloc)?;
                let gid = crate::security::fs_group(&p);
                crate::security::apply_fs_group(&d, gid, policy.as_deref(), false).map_err(
                    |source| VolumeError::Io {
                        what: format!("set fsGroup ownership of {}", d.display()),
                        source,
                    },
                )
            })
            .await?;
            return Ok(MountedVolume {
                path: dir,
                read_only: false,
            });
        }
        let memory = empty_dir::memory_size(pod, &self.allocatable, None);
        let (payload, tmpfs) = if let Some(src) = &v.config_map {
            let optional = src.optional == Some(true);
            let mode = src.default_mode.unwrap_or(0o644);
            let cm = match self.objects.config_map(ns, &src.name).await {
                Ok(cm) => cm,
                Err(e) if e.is_not_found() && optional => ConfigMap::default(),
                Err(e) => return Err(e.into()),
            };
            let p = config_map::payload(src.items.as_deref(), &cm, mode, optional)?;
            (p, None)
        } else if let Some(src) = &v.secret {
            let optional = src.optional == Some(true);
            let mode = src.default_mode.unwrap_or(0o644);
            let name = src.secret_name.clone().unwrap_or_default();
            let s = match self.objects.secret(ns, &name).await {
                Ok(s) => s,
                Err(e) if e.is_not_found() && optional => Secret::default(),
                Err(e) => return Err(e.into()),
            };
            let p = secret::payload(src.items.as_deref(), &s, mode, optional)?;
            (p, Some(memory))
        } else if let Some(src) = &v.downward_api {
            let items = src.items.clone().unwrap_or_default();
            let mode = src.default_mode.unwrap_or(0o644);
            let p = downward_api::payload(&items, pod, mode, &self.allocatable)?;
            (p, Some(memory))
        } else if let Some(src) = &v.projected {
            let p =
                projected::payload(src, pod, &self.objects, &mut self.tokens, &self.allocatable)
                    .await?;
            (p, Some(memory))
        } else {
            return Err(VolumeError::Unsupported);
        };
        let (d, gid) = (dir.clone(), crate::security::fs_group(pod));
        blocking(move || {
            empty_dir::make_dir(&d, tmpfs)?;
            atomic_writer::write(&d, &payload)?;
            // As kubelet: these volumes are handed to the fsGroup on every setup, whatever
            // the change policy says.
            crate::security::apply_fs_group(&d, gid, None, true).map_err(|source| VolumeError::Io {
                what: format!("set fsGroup ownership of {}", d.display()),
                source,
            })
        })
        .await?;
        Ok(MountedVolume {
            path: dir,
            read_only: true,
        })
    }
}

/// Unmounts and removes every volume of the pod whose directory is `pod_dir` (blocking).
/// Nothing is removed while something is still mounted below it.
pub fn tear_down(pod_dir: &Path) -> std::io::Result<()> {
    if !pod_dir.exists() {
        return Ok(());
    }
    mounts::unmount_below(pod_dir)?;
    if mounts::anything_below(pod_dir)? {
        return Err(std::io::Error::other(format!(
            "mounts remain below {}",
            pod_dir.display()
        )));
    }
    match std::fs::remove_dir_all(pod_dir.join("volumes")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `sub` inside `volume`, made as a directory when missing (with the volume's permissions), and
/// refused when it leaves the volume through `..` or a symlink (blocking).
fn sub_path(
    volume: &Path,
    sub: &str,
    mount: &str,
    container: &str,
) -> Result<PathBuf, ConfigError> {
    if Path::new(sub).is_absolute() {
        return Err(ConfigError::SubPath(format!(
            "error SubPath `{sub}` must not be an absolute path"
        )));
    }
    if Path::new(sub)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(ConfigError::SubPath(format!(
            "unable to provision SubPath `{sub}`: must not contain '..'"
        )));
    }
    let prepare = || {
        ConfigError::SubPath(format!(
            "failed to prepare subPath for volumeMount {mount:?} of container {container:?}"
        ))
    };
    let path = volume.join(sub);
    if std::fs::symlink_metadata(&path).is_err() {
        let perm = std::fs::metadata(volume)
            .map_err(|_| prepare())?
            .permissions();
        let base = std::fs::canonicalize(volume).map_err(|_| prepare())?;
        std::fs::create_dir_all(&path).map_err(|_| {
            ConfigError::SubPath(format!(
                "failed to create subPath directory for volumeMount {mount:?} of container {container:?}"
            ))
        })?;
        let made = std::fs::canonicalize(&path).map_err(|_| prepare())?;
        if !made.starts_with(&base) {
            return Err(prepare());
        }
        let _ =
            std::fs::set_permissions(&made, std::fs::Permissions::from_mode(perm.mode() & 0o7777));
    }
    let base = std::fs::canonicalize(volume).map_err(|_| prepare())?;
    let real = std::fs::canonicalize(&path).map_err(|_| prepare())?;
    if !real.starts_with(&base) {
        return Err(prepare());
    }
    Ok(real)
}

/// kubelet's translation of a volumeMount's mountPropagation (unset and None are private);
/// Bidirectional needs a privileged container, as the API server's validation demands.
pub fn propagation(c: &Container, mode: Option<&str>) -> Result<Propagation, ConfigError> {
    match mode {
        None | Some("None") => Ok(Propagation::Private),
        Some("HostToContainer") => Ok(Propagation::HostToContainer),
        Some("Bidirectional") => {
            let privileged = c
                .security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false);
            if privileged {
                Ok(Propagation::Bidirectional)
            } else {
                Err(ConfigError::BidirectionalUnprivileged)
            }
        }
        Some(other) => Err(ConfigError::Propagation(other.to_string())),
    }
}

/// A private copy of a pod's shared volumes dir, for the mounts that want no propagation: the
/// runtime makes bind mounts with their source's propagation (libcontainer applies no
/// propagation option to a bind), and a bind of the shared dir would receive what is mounted
/// there later.
#[derive(Debug, Clone)]
pub struct PrivateView {
    pub shared: PathBuf,
    pub private: PathBuf,
}

impl PrivateView {
    /// The view of a pod whose volumes dir is shared (some mount propagates), else none.
    pub fn of(pod: &Pod, pod_dir: &Path) -> Option<PrivateView> {
        wants_propagation(pod).then(|| PrivateView {
            shared: pod_dir.join("volumes"),
            private: pod_dir.join("volumes-private"),
        })
    }

    /// `source` below the shared dir as seen through the private copy, made when missing
    /// (blocking; once every volume is set up, so the copy holds their mounts).
    fn source(&self, source: &Path) -> Result<PathBuf, ConfigError> {
        let shared = mounts::resolved(&self.shared);
        let Ok(rel) = source
            .strip_prefix(&shared)
            .or(source.strip_prefix(&self.shared))
        else {
            return Ok(source.to_path_buf());
        };
        mounts::ensure_private_copy(&shared, &self.private).map_err(|e| {
            ConfigError::Mount(format!(
                "make the private copy {} of {}: {e}",
                self.private.display(),
                shared.display()
            ))
        })?;
        Ok(self.private.join(rel))
    }
}

/// Whether any container of the pod mounts a volume with HostToContainer or Bidirectional
/// propagation: then the pod's volumes dir is a shared mount, as kubelet keeps its root dir,
/// so that mounts below it propagate to and from containers.
fn wants_propagation(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| {
            matches!(
                m.mount_propagation.as_deref(),
                Some("HostToContainer" | "Bidirectional")
            )
        })
}

/// The bind mounts of container `c` from its volumeMounts (blocking: subPaths are made and
/// resolved).
pub fn container_mounts(
    c: &Container,
    ready: &BTreeMap<String, MountedVolume>,
    env: &Env,
    private_view: Option<&PrivateView>,
) -> Result<Vec<Mount>, ConfigError> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let vol = ready.get(&m.name).ok_or_else(|| ConfigError::NoVolume {
            volume: m.name.clone(),
            container: c.name.clone(),
        })?;
        let sub = match (&m.sub_path, &m.sub_path_expr) {
            (Some(s), _) if !s.is_empty() => Some(s.clone()),
            (_, Some(e)) if !e.is_empty() => Some(expand_sub_path(e, env)?),
            _ => None,
        };
        let source = match sub.filter(|s| !s.is_empty()) {
            Some(s) => sub_path(&vol.path, &s, &m.name, &c.name)?,
            None => vol.path.clone(),
        };
        let propagation = propagation(c, m.mount_propagation.as_deref())?;
        let source = match private_view {
            Some(v) if propagation == Propagation::Private => v.source(&source)?,
            _ => source,
        };
        out.push(Mount {
            source,
            destination: PathBuf::from(&m.mount_path),
            read_only: m.read_only == Some(true) || vol.read_only,
            propagation,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_paths_stay_inside_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::os::unix::fs::symlink("/etc", vol.join("escape")).unwrap();
        std::fs::write(vol.join("file"), "x").unwrap();
        let made = sub_path(&vol, "a/b", "m", "c").unwrap();
        assert!(made.is_dir() && made.ends_with("vol/a/b"));
        assert!(sub_path(&vol, "file", "m", "c").unwrap().is_file());
        assert_eq!(
            sub_path(&vol, "escape", "m", "c").unwrap_err().to_string(),
            "failed to prepare subPath for volumeMount \"m\" of container \"c\""
        );
        assert!(sub_path(&vol, "../x", "m", "c").is_err());
        assert!(sub_path(&vol, "/etc", "m", "c").is_err());
    }

    #[test]
    fn projected_errors_aggregate_as_kubernetes_prints_them() {
        let e = VolumeError::Aggregate(vec![
            VolumeError::MissingSecretKey("a".into()),
            VolumeError::MissingConfigKey("b".into()),
        ]);
        assert_eq!(
            e.to_string(),
            "[references non-existent secret key: a, configmap references non-existent config key: b]"
        );
    }
}
