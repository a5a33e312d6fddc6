//! The client leg's certificates: chosen per connection by the server name the client asks
//! for (SNI), and replaceable while the proxy runs (SIGHUP).
//!
//! Each TLS listener has one [`CertStore`], which rustls asks for a certificate during every
//! handshake. The store holds its whole set of certificates behind an `ArcSwap`, so a reload
//! builds a complete new set and swaps it in one step: a handshake sees the old set or the
//! new one, never a mixture, and established sessions keep the keys they negotiated.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{DnsName, ServerName};
use tokio_rustls::TlsAcceptor;

use super::tls::{self, TlsError};
use crate::config::{Config, ListenerConfig, ListenerTls, NamedCertificate};

/// A label no certificate names by accident: a configured `*.domain` must be served by a
/// certificate valid for any label in front of `domain`, i.e. a wildcard certificate.
const WILDCARD_PROBE: &str = "imapgate-wildcard-check";

/// One listener's certificates at one point in time.
#[derive(Debug)]
pub struct CertSet {
    /// For clients without SNI or asking for a name no certificate is configured for.
    default: Arc<CertifiedKey>,
    /// By lower-case DNS name.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the lower-case domain after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertSet {
    /// A set of one certificate, for every client.
    pub fn single(default: Arc<CertifiedKey>) -> CertSet {
        CertSet {
            default,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }

    /// The certificate for a client asking for `sni`: a configured exact name first, then a
    /// wildcard for the name's first label, then the default. rustls hands over SNI already
    /// lower-cased; it is folded again here so that the rule does not depend on that.
    pub fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return found;
        }
        // `*.example.org` covers `a.example.org`, not `example.org` nor `a.b.example.org`:
        // the same rule a client applies to a wildcard certificate.
        name.split_once('.')
            .filter(|(label, _)| !label.is_empty())
            .and_then(|(_, domain)| self.wildcard.get(domain))
            .unwrap_or(&self.default)
    }

    /// How many names select a certificate other than the default.
    pub fn names(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }
}

/// The certificate resolver of one listener.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertSet>,
}

impl CertStore {
    pub fn new(set: CertSet) -> CertStore {
        CertStore {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// Makes `set` the one new handshakes use.
    pub fn replace(&self, set: CertSet) {
        self.current.store(Arc::new(set));
    }

    /// The set new handshakes use now.
    pub fn current(&self) -> Arc<CertSet> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(client_hello.server_name()).clone())
    }
}

/// The self-signed certificate of listeners configured without one, made once and shared:
/// a reload must not change it under clients that pinned it.
#[derive(Debug, Default)]
struct Generated(Mutex<Option<Arc<CertifiedKey>>>);

impl Generated {
    fn get(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        // A poisoned lock only means a panic elsewhere while generating: the slot is still
        // either empty or a finished certificate.
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = slot.as_ref() {
            return Ok(key.clone());
        }
        let key = Arc::new(tls::generated_key()?);
        *slot = Some(key.clone());
        Ok(key)
    }
}

/// Why a listener's certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("listener {listener}: {source}")]
pub struct CertError {
    pub listener: String,
    #[source]
    pub source: TlsError,
}

/// Every TLS listener's certificate store, by listener name.
#[derive(Debug)]
pub struct ClientCerts {
    stores: Vec<(String, Arc<CertStore>)>,
    generated: Generated,
}

impl ClientCerts {
    /// Loads the certificates of every TLS listener of `config`; the acceptors come back in
    /// the order of `config.listeners`, `None` for plaintext listeners.
    pub fn load(config: &Config) -> Result<(ClientCerts, Vec<Option<TlsAcceptor>>), CertError> {
        let mut certs = ClientCerts {
            stores: Vec::new(),
            generated: Generated::default(),
        };
        let mut acceptors = Vec::new();
        for l in &config.listeners {
            if l.tls == ListenerTls::None {
                acceptors.push(None);
                continue;
            }
            let set = certs.load_set(l, true)?;
            let store = Arc::new(CertStore::new(set));
            let server = tls::server_config_with(store.clone()).map_err(|source| CertError {
                listener: l.name.clone(),
                source,
            })?;
            acceptors.push(Some(TlsAcceptor::from(server)));
            certs.stores.push((l.name.clone(), store));
        }
        Ok((certs, acceptors))
    }

