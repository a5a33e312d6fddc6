//! rustls configurations for both legs, built once at start and shared by all connections.
//!
//! Only the *ring* provider is compiled in, so every builder names it explicitly instead of
//! relying on a process-wide default that nobody installed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::certs::{CertSet, CertStore};
use super::read_ahead::ReadAhead;
use super::stream::Stream;

/// The ALPN protocol id for IMAP (RFC 9051 and the IANA registry). Offering it on both legs
/// lets an ALPN-aware peer refuse a connection meant for another protocol, which defeats
/// cross-protocol attacks such as ALPACA.
pub const ALPN_IMAP: &[u8] = b"imap";

/// Names the generated certificate is valid for: what a local test client connects to.
const SELF_SIGNED_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read the certificate chain: {source}", path.display())]
    Cert {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)", path.display())]
    NoCert { path: PathBuf },
    #[error("{}: cannot read the private key: {source}", path.display())]
    Key {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("a certificate needs its key and a key its certificate: give both or neither")]
    Incomplete,
    #[error("{}: the certificate and key cannot be used together: {source}", path.display())]
    Unusable {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error(
        "{}: the certificate is not valid for {name:?}, a name it is configured for",
        path.display()
    )]
    NameNotCovered { path: PathBuf, name: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: cannot read the CA certificates: {source}", path.display())]
    CaRead {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: not a usable CA certificate: {source}", path.display())]
    Ca {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error(
        "no trust anchors to verify the upstream: the system store is empty or unreadable \
         and no `ca` is configured"
    )]
    NoRoots,
    #[error("cannot build the TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake { peer: String, source: io::Error },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The client-leg configuration for one certificate. With neither `cert` nor `key` a
/// self-signed certificate is generated, so that a first run needs no files; it is never
/// silently trusted by a client, so this only suits tests and trying imapgate out.
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let key = match (cert, key) {
        (Some(cert), Some(key)) => certified_key(cert, key)?,
        (None, None) => {
            tracing::warn!(
                names = ?SELF_SIGNED_NAMES,
                "no cert/key configured: using a freshly generated self-signed certificate; \
                 clients will not trust it without an exception"
            );
            generated_key()?
        }
        _ => return Err(TlsError::Incomplete),
    };
    server_config_with(Arc::new(CertStore::new(CertSet::single(Arc::new(key)))))
}

/// The client-leg configuration choosing its certificates with `certs` (by SNI, and
/// replaceable while it is in use).
pub fn server_config_with(certs: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    // rustls refuses a client whose ALPN list lacks "imap" and accepts one that sends no
    // ALPN at all, which is what RFC 7301 and the IMAP clients in the wild need.
    config.alpn_protocols = vec![ALPN_IMAP.to_vec()];
    Ok(Arc::new(config))
}

/// A certificate chain and its key, read from PEM files and checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_chain(cert)?;
    let key = load_key(key)?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Unusable {
        path: cert.to_owned(),
        source,
    })
}

/// A freshly generated self-signed certificate for [`SELF_SIGNED_NAMES`].
pub fn generated_key() -> Result<CertifiedKey, TlsError> {
    let (cert, key) = self_signed(&SELF_SIGNED_NAMES)?;
    CertifiedKey::from_der(vec![cert], key, &provider()).map_err(|source| TlsError::Unusable {
        path: PathBuf::from("<generated>"),
        source,
    })
}

/// The upstream-leg configuration: system roots plus `ca`, or no verification at all.
pub fn client_config(ca: Option<&Path>, verify: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let mut config = if verify {
        builder
            .with_root_certificates(root_store(ca)?)
            .with_no_client_auth()
    } else {
        tracing::warn!(
            "upstream.verify = false: the upstream's TLS certificate is NOT verified; anyone \
             on the path can read and change the traffic, passwords included. Tests only!"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider())))
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![ALPN_IMAP.to_vec()];
    Ok(Arc::new(config))
}

