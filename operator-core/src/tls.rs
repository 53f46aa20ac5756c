//! TLS material of a cluster's internal traffic: the layout of a TLS
//! Secret (`ca.crt`, `tls.crt`, `tls.key`), the generation of a CA and one
//! certificate for every member's names (pure apart from the random keys),
//! and the check of a directory of those files (filesystem reads only).
//!
//! One certificate for all members, signed by one CA: each member presents
//! it to the others and trusts what the CA signed, which is what Galera
//! (and Percona XtraDB Cluster's `pxc-encrypt-cluster-traffic`) needs. The
//! Percona operator generates the same shape when the user gives no
//! Secret.

use std::path::Path;

use chrono::{Datelike, Days, NaiveDate, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::engine::ValidatedCluster;

/// Key of the CA certificate (PEM) that signed `tls.crt`.
pub const KEY_CA: &str = "ca.crt";
/// Key of the members' certificate (PEM).
pub const KEY_CERT: &str = "tls.crt";
/// Key of the certificate's private key (PEM, PKCS#8).
pub const KEY_KEY: &str = "tls.key";
/// Every key a TLS Secret must hold, in the order they are checked.
pub const KEYS: [&str; 3] = [KEY_CA, KEY_CERT, KEY_KEY];
/// The Secret type of a generated TLS Secret.
pub const SECRET_TYPE: &str = "kubernetes.io/tls";
/// How long generated certificates are valid. Stratum does not rotate
/// them yet (see docs/engines.md): long enough not to expire under a
/// running cluster, as with a user's long-lived internal CA.
pub const VALIDITY_DAYS: u64 = 3650;

/// The three files of a TLS Secret, PEM text.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `ca.crt`.
    pub ca_crt: String,
    /// `tls.crt`.
    pub tls_crt: String,
    /// `tls.key`.
    pub tls_key: String,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca_crt", &self.ca_crt)
            .field("tls_crt", &self.tls_crt)
            .field("tls_key", &"<redacted>")
            .finish()
    }
}