    /// Reads every running TLS listener's certificates again from `config` (listeners are
    /// matched by name) and, only if all of them load, makes them the ones new handshakes
    /// use. Returns the listeners reloaded. Listeners added, removed or switched between
    /// plaintext and TLS need a restart; they are logged and left alone.
    pub fn reload(&self, config: &Config) -> Result<Vec<String>, CertError> {
        let mut fresh = Vec::new();
        for (name, store) in &self.stores {
            let Some(l) = config.listeners.iter().find(|l| &l.name == name) else {
                tracing::warn!(
                    listener = %name,
                    "not in the reloaded config: its certificates are kept (a restart removes it)"
                );
                continue;
            };
            if l.tls == ListenerTls::None {
                tracing::warn!(
                    listener = %name,
                    "tls = \"none\" in the reloaded config: its certificates are kept until a restart"
                );
                continue;
            }
            fresh.push((name, store, self.load_set(l, false)?));
        }
        for l in &config.listeners {
            if l.tls != ListenerTls::None && !self.stores.iter().any(|(n, _)| n == &l.name) {
                tracing::warn!(listener = %l.name, "a TLS listener that is not running: it starts with a restart");
            }
        }
        let mut reloaded = Vec::new();
        for (name, store, set) in fresh {
            tracing::debug!(listener = %name, names = set.names(), "certificates replaced");
            store.replace(set);
            reloaded.push(name.clone());
        }
        Ok(reloaded)
    }

    /// The store of the listener called `name`.
    pub fn store(&self, name: &str) -> Option<&Arc<CertStore>> {
        self.stores.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// One listener's set; `announce` warns about a generated default (at start, not at
    /// every reload).
    fn load_set(&self, l: &ListenerConfig, announce: bool) -> Result<CertSet, CertError> {
        let err = |source| CertError {
            listener: l.name.clone(),
            source,
        };
        let default = match (&l.cert, &l.key) {
            (Some(cert), Some(key)) => Arc::new(tls::certified_key(cert, key).map_err(err)?),
            (None, None) => {
                let generated = self.generated.get().map_err(err)?;
                if announce {
                    tracing::warn!(
                        listener = %l.name,
                        "no cert/key configured: using a generated self-signed certificate \
                         for localhost and 127.0.0.1; clients will not trust it without an \
                         exception"
                    );
                }
                generated
            }
            _ => return Err(err(TlsError::Incomplete)),
        };
        let mut set = CertSet {
            default,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for named in &l.certificates {
            add_named(&mut set, named).map_err(err)?;
        }
        Ok(set)
    }
}

/// Loads one `[[listener.certificate]]` into `set`, after checking that its certificate is
/// valid for each of its names: a certificate that does not cover a name it is chosen for
/// fails every client that asks for that name, so it is refused at load instead.
fn add_named(set: &mut CertSet, named: &NamedCertificate) -> Result<(), TlsError> {
    let key = Arc::new(tls::certified_key(&named.cert, &named.key)?);
    let leaf = key
        .end_entity_cert()
        .and_then(ParsedCertificate::try_from)
        .map_err(|source| TlsError::Unusable {
            path: named.cert.clone(),
            source,
        })?;
    for configured in &named.names {
        let name = configured.to_ascii_lowercase();
        let (probe, table, by) = match name.strip_prefix("*.") {
            Some(domain) => (
                format!("{WILDCARD_PROBE}.{domain}"),
                &mut set.wildcard,
                domain.to_owned(),
            ),
            None => (name.clone(), &mut set.exact, name.clone()),
        };
        check_covers(&leaf, &probe, &named.cert, configured)?;
        table.insert(by, key.clone());
    }
    Ok(())
}

fn check_covers(
    leaf: &ParsedCertificate<'_>,
    probe: &str,
    path: &Path,
    name: &str,
) -> Result<(), TlsError> {
    let server_name = DnsName::try_from(probe.to_owned())
        .map(ServerName::DnsName)
        .map_err(|_| TlsError::ServerName(name.to_owned()))?;
    rustls::client::verify_server_name(leaf, &server_name).map_err(|_| TlsError::NameNotCovered {
        path: path.to_owned(),
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};
    use rustls_pki_types::CertificateDer;

    use super::*;

    fn key(names: &[&str]) -> Arc<CertifiedKey> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let kp = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(kp.serialize_der().into());
        let provider = rustls::crypto::ring::default_provider();
        Arc::new(CertifiedKey::from_der(vec![cert.der().clone()], der, &provider).unwrap())
    }

    fn write(dir: &Path, stem: &str, names: &[&str]) -> NamedCertificate {
        let owned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let kp = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(owned.clone())
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let named = NamedCertificate {
            names: owned,
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&named.cert, cert.pem()).unwrap();
        std::fs::write(&named.key, kp.serialize_pem()).unwrap();
        named
    }

    fn same(a: &Arc<CertifiedKey>, b: &Arc<CertifiedKey>) -> bool {
        Arc::ptr_eq(a, b)
    }

    #[test]
    fn exact_names_then_wildcards_then_the_default() {
        let (default, mail, wild) = (key(&["d"]), key(&["m"]), key(&["w"]));
        let set = CertSet {
            default: default.clone(),
            exact: HashMap::from([("mail.example.org".to_owned(), mail.clone())]),
            wildcard: HashMap::from([("example.org".to_owned(), wild.clone())]),
        };
        assert!(same(set.pick(None), &default));
        assert!(same(set.pick(Some("mail.example.org")), &mail));
        assert!(same(set.pick(Some("MAIL.Example.Org")), &mail));
        assert!(same(set.pick(Some("imap.example.org")), &wild));
        // One label only, as for a wildcard certificate.
        assert!(same(set.pick(Some("a.b.example.org")), &default));
        assert!(same(set.pick(Some("example.org")), &default));
        assert!(same(set.pick(Some(".example.org")), &default));
        assert!(same(set.pick(Some("other.example.net")), &default));
        assert_eq!(set.names(), 2);
    }

    #[test]
    fn a_certificate_must_cover_its_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = CertSet {
            default: key(&["d"]),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        let mut named = write(dir.path(), "a", &["mail.example.org", "*.example.net"]);
        add_named(&mut set, &named).unwrap();
        assert_eq!(set.names(), 2);

        named.names = vec!["Mail.Example.ORG".into(), "other.example.org".into()];
        let err = add_named(&mut set, &named).unwrap_err();
        assert!(
            matches!(&err, TlsError::NameNotCovered { name, .. } if name == "other.example.org"),
            "{err}"
        );
        assert!(err.to_string().contains("a.pem"), "{err}");

        // An exact certificate name does not stand for a wildcard.
        named.names = vec!["*.example.org".into()];
        let err = add_named(&mut set, &named).unwrap_err();
        assert!(matches!(err, TlsError::NameNotCovered { .. }), "{err}");
        // A wildcard certificate covers any one label of its domain.
        named.names = vec!["x.example.net".into(), "*.EXAMPLE.net".into()];
        add_named(&mut set, &named).unwrap();
    }

    #[test]
    fn mismatched_key_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a", &["a.example"]);
        let b = write(dir.path(), "b", &["b.example"]);
        let mut set = CertSet {
            default: key(&["d"]),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        let crossed = NamedCertificate {
            key: b.key.clone(),
            ..a.clone()
        };
        let err = add_named(&mut set, &crossed).unwrap_err();
        assert!(matches!(err, TlsError::Unusable { .. }), "{err}");
        assert!(err.to_string().contains("a.pem"), "{err}");
    }

    fn listener(
        name: &str,
        tls: ListenerTls,
        cert: Option<&NamedCertificate>,
        named: Vec<NamedCertificate>,
    ) -> ListenerConfig {
        let mut l = ListenerConfig::new("127.0.0.1:0".parse().unwrap(), tls);
        l.name = name.to_owned();
        l.cert = cert.map(|c| c.cert.clone());
        l.key = cert.map(|c| c.key.clone());
        l.certificates = named;
        l
    }

    fn pick(certs: &ClientCerts, listener: &str, sni: Option<&str>) -> CertificateDer<'static> {
        let set = certs.store(listener).unwrap().current();
        set.pick(sni).cert[0].clone()
    }

    fn der(named: &NamedCertificate) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_file(&named.cert).unwrap()
    }

