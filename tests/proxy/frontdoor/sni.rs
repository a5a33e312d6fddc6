//! Certificates by name (SNI), reloaded live: each listener shows the certificate configured
//! for the name a client asks for, its default to everyone else; policies see the name as
//! `ctx.sni`; a reload swaps certificates for new handshakes only, or keeps them all when a
//! file is broken.
//!
//! Every handshake here is made by a rustls client that trusts only the test CA and records
//! the leaf it was shown, so each test checks both which certificate came and that a client
//! accepts it for the name it asked for.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imapgate::config::{Config, ListenerTls, NamedCertificate, UpstreamTls};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::pki::Leaf;
use crate::support::proxy::{IMAPS, PLAIN, Proxy, ProxyProcess, STARTTLS, config_for, toml_path};
use crate::support::{Client, Dovecot, Pki};

/// A client's verifier that trusts the test CA and remembers the leaf it was shown, also
/// when it refuses it.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    shown: Mutex<Option<CertificateDer<'static>>>,
}

impl Recording {
    fn shown(&self) -> Option<CertificateDer<'static>> {
        self.shown.lock().expect("lock").clone()
    }
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.shown.lock().expect("lock") = Some(end_entity.clone().into_owned());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn recording_client(ca_pem: &str) -> (Arc<Recording>, Arc<ClientConfig>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("verifier");
    let recording = Arc::new(Recording {
        inner,
        shown: Mutex::new(None),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(recording.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"imap".to_vec()];
    (recording, Arc::new(config))
}

/// What a client asking for `sni` (an IP address: no SNI at all) was shown, and whether it
/// accepted it.
async fn handshake(addr: SocketAddr, ca_pem: &str, sni: &str) -> (CertificateDer<'static>, bool) {
    let (recording, config) = recording_client(ca_pem);
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    let accepted = tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake timed out")
    .is_ok();
    (
        recording.shown().expect("a certificate was shown"),
        accepted,
    )
}

fn der(leaf: &Leaf) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("leaf PEM")
}

fn named(leaf: &Leaf, names: &[&str]) -> NamedCertificate {
    NamedCertificate {
        names: names.iter().map(|n| n.to_string()).collect(),
        cert: leaf.cert.clone(),
        key: leaf.key.clone(),
    }
}

/// A test CA with a default leaf (localhost, 127.0.0.1) and one per configured name.
struct Certs {
    pki: Pki,
    default: Leaf,
    mail: Leaf,
    wild: Leaf,
    net: Leaf,
}

impl Certs {
    fn issue(dir: &Path) -> Certs {
        let pki = Pki::generate(dir);
        let default = Leaf {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
            cert_pem: pki.cert_pem.clone(),
            key_pem: pki.key_pem.clone(),
        };
        Certs {
            mail: pki.issue("mail-", &["mail.example.org"]),
            wild: pki.issue("wild-", &["*.example.org"]),
            net: pki.issue("net-", &["imap.example.net", "imap.example.com"]),
            default,
            pki,
        }
    }

    /// `cert`/`key` and the named certificates of every TLS listener of `config`.
    fn configure(&self, config: &mut Config) {
        for l in &mut config.listeners {
            if l.tls == ListenerTls::None {
                continue;
            }
            l.cert = Some(self.default.cert.clone());
            l.key = Some(self.default.key.clone());
            l.certificates = vec![
                named(&self.mail, &["mail.example.org"]),
                named(&self.wild, &["*.example.org"]),
                named(&self.net, &["imap.example.net", "IMAP.example.com"]),
            ];
        }
    }

    fn ca(&self) -> &str {
        &self.pki.ca_pem
    }
}

async fn proxy(dc: &Dovecot, certs: &Certs) -> (Proxy, Config) {
    let mut config = config_for(dc, UpstreamTls::None);
    certs.configure(&mut config);
    (Proxy::start(config.clone()).await, config)
}

#[tokio::test]
async fn each_name_gets_its_certificate_and_everyone_else_the_default() {
    let dc = Dovecot::shared();
    let dir = crate::support::temp_dir();
    let certs = Certs::issue(dir.path());
    let (proxy, _) = proxy(dc, &certs).await;
    let addr = proxy.addr(IMAPS);
    for (sni, expected, accepted) in [
        ("mail.example.org", &certs.mail, true),
        ("MAIL.Example.ORG", &certs.mail, true),
        ("imap.example.net", &certs.net, true),
        ("imap.example.com", &certs.net, true),
        // The wildcard: any one label in front of example.org, after the exact names.
        ("webmail.example.org", &certs.wild, true),
        ("x.example.org", &certs.wild, true),
        // Not one label: the default, which a client refuses for that name.
        ("a.b.example.org", &certs.default, false),
        ("example.org", &certs.default, false),
        // Names nobody configured, and no SNI at all (an address is never sent as SNI).
        ("unknown.example.net", &certs.default, false),
        ("localhost", &certs.default, true),
        ("127.0.0.1", &certs.default, true),
    ] {
        let (shown, ok) = handshake(addr, certs.ca(), sni).await;
        assert!(
            shown == der(expected),
            "{sni}: another certificate was shown"
        );
        assert_eq!(ok, accepted, "{sni}: the client's verdict");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn starttls_chooses_by_name_too_and_the_session_goes_on() {
    let dc = Dovecot::shared();
    let dir = crate::support::temp_dir();
    let certs = Certs::issue(dir.path());
    let (proxy, _) = proxy(dc, &certs).await;
    let (user, pass) = dc.fresh_user();
    for (sni, expected) in [
        ("mail.example.org", &certs.mail),
        ("imap.example.org", &certs.wild),
        ("127.0.0.1", &certs.default),
    ] {
        let (_, config) = recording_client(certs.ca());
        let mut c = Client::connect(proxy.addr(STARTTLS)).await;
        c.read_greeting().await;
        c.ok("a STARTTLS").await;
        c.upgrade_tls(sni, config).await;
        assert!(
            c.peer_certificate() == Some(der(expected)),
            "{sni}: another certificate was shown"
        );
        c.login(&user, &pass).await;
        c.ok("b SELECT INBOX").await;
        c.logout().await;
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn policies_see_the_name_the_client_asked_for() {
    let dc = Dovecot::shared();
    let dir = crate::support::temp_dir();
    let certs = Certs::issue(dir.path());
    let script = dir.path().join("sni_echo.lua");
    std::fs::write(
        &script,
        r#"return {
  commands = { "NOOP" },
  on_command = function(ctx, cmd)
    return imap.reject{ text = "sni " .. (ctx.sni or "none") }
  end,
}"#,
    )
    .expect("write policy");
    let mut config = config_for(dc, UpstreamTls::None);
    certs.configure(&mut config);
    config.policies = vec![imapgate::config::PolicyConfig {
        script,
        options: Default::default(),
        on_error: Default::default(),
        on_state_error: None,
    }];
    let proxy = Proxy::start(config).await;

    // Implicit TLS: the name is known from the first command.
    for (sni, seen) in [
        ("mail.example.org", "mail.example.org"),
        ("Other.Example.ORG", "other.example.org"),
        ("127.0.0.1", "none"),
    ] {
        let (_, tls) = recording_client(certs.ca());
        let mut c = Client::connect_tls_with(proxy.addr(IMAPS), sni, tls).await;
        c.read_greeting().await;
        let r = c.no("a NOOP").await;
        assert_eq!(r, [format!("a NO sni {seen}")]);
        c.logout().await;
    }

    // STARTTLS: none in plaintext, the handshake's name after it.
    let mut c = Client::connect(proxy.addr(STARTTLS)).await;
    c.read_greeting().await;
    assert_eq!(c.no("a NOOP").await, ["a NO sni none"]);
    c.ok("b STARTTLS").await;
    let (_, tls) = recording_client(certs.ca());
    c.upgrade_tls("imap.example.net", tls).await;
    assert_eq!(c.no("c NOOP").await, ["c NO sni imap.example.net"]);
    c.logout().await;

    // Plaintext listener: never a name.
    let mut c = Client::connect(proxy.addr(PLAIN)).await;
    c.read_greeting().await;
    assert_eq!(c.no("a NOOP").await, ["a NO sni none"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn reload_serves_new_certificates_to_new_connections_only() {
    let dc = Dovecot::shared();
    let dir = crate::support::temp_dir();
    let certs = Certs::issue(dir.path());
    let (proxy, config) = proxy(dc, &certs).await;
    let (user, pass) = dc.fresh_user();

    // A session opened before the reload, in a mailbox.
    let (_, tls) = recording_client(certs.ca());
    let mut before = Client::connect_tls_with(proxy.addr(IMAPS), "mail.example.org", tls).await;
    before.read_greeting().await;
    before.login(&user, &pass).await;
    before.ok("a1 SELECT INBOX").await;
    assert!(before.peer_certificate() == Some(der(&certs.mail)));

    // Renewed files in place (same paths, new keys), then the reload.
    let mail2 = certs.pki.issue("mail-", &["mail.example.org"]);
    let default2 = certs.pki.issue("", &["localhost", "127.0.0.1"]);
    let reloaded = proxy.server().reload_certificates(&config).expect("reload");
    assert_eq!(reloaded, [IMAPS, STARTTLS]);

    let (shown, ok) = handshake(proxy.addr(IMAPS), certs.ca(), "mail.example.org").await;
    assert!(
        ok && shown == der(&mail2),
        "mail.example.org: not the new certificate"
    );
    let (shown, ok) = handshake(proxy.addr(IMAPS), certs.ca(), "127.0.0.1").await;
    assert!(ok && shown == der(&default2), "no SNI: not the new default");
    let (shown, _) = handshake(proxy.addr(IMAPS), certs.ca(), "x.example.org").await;
    assert!(
        shown == der(&certs.wild),
        "an unchanged file is the same certificate"
    );
    let mut c = Client::connect(proxy.addr(STARTTLS)).await;
    c.read_greeting().await;
    c.ok("a STARTTLS").await;
    c.upgrade_tls("mail.example.org", recording_client(certs.ca()).1)
        .await;
    assert!(
        c.peer_certificate() == Some(der(&mail2)),
        "STARTTLS: not the new certificate"
    );
    c.logout().await;

    // The session from before goes on, with the keys of its own handshake.
    before.ok("a2 NOOP").await;
    let r = before.ok("a3 STATUS INBOX (MESSAGES)").await;
    assert!(r[0].starts_with("* STATUS INBOX (MESSAGES "), "{r:?}");
    assert!(before.peer_certificate() == Some(der(&certs.mail)));
    before.logout().await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_broken_file_keeps_the_current_certificates() {
    let dc = Dovecot::shared();
    let dir = crate::support::temp_dir();
    let certs = Certs::issue(dir.path());
    let (proxy, config) = proxy(dc, &certs).await;

    // New default files that are fine, but a key that does not load for one name: nothing
    // changes, and the error names the listener and the file.
    let default2 = certs.pki.issue("", &["localhost", "127.0.0.1"]);
    std::fs::write(&certs.net.key, "this is not a key\n").expect("write");
    let err = proxy
        .server()
        .reload_certificates(&config)
        .expect_err("a broken key must not load")
        .to_string();
    assert!(
        err.contains(&format!("listener {IMAPS}")) && err.contains("net-key.pem"),
        "{err}"
    );
    let (shown, _) = handshake(proxy.addr(IMAPS), certs.ca(), "127.0.0.1").await;
    assert!(shown == der(&certs.default), "the default changed anyway");
    let (shown, ok) = handshake(proxy.addr(IMAPS), certs.ca(), "imap.example.net").await;
    assert!(
        ok && shown == der(&certs.net),
        "imap.example.net lost its certificate"
    );

    // A certificate that does not cover a name it is configured for is refused too.
    certs.pki.issue("net-", &["imap.example.net"]);
    let err = proxy
        .server()
        .reload_certificates(&config)
        .expect_err("imap.example.com is not covered")
        .to_string();
    assert!(
        err.contains("net-cert.pem") && err.contains("IMAP.example.com"),
        "{err}"
    );
    let (shown, _) = handshake(proxy.addr(IMAPS), certs.ca(), "imap.example.net").await;
    assert!(shown == der(&certs.net), "a partial reload happened");

    // Fixed: the next reload takes everything.
    let net2 = certs
        .pki
        .issue("net-", &["imap.example.net", "imap.example.com"]);
    proxy
        .server()
        .reload_certificates(&config)
        .expect("reload after the fix");
    let (shown, ok) = handshake(proxy.addr(IMAPS), certs.ca(), "imap.example.com").await;
    assert!(ok && shown == der(&net2));
    let (shown, ok) = handshake(proxy.addr(IMAPS), certs.ca(), "localhost").await;
    assert!(ok && shown == der(&default2));
    proxy.shutdown().await;
}

/// The binary, driven by SIGHUP as an operator (or certbot's deploy hook) would.
#[tokio::test]
async fn sighup_reloads_certificates_of_the_running_binary() {
    let dc = Dovecot::shared();
    let dir = crate::support::temp_dir();
    let certs = Certs::issue(dir.path());
    let toml = format!(
        r#"
[[listener]]
name = "imaps"
bind = "127.0.0.1:0"
cert = {default_cert}
key = {default_key}

[[listener.certificate]]
names = ["mail.example.org"]
cert = {mail_cert}
key = {mail_key}

[upstream]
address = "{upstream}"
"#,
        default_cert = toml_path(&certs.default.cert),
        default_key = toml_path(&certs.default.key),
        mail_cert = toml_path(&certs.mail.cert),
        mail_key = toml_path(&certs.mail.key),
        upstream = dc.addr(),
    );
    let proxy = ProxyProcess::start(&toml, "info");
    let addr = proxy.addr("imaps");
    let (shown, ok) = handshake(addr, certs.ca(), "mail.example.org").await;
    assert!(ok && shown == der(&certs.mail));

    let mail2 = certs.pki.issue("mail-", &["mail.example.org"]);
    proxy.signal("HUP");
    proxy.wait_for_log("SIGHUP: certificates reloaded", 1).await;
    let (shown, ok) = handshake(addr, certs.ca(), "mail.example.org").await;
    assert!(
        ok && shown == der(&mail2),
        "not the new certificate after SIGHUP"
    );

    std::fs::write(&certs.mail.cert, "-----BEGIN CERTIFICATE-----\n").expect("write");
    proxy.signal("HUP");
    proxy
        .wait_for_log("keeping the current certificates", 1)
        .await;
    assert!(proxy.log().contains("mail-cert.pem"), "{}", proxy.log());
    let (shown, ok) = handshake(addr, certs.ca(), "mail.example.org").await;
    assert!(
        ok && shown == der(&mail2),
        "a broken file replaced the certificate"
    );
}
