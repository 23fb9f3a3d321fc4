//! Service account tokens of a pod's projected volumes, bound to the pod and requested again
//! once 80% of their lifetime (at most 24 hours) has passed, as kubelet's token manager does.

use crate::objects::{ConfigError, Objects};
use k8s_openapi::api::core::v1::Pod;
use std::collections::HashMap;

const MAX_AGE: i64 = 24 * 3600;

#[derive(Debug, Clone)]
struct Cached {
    token: String,
    issued: i64,
    expires: i64,
}

/// Whether a token issued at `issued` and expiring at `expires` is to be replaced at `now`.
pub fn needs_refresh(now: i64, issued: i64, expires: i64) -> bool {
    let ttl = expires - issued;
    now >= issued + (ttl * 8 / 10).min(MAX_AGE)
}

#[derive(Debug, Default)]
pub struct Tokens {
    cache: HashMap<(String, i64), Cached>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Tokens {
    /// Whether some token is due for renewal.
    pub fn due(&self) -> bool {
        let t = now();
        self.cache
            .values()
            .any(|c| needs_refresh(t, c.issued, c.expires))
    }

    /// The token for `audience` (empty: the API server's) valid for `expiration` seconds; a
    /// failed renewal keeps a token that has not expired yet.
    pub async fn get(
        &mut self,
        objects: &Objects,
        pod: &Pod,
        audience: &str,
        expiration: i64,
    ) -> Result<String, ConfigError> {
        let key = (audience.to_string(), expiration);
        let t = now();
        if let Some(c) = self.cache.get(&key) {
            if !needs_refresh(t, c.issued, c.expires) {
                return Ok(c.token.clone());
            }
        }
        let aud = (!audience.is_empty()).then_some(audience);
        match objects.token(pod, aud, expiration).await {
            Ok((token, issued, expires)) => {
                let issued = issued.min(t);
                self.cache.insert(
                    key,
                    Cached {
                        token: token.clone(),
                        issued,
                        expires,
                    },
                );
                Ok(token)
            }
            Err(e) => match self.cache.get(&key) {
                Some(c) if c.expires > t => {
                    tracing::warn!(error = %e, "renew service account token; keeping the current one");
                    Ok(c.token.clone())
                }
                _ => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::needs_refresh;

    #[test]
    fn renewed_at_eighty_percent_or_a_day() {
        assert!(!needs_refresh(1000 + 2879, 1000, 1000 + 3600));
        assert!(needs_refresh(1000 + 2880, 1000, 1000 + 3600));
        let week = 7 * 24 * 3600;
        assert!(!needs_refresh(24 * 3600 - 1, 0, week));
        assert!(needs_refresh(24 * 3600, 0, week));
    }
}
