//! Test certificates made with rcgen: one CA, and leaf certificates signed by it.
//!
//! ```ignore
//! let pki = Pki::generate(dir.path());            // CA + leaf for localhost and 127.0.0.1
//! let other = pki.issue("mail", &["mail.test"]);  // another leaf from the same CA
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA and a leaf certificate for `localhost` / `127.0.0.1`, as PEM strings and as files.
pub struct Pki {
    /// The folder the PEM files were written to.
    pub dir: PathBuf,
    /// `dir/ca.pem`: the CA certificate (what a client trusts).
    pub ca: PathBuf,
    /// `dir/cert.pem`: the leaf certificate for `localhost` and `127.0.0.1`.
    pub cert: PathBuf,
    /// `dir/key.pem`: the leaf's private key (PKCS#8).
    pub key: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    ca_params: CertificateParams,
    ca_key_pem: String,
}

/// A leaf certificate issued by [`Pki::issue`].
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// Generates a fresh CA and a leaf for `localhost` and `127.0.0.1` and writes
    /// `ca.pem`, `cert.pem` and `key.pem` into `dir` (created if missing).
    pub fn generate(dir: &Path) -> Pki {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "imapgate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("generate CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");

        let mut pki = Pki {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca_pem: ca_cert.pem(),
            cert_pem: String::new(),
            key_pem: String::new(),
            ca_params,
            ca_key_pem: ca_key.serialize_pem(),
        };
        write(&pki.ca, &pki.ca_pem);
        let leaf = pki.issue("", &["localhost", "127.0.0.1"]);
        pki.cert_pem = leaf.cert_pem;
        pki.key_pem = leaf.key_pem;
        pki
    }

    /// Issues another leaf certificate from this CA for `names` (DNS names or IP addresses)
    /// and writes it as `{stem}cert.pem` / `{stem}key.pem` into the PKI folder
    /// (so `issue("", ..)` overwrites the default leaf).
    pub fn issue(&self, stem: &str, names: &[&str]) -> Leaf {
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params (bad name?)");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;

        let ca_key = KeyPair::from_pem(&self.ca_key_pem).expect("CA key");
        let issuer = Issuer::from_params(&self.ca_params, ca_key);
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");

        let leaf = Leaf {
            cert: self.dir.join(format!("{stem}cert.pem")),
            key: self.dir.join(format!("{stem}key.pem")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        write(&leaf.cert, &leaf.cert_pem);
        write(&leaf.key, &leaf.key_pem);
        leaf
    }
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
