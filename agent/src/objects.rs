//! The API objects a pod's configuration reads (ConfigMaps, Secrets, Services, service account
//! tokens), fetched as the node, with kubelet's errors. ConfigMaps and Secrets are read with
//! `get`, which the node authorizer allows for those its pods reference.

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use kube::api::{Api, PostParams};

/// Why a referenced object could not be used; the message is kubelet's.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// kubelet's object managers name the resource in the singular.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    MissingKey {
        key: String,
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Field(#[from] crate::fieldpath::Error),
    #[error("failed to fetch token: {0}")]
    Token(String),
    /// A subPath or subPathExpr that cannot be used.
    #[error("{0}")]
    SubPath(String),
    #[error("cannot find volume {volume:?} to mount into container {container:?}")]
    NoVolume { volume: String, container: String },
    /// The API server's validation words: kubelet never sees such a pod from kube-apiserver.
    #[error("Bidirectional mount propagation is available only to privileged containers")]
    BidirectionalUnprivileged,
    #[error("invalid MountPropagation mode: {0:?}")]
    Propagation(String),
    #[error("{0}")]
    Mount(String),
}

impl ConfigError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ConfigError::NotFound { .. })
    }
}

#[derive(Clone)]
pub struct Objects {
    client: kube::Client,
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Objects {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    pub async fn config_map(&self, ns: &str, name: &str) -> Result<ConfigMap, ConfigError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        api.get(name).await.map_err(|e| {
            if not_found(&e) {
                ConfigError::NotFound {
                    kind: "configmap",
                    name: name.into(),
                }
            } else {
                e.into()
            }
        })
    }

    pub async fn secret(&self, ns: &str, name: &str) -> Result<Secret, ConfigError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        api.get(name).await.map_err(|e| {
            if not_found(&e) {
                ConfigError::NotFound {
                    kind: "secret",
                    name: name.into(),
                }
            } else {
                e.into()
            }
        })
    }

    /// The Services of `ns`, and the `kubernetes` Service of `default` (for
    /// KUBERNETES_SERVICE_HOST, which every pod gets).
    pub async fn services(&self, ns: &str) -> Result<Vec<Service>, ConfigError> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let mut all = api.list(&Default::default()).await?.items;
        if ns != "default" {
            let default: Api<Service> = Api::namespaced(self.client.clone(), "default");
            match default.get("kubernetes").await {
                Ok(s) => all.push(s),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(all)
    }

    /// A token of the pod's service account bound to the pod: `(token, issued, expires)` in
    /// unix seconds; issued is reckoned from the validity the server granted, which may be
    /// shorter than asked.
    pub async fn token(
        &self,
        pod: &Pod,
        audience: Option<&str>,
        expiration_seconds: i64,
    ) -> Result<(String, i64, i64), ConfigError> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let tr = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
                expiration_seconds: Some(expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let out = api
            .create_token_request(&sa, &PostParams::default(), &tr)
            .await
            .map_err(|e| ConfigError::Token(e.to_string()))?;
        let status = out
            .status
            .ok_or_else(|| ConfigError::Token("no status in the TokenRequest answer".into()))?;
        let expires = status.expiration_timestamp.0.as_second();
        let granted = out.spec.expiration_seconds.unwrap_or(expiration_seconds);
        Ok((status.token, expires - granted, expires))
    }
}
