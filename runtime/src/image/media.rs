//! Media types of manifests and layers, OCI and Docker, and the manifest JSON shapes we read.
//!
//! Our own serde structs rather than oci-spec's: Docker schema 2 documents use other media types
//! and we only need the fields both share.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What we ask registries for, best first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// What a fetched manifest document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// A single-platform image manifest.
    Image,
    /// An index / manifest list pointing at per-platform manifests.
    Index,
}

impl ManifestKind {
    /// Classifies by media type; falls back to the document's shape (OCI makes `mediaType`
    /// optional in the body, and some registries send a generic Content-Type).
    pub fn detect(media_type: Option<&str>, body: &[u8]) -> Option<ManifestKind> {
        match media_type.map(|m| m.split(';').next().unwrap_or("").trim()) {
            Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST) => Some(ManifestKind::Image),
            Some(OCI_INDEX) | Some(DOCKER_LIST) => Some(ManifestKind::Index),
            _ => {
                let v: serde_json::Value = serde_json::from_slice(body).ok()?;
                match v.get("mediaType").and_then(|m| m.as_str()) {
                    Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST) => Some(ManifestKind::Image),
                    Some(OCI_INDEX) | Some(DOCKER_LIST) => Some(ManifestKind::Index),
                    Some(_) => None,
                    None if v.get("manifests").is_some() => Some(ManifestKind::Index),
                    None if v.get("config").is_some() && v.get("layers").is_some() => {
                        Some(ManifestKind::Image)
                    }
                    None => None,
                }
            }
        }
    }
}

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression a layer media type declares; `None` for media types that are not layers we
/// can unpack (encrypted layers, artifacts, foreign types we do not know).
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// Compression by magic bytes: docker-archive layers carry no media type.
pub fn sniff_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<HashMap<String, String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

/// The architecture name Go (and so OCI) uses for this machine.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Index {
    /// The linux entry for this machine's architecture (amd64 on the nodes we target).
    pub fn pick(&self, arch: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_kinds() {
        assert_eq!(
            ManifestKind::detect(Some(DOCKER_MANIFEST), b""),
            Some(ManifestKind::Image)
        );
        assert_eq!(
            ManifestKind::detect(Some("application/vnd.oci.image.index.v1+json; x=y"), b""),
            Some(ManifestKind::Index)
        );
        assert_eq!(
            ManifestKind::detect(Some(DOCKER_LIST), b""),
            Some(ManifestKind::Index)
        );
        assert_eq!(
            ManifestKind::detect(Some("application/json"), br#"{"manifests":[]}"#),
            Some(ManifestKind::Index)
        );
        assert_eq!(
            ManifestKind::detect(None, br#"{"config":{},"layers":[]}"#),
            Some(ManifestKind::Image)
        );
        assert_eq!(
            ManifestKind::detect(
                None,
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#
            ),
            None
        );
    }

    #[test]
    fn layer_types() {
        use Compression::*;
        assert_eq!(layer_compression(OCI_LAYER_TAR), Some(None));
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Gzip)
        );
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Gzip)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Zstd)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+encrypted"),
            Option::None
        );
        assert_eq!(sniff_compression(&[0x1f, 0x8b, 8]), Gzip);
        assert_eq!(sniff_compression(&[0x28, 0xb5, 0x2f, 0xfd]), Zstd);
        assert_eq!(sniff_compression(b"bin/"), None);
    }

    #[test]
    fn index_picks_linux_amd64() {
        let idx: Index = serde_json::from_str(
            r#"{"manifests":[
              {"mediaType":"m","digest":"sha256:a","size":1,"platform":{"architecture":"arm64","os":"linux"}},
              {"mediaType":"m","digest":"sha256:b","size":1,"platform":{"architecture":"amd64","os":"windows"}},
              {"mediaType":"m","digest":"sha256:c","size":1,"platform":{"architecture":"amd64","os":"linux"}}]}"#,
        )
        .unwrap();
        assert_eq!(idx.pick("amd64").unwrap().digest, "sha256:c");
        assert!(idx.pick("s390x").is_none());
    }
}
