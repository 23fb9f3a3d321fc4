//! Registry credentials: `.dockerconfigjson` (what imagePullSecrets carry) and
//! `WWW-Authenticate` challenges.

use base64::Engine;
use serde::Deserialize;
use std::collections::HashMap;

/// A username and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

// Hand-written so passwords never reach logs through `{:?}`.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// Registry host -> credentials, merged from one or more docker config files.
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    auths: HashMap<String, Credentials>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    auths: HashMap<String, RawAuth>,
}

#[derive(Deserialize)]
struct RawAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl DockerConfig {
    /// Parses `{"auths":{"host":{"auth":"base64(user:pass)"}}}` or `username`/`password` entries.
    pub fn from_json(json: &[u8]) -> Result<DockerConfig, String> {
        let raw: RawConfig =
            serde_json::from_slice(json).map_err(|e| format!("docker config: {e}"))?;
        let mut cfg = DockerConfig::default();
        for (host, a) in raw.auths {
            let creds = match (a.auth, a.username, a.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|e| format!("docker config: auth for {host}: {e}"))?;
                    let s = String::from_utf8(decoded)
                        .map_err(|_| format!("docker config: auth for {host} is not UTF-8"))?;
                    let (u, p) = s.split_once(':').ok_or_else(|| {
                        format!("docker config: auth for {host} is not user:password")
                    })?;
                    Credentials {
                        username: u.into(),
                        password: p.into(),
                    }
                }
                (_, Some(u), Some(p)) => Credentials {
                    username: u,
                    password: p,
                },
                _ => continue,
            };
            cfg.auths.insert(normalise_host(&host), creds);
        }
        Ok(cfg)
    }

    /// Adds credentials for `host` (later ones win, as kubelet merges pull secrets).
    pub fn insert(&mut self, host: &str, creds: Credentials) {
        self.auths.insert(normalise_host(host), creds);
    }

    /// Merges `other` into `self`; `other` wins on conflicts.
    pub fn merge(&mut self, other: DockerConfig) {
        self.auths.extend(other.auths);
    }

    /// Credentials for a reference's domain (`docker.io` matches Docker Hub's historic keys).
    pub fn lookup(&self, domain: &str) -> Option<&Credentials> {
        self.auths.get(&normalise_host(domain))
    }

    pub fn is_empty(&self) -> bool {
        self.auths.is_empty()
    }
}

/// Keys in docker configs may be URLs (`https://index.docker.io/v1/`) or bare hosts.
fn normalise_host(key: &str) -> String {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match k.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => k,
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `k="v", k2=v2` with commas allowed inside quotes (scopes contain them).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if chars.next().is_none() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_forms() {
        let json = br#"{"auths":{
            "127.0.0.1:5001":{"auth":"b3hsZXQ6b3hsZXQtc2VjcmV0"},
            "https://index.docker.io/v1/":{"username":"u","password":"p:w"},
            "empty.example":{}}}"#;
        let c = DockerConfig::from_json(json).unwrap();
        assert_eq!(
            c.lookup("127.0.0.1:5001"),
            Some(&Credentials {
                username: "oxlet".into(),
                password: "oxlet-secret".into()
            })
        );
        assert_eq!(c.lookup("docker.io").unwrap().password, "p:w");
        assert!(c.lookup("empty.example").is_none());
        assert!(DockerConfig::from_json(br#"{"auths":{"h":{"auth":"!!"}}}"#).is_err());
        assert!(!format!("{:?}", c).contains("oxlet-secret"));
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="oxlet-testbed""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }
}
