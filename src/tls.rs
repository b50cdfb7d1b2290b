//! TLS on the HTTP listener (rustls, with the `ring` provider): the
//! certificate chain and key of `[tls]`, and client certificates required
//! and verified against `tls.client_ca_file` when it is set.
//!
//! In cluster mode with `tls.client_ca_file`, the same certificate and CA
//! make the peer port mutual TLS (see `cluster::transport::peer_tls`):
//! [`Tls`] is then also the peer port's [`PeerTlsSource`], and the
//! certificate must name this node (`datanode://node/<node.id>`).
//!
//! The files are read again on SIGHUP and whenever their bytes change
//! (looked at every [`crate::auth::WATCH_INTERVAL`]): a new certificate serves every
//! connection accepted after it, connections already open keep theirs, so
//! a rotation drops no request. Files that do not make a valid
//! configuration (a key that does not match the certificate, a file
//! written halfway) are refused with one warning, and the running
//! certificate stays until they do.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

use crate::auth::{LastSeen, read_credential_file};
use crate::cluster::transport::PeerTlsSource;
use crate::cluster::transport::peer_tls::{PEER_ALPN, certificate_node};
use crate::config::TlsConfig;

/// The bytes a configuration is built from.
type Contents = Vec<Vec<u8>>;

/// The configurations of one set of files.
struct Built {
    http: Arc<ServerConfig>,
    /// The peer port's, for a node of a cluster with client certificates.
    peer: Option<PeerConfigs>,
    /// When the certificate expires (Unix seconds).
    expires: i64,
}

/// The listener's TLS configuration, replaced when its files change.
pub struct Tls {
    files: TlsConfig,
    /// The node the certificate must name, when it serves the peer port.
    peer_node: Option<String>,
    current: RwLock<Arc<ServerConfig>>,
    peer: Option<Arc<PeerCertificates>>,
    seen: LastSeen,
    /// When the served certificate expires (Unix seconds).
    expires: AtomicI64,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads and checks the files of `[tls]`; the error names the file and
    /// what is wrong with it. With `peer_node` (cluster mode with
    /// `tls.client_ca_file`), the peer port's configurations too, and the
    /// certificate must name that node.
    pub fn load(files: &TlsConfig, peer_node: Option<&str>) -> Result<Tls, String> {
        let contents = read_all(files)?;
        let Built { http, peer, expires } = build(files, peer_node, &contents)?;
        let seen = LastSeen::new("tls", &contents);
        let expires = AtomicI64::new(expires);
        let peer = peer.map(|configs| Arc::new(PeerCertificates { current: RwLock::new(configs) }));
        let peer_node = peer_node.map(str::to_string);
        Ok(Tls { files: files.clone(), peer_node, current: RwLock::new(http), peer, seen, expires })
    }

    /// The peer port's configurations, when it uses these certificates
    /// (cluster mode with `tls.client_ca_file`).
    pub fn peer_certificates(&self) -> Option<Arc<PeerCertificates>> {
        self.peer.clone()
    }

    /// `datanode_tls_certificate_expiry_timestamp_seconds`: when the served
    /// certificate expires (an alert rule warns ahead of it).
    pub fn export_expiry(&self) {
        let expires = self.expires.load(Ordering::Relaxed);
        metrics::gauge!("datanode_tls_certificate_expiry_timestamp_seconds").set(expires as f64);
    }

    /// An acceptor with the current certificate, for one connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner)))
    }

    /// Reads the files again and switches to them if they changed and make
    /// a valid configuration; `forced` (SIGHUP) reports an unchanged or
    /// refused set too. Blocking (reads files).
    pub fn reload(&self, forced: bool) {
        self.seen.reload(
            forced,
            || read_all(&self.files),
            |contents| {
                let Built { http, peer, expires } = build(&self.files, self.peer_node.as_deref(), contents)?;
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = http;
                if let (Some(certificates), Some(configs)) = (&self.peer, peer) {
                    *certificates.current.write().unwrap_or_else(PoisonError::into_inner) = configs;
                }
                self.expires.store(expires, Ordering::Relaxed);
                self.export_expiry();
                Ok("a certificate; new connections use it".to_string())
            },
        );
    }
}

fn read_all(files: &TlsConfig) -> Result<Contents, String> {
    let mut paths: Vec<&PathBuf> = vec![&files.cert_file, &files.key_file];
    paths.extend(files.client_ca_file.as_ref());
    paths.into_iter().map(|path| read_credential_file(path)).collect()
}

/// The validity of a certificate (Unix seconds), refused when it is not
/// valid now: a rotation to an expired certificate would fail every
/// client.
fn validity(path: &Path, certificate: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|e| format!("tls.cert_file = {}: not an X.509 certificate: {e}", path.display()))?;
    let (from, until) = (parsed.validity().not_before.timestamp(), parsed.validity().not_after.timestamp());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if now < from {
        return Err(format!("tls.cert_file = {}: not valid before {}", path.display(), parsed.validity().not_before));
    }
    if now >= until {
        return Err(format!("tls.cert_file = {}: expired at {}", path.display(), parsed.validity().not_after));
    }
    Ok(until)
}

