//! `oxlet up --merge-kubeconfig`: the admin credentials as a context of the user's kubeconfig
//! (`~/.kube/config` or the first file of $KUBECONFIG), so plain `kubectl` reaches the cluster.
//! The file is edited as YAML, so entries and fields oxlet does not know stay as they were.

use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kubeconfig: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The kubeconfig kubectl reads by default: the first path of $KUBECONFIG, else
/// `$HOME/.kube/config`.
pub fn default_path() -> PathBuf {
    if let Some(first) = std::env::var_os("KUBECONFIG")
        .as_ref()
        .and_then(|v| std::env::split_paths(v).find(|p| !p.as_os_str().is_empty()))
    {
        return first;
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".kube/config")
}

fn read_yaml(path: &Path) -> Result<Option<Mapping>, MergeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MergeError::Read {
                path: path.into(),
                source,
            })
        }
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    match serde_yaml::from_str(&text) {
        Ok(Value::Mapping(m)) => Ok(Some(m)),
        Ok(_) => Err(MergeError::Parse {
            path: path.into(),
            message: "not a mapping".into(),
        }),
        Err(e) => Err(MergeError::Parse {
            path: path.into(),
            message: e.to_string(),
        }),
    }
}

/// The first entry of list `key` in `doc` (a kubeconfig's clusters, users or contexts).
fn first(doc: &Mapping, key: &str, path: &Path) -> Result<Value, MergeError> {
    doc.get(key)
        .and_then(Value::as_sequence)
        .and_then(|s| s.first())
        .cloned()
        .ok_or_else(|| MergeError::Parse {
            path: path.into(),
            message: format!("no {key}"),
        })
}

/// Replaces the entry named `name` of list `key` in `doc` with `entry` (renamed `name`).
fn put(doc: &mut Mapping, key: &str, name: &str, mut entry: Value) {
    if let Some(m) = entry.as_mapping_mut() {
        m.insert("name".into(), name.into());
    }
    let list = doc
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !list.is_sequence() {
        *list = Value::Sequence(Vec::new());
    }
    let seq = list.as_sequence_mut().expect("made a sequence above");
    seq.retain(|e| e.get("name").and_then(Value::as_str) != Some(name));
    seq.push(entry);
}

/// Puts the cluster, user and context of `admin` into the kubeconfig at `into` under `name`,
/// replacing an earlier one of that name, and makes it the current context. Other entries stay.
pub fn merge(admin: &Path, into: &Path, name: &str) -> Result<(), MergeError> {
    let src = read_yaml(admin)?.ok_or_else(|| MergeError::Parse {
        path: admin.into(),
        message: "empty".into(),
    })?;
    let cluster = first(&src, "clusters", admin)?;
    let user = first(&src, "users", admin)?;
    let mut doc = read_yaml(into)?.unwrap_or_else(|| {
        let mut m = Mapping::new();
        m.insert("apiVersion".into(), "v1".into());
        m.insert("kind".into(), "Config".into());
        m
    });
    let user_name = format!("{name}-admin");
    put(&mut doc, "clusters", name, cluster);
    put(&mut doc, "users", &user_name, user);
    let mut ctx = Mapping::new();
    ctx.insert("cluster".into(), name.into());
    ctx.insert("user".into(), user_name.as_str().into());
    let mut entry = Mapping::new();
    entry.insert("context".into(), Value::Mapping(ctx));
    put(&mut doc, "contexts", name, Value::Mapping(entry));
    doc.insert("current-context".into(), name.into());
    let text = serde_yaml::to_string(&Value::Mapping(doc)).expect("YAML values serialize");
    write_private(into, &text).map_err(|source| MergeError::Write {
        path: into.into(),
        source,
    })
}

/// Writes `text` to `path` atomically with mode 0600 (it holds a private key).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("oxlet-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "apiVersion: v1
kind: Config
clusters:
- name: oxlet
  cluster: {server: 'https://127.0.0.1:6443', certificate-authority-data: Q0E=}
users:
- name: admin
  user: {client-certificate-data: Q1JU, client-key-data: S0VZ}
contexts:
- name: admin@oxlet
  context: {cluster: oxlet, user: admin}
current-context: admin@oxlet
";

    #[test]
    fn merges_into_an_existing_config_keeping_other_entries() {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin.kubeconfig");
        std::fs::write(&admin, ADMIN).unwrap();
        let into = dir.path().join("kube/config");
        std::fs::create_dir_all(into.parent().unwrap()).unwrap();
        std::fs::write(
            &into,
            "apiVersion: v1
kind: Config
preferences: {colors: true}
clusters:
- {name: prod, cluster: {server: 'https://prod:6443'}}
- {name: oxlet, cluster: {server: 'https://stale:1'}}
users:
- {name: me, user: {exec: {command: get-token, apiVersion: client.authentication.k8s.io/v1}}}
contexts:
- {name: prod, context: {cluster: prod, user: me, namespace: web}}
current-context: prod
",
        )
        .unwrap();
        merge(&admin, &into, "oxlet").unwrap();
        let got: Value = serde_yaml::from_str(&std::fs::read_to_string(&into).unwrap()).unwrap();
        assert_eq!(got["current-context"], "oxlet");
        assert_eq!(got["preferences"]["colors"], true);
        let clusters = got["clusters"].as_sequence().unwrap();
        assert_eq!(clusters.len(), 2, "{clusters:?}");
        assert_eq!(clusters[1]["cluster"]["server"], "https://127.0.0.1:6443");
        assert_eq!(got["users"][0]["user"]["exec"]["command"], "get-token");
        assert_eq!(got["users"][1]["name"], "oxlet-admin");
        assert_eq!(got["users"][1]["user"]["client-key-data"], "S0VZ");
        assert_eq!(got["contexts"][0]["context"]["namespace"], "web");
        assert_eq!(got["contexts"][1]["context"]["user"], "oxlet-admin");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&into).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Merging again replaces rather than duplicates.
        merge(&admin, &into, "oxlet").unwrap();
        let again: Value = serde_yaml::from_str(&std::fs::read_to_string(&into).unwrap()).unwrap();
        assert_eq!(again, got);
    }

    #[test]
    fn creates_a_missing_config_and_refuses_a_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin.kubeconfig");
        std::fs::write(&admin, ADMIN).unwrap();
        let into = dir.path().join("new/.kube/config");
        merge(&admin, &into, "oxlet").unwrap();
        let got: Value = serde_yaml::from_str(&std::fs::read_to_string(&into).unwrap()).unwrap();
        assert_eq!(got["kind"], "Config");
        assert_eq!(got["contexts"][0]["name"], "oxlet");
        let broken = dir.path().join("broken");
        std::fs::write(&broken, "clusters: [unclosed").unwrap();
        let e = merge(&admin, &broken, "oxlet").unwrap_err();
        assert!(e.to_string().contains("is not a kubeconfig"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&broken).unwrap(),
            "clusters: [unclosed"
        );
    }
}