impl TlsFiles {
    /// `(key, content)` for each of [`KEYS`].
    pub fn entries(&self) -> [(&'static str, &str); 3] {
        [
            (KEY_CA, &self.ca_crt),
            (KEY_CERT, &self.tls_crt),
            (KEY_KEY, &self.tls_key),
        ]
    }
}

/// Generation failed (an invalid name, which the callers' names are not).
#[derive(Debug, thiserror::Error)]
#[error("failed to generate the TLS certificates of {cluster}")]
pub struct GenerateError {
    /// The cluster.
    pub cluster: String,
    /// rcgen's error.
    #[source]
    pub source: rcgen::Error,
}

/// A new CA (`<cluster> CA`) and one certificate signed by it for `names`
/// (DNS names, wildcards, or IP addresses, which become IP SANs), usable
/// as server and client certificate. ECDSA P-256 keys, valid from
/// yesterday for [`VALIDITY_DAYS`].
pub fn generate(cluster: &str, names: &[String]) -> Result<TlsFiles, GenerateError> {
    let err = |source| GenerateError {
        cluster: cluster.to_string(),
        source,
    };
    let today = Utc::now().date_naive();
    let at = |d: NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    let not_before = at(today - Days::new(1));
    let not_after = at(today + Days::new(VALIDITY_DAYS));

    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name = dn(&format!("{cluster} CA"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(names.to_vec()).map_err(err)?;
    // The CN must differ from the CA's (OpenSSL refuses a chain whose
    // subject and issuer names are equal as self-signed).
    // Not a wildcard: rsync's SST sends the CN to the donor inside its
    // `CN:secret@host` auth string, which the server refuses with a `*` in
    // it ("Bad remote auth string").
    let cn = names
        .iter()
        .find(|n| !n.contains('*'))
        .map_or(cluster, String::as_str);
    leaf.distinguished_name = dn(cn);
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Members are servers (Galera listener, SST joiner) and clients (the
    // connecting peer, the SST donor) with the same certificate.
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let leaf_key = KeyPair::generate().map_err(err)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(err)?;
    Ok(TlsFiles {
        ca_crt: ca_cert.pem(),
        tls_crt: leaf_cert.pem(),
        tls_key: leaf_key.serialize_pem(),
    })
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Stratum");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The names a Kubernetes member is reached at: each instance's name
/// through the headless Service (`<pod>.<cluster>-headless.<ns>.svc`, and
/// with the cluster domain), and the same with a wildcard so that members
/// added by scaling are covered by the certificate made at creation.
pub fn kubernetes_names(cluster: &ValidatedCluster) -> Vec<String> {
    let headless = crate::build::names::headless_service(&cluster.meta.name);
    let ns = &cluster.meta.namespace;
    let domain = crate::build::CLUSTER_DOMAIN;
    let mut names = vec![
        format!("*.{headless}.{ns}.svc"),
        format!("*.{headless}.{ns}.svc.{domain}"),
    ];
    for instance in cluster.instance_names() {
        names.push(format!("{instance}.{headless}.{ns}.svc"));
        names.push(format!("{instance}.{headless}.{ns}.svc.{domain}"));
    }
    names
}

/// The names a local member is reached at: `localhost` (mariabackup's SST
/// checks a local joiner's certificate against that name), the listen
/// address and the loopback addresses, as IP SANs.
pub fn local_names(listen: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), listen.to_string()];
    for ip in ["127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == ip) {
            names.push(ip.to_string());
        }
    }
    names
}

/// The keys of [`KEYS`] that a Secret's data (or `stringData`) lacks or
/// holds empty.
pub fn missing_keys(secret: &k8s_openapi::api::core::v1::Secret) -> Vec<&'static str> {
    KEYS.into_iter()
        .filter(|k| {
            let in_data = secret
                .data
                .as_ref()
                .and_then(|d| d.get(*k))
                .is_some_and(|v| !v.0.is_empty());
            let in_string_data = secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(*k))
                .is_some_and(|v| !v.is_empty());
            !(in_data || in_string_data)
        })
        .collect()
}

/// A TLS Secret whose files are incomplete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "TLS Secret {secret} has no key {key} (looked for {path}); it must hold ca.crt, tls.crt and tls.key: a kubernetes.io/tls Secret with the CA that signed tls.crt under ca.crt"
)]
pub struct MissingKey {
    /// The Secret's name.
    pub secret: String,
    /// The first missing key.
    pub key: &'static str,
    /// Where the file was looked for.
    pub path: String,
}

