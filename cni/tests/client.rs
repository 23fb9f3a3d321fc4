//! The client's chain mechanics with recording fake plugins (shell scripts): prevResult down the
//! chain, runtimeConfig for declared capabilities, DEL in reverse with the cached result after a
//! restart, CNI_ARGS, errors.

use cni::client::{Client, NetworkConfigList, RuntimeConf};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const FAKE: &str = r#"#!/bin/sh
# Records its invocation, answers ADD with prevResult plus one IP of its own.
in=$(cat)
me=$(basename "$0")
echo "$CNI_COMMAND $me $CNI_CONTAINERID $CNI_IFNAME $CNI_ARGS" >> "$(dirname "$0")/log"
printf '%s' "$in" > "$(dirname "$0")/$me-$CNI_COMMAND.json"
case "$CNI_COMMAND" in
ADD)
  if [ "$me" = fail ]; then echo '{"cniVersion":"1.0.0","code":11,"msg":"busy"}'; exit 1; fi
  printf '%s' "$in" | jq -c --arg me "$me" '(.prevResult // {"cniVersion":.cniVersion,"ips":[]}) | .ips += [{"address":"10.243.250.\(.ips|length+2)/24"}] | .interfaces += [{"name":$me}]'
  ;;
esac
"#;

fn setup() -> (tempfile::TempDir, tempfile::TempDir) {
    let bin = tempfile::tempdir().unwrap();
    for name in ["fake-a", "fake-b", "fail"] {
        let p = bin.path().join(name);
        fs::write(&p, FAKE).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    (bin, tempfile::tempdir().unwrap())
}

fn read(dir: &Path, name: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

fn list(plugins: Value) -> NetworkConfigList {
    NetworkConfigList::parse(
        json!({"cniVersion": "1.0.0", "name": "fakenet", "plugins": plugins})
            .to_string()
            .as_bytes(),
        Path::new("t"),
    )
    .unwrap()
}

#[test]
fn chain_passes_prev_result_and_capabilities_and_dels_in_reverse_from_the_cache() {
    let (bin, cache) = setup();
    let net = list(
        json!([{"type": "fake-a", "x": 1}, {"type": "fake-b", "capabilities": {"portMappings": true}}]),
    );
    let rt = RuntimeConf {
        container_id: "c1".into(),
        netns: "/run/netns/none".into(),
        ifname: "eth0".into(),
        args: vec![("K8S_POD_NAME".into(), "p".into())],
        capability_args: json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}], "bandwidth": {}})
            .as_object()
            .unwrap()
            .clone(),
    };
    let client = Client::new(
        vec![Path::new("/nonexistent").into(), bin.path().into()],
        cache.path(),
    );
    let r = client.add(&net, &rt).unwrap();
    assert_eq!(r.ips.len(), 2);
    assert_eq!(
        r.interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["fake-a", "fake-b"]
    );

    let a = read(bin.path(), "fake-a-ADD.json");
    assert_eq!(a["name"], "fakenet");
    assert_eq!(a["cniVersion"], "1.0.0");
    assert_eq!(a["x"], 1);
    assert!(a.get("prevResult").is_none() && a.get("runtimeConfig").is_none());
    let b = read(bin.path(), "fake-b-ADD.json");
    assert_eq!(b["prevResult"]["ips"][0]["address"], "10.243.250.2/24");
    assert_eq!(
        b["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    );

    // The agent restarts: a new client, and DEL knows only the attachment's identity.
    let client = Client::new(vec![bin.path().into()], cache.path());
    client.check(&net, &rt).unwrap();
    assert_eq!(
        read(bin.path(), "fake-a-CHECK.json")["prevResult"]["ips"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let bare = RuntimeConf {
        container_id: "c1".into(),
        netns: "/run/netns/none".into(),
        ifname: "eth0".into(),
        ..Default::default()
    };
    client.del(&net, &bare).unwrap();
    let log = fs::read_to_string(bin.path().join("log")).unwrap();
    let verbs: Vec<String> = log
        .lines()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        verbs,
        [
            "ADD fake-a",
            "ADD fake-b",
            "CHECK fake-a",
            "CHECK fake-b",
            "DEL fake-b",
            "DEL fake-a"
        ]
    );
    assert!(
        log.lines()
            .next()
            .unwrap()
            .ends_with("c1 eth0 K8S_POD_NAME=p"),
        "{log}"
    );
    let del_b = read(bin.path(), "fake-b-DEL.json");
    assert_eq!(del_b["prevResult"]["ips"].as_array().unwrap().len(), 2);
    assert_eq!(
        del_b["runtimeConfig"]["portMappings"][0]["hostPort"], 8080,
        "capability args come from the cache"
    );

    // Forgotten after DEL: DEL again runs without prevResult and succeeds; CHECK has nothing.
    client.del(&net, &bare).unwrap();
    assert!(read(bin.path(), "fake-a-DEL.json")
        .get("prevResult")
        .is_none());
    assert!(client.check(&net, &bare).is_err());
}

#[test]
fn plugin_errors_and_missing_plugins_are_reported() {
    let (bin, cache) = setup();
    let client = Client::new(vec![bin.path().into()], cache.path());
    let rt = RuntimeConf {
        container_id: "c2".into(),
        netns: "/x".into(),
        ifname: "eth0".into(),
        ..Default::default()
    };
    let e = client
        .add(&list(json!([{"type": "fake-a"}, {"type": "fail"}])), &rt)
        .unwrap_err();
    match &e {
        cni::client::ClientError::Plugin { plugin, source, .. } => {
            assert_eq!(plugin, "fail");
            assert_eq!(source.code, 11);
            assert_eq!(source.msg, "busy");
        }
        other => panic!("{other}"),
    }
    let e = client
        .add(&list(json!([{"type": "nope"}])), &rt)
        .unwrap_err();
    assert!(
        e.to_string().contains("failed to find plugin \"nope\""),
        "{e}"
    );
}

#[test]
fn gc_dels_cached_attachments_that_are_not_valid() {
    let (bin, cache) = setup();
    let client = Client::new(vec![bin.path().into()], cache.path());
    let net = list(json!([{"type": "fake-a"}]));
    for id in ["k1", "s1", "s2"] {
        client
            .add(
                &net,
                &RuntimeConf {
                    container_id: id.into(),
                    netns: "/x".into(),
                    ifname: "eth0".into(),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    let keep = cni::types::Attachment {
        container_id: "k1".into(),
        ifname: "eth0".into(),
    };
    client.gc(&net, &[keep]).unwrap();
    let log = fs::read_to_string(bin.path().join("log")).unwrap();
    let mut dels: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("DEL"))
        .map(|l| l.split(' ').nth(2).unwrap())
        .collect();
    dels.sort();
    assert_eq!(dels, ["s1", "s2"]);
    assert_eq!(client.cached_attachments(&net).len(), 1);
}
