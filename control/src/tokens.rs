//! Service account tokens: ES256 JWTs issued through serviceaccounts/{name}/token and accepted
//! as `Authorization: Bearer` credentials while the service account (and the bound pod, if any)
//! still exists with the same uid.

use std::path::Path;

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use serde_json::{json, Value};

use crate::certs::{CertError, Identity};
use crate::registry::{meta_str, Registry};
use crate::resources;
use crate::status::{ApiError, ApiResult, Cause};
use tokio_rustls::rustls;

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const DEFAULT_EXPIRY: i64 = 3600;
const MIN_EXPIRY: i64 = 600;

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub struct Signer {
    key: EcdsaKeyPair,
    public: Vec<u8>,
    kid: String,
}

impl Signer {
    /// Loads `<pki>/sa.key` (PKCS#8 PEM), creating it on first start.
    pub fn load_or_create(pki_dir: &Path) -> Result<Signer, CertError> {
        let path = pki_dir.join("sa.key");
        let io = |source| CertError::Io {
            path: path.clone(),
            source,
        };
        if !path.exists() {
            let kp = rcgen::KeyPair::generate()?;
            crate::certs::write_private(&path, &kp.serialize_pem())?;
        }
        let pem = std::fs::read_to_string(&path).map_err(io)?;
        let der = match rustls_pemfile::private_key(&mut pem.as_bytes()).map_err(io)? {
            Some(rustls::pki_types::PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
            _ => return Err(CertError::Pem(path)),
        };
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &SystemRandom::new(),
        )
        .map_err(|_| CertError::Pem(path.clone()))?;
        let public = key.public_key().as_ref().to_vec();
        let kid = b64url(&ring::digest::digest(&ring::digest::SHA256, &public).as_ref()[..16]);
        Ok(Signer { key, public, kid })
    }

    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("ECDSA signing does not fail");
        format!("{input}.{}", b64url(sig.as_ref()))
    }

    /// The claims of a token signed by this key and not expired.
    pub fn verify(&self, token: &str) -> Option<Value> {
        let mut parts = token.split('.');
        let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let d = |x: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(x)
                .ok()
        };
        let header: Value = serde_json::from_slice(&d(h)?).ok()?;
        if header["alg"] != "ES256" {
            return None;
        }
        let key =
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public);
        key.verify(format!("{h}.{c}").as_bytes(), &d(s)?).ok()?;
        let claims: Value = serde_json::from_slice(&d(c)?).ok()?;
        let now = chrono::Utc::now().timestamp();
        let exp = claims["exp"].as_i64()?;
        (claims["iss"] == ISSUER && exp > now && claims["nbf"].as_i64().unwrap_or(0) <= now)
            .then_some(claims)
    }
}

/// POST serviceaccounts/{name}/token: a TokenRequest in, the same with `status.token` out.
pub fn request(
    reg: &Registry,
    signer: &Signer,
    ns: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Value> {
    let sat = resources::get("", "serviceaccounts");
    let sa = reg.get(sat, Some(ns), name)?;
    let spec = &body["spec"];
    let exp_s = spec["expirationSeconds"].as_i64().unwrap_or(DEFAULT_EXPIRY);
    if exp_s < MIN_EXPIRY {
        return Err(ApiError::invalid(
            sat,
            name,
            vec![Cause::invalid(
                "spec.expirationSeconds",
                &json!(exp_s),
                "may not specify a duration less than 10 minutes",
            )],
        ));
    }
    let audiences: Vec<Value> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.clone(),
        _ => vec![json!(ISSUER)],
    };
    let now = chrono::Utc::now().timestamp();
    let mut k8s =
        json!({"namespace": ns, "serviceaccount": {"name": name, "uid": meta_str(&sa, "uid")}});
    let bound = &spec["boundObjectRef"];
    if bound["kind"] == "Pod" {
        let pname = bound["name"].as_str().unwrap_or("");
        let pod = reg.get(resources::get("", "pods"), Some(ns), pname)?;
        k8s["pod"] = json!({"name": pname, "uid": meta_str(&pod, "uid")});
    }
    let claims = json!({"iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{name}"), "aud": audiences,
        "iat": now, "nbf": now, "exp": now + exp_s, "kubernetes.io": k8s});
    let exp = chrono::DateTime::from_timestamp(now + exp_s, 0).unwrap_or_default();
    let mut out = body.clone();
    out["kind"] = json!("TokenRequest");
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["spec"]["audiences"] = json!(audiences);
    out["spec"]["expirationSeconds"] = json!(exp_s);
    out["status"] = json!({"token": signer.sign(&claims),
        "expirationTimestamp": exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)});
    Ok(out)
}

/// Who a bearer token stands for, if it is valid and its service account (and pod) still exist.
pub fn authenticate(reg: &Registry, signer: &Signer, token: &str) -> Option<Identity> {
    let claims = signer.verify(token)?;
    // Only tokens meant for this server: a token for another audience is that audience's.
    let for_api = match &claims["aud"] {
        Value::String(a) => a == ISSUER,
        Value::Array(a) => a.iter().any(|x| x == ISSUER),
        _ => false,
    };
    if !for_api {
        return None;
    }
    let k = &claims["kubernetes.io"];
    let ns = k["namespace"].as_str()?;
    let sa = &k["serviceaccount"];
    let name = sa["name"].as_str()?;
    let cur = reg
        .get(resources::get("", "serviceaccounts"), Some(ns), name)
        .ok()?;
    if meta_str(&cur, "uid") != sa["uid"].as_str()? {
        return None;
    }
    if let Some(pod) = k.get("pod") {
        let p = reg
            .get(resources::get("", "pods"), Some(ns), pod["name"].as_str()?)
            .ok()?;
        if meta_str(&p, "uid") != pod["uid"].as_str()? {
            return None;
        }
    }
    Some(Identity {
        user: format!("system:serviceaccount:{ns}:{name}"),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".into(),
        ],
    })
}