/// Check that `dir` holds every key of the TLS Secret `secret` as a
/// non-empty file. Filesystem reads only.
pub fn check_dir(dir: &Path, secret: &str) -> Result<(), MissingKey> {
    for key in KEYS {
        let path = dir.join(key);
        let present = std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() > 0);
        if !present {
            return Err(MissingKey {
                secret: secret.to_string(),
                key,
                path: path.display().to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_is_signed_by_the_ca_and_names_every_member() {
        let names = vec![
            "*.simple-pxc-headless.db.svc".to_string(),
            "simple-pxc-0.simple-pxc-headless.db.svc".to_string(),
            "127.0.0.1".to_string(),
        ];
        let files = generate("simple-pxc", &names).unwrap();
        assert!(files.ca_crt.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(files.tls_crt.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(files.tls_key.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!format!("{files:?}").contains("PRIVATE KEY"));
        // A second generation is another CA: nothing is deterministic.
        let again = generate("simple-pxc", &names).unwrap();
        assert_ne!(again.ca_crt, files.ca_crt);
        assert_ne!(again.tls_key, files.tls_key);
    }

    /// OpenSSL itself (the library MariaDB, Galera and socat use) accepts
    /// the chain and the names, when the `openssl` tool is installed (it
    /// is wherever MariaDB is; scripts/setup.sh installs it).
    #[test]
    fn openssl_verifies_the_chain_and_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "*.simple-pxc-headless.db.svc",
            "simple-pxc-0.simple-pxc-headless.db.svc",
            "localhost",
            "127.0.0.1",
        ]
        .map(String::from);
        let files = generate("simple-pxc", &names).unwrap();
        for (key, text) in files.entries() {
            std::fs::write(dir.path().join(key), text).unwrap();
        }
        let verify = |extra: &[&str]| {
            let out = std::process::Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(dir.path().join(KEY_CA))
                .args(extra)
                .arg(dir.path().join(KEY_CERT))
                .output()
                .expect("openssl not found: apt-get install openssl (scripts/setup.sh)");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        for extra in [
            &[][..],
            &[
                "-verify_hostname",
                "simple-pxc-2.simple-pxc-headless.db.svc",
            ],
            &["-verify_hostname", "localhost"],
            &["-verify_ip", "127.0.0.1"],
            &["-purpose", "sslserver"],
            &["-purpose", "sslclient"],
        ] {
            let (ok, out) = verify(extra);
            assert!(ok, "openssl verify {extra:?}: {out}");
        }
        let (ok, _) = verify(&["-verify_hostname", "other-0.other-headless.db.svc"]);
        assert!(!ok, "a name outside the certificate must not verify");
        // rsync's SST sends the subject's CN to the donor, which refuses
        // a wildcard in it.
        let subject = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(dir.path().join(KEY_CERT))
            .output()
            .unwrap();
        let subject = String::from_utf8_lossy(&subject.stdout).to_string();
        assert!(
            subject.contains("CN = simple-pxc-0.simple-pxc-headless.db.svc")
                || subject.contains("CN=simple-pxc-0.simple-pxc-headless.db.svc"),
            "{subject}"
        );
    }

    #[test]
    fn names_cover_members_and_scaling() {
        let cluster = ValidatedCluster {
            meta: crate::engine::ClusterMeta {
                kind: "PxcCluster".into(),
                name: "simple-pxc".into(),
                namespace: "db".into(),
                uid: Some("u".into()),
                generation: None,
            },
            common: serde_json::from_value(
                serde_json::json!({"instances": 3, "storage": {"size": "1Gi"}}),
            )
            .unwrap(),
            image: "x".into(),
            spec: serde_json::json!({}),
        };
        let names = kubernetes_names(&cluster);
        assert!(names.contains(&"*.simple-pxc-headless.db.svc".to_string()));
        assert!(names.contains(&"*.simple-pxc-headless.db.svc.cluster.local".to_string()));
        assert!(names.contains(&"simple-pxc-2.simple-pxc-headless.db.svc".to_string()));
        assert_eq!(names.len(), 2 + 2 * 3);
        assert_eq!(
            local_names("127.0.0.1"),
            ["localhost", "127.0.0.1", "::1"].map(String::from)
        );
        assert_eq!(
            local_names("127.0.0.5"),
            ["localhost", "127.0.0.5", "127.0.0.1", "::1"].map(String::from)
        );
    }

    #[test]
    fn missing_keys_and_files_are_named() {
        use k8s_openapi::ByteString;
        let secret = k8s_openapi::api::core::v1::Secret {
            data: Some(
                [
                    ("ca.crt".to_string(), ByteString(b"x".to_vec())),
                    ("tls.crt".to_string(), ByteString(Vec::new())),
                ]
                .into(),
            ),
            string_data: Some([("tls.key".to_string(), "k".to_string())].into()),
            ..Default::default()
        };
        assert_eq!(missing_keys(&secret), ["tls.crt"]);
        assert_eq!(
            missing_keys(&Default::default()),
            ["ca.crt", "tls.crt", "tls.key"]
        );

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), "x").unwrap();
        std::fs::write(dir.path().join("tls.crt"), "x").unwrap();
        let err = check_dir(dir.path(), "my-certs").unwrap_err();
        assert_eq!(err.key, "tls.key");
        let text = err.to_string();
        assert!(
            text.starts_with("TLS Secret my-certs has no key tls.key"),
            "{text}"
        );
        std::fs::write(dir.path().join("tls.key"), "x").unwrap();
        check_dir(dir.path(), "my-certs").unwrap();
    }
}
