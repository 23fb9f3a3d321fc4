//! kubelet's image garbage collection loop: every `image_gc_period`, when the image store's
//! disk is used above the high threshold, images no container uses (nor any pod being started)
//! are removed, least recently used first, down to the low threshold.

use crate::pod_runtime::PodRuntime;
use runtime::image::gc::{GcError, ImageGc};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The images the pods being worked on ask for.
fn wanted(ctx: &PodRuntime) -> HashSet<String> {
    ctx.running_pods()
        .iter()
        .filter_map(|p| p.spec.as_ref())
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .filter_map(|c| c.image.clone())
        .collect()
}

pub async fn run(ctx: Arc<PodRuntime>) {
    let gc = match ImageGc::new(ctx.images.clone(), ctx.cfg.image_gc) {
        Ok(gc) => Arc::new(Mutex::new(gc)),
        Err(e) => {
            tracing::error!(error = %e, "image garbage collection disabled");
            return;
        }
    };
    let mut tick = tokio::time::interval(ctx.cfg.image_gc_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let in_use = wanted(&ctx);
        let gc = gc.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut gc = gc.lock().expect("gc lock");
            gc.run(&in_use)
        })
        .await;
        match r {
            Ok(Ok(out)) if !out.removed.is_empty() => {
                tracing::info!(removed = ?out.removed, freed = out.freed, usage = out.usage_percent, "image garbage collection")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e @ GcError::NotEnough { .. })) => {
                let GcError::NotEnough { removed, .. } = &e else {
                    unreachable!()
                };
                tracing::warn!(error = %e, ?removed, "image garbage collection")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "image garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "image garbage collection task"),
        }
    }
}
