//! Where the test bed (`tests/testbed/up`) serves its registries: 127.0.0.1:5000 and :5001 when
//! those ports were free, other loopback ports otherwise, recorded in its state directory.

use std::path::PathBuf;
use std::sync::OnceLock;

fn state_dir() -> PathBuf {
    std::env::var_os("OXLET_TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/oxlet-testbed"))
}

fn address(var: &str, file: &str) -> String {
    if let Ok(v) = std::env::var(var) {
        return v;
    }
    let path = state_dir().join(file);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => panic!(
            "the test bed is not up: {} is missing (run tests/testbed/up, or set {var})",
            path.display()
        ),
    }
}

/// `host:port` of the open registry.
pub fn registry() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| address("OXLET_TEST_REGISTRY", "registry"))
}

/// `host:port` of the registry that asks for basic auth (user `oxlet`, password `oxlet-secret`).
pub fn auth_registry() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| address("OXLET_TEST_AUTH_REGISTRY", "auth-registry"))
}

/// A reference in the open registry, e.g. `image("test/busybox:latest")`.
pub fn image(repository_and_tag: &str) -> String {
    format!("{}/{repository_and_tag}", registry())
}

/// `test/busybox:latest` in the open registry: the image most tests run.
pub fn busybox() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| image("test/busybox:latest"))
}

/// `test/layers:latest` in the open registry: busybox with more layers (whiteouts, links, modes).
pub fn layers() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| image("test/layers:latest"))
}
