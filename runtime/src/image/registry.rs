//! A minimal OCI distribution client: manifests and blobs, with Bearer-token and Basic auth.

use super::auth::{parse_challenge, Challenge, Credentials};
use super::media::MANIFEST_ACCEPT;
use super::reference::{host_without_port, Reference};
use super::{Progress, PullOptions};
use base64::Engine;
use reqwest::{header, StatusCode};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tracing::debug;

/// Manifests and configs are small; a bigger answer is a broken or hostile registry.
const MAX_DOCUMENT: usize = 8 << 20;

/// A client for one repository of one registry. Clones share the connection pool and start
/// with the token obtained so far.
#[derive(Clone)]
pub(crate) struct Registry {
    http: reqwest::Client,
    /// `scheme://host/v2/path`
    base: String,
    domain: String,
    path: String,
    creds: Option<Credentials>,
    /// The Authorization header value once a challenge was answered.
    authorization: Option<String>,
}

/// Whether `r` may be spoken to over plain HTTP: loopback, or named insecure by the operator.
pub(crate) fn plain_http_allowed(r: &Reference, insecure: &[String]) -> bool {
    let host = r.host_only();
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
        || insecure
            .iter()
            .any(|i| i == &r.domain || host_without_port(i) == host && !i.contains(':'))
}

/// Formats an error with its sources: reqwest's own message alone says little
/// ("error sending request"), the cause ("Connection refused") is what users need.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl Registry {
    pub(crate) fn new(r: &Reference, opts: &PullOptions) -> Result<Registry, String> {
        let scheme = if plain_http_allowed(r, &opts.insecure_registries) {
            "http"
        } else {
            "https"
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("oxlet/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| chain(&e))?;
        Ok(Registry {
            http,
            base: format!("{scheme}://{}/v2/{}", r.api_host(), r.path),
            domain: r.domain.clone(),
            path: r.path.clone(),
            creds: opts.auth.lookup(&r.domain).cloned(),
            authorization: None,
        })
    }

    /// GETs `url`, answering one auth challenge if the registry asks for it.
    async fn get(&mut self, url: &str, accept: Option<&str>) -> Result<reqwest::Response, String> {
        let mut answered = false;
        loop {
            let mut req = self.http.get(url);
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            if let Some(auth) = &self.authorization {
                req = req.header(header::AUTHORIZATION, auth);
            }
            let resp = req.send().await.map_err(|e| describe_send_error(&e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || answered {
                return Ok(resp);
            }
            answered = true;
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            match challenge {
                Some(Challenge::Basic) => match &self.creds {
                    Some(c) => self.authorization = Some(basic(c)),
                    None => return Err(self.unauthorized()),
                },
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope,
                }) => {
                    let token = self.token(&realm, service, scope).await?;
                    self.authorization = Some(format!("Bearer {token}"));
                }
                None => return Err(self.unauthorized()),
            }
        }
    }

    fn unauthorized(&self) -> String {
        match self.creds {
            Some(_) => "unauthorized (401): credentials rejected".into(),
            None => format!("unauthorized (401): no credentials for {}", self.domain),
        }
    }

    /// Fetches a Bearer token from the realm the registry named, with our basic creds if any.
    async fn token(
        &self,
        realm: &str,
        service: Option<String>,
        scope: Option<String>,
    ) -> Result<String, String> {
        let mut url =
            reqwest::Url::parse(realm).map_err(|e| format!("token realm {realm:?}: {e}"))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", &s);
            }
            q.append_pair(
                "scope",
                &scope.unwrap_or_else(|| format!("repository:{}:pull", self.path)),
            );
        }
        debug!(%url, "fetching registry token");
        let mut req = self.http.get(url);
        if let Some(c) = &self.creds {
            req = req.header(header::AUTHORIZATION, basic(c));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("token: {}", describe_send_error(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(if status == StatusCode::UNAUTHORIZED {
                self.unauthorized()
            } else {
                format!("token: HTTP {}", status.as_u16())
            });
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = resp
            .json()
            .await
            .map_err(|e| format!("token: {}", chain(&e)))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| "token: answer has no token".into())
    }

    /// Fetches a manifest by tag or digest: its bytes and Content-Type.
    pub(crate) async fn manifest(
        &mut self,
        reference: &str,
    ) -> Result<(Vec<u8>, Option<String>), String> {
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self.get(&url, Some(MANIFEST_ACCEPT)).await?;
        let resp = check(resp, "manifest").await?;
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_limited(resp).await?;
        Ok((body, ctype))
    }

    /// Fetches a small blob (a config) into memory; the caller verifies its digest.
    pub(crate) async fn small_blob(&mut self, digest: &str) -> Result<Vec<u8>, String> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.get(&url, None).await?;
        read_limited(check(resp, "blob").await?).await
    }

    /// Streams a blob into the fresh path `tmp`, checks size and digest, then renames it to
    /// `dest`, so `dest` only ever holds verified content.
    pub(crate) async fn blob_to_file(
        &mut self,
        digest: &str,
        size: u64,
        dest: &Path,
        tmp: &Path,
        progress: Option<&super::ProgressFn>,
    ) -> Result<(), String> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.get(&url, None).await?;
        let mut resp = check(resp, "blob").await?;
        let result = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| format!("create {}: {e}", tmp.display()))?;
            let mut hasher = Sha256::new();
            let mut got: u64 = 0;
            let mut last_report = 0u64;
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| format!("download {digest}: {}", chain(&e)))?
            {
                got += chunk.len() as u64;
                if got > size {
                    return Err(format!(
                        "blob {digest} is larger than the {size} bytes the manifest says"
                    ));
                }
                hasher.update(&chunk);
                f.write_all(&chunk)
                    .await
                    .map_err(|e| format!("write {}: {e}", tmp.display()))?;
                if let Some(p) = progress {
                    // Every 256 KiB is enough for a progress bar and cheap for the callback.
                    if got - last_report >= 256 * 1024 || got == size {
                        last_report = got;
                        p(&Progress::LayerBytes {
                            digest: digest.to_string(),
                            downloaded: got,
                            size,
                        });
                    }
                }
            }
            if got != size {
                return Err(format!(
                    "blob {digest}: got {got} bytes, manifest says {size}"
                ));
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != digest {
                return Err(format!("digest mismatch: expected {digest}, got {actual}"));
            }
            f.sync_all().await.map_err(|e| e.to_string())?;
            tokio::fs::rename(&tmp, dest)
                .await
                .map_err(|e| format!("store {digest}: {e}"))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

fn basic(c: &Credentials) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password))
    )
}

