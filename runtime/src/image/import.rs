//! Importing image tarballs: OCI image layouts (`oci-archive`) and `docker save` archives.

use super::media::{
    self, sniff_compression, Compression, Descriptor, Index, Manifest, ManifestKind,
};
use super::reference::Reference;
use super::store::{parse_config, sha256_hex, ImageStore, Record, RecordLayer};
use super::unpack::sanitize;
use super::{Error, Image, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use tracing::info;

pub(crate) fn import(store: &ImageStore, tarball: &Path) -> Result<Vec<Image>> {
    let ierr = |detail: String| Error::Import {
        path: tarball.to_path_buf(),
        detail,
    };
    let _lock = store.lock(false)?;
    let dir = store.tmp_path("import");
    let result = (|| {
        let links = extract(tarball, &dir).map_err(ierr)?;
        let stem = tarball
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let arch = Archive {
            dir: &dir,
            links,
            stem: clean_name(&stem),
        };
        if dir.join("index.json").is_file() {
            oci_layout(store, &arch, &ierr)
        } else if dir.join("manifest.json").is_file() {
            docker_archive(store, &arch, &ierr)
        } else {
            Err(ierr(
                "neither an OCI image layout (index.json) nor a docker archive (manifest.json)"
                    .into(),
            ))
        }
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

struct Archive<'a> {
    dir: &'a Path,
    /// Symlinks in the tarball (docker archives link `<id>/layer.tar` to `<digest>.tar`).
    links: HashMap<PathBuf, PathBuf>,
    stem: String,
}

impl Archive<'_> {
    /// The extracted file for an archive path, following archive symlinks a few times.
    fn file(&self, name: &str) -> Result<PathBuf, String> {
        let mut rel = sanitize(Path::new(name))?;
        for _ in 0..8 {
            match self.links.get(&rel) {
                Some(t) => rel = t.clone(),
                None => break,
            }
        }
        let p = self.dir.join(&rel);
        if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{name} is missing from the archive"))
        }
    }

    /// Name for an image without a usable tag: pinned by digest under `localhost/`.
    fn untagged(&self, digest: &str) -> String {
        format!("localhost/{}@{digest}", self.stem)
    }
}

/// Extracts regular files (sanitised names, no links followed) and returns the symlink map.
fn extract(tarball: &Path, dir: &Path) -> Result<HashMap<PathBuf, PathBuf>, String> {
    let f = File::open(tarball).map_err(|e| e.to_string())?;
    let mut ar = tar::Archive::new(io::BufReader::new(f));
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut links = HashMap::new();
    for entry in ar.entries().map_err(|e| format!("read tar: {e}"))? {
        let mut entry = entry.map_err(|e| format!("read tar: {e}"))?;
        let rel = sanitize(&entry.path().map_err(|e| e.to_string())?)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let dest = dir.join(&rel);
                if let Some(p) = dest.parent() {
                    fs::create_dir_all(p).map_err(|e| format!("{}: {e}", rel.display()))?;
                }
                let mut out = File::create(&dest).map_err(|e| format!("{}: {e}", rel.display()))?;
                io::copy(&mut entry, &mut out).map_err(|e| format!("{}: {e}", rel.display()))?;
            }
            tar::EntryType::Symlink => {
                if let Some(target) = entry.link_name().map_err(|e| e.to_string())? {
                    let base = rel.parent().unwrap_or(Path::new(""));
                    if let Ok(t) = sanitize(&base.join(target)) {
                        links.insert(rel, t);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(links)
}

/// Lowercase `[a-z0-9-]` name for references made from file names.
fn clean_name(s: &str) -> String {
    let n: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let n = n.trim_matches('-').to_string();
    if n.is_empty() {
        "import".into()
    } else {
        n
    }
}

/// Reads an archive blob, checks its digest and moves it into the store.
fn adopt_blob(store: &ImageStore, arch: &Archive, digest: &str) -> Result<Vec<u8>, String> {
    let hex = super::store::digest_hex(digest)?;
    let src = arch.file(&format!("blobs/sha256/{hex}"))?;
    let data = fs::read(&src).map_err(|e| e.to_string())?;
    store.put_blob(digest, &data)?;
    Ok(data)
}

/// Streams a (possibly large) layer file into the store under its sha256.
fn adopt_layer_file(store: &ImageStore, src: &Path) -> Result<(String, u64), String> {
    let mut f = File::open(src).map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    let dest = store.blob_path(&digest)?;
    if !dest.exists() {
        // Same filesystem (the extract dir is in the store's tmp/): an atomic rename.
        fs::rename(src, &dest).map_err(|e| e.to_string())?;
    }
    Ok((digest, size))
}

fn oci_layout(
    store: &ImageStore,
    arch: &Archive,
    ierr: &dyn Fn(String) -> Error,
) -> Result<Vec<Image>> {
    let index: Index = serde_json::from_slice(
        &fs::read(arch.dir.join("index.json")).map_err(|e| ierr(e.to_string()))?,
    )
    .map_err(|e| ierr(format!("index.json: {e}")))?;
    let mut images = Vec::new();
    for desc in &index.manifests {
        let body = adopt_blob(store, arch, &desc.digest).map_err(ierr)?;
        let top = desc.digest.clone();
        let (manifest_digest, body) =
            match ManifestKind::detect(Some(desc.media_type.as_str()), &body) {
                Some(ManifestKind::Index) => {
                    let inner: Index =
                        serde_json::from_slice(&body).map_err(|e| ierr(e.to_string()))?;
                    let pick = inner.pick(media::host_arch()).ok_or_else(|| {
                        ierr(format!("{top}: no linux/{} image", media::host_arch()))
                    })?;
                    let d = pick.digest.clone();
                    let b = adopt_blob(store, arch, &d).map_err(ierr)?;
                    (d, b)
                }
                Some(ManifestKind::Image) => (top.clone(), body),
                None => continue, // not an image (an artifact, a signature): skip it
            };
        let manifest: Manifest = serde_json::from_slice(&body)
            .map_err(|e| ierr(format!("manifest {manifest_digest}: {e}")))?;
        let cfg = adopt_blob(store, arch, &manifest.config.digest).map_err(ierr)?;
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let comp = media::layer_compression(&l.media_type).ok_or_else(|| {
                ierr(format!(
                    "layer {} has unsupported type {}",
                    l.digest, l.media_type
                ))
            })?;
            adopt_blob_file(store, arch, &l.digest).map_err(ierr)?;
            layers.push((l.clone(), Some(comp)));
        }
        let annotations = desc.annotations.clone().unwrap_or_default();
        let name = annotations
            .get("io.containerd.image.name")
            .or_else(|| annotations.get("org.opencontainers.image.ref.name"));
        let reference = match name {
            // A full reference, or `name:tag`.
            Some(n) if n.contains([':', '/', '@']) => n.clone(),
            // Just a tag (what the OCI layout spec shows): qualify it with the file name.
            Some(tag) => format!("localhost/{}:{tag}", arch.stem),
            None => arch.untagged(&top),
        };
        images.push(finish(
            store,
            &reference,
            &top,
            &manifest_digest,
            &manifest.config.digest,
            &cfg,
            layers,
            ierr,
        )?);
    }
    if images.is_empty() {
        return Err(ierr("no images in index.json".into()));
    }
    Ok(images)
}

/// Verifies a layer blob from the archive by streaming it and moves it into the store.
fn adopt_blob_file(store: &ImageStore, arch: &Archive, digest: &str) -> Result<(), String> {
    let hex = super::store::digest_hex(digest)?;
    if store.blob_path(digest)?.exists() {
        return Ok(());
    }
    let src = arch.file(&format!("blobs/sha256/{hex}"))?;
    let (got, _) = adopt_layer_file(store, &src)?;
    if got != digest {
        let _ = fs::remove_file(store.blob_path(&got)?);
        return Err(format!("digest mismatch: expected {digest}, got {got}"));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn docker_archive(
    store: &ImageStore,
    arch: &Archive,
    ierr: &dyn Fn(String) -> Error,
) -> Result<Vec<Image>> {
    let entries: Vec<DockerEntry> = serde_json::from_slice(
        &fs::read(arch.dir.join("manifest.json")).map_err(|e| ierr(e.to_string()))?,
    )
    .map_err(|e| ierr(format!("manifest.json: {e}")))?;
    let mut images = Vec::new();
    let mut adopted: HashMap<PathBuf, (String, u64, Compression)> = HashMap::new();
    for e in entries {
        let cfg = fs::read(arch.file(&e.config).map_err(ierr)?).map_err(|e| ierr(e.to_string()))?;
        let cfg_digest = format!("sha256:{}", sha256_hex(&cfg));
        store.put_blob(&cfg_digest, &cfg).map_err(ierr)?;
        let mut layers = Vec::new();
        for name in &e.layers {
            let path = arch.file(name).map_err(ierr)?;
            // The same file may be listed by several images or be linked: adopt it once
            // (adopting moves it into the store).
            let (digest, size, comp) = match adopted.get(&path) {
                Some(x) => x.clone(),
                None => {
                    let mut head = [0u8; 8];
                    let n = File::open(&path)
                        .and_then(|mut f| f.read(&mut head))
                        .map_err(|e| ierr(e.to_string()))?;
                    let comp = sniff_compression(&head[..n]);
                    let (digest, size) = adopt_layer_file(store, &path).map_err(ierr)?;
                    adopted.insert(path.clone(), (digest.clone(), size, comp));
                    (digest, size, comp)
                }
            };
            let media_type = match comp {
                Compression::None => media::OCI_LAYER_TAR.to_string(),
                Compression::Gzip => format!("{}+gzip", media::OCI_LAYER_TAR),
                Compression::Zstd => format!("{}+zstd", media::OCI_LAYER_TAR),
            };
            layers.push((
                Descriptor {
                    media_type,
                    digest,
                    size,
                    platform: None,
                    annotations: None,
                },
                Some(comp),
            ));
        }
        // docker save has no manifest; synthesise the OCI one a registry push would create.
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: media::OCI_CONFIG.into(),
                digest: cfg_digest.clone(),
                size: cfg.len() as u64,
                platform: None,
                annotations: None,
            },
            layers: layers.iter().map(|(d, _)| d.clone()).collect(),
        };
        let body = serde_json::to_vec(&manifest).expect("manifest serialises");
        let digest = format!("sha256:{}", sha256_hex(&body));
        store.put_blob(&digest, &body).map_err(ierr)?;
        let tags = e.repo_tags.unwrap_or_default();
        let refs = if tags.is_empty() {
            vec![arch.untagged(&digest)]
        } else {
            tags
        };
        for r in refs {
            images.push(finish(
                store,
                &r,
                &digest,
                &digest,
                &cfg_digest,
                &cfg,
                layers.clone(),
                ierr,
            )?);
        }
    }
    if images.is_empty() {
        return Err(ierr("manifest.json lists no images".into()));
    }
    Ok(images)
}

/// Common tail: check the config, unpack layers, write the record.
#[allow(clippy::too_many_arguments)]
fn finish(
    store: &ImageStore,
    reference: &str,
    digest: &str,
    manifest_digest: &str,
    config_digest: &str,
    raw_config: &[u8],
    layers: Vec<(Descriptor, Option<Compression>)>,
    ierr: &dyn Fn(String) -> Error,
) -> Result<Image> {
    let name = Reference::parse(reference)
        .map_err(|detail| Error::InvalidReference {
            reference: reference.to_string(),
            detail,
        })?
        .to_string();
    let config = parse_config(raw_config).map_err(|detail| Error::Inspect {
        reference: name.clone(),
        digest: config_digest.to_string(),
        detail,
    })?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(ierr(format!(
            "{name}: {} layers but config lists {} diff ids",
            layers.len(),
            diff_ids.len()
        )));
    }
    let mut rec_layers = Vec::new();
    for ((desc, comp), diff_id) in layers.into_iter().zip(diff_ids) {
        let rl = RecordLayer {
            digest: desc.digest,
            diff_id: diff_id.clone(),
            media_type: desc.media_type,
            size: desc.size,
        };
        store.ensure_snapshot(&rl, comp)?;
        rec_layers.push(rl);
    }
    let record = Record {
        reference: name.clone(),
        digest: digest.to_string(),
        manifest_digest: manifest_digest.to_string(),
        config_digest: config_digest.to_string(),
        layers: rec_layers,
    };
    store.write_record(&record)?;
    info!(reference = %name, %digest, "imported image");
    store.image_from_record(record)
}
