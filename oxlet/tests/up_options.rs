//! `oxlet up`'s settings as a user gives them: a config file whose keys are the flags (command
//! line flags win), the admin context merged into a kubeconfig of the user's, and `--reset`
//! starting a new cluster in place of the old one.
//!
//! Ignored in the parallel run and run alone by `scripts/test`: its kube-proxy owns the
//! `oxlet-proxy` table and 10.96.0.0/12.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const PREFIX: &str = "oxlet-options-test-";

#[test]
#[ignore = "run alone by scripts/test (owns the oxlet-proxy table and 10.96.0.0/12)"]
fn up_reads_a_config_file_merges_a_kubeconfig_and_resets() {
    let mut up = Cluster::new(PREFIX);
    let d = up.path().to_path_buf();
    // A config file with a key the command line overrides (port) and one it does not.
    let config = d.join("oxlet.yaml");
    std::fs::write(
        &config,
        "node-name: oxlet-options-node\nport: 1\ncluster-domain: cluster.local\nno-dns: false\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    // A bad key is refused before anything starts.
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "prot = 6443\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_oxlet"))
        .args(["--data-dir"])
        .arg(d.join("data"))
        .args(["up", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key \"prot\""), "{err}");
    assert!(!d.join("data").exists(), "nothing started");

    // The user's kubeconfig has a context of another cluster.
    let user_kc = d.join("home/.kube/config");
    std::fs::create_dir_all(user_kc.parent().unwrap()).unwrap();
    std::fs::write(
        &user_kc,
        "apiVersion: v1\nkind: Config\nclusters:\n- {name: prod, cluster: {server: 'https://prod.invalid:6443'}}\nusers:\n- {name: me, user: {token: abc}}\ncontexts:\n- {name: prod, context: {cluster: prod, user: me}}\ncurrent-context: prod\n",
    )
    .unwrap();
    up.restart_with(&[
        "--config",
        &config,
        "--merge-kubeconfig",
        user_kc.to_str().unwrap(),
    ]);
    up.wait_ready(Duration::from_secs(60));
    let kc = up.kubeconfig();
    let admin = std::fs::read_to_string(&kc).unwrap();
    assert!(
        admin.contains(&format!(":{}", up.port)),
        "the command line's port wins over the file's: {admin}"
    );
    let name = ok(kubectl(
        &kc,
        &["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"],
        None,
    ));
    assert_eq!(name, "oxlet-options-node", "the file's node name");
    // Plain kubectl on the user's kubeconfig reaches the cluster; the other context stays.
    let nodes = ok(kubectl(&user_kc, &["get", "nodes", "-o", "name"], None));
    assert_eq!(nodes.trim(), "node/oxlet-options-node");
    let contexts = ok(kubectl(
        &user_kc,
        &["config", "get-contexts", "-o", "name"],
        None,
    ));
    let mut contexts: Vec<&str> = contexts.split_whitespace().collect();
    contexts.sort();
    assert_eq!(contexts, ["oxlet", "prod"]);
    ok(kubectl(
        &kc,
        &["create", "configmap", "from-before", "--from-literal=a=b"],
        None,
    ));
    up.stop();

    // --reset: the old cluster is removed and a new one starts.
    up.restart_with(&["--config", &config, "--reset"]);
    up.wait_ready(Duration::from_secs(60));
    let out = kubectl(&kc, &["get", "configmap", "from-before"], None);
    assert!(!out.status.success(), "the old cluster's objects are gone");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(d.join("up.log")).unwrap();
    assert!(
        log.contains(&format!("removed {}", d.join("data").display())),
        "{log}"
    );
    let name = ok(kubectl(
        &kc,
        &["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"],
        None,
    ));
    assert_eq!(name, "oxlet-options-node");
}
