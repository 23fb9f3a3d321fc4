//! Image pulls, store, snapshots and rootfs mounts against the test bed registries
//! (`tests/testbed/up`: an open registry and one with basic auth). Runs as root.
//!
//! Every test has its own store in a temp dir and unmounts what it mounted in `Drop`, so a
//! failing assertion leaves nothing mounted behind.

use runtime::image::{
    mount_rootfs, unmount_rootfs, Credentials, DockerConfig, Error, Image, ImageStore, PullOptions,
    PullPolicy,
};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use oxlet_tests::testbed::{auth_registry, busybox, image, registry};

struct Env {
    tmp: tempfile::TempDir,
    store: ImageStore,
    containers: Vec<PathBuf>,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("oxlet-image-test")
            .tempdir()
            .unwrap();
        let store = ImageStore::open(tmp.path().join("store")).unwrap();
        Env {
            tmp,
            store,
            containers: Vec::new(),
        }
    }

    fn mount(&mut self, image: &Image, name: &str) -> PathBuf {
        let dir = self.tmp.path().join("containers").join(name);
        self.containers.push(dir.clone());
        mount_rootfs(image, &dir).unwrap()
    }

    fn count(&self, sub: &str) -> usize {
        fs::read_dir(self.store.root().join(sub)).unwrap().count()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &self.containers {
            if let Err(e) = unmount_rootfs(c) {
                eprintln!("cleanup {}: {e}", c.display());
            }
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn pull(env: &Env, reference: &str) -> Result<Image, Error> {
    rt().block_on(env.store.pull(reference, &PullOptions::default()))
}

fn sha256_file(p: &Path) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(fs::read(p).unwrap()))
    )
}

