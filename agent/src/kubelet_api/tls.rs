//! The kubelet API's TLS: a self-signed serving certificate for the node's name and addresses
//! (kubelet's behaviour without --tls-cert-file), kept under the data dir, and client
//! certificates verified against the cluster CA.

use super::Error;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls::{self, pki_types::CertificateDer};

/// DER certificates of a PEM bundle (a CA file or kubeconfig's certificate-authority-data).
pub fn pem_to_der(pem: &[u8]) -> Vec<Vec<u8>> {
    rustls_pemfile::certs(&mut &pem[..])
        .flatten()
        .map(|c| c.as_ref().to_vec())
        .collect()
}

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.display().to_string(),
        source,
    }
}

/// `<dir>/kubelet.crt` and `kubelet.key`, made when missing or when the names changed.
fn serving_cert(
    dir: &Path,
    node: &str,
    addrs: &[std::net::IpAddr],
) -> Result<(String, String), Error> {
    let (crt, key, names) = (
        dir.join("kubelet.crt"),
        dir.join("kubelet.key"),
        dir.join("kubelet.names"),
    );
    let mut wanted: Vec<String> = std::iter::once(node.to_string())
        .chain(addrs.iter().map(|a| a.to_string()))
        .collect();
    wanted.sort();
    wanted.dedup();
    let recorded = std::fs::read_to_string(&names).unwrap_or_default();
    if crt.exists() && key.exists() && recorded == wanted.join("\n") {
        return Ok((
            std::fs::read_to_string(&crt).map_err(io(&crt))?,
            std::fs::read_to_string(&key).map_err(io(&key))?,
        ));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(
        DnType::CommonName,
        format!("{node}@{}", chrono::Utc::now().timestamp()),
    );
    p.subject_alt_names = wanted
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let k = KeyPair::generate()?;
    let cert = p.self_signed(&k)?;
    let (cpem, kpem) = (cert.pem(), k.serialize_pem());
    write_private(&key, &kpem)?;
    std::fs::write(&crt, &cpem).map_err(io(&crt))?;
    std::fs::write(&names, wanted.join("\n")).map_err(io(&names))?;
    Ok((cpem, kpem))
}

fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

/// The server's TLS settings: HTTP/1.1 only (upgrades), client certificates of `client_ca`
/// verified when presented; requests without one are answered 401 by the handler.
pub fn server_config(
    dir: &Path,
    node: &str,
    addrs: &[std::net::IpAddr],
    client_ca: &[Vec<u8>],
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let (cpem, kpem) = serving_cert(dir, node, addrs)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cpem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    let key = rustls_pemfile::private_key(&mut kpem.as_bytes())
        .map_err(io(dir))?
        .ok_or_else(|| Error::Io {
            what: "kubelet.key".into(),
            source: std::io::Error::other("no private key"),
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cfg = if client_ca.is_empty() {
        builder.with_no_client_auth().with_single_cert(certs, key)?
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in client_ca {
            roots.add(CertificateDer::from(c.clone()))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::Tls(rustls::Error::General(e.to_string())))?;
        builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
