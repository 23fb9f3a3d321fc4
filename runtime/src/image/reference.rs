//! Image references, normalised the way Docker does it: `busybox` is `docker.io/library/busybox:latest`.

use std::fmt;

/// The registry Docker Hub names are resolved against when a reference has no domain.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Docker Hub's registry API host: `docker.io` itself serves no `/v2/`.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed, normalised reference: always a domain and a path, a tag and/or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host with optional port, e.g. `127.0.0.1:5000` or `docker.io`.
    pub domain: String,
    /// Repository path, e.g. `library/busybox`.
    pub path: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>` when pinned.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `reference`, filling in Docker's defaults. The error says what is wrong with it.
    pub fn parse(reference: &str) -> Result<Reference, String> {
        if reference.is_empty() {
            return Err("empty reference".into());
        }
        if reference.len() > 4096 {
            return Err("reference too long".into());
        }
        let (name_tag, digest) = match reference.split_once('@') {
            Some((n, d)) => (n, Some(parse_digest(d)?)),
            None => (reference, None),
        };
        // A tag is the text after the last ':' only if no '/' follows it (else it is a port).
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if !name_tag[i..].contains('/') => {
                (&name_tag[..i], Some(name_tag[i + 1..].to_string()))
            }
            _ => (name_tag, None),
        };
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(format!("invalid tag {t:?}"));
            }
        }
        if name.is_empty() {
            return Err("empty repository name".into());
        }
        // The first component is a domain when it looks like one (Docker's rule).
        let (domain, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
        };
        let domain = if domain == "index.docker.io" {
            DEFAULT_DOMAIN.to_string()
        } else {
            domain
        };
        if !valid_domain(&domain) {
            return Err(format!("invalid registry host {domain:?}"));
        }
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if path.chars().any(|c| c.is_ascii_uppercase()) {
            return Err("repository name must be lowercase".into());
        }
        if path.len() > 255 || !path.split('/').all(valid_path_component) {
            return Err(format!("invalid repository name {path:?}"));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host the registry API lives on (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.domain == DEFAULT_DOMAIN {
            DOCKER_HUB_API
        } else {
            &self.domain
        }
    }

    /// The host without port, for the plain-HTTP loopback rule.
    pub fn host_only(&self) -> &str {
        host_without_port(&self.domain)
    }
}

/// Strips a `:port`, keeping bracketed IPv6 literals whole (`[::1]:5000` -> `[::1]`).
pub(crate) fn host_without_port(domain: &str) -> &str {
    if domain.starts_with('[') {
        match domain.find(']') {
            Some(i) => &domain[..=i],
            None => domain,
        }
    } else {
        domain.split(':').next().unwrap_or(domain)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Only sha256 is accepted: it is what every registry and the store use.
pub(crate) fn parse_digest(d: &str) -> Result<String, String> {
    match d.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(d.to_string())
        }
        _ => Err(format!(
            "invalid digest {d:?} (want sha256:<64 lowercase hex>)"
        )),
    }
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `[a-z0-9]+` runs joined by one of `.`, `_`, `__` or any number of `-`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|s| s == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum_lower(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn valid_domain(d: &str) -> bool {
    if let Some(rest) = d.strip_prefix('[') {
        // IPv6 literal, optionally with a port.
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        return ip.parse::<std::net::Ipv6Addr>().is_ok()
            && (after.is_empty() || after.strip_prefix(':').is_some_and(valid_port));
    }
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port {
        if !valid_port(p) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_defaults() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(norm("index.docker.io/user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(
            Reference::parse("busybox").unwrap().api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn hosts_ports_and_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("127.0.0.1:5000/test/busybox@{d}")).unwrap();
        assert_eq!(r.domain, "127.0.0.1:5000");
        assert_eq!(r.path, "test/busybox");
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), d);
        assert_eq!(r.host_only(), "127.0.0.1");
        let r = Reference::parse(&format!("localhost/x:v2@{d}")).unwrap();
        assert_eq!(r.domain, "localhost");
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert_eq!(r.manifest_ref(), d);
        let r = Reference::parse("[::1]:5000/a/b").unwrap();
        assert_eq!(r.domain, "[::1]:5000");
        assert_eq!(r.host_only(), "[::1]");
        assert_eq!(
            norm("quay.io/a/b-c__d.e:tag_1.0-x"),
            "quay.io/a/b-c__d.e:tag_1.0-x"
        );
    }

    #[test]
    fn invalid() {
        for bad in [
            "",
            "UPPER/case:bad",
            "Busybox",
            "busybox:",
            "busybox:-bad",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a//b",
            "a/b/",
            "a..b",
            "a/-b",
            "host:port/x",
            "x:y:z",
            "bad host/x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be invalid");
        }
    }
}