/// System roots come from rustls-native-certs rather than a fixed bundle path: it honours
/// SSL_CERT_FILE and SSL_CERT_DIR and knows each platform's store, so the admin's usual way
/// of adding a CA works here too.
fn root_store(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::warn!(%err, "while loading the system trust store");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system trust anchors loaded");
    if let Some(path) = ca {
        let certs = read_certs(path).map_err(|source| TlsError::CaRead {
            path: path.to_owned(),
            source,
        })?;
        if certs.is_empty() {
            return Err(TlsError::NoCert {
                path: path.to_owned(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|source| TlsError::Ca {
                path: path.to_owned(),
                source,
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(roots)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    CertificateDer::pem_file_iter(path)?.collect()
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = read_certs(path).map_err(|source| TlsError::Cert {
        path: path.to_owned(),
        source,
    })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Key {
        path: path.to_owned(),
        source,
    })
}

/// A self-signed certificate and its PKCS#8 key; public so tests can make their own.
pub fn self_signed(
    names: &[&str],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let generated = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    Ok((generated.cert.der().clone(), key))
}

/// The TLS handshake on an accepted client socket. The caller bounds it with its pre-auth
/// timeout: a client that never finishes the handshake must not hold a slot for ever.
pub async fn accept(acceptor: &TlsAcceptor, tcp: TcpStream) -> Result<Stream, TlsError> {
    let peer = peer_name(&tcp);
    match acceptor.accept(tcp).await {
        Ok(tls) => Ok(Stream::ServerTls(Box::new(tls))),
        Err(source) => Err(TlsError::Handshake { peer, source }),
    }
}

/// The TLS handshake on a socket to the upstream, verifying `server_name`.
pub async fn connect(
    connector: &TlsConnector,
    server_name: &str,
    tcp: TcpStream,
) -> Result<Stream, TlsError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
    let peer = peer_name(&tcp);
    match connector.connect(name, ReadAhead::new(tcp)).await {
        Ok(tls) => Ok(Stream::ClientTls(Box::new(tls))),
        Err(source) => Err(TlsError::Handshake { peer, source }),
    }
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "an unknown peer".to_owned(), |a| a.to_string())
}

/// Accepts any certificate, for `verify = false`. The handshake signatures are still
/// checked, so the peer at least holds the key of the certificate it showed.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Certificates for tests, shared with the upstream tests.
#[cfg(test)]
pub(crate) mod test_pki {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    /// A CA and a leaf for `localhost` and 127.0.0.1 that it signed, as PEM files in a
    /// temporary directory that lives as long as this value.
    pub struct TestPki {
        pub dir: tempfile::TempDir,
        pub ca: PathBuf,
        pub cert: PathBuf,
        pub key: PathBuf,
    }

    impl TestPki {
        pub fn new() -> TestPki {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            // Distinct names, so that a wrong CA is an unknown issuer, not an impostor.
            static SERIAL: AtomicUsize = AtomicUsize::new(0);
            let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
            ca_params
                .distinguished_name
                .push(DnType::CommonName, format!("imapgate test CA {serial}"));
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(ca_params, ca_key);
            let leaf_key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                .unwrap()
                .signed_by(&leaf_key, &issuer)
                .unwrap();
            let write = |name: &str, pem: String| {
                let path = dir.path().join(name);
                std::fs::write(&path, pem).unwrap();
                path
            };
            let ca = write("ca.pem", ca_cert.pem());
            let cert = write("cert.pem", leaf.pem());
            let key = write("key.pem", leaf_key.serialize_pem());
            TestPki { dir, ca, cert, key }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::test_pki::TestPki;
    use super::*;

    /// Runs one handshake over loopback; both ends' results, server first.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> (Result<Stream, TlsError>, Result<Stream, TlsError>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_side = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(&TlsAcceptor::from(server), tcp).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let client_side = connect(&TlsConnector::from(client), name, tcp).await;
        (server_side.await.unwrap(), client_side)
    }

    fn rustls_error(err: &TlsError) -> Option<&rustls::Error> {
        match err {
            TlsError::Handshake { source, .. } => source.get_ref()?.downcast_ref(),
            _ => None,
        }
    }

    fn with_alpn(config: Arc<ClientConfig>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut config = (*config).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    #[tokio::test]
    async fn handshake_with_configured_ca_negotiates_imap() {
        let pki = TestPki::new();
        let server = server_config(Some(&pki.cert), Some(&pki.key)).unwrap();
        let client = client_config(Some(&pki.ca), true).unwrap();
        let (server, client) = handshake(server, client, "localhost").await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        assert!(server.is_tls() && client.is_tls());
        assert_eq!(server.alpn(), Some(ALPN_IMAP));
        assert_eq!(client.alpn(), Some(ALPN_IMAP));
        assert_eq!(server.sni(), Some("localhost"));
        assert_eq!(client.sni(), None);
        client.write_all(b"a NOOP\r\n").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 8];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"a NOOP\r\n");
    }

    #[tokio::test]
    async fn ip_address_server_name_is_verified() {
        let pki = TestPki::new();
        let server = server_config(Some(&pki.cert), Some(&pki.key)).unwrap();
        let client = client_config(Some(&pki.ca), true).unwrap();
        let (server, client) = handshake(server, client, "127.0.0.1").await;
        client.unwrap();
        // No SNI is sent for an IP address.
        assert_eq!(server.unwrap().sni(), None);
    }

    #[tokio::test]
    async fn client_offering_only_other_alpn_is_rejected() {
        let pki = TestPki::new();
        let server = server_config(Some(&pki.cert), Some(&pki.key)).unwrap();
        let client = with_alpn(client_config(Some(&pki.ca), true).unwrap(), &[b"http/1.1"]);
        let (server, client) = handshake(server, client, "localhost").await;
        let err = server.unwrap_err();
        assert!(
            err.to_string().contains("TLS handshake with 127.0.0.1:"),
            "{err}"
        );
        assert_eq!(
            rustls_error(&err),
            Some(&rustls::Error::NoApplicationProtocol),
            "{err}"
        );
        let err = client.unwrap_err();
        assert_eq!(
            rustls_error(&err),
            Some(&rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            )),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_offering_imap_among_others_gets_imap() {
        let pki = TestPki::new();
        let server = server_config(Some(&pki.cert), Some(&pki.key)).unwrap();
        let client = with_alpn(
            client_config(Some(&pki.ca), true).unwrap(),
            &[b"http/1.1", b"imap"],
        );
        let (server, client) = handshake(server, client, "localhost").await;
        assert_eq!(server.unwrap().alpn(), Some(ALPN_IMAP));
        client.unwrap();
    }

    #[tokio::test]
    async fn client_offering_no_alpn_is_accepted() {
        let pki = TestPki::new();
        let server = server_config(Some(&pki.cert), Some(&pki.key)).unwrap();
        let client = with_alpn(client_config(Some(&pki.ca), true).unwrap(), &[]);
        let (server, client) = handshake(server, client, "localhost").await;
        assert_eq!(server.unwrap().alpn(), None);
        assert_eq!(client.unwrap().alpn(), None);
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_rejected() {
        let pki = TestPki::new();
        let other = TestPki::new();
        let server = server_config(Some(&pki.cert), Some(&pki.key)).unwrap();
        let client = client_config(Some(&other.ca), true).unwrap();
        let (_, client) = handshake(server, client, "localhost").await;
        let err = client.unwrap_err();
        assert_eq!(
            rustls_error(&err),
            Some(&rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            )),
            "{err}"
        );
    }

    #[tokio::test]
    async fn wrong_server_name_is_rejected() {
        let pki = TestPki::new();
        let server = server_config(Some(&pki.cert), Some(&pki.key)).unwrap();
        let client = client_config(Some(&pki.ca), true).unwrap();
        let (_, client) = handshake(server, client, "imap.example.com").await;
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn generated_certificate_is_accepted_only_without_verification() {
        let server = server_config(None, None).unwrap();
        let insecure = client_config(None, false).unwrap();
        let (server_side, client) = handshake(server.clone(), insecure, "localhost").await;
        server_side.unwrap();
        assert_eq!(client.unwrap().alpn(), Some(ALPN_IMAP));

        let pki = TestPki::new();
        let verifying = client_config(Some(&pki.ca), true).unwrap();
        let (_, client) = handshake(server, verifying, "localhost").await;
        assert!(client.is_err());
    }

    #[test]
    fn errors_name_the_file() {
        let pki = TestPki::new();
        let missing = pki.dir.path().join("missing.pem");
        let err = server_config(Some(&missing), Some(&pki.key)).unwrap_err();
        assert!(matches!(err, TlsError::Cert { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let err = server_config(Some(&pki.key), Some(&pki.key)).unwrap_err();
        assert!(matches!(err, TlsError::NoCert { .. }), "{err}");

        let err = server_config(Some(&pki.cert), Some(&pki.cert)).unwrap_err();
        assert!(matches!(err, TlsError::Key { .. }), "{err}");
        assert!(err.to_string().contains("cert.pem"), "{err}");

        let err = server_config(Some(&pki.cert), None).unwrap_err();
        assert!(matches!(err, TlsError::Incomplete), "{err}");

        let err = client_config(Some(&missing), true).unwrap_err();
        assert!(matches!(err, TlsError::CaRead { .. }), "{err}");
        let err = client_config(Some(&pki.key), true).unwrap_err();
        assert!(matches!(err, TlsError::NoCert { .. }), "{err}");
    }

    #[test]
    fn mismatched_key_is_refused_at_config_time() {
        let pki = TestPki::new();
        let other = TestPki::new();
        let err = server_config(Some(&pki.cert), Some(&other.key)).unwrap_err();
        assert!(matches!(err, TlsError::Unusable { .. }), "{err}");
    }
}
