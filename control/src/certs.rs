//! The cluster's PKI: a CA, the API server's serving certificate, the admin and node client
//! certificates, and the kubeconfig files that carry them. Created on first start, reused after.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tokio_rustls::rustls;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("certificate generation: {0}")]
    Gen(#[from] rcgen::Error),
    #[error("tls setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}: no PEM item found")]
    Pem(PathBuf),
    #[error("no CA under {0}: run `oxlet up` on this machine first")]
    NoCa(PathBuf),
    #[error("invalid node name {name:?}: {message}")]
    NodeName { name: String, message: &'static str },
}

pub type Result<T, E = CertError> = std::result::Result<T, E>;

/// The group of every node's client certificate; with a `system:node:<name>` user it makes the
/// identity a node (see `crate::authz`).
pub const NODES_GROUP: &str = "system:nodes";
/// Node users are `system:node:<node name>`.
pub const NODE_USER_PREFIX: &str = "system:node:";

/// PEM files in `<data_dir>/pki`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.into(),
        source,
    })
}

fn write(path: &Path, data: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertError::Io {
        path: path.into(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io)?;
    }
    // Written to a temporary name and renamed, so a crash never leaves half a key behind.
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Writes a private key file (mode 0600), atomically.
pub fn write_private(path: &Path, pem: &str) -> Result<()> {
    write(path, pem, 0o600)
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("oxlet-ca", None);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    if let Some(o) = org {
        d.push(DnType::OrganizationName, o);
    }
    d.push(DnType::CommonName, cn);
    d
}

impl Pki {
    pub fn new(data_dir: &Path) -> Pki {
        Pki {
            dir: data_dir.join("pki"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn ca_pem(&self) -> Result<String> {
        read(&self.path("ca.crt"))
    }

    /// Creates whatever is missing: CA, serving certificate (for `sans`), admin client cert.
    pub fn ensure(&self, sans: &[String]) -> Result<()> {
        if !self.path("ca.crt").exists() {
            let key = KeyPair::generate()?;
            let cert = ca_params().self_signed(&key)?;
            write(&self.path("ca.key"), &key.serialize_pem(), 0o600)?;
            write(&self.path("ca.crt"), &cert.pem(), 0o644)?;
        }
        // Re-issued when the names change (a new address): nodes verify the server by them.
        let mut wanted = sans.to_vec();
        wanted.sort();
        wanted.dedup();
        let recorded = fs::read_to_string(self.path("apiserver.sans")).unwrap_or_default();
        if !self.path("apiserver.crt").exists() || recorded != wanted.join("\n") {
            let mut p = CertificateParams::new(wanted.clone())?;
            p.distinguished_name = dn("kube-apiserver", None);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.issue("apiserver", p)?;
            write(&self.path("apiserver.sans"), &wanted.join("\n"), 0o644)?;
        }
        if !self.path("admin.crt").exists() {
            self.issue_client("admin", "kubernetes-admin", &["system:masters"])?;
        }
        if !self.path("kubelet-client.crt").exists() {
            self.issue_client(
                "kubelet-client",
                "kube-apiserver-kubelet-client",
                &["system:masters"],
            )?;
        }
        Ok(())
    }

    /// Issues a client certificate `<name>.crt`/`<name>.key` for user `cn` in `groups`.
    pub fn issue_client(&self, name: &str, cn: &str, groups: &[&str]) -> Result<()> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        for g in groups {
            p.distinguished_name.push(DnType::OrganizationName, *g);
        }
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(name, p)
    }

    /// Issues the client certificate of node `node` as `<name>.crt`/`<name>.key`: user
    /// `system:node:<node>` in group `system:nodes`, the identity the node authorizer expects.
    pub fn issue_node(&self, name: &str, node: &str) -> Result<()> {
        self.issue_client(name, &format!("{NODE_USER_PREFIX}{node}"), &[NODES_GROUP])
    }

    fn issue(&self, name: &str, mut p: CertificateParams) -> Result<()> {
        let ca_key = KeyPair::from_pem(&read(&self.path("ca.key"))?)?;
        let issuer = Issuer::new(ca_params(), ca_key);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        write(
            &self.path(&format!("{name}.key")),
            &key.serialize_pem(),
            0o600,
        )?;
        write(&self.path(&format!("{name}.crt")), &cert.pem(), 0o644)
    }

    /// A kubeconfig for client certificate `name` talking to `server`.
    pub fn kubeconfig(&self, name: &str, user: &str, server: &str) -> Result<String> {
        let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
        let ca = b64(self.ca_pem()?);
        let crt = b64(read(&self.path(&format!("{name}.crt")))?);
        let key = b64(read(&self.path(&format!("{name}.key")))?);
        Ok(format!(
            "apiVersion: v1
kind: Config
clusters:
- name: oxlet
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {crt}
    client-key-data: {key}
contexts:
- name: {user}@oxlet
  context:
    cluster: oxlet
    user: {user}
current-context: {user}@oxlet
"
        ))
    }

    pub fn write_kubeconfig(&self, name: &str, user: &str, server: &str, to: &Path) -> Result<()> {
        write(to, &self.kubeconfig(name, user, server)?, 0o600)
    }

    /// Writes to `to` a kubeconfig for the agent of node `node` on another machine: a client
    /// certificate `system:node:<node>` in `system:nodes` from this CA, and `server` as the URL.
    /// Issuing again replaces the node's certificate (the old one stays valid until it expires).
    pub fn write_node_kubeconfig(&self, node: &str, server: &str, to: &Path) -> Result<()> {
        if let Some(message) = crate::validate::dns_subdomain(node) {
            return Err(CertError::NodeName {
                name: node.into(),
                message,
            });
        }
        if !self.path("ca.key").exists() {
            return Err(CertError::NoCa(self.dir.clone()));
        }
        let file = format!("node-{node}");
        self.issue_node(&file, node)?;
        self.write_kubeconfig(&file, &format!("{NODE_USER_PREFIX}{node}"), server, to)
    }

    /// TLS settings for the API server: our serving certificate; client certificates signed by
    /// our CA are verified, and clients without one are let in as anonymous (then refused 401).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = pem_certs(&self.path("apiserver.crt"))?;
        let key_path = self.path("apiserver.key");
        let key = rustls_pemfile::private_key(&mut read(&key_path)?.as_bytes())
            .map_err(|source| CertError::Io {
                path: key_path.clone(),
                source,
            })?
            .ok_or(CertError::Pem(key_path))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(&self.path("ca.crt"))? {
            roots.add(c)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// TLS settings for the API server's connections to kubelets: it presents the
/// `kubelet-client` certificate. Like kube-apiserver without `--kubelet-certificate-authority`
/// (its default), it does not verify the kubelet's serving certificate, which kubelets
/// usually sign themselves.
pub fn kubelet_client_config(pki: &Pki) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = pem_certs(&pki.path("kubelet-client.crt"))?;
    let key_path = pki.path("kubelet-client.key");
    let key = rustls_pemfile::private_key(&mut read(&key_path)?.as_bytes())
        .map_err(|source| CertError::Io {
            path: key_path.clone(),
            source,
        })?
        .ok_or(CertError::Pem(key_path))?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn pem_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = read(path)?;
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Io {
            path: path.into(),
            source,
        })
}

/// Who a verified client certificate names: CN is the user, each O a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    /// A control-plane component's identity (`system:kube-scheduler`, ...).
    pub fn component(user: &str) -> Identity {
        Identity {
            user: user.to_string(),
            groups: vec!["system:authenticated".into()],
        }
    }
}

pub fn identity(cert_der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(Identity { user, groups })
}

/// This machine's interface addresses, without loopback and IPv6 link-local ones: the names
/// other machines' nodes reach the API server by when it listens on every address.
pub fn host_addresses() -> Vec<String> {
    use std::net::IpAddr;
    let Ok(ifaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<String> = ifaces
        .filter_map(|i| {
            let a = i.address?;
            let ip = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
            (!ip.is_loopback() && !link_local).then(|| ip.to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_creates_once_and_identity_reads_the_subject() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        pki.ensure(&["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let ca = pki.ca_pem().unwrap();
        let serving = read(&pki.path("apiserver.crt")).unwrap();
        pki.ensure(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert_eq!(serving, read(&pki.path("apiserver.crt")).unwrap());
        assert_eq!(ca, pki.ca_pem().unwrap(), "second start reuses the CA");
        pki.server_config().unwrap();
        let der = pem_certs(&pki.path("admin.crt")).unwrap().remove(0);
        let id = identity(&der).unwrap();
        assert_eq!(id.user, "kubernetes-admin");
        assert_eq!(id.groups, ["system:masters"]);
        let kc = pki
            .kubeconfig("admin", "admin", "https://127.0.0.1:6443")
            .unwrap();
        assert!(kc.contains("client-key-data"));
    }

    fn serving_names(pki: &Pki) -> Vec<String> {
        let der = pem_certs(&pki.path("apiserver.crt")).unwrap().remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                x509_parser::extensions::GeneralName::IPAddress(b) if b.len() == 4 => {
                    std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn serving_certificate_follows_new_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        pki.ensure(&["localhost".into()]).unwrap();
        let ca = pki.ca_pem().unwrap();
        assert!(!serving_names(&pki).contains(&"192.0.2.7".to_string()));
        pki.ensure(&["localhost".into(), "192.0.2.7".into()])
            .unwrap();
        let names = serving_names(&pki);
        assert!(names.contains(&"192.0.2.7".to_string()), "{names:?}");
        assert!(names.contains(&"localhost".to_string()), "{names:?}");
        assert_eq!(ca, pki.ca_pem().unwrap(), "the CA stays");
    }

    #[test]
    fn host_addresses_leave_out_loopback() {
        let addrs = host_addresses();
        assert!(
            !addrs.iter().any(|a| a == "127.0.0.1" || a == "::1"),
            "{addrs:?}"
        );
        for a in &addrs {
            a.parse::<std::net::IpAddr>().unwrap();
        }
    }
}