/// The peer port's configurations, server and client, replaced with the
/// listener's.
#[derive(Debug)]
pub struct PeerCertificates {
    current: RwLock<PeerConfigs>,
}

type PeerConfigs = (Arc<ServerConfig>, Arc<rustls::ClientConfig>);

impl PeerTlsSource for PeerCertificates {
    fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner).0)
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner).1)
    }
}

/// The configurations the files' contents make, and when the certificate
/// expires. With `peer_node`, the peer port's too, and the certificate
/// must name that node.
fn build(files: &TlsConfig, peer_node: Option<&str>, contents: &[Vec<u8>]) -> Result<Built, String> {
    let (cert, key, ca) = match contents {
        [cert, key] => (cert, key, None),
        [cert, key, ca] => (cert, key, Some(ca)),
        _ => return Err("internal: unexpected number of TLS files".into()),
    };
    let named = |path: &Path, what: &str| format!("{} ({what})", path.display());
    let chain = certificates(cert).map_err(|e| format!("tls.cert_file = {}: {e}", named(&files.cert_file, "PEM")))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("tls.cert_file = {}: no certificate in it", files.cert_file.display()));
    };
    let expires = validity(&files.cert_file, leaf)?;
    if let Some(node) = peer_node {
        match certificate_node(leaf.as_ref()) {
            Ok(named) if named == node => {}
            Ok(named) => {
                return Err(format!(
                    "tls.cert_file = {}: names node {named:?}, but this is node {node:?} (its peers would refuse it)",
                    files.cert_file.display()
                ));
            }
            Err(error) => {
                return Err(format!(
                    "tls.cert_file = {}: {error}; with tls.client_ca_file it is this node's certificate on the \
                     peer port and must name node {node:?}",
                    files.cert_file.display()
                ));
            }
        }
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        format!("tls.key_file = {}: no private key: {e}", named(&files.key_file, "PEM: PKCS#8, PKCS#1 or SEC1"))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match (ca, &files.client_ca_file) {
        (Some(ca), Some(path)) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates(ca).map_err(|e| format!("tls.client_ca_file = {}: {e}", path.display()))? {
                roots.add(certificate).map_err(|e| format!("tls.client_ca_file = {}: {e}", path.display()))?;
            }
            Some((Arc::new(roots), path))
        }
        _ => None,
    };
    let both = |e: rustls::Error| {
        format!("tls.cert_file = {} and tls.key_file = {}: {e}", files.cert_file.display(), files.key_file.display())
    };
    let server = |alpn: &[u8]| -> Result<Arc<ServerConfig>, String> {
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &roots {
            Some((roots, path)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| format!("tls.client_ca_file = {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain.clone(), key.clone_key()).map_err(both)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    };
    let http = server(b"http/1.1")?;
    let peer = match (&roots, peer_node) {
        (Some((roots, _)), Some(_)) => {
            let client = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(Arc::clone(roots))
                .with_client_auth_cert(chain.clone(), key.clone_key());
            let mut client = client.map_err(both)?;
            client.alpn_protocols = vec![PEER_ALPN.to_vec()];
            Some((server(PEER_ALPN)?, Arc::new(client)))
        }
        _ => None,
    };
    Ok(Built { http, peer, expires })
}

/// Every certificate of a PEM file; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| format!("not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(chain)
}

/// What a client command (`status`, `partition`, `disk`) needs to reach a
/// node that serves TLS: the CA to trust, and a client certificate when
/// the node requires one.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTls {
    /// For https:// URLs: trust the CAs of this PEM file (default: the
    /// public web roots).
    #[arg(long, global = true)]
    pub ca_file: Option<PathBuf>,
    /// Present this client certificate (PEM), for a node with
    /// `tls.client_ca_file`; needs `--client-key` and `--ca-file`.
    #[arg(long, global = true, requires_all = ["client_key", "ca_file"])]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ClientTls {
    /// An agent from `builder` that trusts `--ca-file` and presents the
    /// client certificate; `builder` as it is without them.
    pub fn agent(&self, builder: ureq::AgentBuilder) -> Result<ureq::Agent, String> {
        let Some(ca_file) = &self.ca_file else { return Ok(builder.build()) };
        let mut roots = RootCertStore::empty();
        for certificate in certificates(&read_credential_file(ca_file)?)
            .map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?
        {
            roots.add(certificate).map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(&read_credential_file(cert)?)
                    .map_err(|e| format!("--client-cert {}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_slice(&read_credential_file(key)?)
                    .map_err(|e| format!("--client-key {}: no private key: {e}", key.display()))?;
                config.with_client_auth_cert(chain, key).map_err(|e| format!("--client-cert: {e}"))?
            }
            _ => config.with_no_client_auth(),
        };
        Ok(builder.tls_config(Arc::new(config)).build())
    }
}