fn blob(env: &Env, digest: &str) -> PathBuf {
    env.store
        .root()
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn getxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let cp = CString::new(p.as_os_str().as_bytes()).unwrap();
    let cn = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and buffer length.
    let n = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

#[test]
fn pull_busybox_verifies_digests_and_mounts_writable_rootfs() {
    let mut env = Env::new();
    let img = pull(&env, &image("test/busybox")).unwrap();
    assert_eq!(img.reference, image("test/busybox:latest"));
    assert!(img.digest.starts_with("sha256:") && img.digest.len() == 71);
    assert_eq!(img.digest, img.manifest_digest);
    // Every stored blob hashes to its name: manifest, config and the layer.
    assert_eq!(sha256_file(&blob(&env, &img.digest)), img.digest);
    assert_eq!(
        sha256_file(&blob(&env, &img.config_digest)),
        img.config_digest
    );
    assert_eq!(img.layers.len(), 1);
    assert_eq!(
        sha256_file(&blob(&env, &img.layers[0].digest)),
        img.layers[0].digest
    );
    assert_eq!(img.config.architecture().to_string(), "amd64");
    let cmd = img.config.config().as_ref().unwrap().cmd().clone().unwrap();
    assert_eq!(cmd, vec!["sh".to_string()]);

    let rootfs = env.mount(&img, "c1");
    let bb = fs::metadata(rootfs.join("bin/busybox")).unwrap();
    assert!(bb.is_file() && bb.permissions().mode() & 0o111 != 0);
    assert_eq!(
        fs::read_link(rootfs.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert!(fs::read_to_string(rootfs.join("etc/passwd"))
        .unwrap()
        .starts_with("root:x:0:0"));
    // Writes go to the container's upper dir, never into the shared snapshot.
    fs::write(rootfs.join("tmp/hello"), "hi").unwrap();
    let container = rootfs.parent().unwrap().to_path_buf();
    assert_eq!(fs::read(container.join("upper/tmp/hello")).unwrap(), b"hi");
    assert!(!img.layers[0].snapshot.join("tmp/hello").exists());
    // Mounting again is idempotent; unmounting twice is fine.
    assert_eq!(mount_rootfs(&img, &container).unwrap(), rootfs);
    unmount_rootfs(&container).unwrap();
    assert!(!rootfs.exists());
    unmount_rootfs(&container).unwrap();
    unmount_rootfs(&env.tmp.path().join("never-existed")).unwrap();
}

#[test]
fn layers_whiteouts_opaque_links_modes_owners_xattrs() {
    let mut env = Env::new();
    let img = pull(&env, &image("test/layers:latest")).unwrap();
    assert_eq!(img.layers.len(), 3);
    let r = env.mount(&img, "layers");
    let data = r.join("data");
    // Whiteout: removed in layer 2.
    assert!(fs::symlink_metadata(data.join("removed")).is_err());
    assert!(!fs::read_dir(&data).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".wh.")));
    assert_eq!(fs::read(data.join("added")).unwrap(), b"added\n");
    // Opaque dir: only what layer 2 put there.
    let mut names: Vec<String> = fs::read_dir(r.join("opaque"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["new".to_string()]);
    // Owner and mode.
    let kept = fs::metadata(data.join("kept")).unwrap();
    assert_eq!((kept.uid(), kept.gid()), (1000, 1000));
    assert_eq!(kept.permissions().mode() & 0o7777, 0o600);
    assert_eq!(fs::read(data.join("kept")).unwrap(), b"kept\n");
    let suid = fs::metadata(data.join("setuid")).unwrap();
    assert_eq!(suid.permissions().mode() & 0o7777, 0o4755);
    // Hard link shares the inode; symlink keeps its absolute target.
    let a = fs::metadata(data.join("original")).unwrap();
    let b = fs::metadata(data.join("hardlink")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    assert_eq!(
        fs::read_link(data.join("symlink")).unwrap(),
        Path::new("/data/kept")
    );
    // xattr from the PAX header.
    assert_eq!(
        getxattr(&data.join("xattr"), "user.oxlet").as_deref(),
        Some(&b"yes"[..])
    );
    assert_eq!(
        img.config
            .config()
            .as_ref()
            .unwrap()
            .working_dir()
            .as_deref(),
        Some("/data")
    );
    // Snapshots store whiteouts the overlayfs way.
    let top = &img.layers[2].snapshot;
    let wh = fs::symlink_metadata(top.join("data/removed")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &wh.file_type()
    ));
    assert_eq!(wh.rdev(), 0);
    assert_eq!(
        getxattr(&top.join("opaque"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
}

#[test]
fn zstd_and_docker_media_types_share_the_busybox_snapshot() {
    let mut env = Env::new();
    let gz = pull(&env, &image("test/busybox:latest")).unwrap();
    let zs = pull(&env, &image("test/busybox:zstd")).unwrap();
    let dk = pull(&env, &image("test/busybox:docker")).unwrap();
    assert_eq!(
        zs.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    assert_eq!(
        dk.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_ne!(zs.layers[0].digest, gz.layers[0].digest);
    // Same uncompressed tar: one snapshot for all three.
    assert_eq!(zs.layers[0].diff_id, gz.layers[0].diff_id);
    assert_eq!(dk.layers[0].snapshot, gz.layers[0].snapshot);
    assert_eq!(env.count("snapshots"), 1);
    // Docker manifest has its own digest but the same layer blob as the OCI one.
    assert_ne!(dk.digest, gz.digest);
    assert_eq!(dk.layers[0].digest, gz.layers[0].digest);
    for (img, name) in [(&zs, "z"), (&dk, "d")] {
        let r = env.mount(img, name);
        assert!(r.join("bin/busybox").is_file());
    }
}

#[test]
fn multiarch_index_picks_linux_amd64() {
    let env = Env::new();
    let plain = pull(&env, &image("test/busybox:latest")).unwrap();
    let multi = pull(&env, &image("test/multiarch:latest")).unwrap();
    assert_eq!(multi.config.architecture().to_string(), "amd64");
    assert_eq!(multi.manifest_digest, plain.digest);
    assert_ne!(multi.digest, multi.manifest_digest);
    assert_eq!(sha256_file(&blob(&env, &multi.digest)), multi.digest);
    assert_eq!(multi.layers, plain.layers);
    // Pull by the index digest gives the same image.
    let by_digest = pull(
        &env,
        &format!("{}/test/multiarch@{}", registry(), multi.digest),
    )
    .unwrap();
    assert_eq!(by_digest.manifest_digest, plain.digest);
    assert_eq!(
        by_digest.reference,
        format!("{}/test/multiarch@{}", registry(), multi.digest)
    );
}

#[test]
fn auth_registry_needs_credentials() {
    let env = Env::new();
    let reference = format!("{}/test/busybox:latest", auth_registry());
    let err = pull(&env, &reference).unwrap_err();
    assert_eq!(err.reason(), "ErrImagePull");
    assert!(err.to_string().contains("401"), "{err}");

    let json = format!(
        r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#,
        auth_registry(),
        "b3hsZXQ6b3hsZXQtc2VjcmV0" // base64("oxlet:oxlet-secret")
    );
    let opts = PullOptions {
        auth: DockerConfig::from_json(json.as_bytes()).unwrap(),
        ..Default::default()
    };
    let img = rt().block_on(env.store.pull(&reference, &opts)).unwrap();
    assert!(img.layers[0].snapshot.join("bin/busybox").is_file());

    let mut wrong = DockerConfig::default();
    wrong.insert(
        auth_registry(),
        Credentials {
            username: "oxlet".into(),
            password: "wrong".into(),
        },
    );
    let opts = PullOptions {
        auth: wrong,
        ..Default::default()
    };
    let err = rt()
        .block_on(env.store.pull(&reference, &opts))
        .unwrap_err();
    assert_eq!(err.reason(), "ErrImagePull");
    assert!(err.to_string().contains("401"), "{err}");
}

#[test]
fn errors_carry_kubelet_reasons() {
    let env = Env::new();
    let rt = rt();
    let opts = PullOptions::default();
    let ensure = |r: &str, p: PullPolicy| rt.block_on(env.store.ensure(r, p, &opts));

    let e = ensure("UPPER/case:bad", PullPolicy::IfNotPresent).unwrap_err();
    assert_eq!(e.reason(), "InvalidImageName");

    let e = ensure(&image("test/nope:latest"), PullPolicy::Always).unwrap_err();
    assert_eq!(e.reason(), "ErrImagePull");
    assert_eq!(
        e.to_string(),
        format!(
            "pull {}/test/nope:latest: manifest unknown (404)",
            registry()
        )
    );

    let e = ensure("127.0.0.1:1/test/busybox:latest", PullPolicy::IfNotPresent).unwrap_err();
    assert_eq!(e.reason(), "ErrImagePull");
    assert!(e.to_string().contains("cannot connect"), "{e}");

    let e = ensure(&image("test/busybox:latest"), PullPolicy::Never).unwrap_err();
    assert_eq!(e.reason(), "ErrImageNeverPull");

    let e = ensure(&image("test/corrupt:latest"), PullPolicy::IfNotPresent).unwrap_err();
    assert_eq!(e.reason(), "ImageInspectError");
    assert!(env.store.list().unwrap().is_empty());

    // A pinned digest the registry does not have is a pull error too.
    let e = ensure(
        &format!("{}/test/busybox@sha256:{}", registry(), "0".repeat(64)),
        PullPolicy::IfNotPresent,
    )
    .unwrap_err();
    assert_eq!(e.reason(), "ErrImagePull");
}

#[test]
fn policies_and_records_survive_reopen() {
    let env = Env::new();
    let rt = rt();
    let opts = PullOptions::default();
    let reference = image("test/entrypoint");
    let pulled = rt
        .block_on(
            env.store
                .ensure(&reference, PullPolicy::IfNotPresent, &opts),
        )
        .unwrap();
    let cfg = pulled.config.config().as_ref().unwrap();
    assert_eq!(
        cfg.entrypoint().as_deref(),
        Some(&["echo".to_string(), "entry".to_string()][..])
    );
    assert_eq!(cfg.user().as_deref(), Some("1000:1000"));

    // A new handle (as after a restart) sees the record; Never now succeeds without a registry.
    let again = ImageStore::open(env.store.root()).unwrap();
    let got = rt
        .block_on(again.ensure(&reference, PullPolicy::Never, &opts))
        .unwrap();
    assert_eq!(got.digest, pulled.digest);
    assert_eq!(got.reference, image("test/entrypoint:latest"));
    let listed = again.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, pulled.size);
    assert!(again.get(&image("test/other")).unwrap().is_none());
    // Always re-contacts the registry and gives the same digest.
    let always = rt
        .block_on(again.ensure(&reference, PullPolicy::Always, &opts))
        .unwrap();
    assert_eq!(always.digest, pulled.digest);
}

#[test]
fn shared_layers_stored_once_and_remove_collects_garbage() {
    let mut env = Env::new();
    let bb = pull(&env, &image("test/busybox:latest")).unwrap();
    let layers = pull(&env, &image("test/layers:latest")).unwrap();
    assert_eq!(layers.layers[0], bb.layers[0]);
    // busybox: manifest, config, layer; layers: manifest, config, 2 more layers.
    assert_eq!(env.count("blobs/sha256"), 7);
    assert_eq!(env.count("snapshots"), 3);

    // A mounted image keeps its content even after its tag is removed.
    let rootfs = env.mount(&layers, "user");
    env.store.remove(&image("test/layers:latest")).unwrap();
    assert_eq!(env.count("blobs/sha256"), 7);
    assert!(rootfs.join("data/added").is_file());
    let err = env.store.remove(&image("test/layers:latest")).unwrap_err();
    assert_eq!(err.reason(), "ImageNotFound");

    unmount_rootfs(rootfs.parent().unwrap()).unwrap();
    env.store.gc().unwrap();
    assert_eq!(env.count("blobs/sha256"), 3);
    assert_eq!(env.count("snapshots"), 1);
    assert!(bb.layers[0].snapshot.join("bin/busybox").is_file());
    let r = env.mount(&bb, "still-works");
    assert!(r.join("bin/busybox").is_file());
    unmount_rootfs(r.parent().unwrap()).unwrap();

    env.store.remove(&image("test/busybox")).unwrap();
    assert_eq!(env.count("blobs/sha256"), 0);
    assert_eq!(env.count("snapshots"), 0);
    assert!(env.store.list().unwrap().is_empty());
}

#[test]
fn concurrent_pulls_of_one_image_are_safe() {
    let env = Env::new();
    let rt = rt();
    let opts = PullOptions::default();
    let reference = image("test/layers:latest");
    let (a, b) = rt.block_on(async {
        tokio::join!(
            env.store.pull(&reference, &opts),
            env.store.pull(&reference, &opts)
        )
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.digest, b.digest);
    assert_eq!(env.count("snapshots"), 3);
    assert_eq!(env.count("tmp"), 0);
    assert!(a.layers[2].snapshot.join("opaque/new").is_file());
}

fn skopeo(dest: &str) {
    let st = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{}", image("test/layers:latest")))
        .arg(dest)
        .status()
        .expect("skopeo");
    assert!(st.success(), "skopeo copy to {dest}");
}

#[test]
fn import_oci_and_docker_archives() {
    let mut env = Env::new();
    let dir = env.tmp.path().to_path_buf();
    let rt = rt();

    let oci = dir.join("layers-oci.tar");
    skopeo(&format!(
        "oci-archive:{}:{}",
        oci.display(),
        image("test/imported:v1")
    ));
    let imgs = rt.block_on(env.store.import(&oci)).unwrap();
    assert_eq!(imgs.len(), 1);
    assert_eq!(imgs[0].reference, image("test/imported:v1"));
    assert_eq!(imgs[0].layers.len(), 3);
    let r = env.mount(&imgs[0], "oci");
    assert!(r.join("opaque/new").is_file());
    assert!(!r.join("data/removed").exists());

    // Untagged OCI archive: named after the file, pinned by digest.
    let untagged = dir.join("Plain.tar");
    skopeo(&format!("oci-archive:{}", untagged.display()));
    let imgs = rt.block_on(env.store.import(&untagged)).unwrap();
    assert_eq!(
        imgs[0].reference,
        format!("localhost/plain@{}", imgs[0].digest)
    );

    let docker = dir.join("layers-docker.tar");
    skopeo(&format!(
        "docker-archive:{}:example.com/team/app:2.0",
        docker.display()
    ));
    let imgs = rt.block_on(env.store.import(&docker)).unwrap();
    assert_eq!(imgs.len(), 1);
    assert_eq!(imgs[0].reference, "example.com/team/app:2.0");
    let r = env.mount(&imgs[0], "docker");
    let a = fs::metadata(r.join("data/original")).unwrap();
    assert_eq!(
        a.ino(),
        fs::metadata(r.join("data/hardlink")).unwrap().ino()
    );
    assert_eq!(fs::metadata(r.join("data/kept")).unwrap().uid(), 1000);
    // Both formats unpacked to the same snapshots (same diff ids).
    assert_eq!(env.count("snapshots"), 3);
    assert_eq!(env.store.list().unwrap().len(), 3);

    let bad = dir.join("bad.tar");
    fs::write(&bad, b"not a tarball at all").unwrap();
    let e = rt.block_on(env.store.import(&bad)).unwrap_err();
    assert_eq!(e.reason(), "ErrImagePull");
}

/// A tiny registry speaking the token flow (the test bed's registries only do Basic auth):
/// every /v2/ request needs `Bearer good-token`, which /token hands out for oxlet:pw.
/// `test/bad` serves a layer whose bytes do not match its digest.
struct FakeRegistry {
    addr: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn fake_registry() -> FakeRegistry {
    use base64::Engine;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};

    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(6);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    layer.append_data(&mut h, "hello", &b"hello\n"[..]).unwrap();
    let layer = layer.into_inner().unwrap();
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/hello"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        digest(&layer)
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        digest(config.as_bytes()),
        config.len(),
        digest(&layer),
        layer.len()
    );
    let mut routes: HashMap<String, (String, Vec<u8>)> = HashMap::new();
    let oci = "application/vnd.oci.image.manifest.v1+json".to_string();
    for repo in ["test/tok", "test/bad"] {
        routes.insert(
            format!("/v2/{repo}/manifests/v1"),
            (oci.clone(), manifest.clone().into_bytes()),
        );
        routes.insert(
            format!("/v2/{repo}/blobs/{}", digest(config.as_bytes())),
            (
                "application/octet-stream".into(),
                config.clone().into_bytes(),
            ),
        );
    }
    routes.insert(
        format!("/v2/test/tok/blobs/{}", digest(&layer)),
        ("application/octet-stream".into(), layer.clone()),
    );
    let mut tampered = layer.clone();
    tampered[513] ^= 1; // inside the file data: same size, other bytes
    routes.insert(
        format!("/v2/test/bad/blobs/{}", digest(&layer)),
        ("application/octet-stream".into(), tampered),
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = requests.clone();
    let realm = format!("http://{addr}/token");
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("oxlet:pw")
    );
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut auth = String::new();
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        auth = v.trim().to_string();
                    }
                }
            }
            log.lock().unwrap().push(format!("{target} {auth}"));
            let (status, headers, body): (&str, String, Vec<u8>) = if target.starts_with("/token") {
                if auth == basic {
                    (
                        "200 OK",
                        "Content-Type: application/json\r\n".into(),
                        br#"{"token":"good-token"}"#.to_vec(),
                    )
                } else {
                    ("401 Unauthorized", String::new(), Vec::new())
                }
            } else if auth != "Bearer good-token" {
                (
                    "401 Unauthorized",
                    format!("WWW-Authenticate: Bearer realm=\"{realm}\",service=\"fake\",scope=\"repository:test/tok:pull\"\r\nContent-Type: application/json\r\n"),
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.to_vec(),
                )
            } else if let Some((ctype, body)) = routes.get(&target) {
                ("200 OK", format!("Content-Type: {ctype}\r\n"), body.clone())
            } else {
                ("404 Not Found", String::new(), Vec::new())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
    });
    FakeRegistry { addr, requests }
}

#[test]
fn bearer_token_flow_and_layer_digest_mismatch() {
    let mut env = Env::new();
    let fake = fake_registry();
    let rt = rt();
    let reference = format!("{}/test/tok:v1", fake.addr);

    let e = rt
        .block_on(env.store.pull(&reference, &PullOptions::default()))
        .unwrap_err();
    assert_eq!(e.reason(), "ErrImagePull");
    assert!(e.to_string().contains("401"), "{e}");

    let mut creds = DockerConfig::default();
    creds.insert(
        &fake.addr,
        Credentials {
            username: "oxlet".into(),
            password: "pw".into(),
        },
    );
    let opts = PullOptions {
        auth: creds,
        ..Default::default()
    };
    let img = rt.block_on(env.store.pull(&reference, &opts)).unwrap();
    let r = env.mount(&img, "tok");
    assert_eq!(fs::read(r.join("hello")).unwrap(), b"hello\n");
    let reqs = fake.requests.lock().unwrap().clone();
    assert!(
        reqs.iter()
            .any(|r| r
                .starts_with("/token?service=fake&scope=repository%3Atest%2Ftok%3Apull Basic ")),
        "{reqs:#?}"
    );
    assert!(reqs
        .iter()
        .any(|r| r.contains("/blobs/") && r.ends_with("Bearer good-token")));

    // The same layer digest with other bytes, into a fresh store (the first store already
    // holds the verified blob, so it would rightly not download it again).
    let fresh = Env::new();
    let e = rt
        .block_on(
            fresh
                .store
                .pull(&format!("{}/test/bad:v1", fake.addr), &opts),
        )
        .unwrap_err();
    assert_eq!(e.reason(), "ErrImagePull");
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    assert_eq!(fresh.count("tmp"), 0);
    assert_eq!(fresh.count("snapshots"), 0);
    assert!(fresh.store.list().unwrap().is_empty());
}

#[test]
fn repull_of_a_moved_tag_collects_the_old_content() {
    let env = Env::new();
    let rt = rt();
    // Plant test/layers' content under busybox's tag, as if the tag had moved since.
    let tarball = env.tmp.path().join("old.tar");
    skopeo(&format!(
        "docker-archive:{}:{}",
        tarball.display(),
        busybox()
    ));
    rt.block_on(env.store.import(&tarball)).unwrap();
    assert_eq!(env.count("snapshots"), 3);
    let img = pull(&env, &image("test/busybox:latest")).unwrap();
    assert_eq!(img.layers.len(), 1);
    assert_eq!(env.count("snapshots"), 1);
    assert_eq!(env.count("blobs/sha256"), 3);
}

#[test]
fn too_many_layers_for_one_overlay_mount_is_a_clear_error() {
    let mut env = Env::new();
    let mut img = pull(&env, &image("test/busybox:latest")).unwrap();
    let one = img.layers[0].clone();
    img.layers = vec![one; 200];
    let dir = env.tmp.path().join("containers/many");
    env.containers.push(dir.clone());
    let e = mount_rootfs(&img, &dir).unwrap_err();
    assert_eq!(e.reason(), "CreateContainerError");
    assert!(e.to_string().contains("200 layers"), "{e}");
    assert!(!dir.join(".oxlet-image.json").exists());
}

#[test]
fn image_gc_removes_unused_images_least_recently_used_first() {
    use runtime::image::gc::{GcError, ImageGc, Policy};
    let mut env = Env::new();
    let busybox = busybox();
    let (layers, docker) = (image("test/layers:latest"), image("test/busybox:docker"));
    let img = pull(&env, busybox).unwrap();
    pull(&env, &layers).unwrap();
    pull(&env, &docker).unwrap();
    env.mount(&img, "c1");
    let never = Policy {
        high_threshold_percent: 100,
        low_threshold_percent: 0,
        min_age: std::time::Duration::ZERO,
    };
    let mut gc = ImageGc::new(env.store.clone(), never).unwrap();
    // A first look sees `layers` in use (a pod starting with it); nothing is removed.
    let wanted: std::collections::HashSet<String> = [layers.clone()].into();
    assert!(gc.run(&wanted).unwrap().removed.is_empty());
    // Above the threshold now, with 0 % out of reach: every unused image goes, the one never
    // used first; the mounted one stays.
    gc.set_policy(Policy {
        high_threshold_percent: 1,
        ..never
    })
    .unwrap();
    match gc.run(&Default::default()) {
        Err(GcError::NotEnough { removed, .. }) => {
            assert_eq!(removed, vec![docker.clone(), layers.clone()])
        }
        other => panic!("expected a shortfall after removing both, got {other:?}"),
    }
    assert!(env.store.get(busybox).unwrap().is_some());
    assert!(env.store.get(&layers).unwrap().is_none());
    assert!(env.store.get(&docker).unwrap().is_none());
}