    #[test]
    fn reload_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = write(dir.path(), "d", &["localhost"]);
        let m = write(dir.path(), "m", &["mail.example.org"]);
        let config = Config {
            listeners: vec![
                listener("a", ListenerTls::Implicit, Some(&d), vec![m.clone()]),
                listener("b", ListenerTls::Starttls, None, vec![]),
                listener("c", ListenerTls::None, None, vec![]),
            ],
            ..Config::default()
        };
        let (certs, acceptors) = ClientCerts::load(&config).unwrap();
        assert_eq!(
            acceptors.iter().map(Option::is_some).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(certs.store("c").is_none());
        let generated = pick(&certs, "b", None);
        assert_eq!(pick(&certs, "a", Some("mail.example.org")), der(&m));

        // New files for "a"; "b" still generated, and the same certificate as before.
        let m2 = write(dir.path(), "m", &["mail.example.org"]);
        assert_ne!(der(&m2), pick(&certs, "a", Some("mail.example.org")));
        assert_eq!(certs.reload(&config).unwrap(), ["a", "b"]);
        let m2_der = der(&m2);
        assert_eq!(pick(&certs, "a", Some("mail.example.org")), m2_der);
        assert_eq!(pick(&certs, "b", Some("mail.example.org")), generated);

        // New files for "a" again, but "b" now wants a certificate that does not load:
        // "a" is not changed either.
        let m3 = write(dir.path(), "m", &["mail.example.org"]);
        let mut broken = config.clone();
        let missing = NamedCertificate {
            cert: dir.path().join("missing.pem"),
            ..m3.clone()
        };
        broken.listeners[1].certificates = vec![missing];
        let err = certs.reload(&broken).unwrap_err();
        assert_eq!(err.listener, "b");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        assert_eq!(pick(&certs, "a", Some("mail.example.org")), m2_der);
        assert_eq!(certs.reload(&config).unwrap(), ["a", "b"]);
        assert_eq!(pick(&certs, "a", Some("mail.example.org")), der(&m3));
    }
}
