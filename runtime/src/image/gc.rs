//! Image garbage collection by disk usage, as kubelet's image manager does it: when the image
//! store's file system is used at or above the high threshold, images no container uses are
//! removed, least recently used first (never used before used, then oldest detection), until
//! usage is down to the low threshold; images detected less than the minimum age ago stay.
//! Use is remembered from one run to the next, as kubelet keeps it in memory.

use super::{ImageStore, Result};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

/// kubelet's --image-gc-high-threshold, --image-gc-low-threshold and
/// --minimum-image-ttl-duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub high_threshold_percent: u8,
    pub low_threshold_percent: u8,
    pub min_age: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            high_threshold_percent: 85,
            low_threshold_percent: 80,
            min_age: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("invalid image GC policy: {0}")]
    Policy(String),
    /// kubelet's words; `removed` says what was removed all the same.
    #[error("Failed to garbage collect required amount of images. Attempted to free {wanted} bytes, but only found {freed} bytes eligible to free.")]
    NotEnough {
        wanted: u64,
        freed: u64,
        removed: Vec<String>,
    },
    #[error(transparent)]
    Store(#[from] super::Error),
    #[error("statfs {path}: {source}")]
    Statfs {
        path: std::path::PathBuf,
        #[source]
        source: nix::Error,
    },
}

impl Policy {
    /// kubelet's validation of the thresholds.
    pub fn validate(&self) -> Result<(), GcError> {
        let (h, l) = (self.high_threshold_percent, self.low_threshold_percent);
        if h > 100 {
            return Err(GcError::Policy(format!(
                "invalid HighThresholdPercent {h}, must be in range [0-100]"
            )));
        }
        if l > 100 {
            return Err(GcError::Policy(format!(
                "invalid LowThresholdPercent {l}, must be in range [0-100]"
            )));
        }
        if l > h {
            return Err(GcError::Policy(format!(
                "LowThresholdPercent {l} can not be higher than HighThresholdPercent {h}"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    first_detected: SystemTime,
    /// None: never seen in use.
    last_used: Option<SystemTime>,
}

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Usage of the store's file system before the run, in percent.
    pub usage_percent: u8,
    /// References removed, in order.
    pub removed: Vec<String>,
    /// Bytes the file system gained.
    pub freed: u64,
}

/// The collector of one image store.
#[derive(Debug)]
pub struct ImageGc {
    store: ImageStore,
    policy: Policy,
    seen: HashMap<String, Seen>,
}

/// (capacity, available) bytes of the file system holding `path`.
fn fs_space(path: &std::path::Path) -> Result<(u64, u64), GcError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|source| GcError::Statfs {
        path: path.to_path_buf(),
        source,
    })?;
    let frag = st.fragment_size() as u64;
    Ok((
        st.blocks() as u64 * frag,
        st.blocks_available() as u64 * frag,
    ))
}

impl ImageGc {
    pub fn new(store: ImageStore, policy: Policy) -> Result<Self, GcError> {
        policy.validate()?;
        Ok(Self {
            store,
            policy,
            seen: HashMap::new(),
        })
    }

    /// Changes the thresholds; what was seen so far is kept.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), GcError> {
        policy.validate()?;
        self.policy = policy;
        Ok(())
    }

    /// Notes which images exist and which are in use now; `also_in_use` adds references the
    /// caller is about to use (pods starting), in any spelling the store accepts.
    fn detect(
        &mut self,
        now: SystemTime,
        also_in_use: &HashSet<String>,
    ) -> Result<HashSet<String>, GcError> {
        let images = self.store.list()?;
        let mut in_use = self.store.references_in_use()?;
        in_use.extend(
            also_in_use
                .iter()
                .filter_map(|r| super::Reference::parse(r).ok())
                .map(|r| r.to_string()),
        );
        let present: HashSet<String> = images.iter().map(|i| i.reference.clone()).collect();
        self.seen.retain(|r, _| present.contains(r));
        for r in present {
            let s = self.seen.entry(r.clone()).or_insert(Seen {
                first_detected: now,
                last_used: None,
            });
            if in_use.contains(&r) {
                s.last_used = Some(now);
            }
        }
        Ok(in_use)
    }

    /// One run (blocking): nothing below the high threshold; otherwise removes unused images
    /// until usage is at the low threshold, or fails saying how much it could not free.
    pub fn run(&mut self, also_in_use: &HashSet<String>) -> Result<Outcome, GcError> {
        let now = SystemTime::now();
        let in_use = self.detect(now, also_in_use)?;
        let root = self.store.root().to_path_buf();
        let (capacity, available) = fs_space(&root)?;
        if capacity == 0 {
            return Ok(Outcome::default());
        }
        let usage = (100 - (available as u128 * 100 / capacity as u128)) as u8;
        let mut out = Outcome {
            usage_percent: usage,
            ..Default::default()
        };
        if usage < self.policy.high_threshold_percent {
            return Ok(out);
        }
        let target = capacity as u128 * (100 - self.policy.low_threshold_percent as u128) / 100;
        let wanted = target.saturating_sub(available as u128) as u64;
        let mut candidates: Vec<(String, Seen)> = self
            .seen
            .iter()
            .filter(|(r, _)| !in_use.contains(*r))
            .map(|(r, s)| (r.clone(), *s))
            .collect();
        candidates.sort_by_key(|(r, s)| (s.last_used, s.first_detected, r.clone()));
        for (reference, seen) in candidates {
            if out.freed >= wanted {
                break;
            }
            if now.duration_since(seen.first_detected).unwrap_or_default() < self.policy.min_age {
                continue;
            }
            let before = fs_space(&root)?.1;
            match self.store.remove(&reference) {
                Ok(()) | Err(super::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            self.seen.remove(&reference);
            out.freed += fs_space(&root)?.1.saturating_sub(before);
            tracing::info!(image = %reference, "image garbage collection removed an unused image");
            out.removed.push(reference);
        }
        if out.freed < wanted {
            return Err(GcError::NotEnough {
                wanted,
                freed: out.freed,
                removed: out.removed,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_validated_as_kubelet_does() {
        assert!(Policy::default().validate().is_ok());
        let p = |h, l| Policy {
            high_threshold_percent: h,
            low_threshold_percent: l,
            min_age: Duration::ZERO,
        };
        assert_eq!(
            p(70, 80).validate().unwrap_err().to_string(),
            "invalid image GC policy: LowThresholdPercent 80 can not be higher than HighThresholdPercent 70"
        );
        assert!(p(101, 80).validate().is_err());
    }

    #[test]
    fn below_the_high_threshold_nothing_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore::open(d.path()).unwrap();
        let mut gc = ImageGc::new(
            store,
            Policy {
                high_threshold_percent: 100,
                low_threshold_percent: 0,
                min_age: Duration::ZERO,
            },
        )
        .unwrap();
        let out = gc.run(&HashSet::new()).unwrap();
        assert!(out.removed.is_empty() && out.usage_percent < 100);
    }
}
