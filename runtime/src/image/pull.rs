//! Pulling: resolve the reference, fetch and verify manifest, config and layers, unpack, record.

use super::media::{self, layer_compression, Index, Manifest, ManifestKind};
use super::reference::Reference;
use super::registry::Registry;
use super::store::{blocking, parse_config, sha256_hex, ImageStore, Record, RecordLayer};
use super::{Error, Image, Progress, PullOptions, Result};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::info;

/// How many layer blobs one pull fetches at once.
const PARALLEL_DOWNLOADS: usize = 3;

pub(crate) async fn pull(store: &ImageStore, r: Reference, opts: &PullOptions) -> Result<Image> {
    let name = r.to_string();
    let perr = |detail: String| Error::Pull {
        reference: name.clone(),
        detail,
    };
    // Shared lock for the whole pull: garbage collection (exclusive) must not delete blobs
    // or snapshots between our download and our record write.
    let lock_store = store.clone();
    let lock = blocking(move || lock_store.lock(false)).await?;
    info!(reference = %name, "pulling image");

    let mut reg = Registry::new(&r, opts).map_err(perr)?;
    let (body, ctype) = reg.manifest(r.manifest_ref()).await.map_err(perr)?;
    let top = format!("sha256:{}", sha256_hex(&body));
    if let Some(want) = &r.digest {
        if &top != want {
            return Err(perr(format!(
                "manifest digest mismatch: asked for {want}, registry sent {top}"
            )));
        }
    }
    store.put_blob(&top, &body).map_err(perr)?;

    let (manifest_digest, body) = match ManifestKind::detect(ctype.as_deref(), &body) {
        Some(ManifestKind::Image) => (top.clone(), body),
        Some(ManifestKind::Index) => {
            let index: Index =
                serde_json::from_slice(&body).map_err(|e| perr(format!("bad image index: {e}")))?;
            let arch = media::host_arch();
            let desc = index
                .pick(arch)
                .ok_or_else(|| perr(format!("no linux/{arch} image in the index")))?;
            let digest = desc.digest.clone();
            let (inner, ctype) = reg.manifest(&digest).await.map_err(perr)?;
            store.put_blob(&digest, &inner).map_err(perr)?;
            if ManifestKind::detect(ctype.as_deref(), &inner) != Some(ManifestKind::Image) {
                return Err(perr(format!(
                    "linux/{arch} entry {digest} is not an image manifest"
                )));
            }
            (digest, inner)
        }
        None => {
            return Err(perr(format!(
                "unsupported manifest type {}",
                ctype.as_deref().unwrap_or("(none)")
            )))
        }
    };
    let manifest: Manifest =
        serde_json::from_slice(&body).map_err(|e| perr(format!("bad image manifest: {e}")))?;

    // Config: small, fetched into memory, verified, then parsed (unparsable -> inspect error).
    let cfg_digest = manifest.config.digest.clone();
    let raw_cfg = match store.read_blob(&cfg_digest) {
        Ok(raw) => raw,
        Err(_) => {
            let raw = reg.small_blob(&cfg_digest).await.map_err(perr)?;
            store
                .put_blob(&cfg_digest, &raw)
                .map_err(|e| perr(format!("config: {e}")))?;
            raw
        }
    };
    let config = parse_config(&raw_cfg).map_err(|detail| Error::Inspect {
        reference: name.clone(),
        digest: cfg_digest.clone(),
        detail,
    })?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers.len() {
        return Err(perr(format!(
            "manifest has {} layers but config lists {} diff ids",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }

    // Missing layers download concurrently, a few at a time (as docker does): one slow layer
    // should not serialise the others, and registries throttle wider fan-outs.
    let report = |p: Progress| {
        if let Some(f) = &opts.progress {
            f(&p)
        }
    };
    let limit = Arc::new(Semaphore::new(PARALLEL_DOWNLOADS));
    let mut downloads = JoinSet::new();
    let mut started = HashSet::new();
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (desc, diff_id) in manifest.layers.iter().zip(diff_ids) {
        let compression = layer_compression(&desc.media_type).ok_or_else(|| {
            perr(format!(
                "layer {} has unsupported media type {:?}",
                desc.digest, desc.media_type
            ))
        })?;
        let dest = store.blob_path(&desc.digest).map_err(perr)?;
        if dest.exists() {
            report(Progress::LayerDone {
                digest: desc.digest.clone(),
                size: desc.size,
                cached: true,
            });
        } else if started.insert(desc.digest.clone()) {
            let mut reg = reg.clone();
            let (digest, size) = (desc.digest.clone(), desc.size);
            let tmp = store.tmp_path("blob");
            let progress = opts.progress.clone();
            let limit = limit.clone();
            downloads.spawn(async move {
                let _permit = limit.acquire_owned().await;
                if let Some(p) = &progress {
                    p(&Progress::LayerStart {
                        digest: digest.clone(),
                        size,
                    });
                }
                reg.blob_to_file(&digest, size, &dest, &tmp, progress.as_ref())
                    .await
                    .map_err(|e| format!("layer {digest}: {e}"))?;
                if let Some(p) = &progress {
                    p(&Progress::LayerDone {
                        digest,
                        size,
                        cached: false,
                    });
                }
                Ok::<(), String>(())
            });
        }
        layers.push((
            RecordLayer {
                digest: desc.digest.clone(),
                diff_id: diff_id.clone(),
                media_type: desc.media_type.clone(),
                size: desc.size,
            },
            compression,
        ));
    }
    while let Some(done) = downloads.join_next().await {
        let result = done.unwrap_or_else(|e| Err(format!("download task: {e}")));
        if let Err(e) = result {
            // Dropping the set aborts the other downloads; their temp files are removed by
            // the next garbage collection.
            downloads.abort_all();
            return Err(perr(e));
        }
    }

    let record = Record {
        reference: name.clone(),
        digest: top,
        manifest_digest,
        config_digest: cfg_digest,
        layers: layers.iter().map(|(l, _)| l.clone()).collect(),
    };
    let s = store.clone();
    let (image, previous) = blocking(move || {
        for (layer, compression) in &layers {
            s.ensure_snapshot(layer, Some(*compression))?;
        }
        let previous = s.read_record(&record.reference).ok().flatten();
        s.write_record(&record)?;
        Ok((s.image_from_record(record)?, previous))
    })
    .await?;
    info!(reference = %name, digest = %image.digest, "pulled image");
    drop(lock);
    if previous.is_some_and(|p| p.digest != image.digest) {
        // The tag moved: what only the old content used is garbage now.
        let s = store.clone();
        if let Err(e) = blocking(move || s.gc_if_idle()).await {
            tracing::warn!("garbage collection after pull: {e}");
        }
    }
    Ok(image)
}