fn describe_send_error(e: &reqwest::Error) -> String {
    let url = e
        .url()
        .map(|u| {
            let mut u = u.clone();
            u.set_query(None);
            u.to_string()
        })
        .unwrap_or_default();
    let what = if e.is_connect() {
        "cannot connect to registry"
    } else if e.is_timeout() {
        "registry timed out"
    } else {
        "request failed"
    };
    // The innermost cause carries the useful part (Connection refused, certificate errors).
    let mut cause = None;
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        cause = Some(c.to_string());
        cur = c.source();
    }
    match cause {
        Some(c) => format!("{what} ({url}): {c}"),
        None => format!("{what} ({url})"),
    }
}

/// Turns a non-2xx answer into "manifest unknown (404)" from the registry's error body.
async fn check(resp: reqwest::Response, what: &str) -> Result<reqwest::Response, String> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<RegistryError>,
    }
    #[derive(serde::Deserialize)]
    struct RegistryError {
        #[serde(default)]
        message: String,
        #[serde(default)]
        code: String,
    }
    let msg = serde_json::from_slice::<Errors>(&body)
        .ok()
        .and_then(|e| e.errors.into_iter().next())
        .map(|e| {
            if e.message.is_empty() {
                e.code.to_lowercase().replace('_', " ")
            } else {
                e.message
            }
        })
        .unwrap_or_else(|| match status {
            StatusCode::NOT_FOUND => format!("{what} not found"),
            StatusCode::UNAUTHORIZED => "unauthorized".into(),
            StatusCode::FORBIDDEN => "denied".into(),
            _ => format!("{what}: HTTP error"),
        });
    Err(format!("{msg} ({})", status.as_u16()))
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| chain(&e))? {
        if out.len() + c.len() > MAX_DOCUMENT {
            return Err(format!("document larger than {MAX_DOCUMENT} bytes"));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_and_named() {
        let r = |s: &str| Reference::parse(s).unwrap();
        assert!(plain_http_allowed(&r("127.0.0.1:5000/a"), &[]));
        assert!(plain_http_allowed(&r("localhost:5000/a"), &[]));
        assert!(plain_http_allowed(&r("[::1]:5000/a"), &[]));
        assert!(!plain_http_allowed(&r("reg.example:5000/a"), &[]));
        assert!(!plain_http_allowed(&r("busybox"), &[]));
        assert!(plain_http_allowed(
            &r("reg.example:5000/a"),
            &["reg.example:5000".into()]
        ));
        assert!(plain_http_allowed(
            &r("reg.example/a"),
            &["reg.example".into()]
        ));
        assert!(!plain_http_allowed(
            &r("reg.example:5000/a"),
            &["reg.example:6000".into()]
        ));
    }
}
