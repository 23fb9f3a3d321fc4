//! Pod facts the controllers read: active, ready, available, and the order in which a
//! controller gives pods up.

use std::cmp::Ordering;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

/// Not terminal and not being deleted: what counts towards replicas.
pub fn is_active(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    p.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

pub fn is_terminal(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// When the Ready condition turned True, if it is True.
pub fn ready_since(p: &Pod) -> Option<Option<Timestamp>> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| c.last_transition_time.as_ref().map(|t| t.0))
}

pub fn is_ready(p: &Pod) -> bool {
    ready_since(p).is_some()
}

/// Ready for at least `min_ready` seconds at `now`.
pub fn is_available(p: &Pod, min_ready: i32, now: Timestamp) -> bool {
    match ready_since(p) {
        None => false,
        Some(_) if min_ready <= 0 => true,
        Some(None) => false,
        Some(Some(t)) => now.as_second() - t.as_second() >= min_ready as i64,
    }
}

fn phase_rank(p: &Pod) -> u8 {
    match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Unknown") => 1,
        _ => 2,
    }
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| {
            cs.iter().map(|c| c.restart_count).max().unwrap_or(0)
        })
}

/// Orders pods so that those to delete first come first: unscheduled before scheduled,
/// pending before unknown before running, not ready before ready, ready more recently before
/// ready longer, more restarts before fewer, newer before older.
pub fn deletion_order(a: &Pod, b: &Pod) -> Ordering {
    let assigned = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    assigned(a)
        .cmp(&assigned(b))
        .then(phase_rank(a).cmp(&phase_rank(b)))
        .then(is_ready(a).cmp(&is_ready(b)))
        .then_with(|| {
            let since = |p: &Pod| ready_since(p).flatten().map(|t| t.as_second());
            since(b).cmp(&since(a))
        })
        .then(restarts(b).cmp(&restarts(a)))
        .then_with(|| {
            let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            created(b).cmp(&created(a))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(node: Option<&str>, phase: &str, ready: bool, created: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "creationTimestamp": created},
            "spec": {"containers": [], "nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap()
    }

    #[test]
    fn the_least_valuable_pods_go_first() {
        let unscheduled = pod(None, "Pending", false, "2026-01-01T00:00:00Z");
        let pending = pod(Some("n"), "Pending", false, "2026-01-01T00:00:00Z");
        let running_old = pod(Some("n"), "Running", true, "2026-01-01T00:00:00Z");
        let running_new = pod(Some("n"), "Running", true, "2026-01-02T00:00:00Z");
        let not_ready = pod(Some("n"), "Running", false, "2026-01-01T00:00:00Z");
        let mut v = [
            &running_old,
            &running_new,
            &not_ready,
            &pending,
            &unscheduled,
        ];
        v.sort_by(|a, b| deletion_order(a, b));
        assert!(std::ptr::eq(v[0], &unscheduled));
        assert!(std::ptr::eq(v[1], &pending));
        assert!(std::ptr::eq(v[2], &not_ready));
        assert!(std::ptr::eq(v[3], &running_new));
        assert!(std::ptr::eq(v[4], &running_old));
        let now = Timestamp::from_second(1_767_225_610).unwrap(); // 10 s after ready
        assert!(is_available(&running_old, 5, now));
        assert!(!is_available(&running_old, 20, now));
        assert!(!is_available(&not_ready, 0, now));
    }
}
