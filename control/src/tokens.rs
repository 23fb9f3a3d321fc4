//! Service account tokens: ES256 JWTs issued through serviceaccounts/{name}/token and accepted
//! as `Authorization: Bearer` credentials when signed by this server's key (`sa.key`), issued
//! by it, meant for one of its audiences (`--api-audiences`, the issuer by default), unexpired,
//! and while the service account and the object the token is bound to (a pod or a secret)
//! still exist with the same uid. Signing and verification are `jsonwebtoken`'s.

use std::path::Path;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
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
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
    /// What a token's `aud` must include to be a credential for this server.
    audiences: Vec<String>,
    /// The longest validity issued; a longer request gets this much.
    max_expiration: Option<i64>,
}

impl Signer {
    /// Loads `<pki>/sa.key` (PKCS#8 PEM, P-256), creating it on first start. Tokens are
    /// accepted for `audiences` (the issuer when empty).
    pub fn load_or_create(pki_dir: &Path, audiences: Vec<String>) -> Result<Signer, CertError> {
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
        // The public point, for verification and the key id.
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &SystemRandom::new(),
        )
        .map_err(|_| CertError::Pem(path.clone()))?;
        let public = key.public_key().as_ref().to_vec();
        let kid = b64url(&ring::digest::digest(&ring::digest::SHA256, &public).as_ref()[..16]);
        let audiences = if audiences.is_empty() {
            vec![ISSUER.to_string()]
        } else {
            audiences
        };
        Ok(Signer {
            encoding: EncodingKey::from_ec_der(&der),
            decoding: DecodingKey::from_ec_der(&public),
            kid,
            audiences,
            max_expiration: None,
        })
    }

    /// Caps the validity of issued tokens at `seconds`, as kube-apiserver's
    /// `--service-account-max-token-expiration` does (which accepts no less than an hour; any
    /// positive value is taken here, so that rotation can be watched in seconds).
    pub fn with_max_expiration(mut self, seconds: Option<i64>) -> Self {
        self.max_expiration = seconds.filter(|s| *s > 0);
        self
    }

    /// The audiences tokens are issued for when a TokenRequest names none.
    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("ECDSA signing does not fail")
    }

    /// The claims of a token signed by this key, from this issuer, for one of this server's
    /// audiences, and within its validity.
    pub fn verify(&self, token: &str) -> Option<Value> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&self.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        v.leeway = 0;
        jsonwebtoken::decode::<Value>(token, &self.decoding, &v)
            .ok()
            .map(|d| d.claims)
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
    // Validated as asked, then capped; the answer's spec says what was issued.
    let exp_s = signer.max_expiration.map_or(exp_s, |max| exp_s.min(max));
    let audiences: Vec<Value> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.clone(),
        _ => signer.audiences().iter().map(|a| json!(a)).collect(),
    };
    let now = chrono::Utc::now().timestamp();
    let mut k8s =
        json!({"namespace": ns, "serviceaccount": {"name": name, "uid": meta_str(&sa, "uid")}});
    let bound = &spec["boundObjectRef"];
    for (kind, plural, claim) in [("Pod", "pods", "pod"), ("Secret", "secrets", "secret")] {
        if bound["kind"] == kind {
            let bname = bound["name"].as_str().unwrap_or("");
            let obj = reg.get(resources::get("", plural), Some(ns), bname)?;
            let uid = meta_str(&obj, "uid");
            if bound["uid"]
                .as_str()
                .is_some_and(|u| !u.is_empty() && u != uid)
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {plural} {bname:?}: the UID in the \
                         bound object reference ({}) does not match the UID in record. The \
                         object might have been deleted and then recreated",
                        bound["uid"].as_str().unwrap_or("")
                    ),
                ));
            }
            k8s[claim] = json!({"name": bname, "uid": uid});
        }
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

/// Who a bearer token stands for, if it is valid and its service account (and the pod or
/// secret it is bound to) still exist with the uids it names.
pub fn authenticate(reg: &Registry, signer: &Signer, token: &str) -> Option<Identity> {
    let claims = signer.verify(token)?;
    let k = &claims["kubernetes.io"];
    let ns = k["namespace"].as_str()?;
    let sa = &k["serviceaccount"];
    let name = sa["name"].as_str()?;
    let same = |plural: &str, name: &str, uid: &str| {
        reg.get(resources::get("", plural), Some(ns), name)
            .is_ok_and(|cur| meta_str(&cur, "uid") == uid)
    };
    if !same("serviceaccounts", name, sa["uid"].as_str()?) {
        return None;
    }
    for (claim, plural) in [("pod", "pods"), ("secret", "secrets")] {
        if let Some(b) = k.get(claim) {
            if !same(plural, b["name"].as_str()?, b["uid"].as_str()?) {
                return None;
            }
        }
    }
    if claims["sub"] != format!("system:serviceaccount:{ns}:{name}") {
        return None;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(aud: &str, iss: &str, exp_in: i64) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({"iss": iss, "sub": "system:serviceaccount:default:x", "aud": [aud],
            "iat": now, "nbf": now, "exp": now + exp_in})
    }

    #[test]
    fn tokens_are_checked_for_issuer_audience_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let default = Signer::load_or_create(dir.path(), vec![]).unwrap();
        assert!(default
            .verify(&default.sign(&claims(ISSUER, ISSUER, 600)))
            .is_some());
        assert!(default
            .verify(&default.sign(&claims("vault", ISSUER, 600)))
            .is_none());
        assert!(default
            .verify(&default.sign(&claims(ISSUER, "https://other", 600)))
            .is_none());
        assert!(default
            .verify(&default.sign(&claims(ISSUER, ISSUER, -10)))
            .is_none());
        // The same sa.key with other audiences: tokens for those, not for the issuer.
        let vault = Signer::load_or_create(dir.path(), vec!["vault".into()]).unwrap();
        assert!(vault
            .verify(&default.sign(&claims("vault", ISSUER, 600)))
            .is_some());
        assert!(vault
            .verify(&default.sign(&claims(ISSUER, ISSUER, 600)))
            .is_none());
        // Another key's signature is refused.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Signer::load_or_create(other_dir.path(), vec![]).unwrap();
        assert!(default
            .verify(&other.sign(&claims(ISSUER, ISSUER, 600)))
            .is_none());
    }
}
