//! Rendering of the server's option file (`<runDir>/my.cnf`, outside the
//! data directory) and of the one-time SQL that creates the operator's
//! accounts. Pure: strings in, strings out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::api::{Flavor, SstMethod};
use crate::mycnf::{RenderedMyCnf, canonical_name, is_server_group};
use crate::settings::{PxcInstanceSettings, users};

/// Galera provider options the operator sets by default; the user's
/// `wsrep_provider_options` may override them.
///
/// Why these values (see docs/engines.md, "Galera timeouts"): a member is
/// suspected after `evs.suspect_timeout` without a message and evicted once
/// the others agree; Galera's default of 5 s (15 s inactive) keeps writes
/// blocked that long after a member dies, so the operator shortens it. On a
/// loopback or pod network a keepalive every 0.5 s makes 2 s of silence a
/// dead peer, not a slow one.
pub const DEFAULT_PROVIDER_OPTIONS: &[(&str, &str)] = &[
    ("evs.keepalive_period", "PT0.5S"),
    ("evs.inactive_check_period", "PT0.5S"),
    ("evs.suspect_timeout", "PT2S"),
    ("evs.inactive_timeout", "PT4S"),
    ("evs.install_timeout", "PT4S"),
    ("gmcast.peer_timeout", "PT3S"),
    // Galera's default, kept explicit: when every member of the last
    // Primary component is back (a survivor that lost quorum and the
    // restarted others), they restore it by themselves from gvwstate.dat.
    // After a full crash the members wait for the operator's bootstrap
    // order before they start at all, so this never bypasses its choice.
    ("pc.recovery", "TRUE"),
    // Keep the write-set cache across restarts, so that a member restarted
    // after a crash (or the one bootstrapped after a full crash) can serve
    // IST instead of forcing SST on the others.
    ("gcache.recover", "yes"),
    ("gcache.size", "256M"),
];

/// Where this member listens and who its peers are.
#[derive(Clone, Debug)]
pub struct Network<'a> {
    /// Address the server binds (`bind_address`).
    pub listen_address: &'a str,
    /// The address peers reach this member at.
    pub host: &'a str,
    /// MySQL client port.
    pub db_port: u16,
    /// Galera replication port.
    pub galera_port: u16,
    /// IST port.
    pub ist_port: u16,
    /// SST port.
    pub sst_port: u16,
    /// `host:galeraPort` of every member, this one included (Galera skips
    /// itself).
    pub peers: Vec<String>,
}

/// The cluster-traffic certificate files of a member (the TLS Secret's
/// `ca.crt`, `tls.crt`, `tls.key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed every member's certificate.
    pub ca: PathBuf,
    /// The member's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files of a TLS Secret mounted at `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        use operator_core::tls::{KEY_CA, KEY_CERT, KEY_KEY};
        Self {
            ca: dir.join(KEY_CA),
            cert: dir.join(KEY_CERT),
            key: dir.join(KEY_KEY),
        }
    }
}

/// What `my.cnf` is rendered from.
#[derive(Clone, Debug)]
pub struct MyCnfInputs<'a> {
    /// Engine settings (flavor, SST method, the user's configuration).
    pub settings: &'a PxcInstanceSettings,
    /// Instance name (`wsrep_node_name`).
    pub instance: &'a str,
    /// `server_id`: the ordinal plus one.
    pub server_id: u32,
    /// The server's data directory.
    pub datadir: &'a Path,
    /// The run directory (socket, pid file, temporary files).
    pub run_dir: &'a Path,
    /// The Galera provider library.
    pub provider: &'a Path,
    /// Addresses and ports.
    pub network: Network<'a>,
    /// `user:password` for `wsrep_sst_auth` (MariaDB; PXC 8.0 has no such
    /// option and manages its SST user internally).
    pub sst_auth: Option<String>,
    /// Encrypt cluster traffic with these files; `None`: clear text.
    pub tls: Option<TlsFiles>,
}

/// The `wsrep_provider_options` value: defaults, then the user's, then
/// what the operator owns (addresses). Pure.
pub fn provider_options(inputs: &MyCnfInputs<'_>) -> String {
    let mut opts: BTreeMap<String, String> = DEFAULT_PROVIDER_OPTIONS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for group in server_groups(&inputs.settings.my_cnf) {
        for (name, value) in group {
            if canonical_name(name) == "wsrep_provider_options" {
                for (k, v) in parse_provider_options(value.as_deref().unwrap_or("")) {
                    opts.insert(k, v);
                }
            }
        }
    }
    // MariaDB's Galera takes the TLS files as provider options (which
    // cover replication and IST); Percona XtraDB Cluster derives the same
    // from `pxc-encrypt-cluster-traffic` and the server's ssl-* options.
    if let (Some(tls), Flavor::MariaDB) = (&inputs.tls, inputs.settings.flavor) {
        opts.insert("socket.ssl".into(), "YES".into());
        opts.insert("socket.ssl_ca".into(), tls.ca.display().to_string());
        opts.insert("socket.ssl_cert".into(), tls.cert.display().to_string());
        opts.insert("socket.ssl_key".into(), tls.key.display().to_string());
    }
    let n = &inputs.network;
    opts.insert(
        "gmcast.listen_addr".into(),
        format!("tcp://{}:{}", n.listen_address, n.galera_port),
    );
    opts.insert("ist.recv_addr".into(), format!("{}:{}", n.host, n.ist_port));
    opts.insert(
        "ist.recv_bind".into(),
        format!("{}:{}", n.listen_address, n.ist_port),
    );
    opts.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

fn server_groups(
    my_cnf: &RenderedMyCnf,
) -> impl Iterator<Item = &BTreeMap<String, Option<String>>> {
    my_cnf
        .iter()
        .filter(|(name, _)| is_server_group(name))
        .map(|(_, options)| options)
}

/// Split `a=b; c=d` (quotes around the whole value allowed). Pure.
pub fn parse_provider_options(value: &str) -> Vec<(String, String)> {
    let v = value.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(v);
    v.split(';')
        .filter_map(|item| {
            let (k, val) = item.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_string(), val.trim().to_string()))
        })
        .collect()
}

/// Render `my.cnf`: the operator's `[mysqld]` section, then the user's
/// groups as given (their `wsrep_provider_options` merged into the
/// operator's). Later options win in option files, and the operator's
/// owned options are refused by validation, so the user's tuning overrides
/// the defaults here without touching what the operator owns. Pure.
pub fn render_my_cnf(inputs: &MyCnfInputs<'_>) -> String {
    let s = inputs.settings;
    let n = &inputs.network;
    let run = inputs.run_dir.display();
    let mut out = String::from(
        "# Written by the Stratum instance manager; changes are overwritten.\n[mysqld]\n",
    );
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k}={v}\n"));
    line("datadir", &inputs.datadir.display().to_string());
    line("socket", &format!("{run}/mysqld.sock"));
    line("pid_file", &format!("{run}/mysqld.pid"));
    line("tmpdir", &run.to_string());
    line("port", &n.db_port.to_string());
    line("bind_address", n.listen_address);
    line("server_id", &inputs.server_id.to_string());
    line("skip_name_resolve", "ON");
    // Galera requirements.
    line("binlog_format", "ROW");
    line("default_storage_engine", "InnoDB");
    line("innodb_autoinc_lock_mode", "2");
    line("wsrep_on", "ON");
    line("wsrep_provider", &inputs.provider.display().to_string());
    line("wsrep_cluster_name", &s.cluster_name);
    line("wsrep_node_name", inputs.instance);
    line(
        "wsrep_node_address",
        &format!("{}:{}", n.host, n.galera_port),
    );
    line(
        "wsrep_node_incoming_address",
        &format!("{}:{}", n.host, n.db_port),
    );
    line(
        "wsrep_cluster_address",
        &format!("gcomm://{}", n.peers.join(",")),
    );
    line(
        "wsrep_sst_receive_address",
        &format!("{}:{}", n.host, n.sst_port),
    );
    line("wsrep_sst_method", s.sst_method.as_str());
    if let Some(auth) = &inputs.sst_auth {
        line("wsrep_sst_auth", auth);
    }
    line(
        "wsrep_provider_options",
        &format!("\"{}\"", provider_options(inputs)),
    );
    if s.flavor == Flavor::PerconaXtraDB {
        // ON is PXC 8.0's default, and with certificates it encrypts
        // replication, IST and SST; OFF must be said explicitly.
        match &inputs.tls {
            Some(tls) => {
                line("pxc_encrypt_cluster_traffic", "ON");
                line("ssl_ca", &tls.ca.display().to_string());
                line("ssl_cert", &tls.cert.display().to_string());
                line("ssl_key", &tls.key.display().to_string());
            }
            None => line("pxc_encrypt_cluster_traffic", "OFF"),
        }
    }
    let mut sst: Vec<(&str, String)> = Vec::new();
    if s.flavor == Flavor::MariaDB && s.sst_method == SstMethod::Mariabackup {
        // Donor and joiner both stream through socat (the default format).
        // The script's old logs go to the run directory, not a shared
        // /tmp/sst_log_archive that the first database user would own.
        sst.push(("transferfmt", "socat".into()));
        sst.push(("sst-log-archive-dir", format!("{run}/sst-log-archive")));
    }
    if let Some(tls) = &inputs.tls {
        let file = |p: &PathBuf| p.display().to_string();
        match (s.flavor, s.sst_method) {
            // What `pxc-encrypt-cluster-traffic=ON` applies to the SST,
            // written out so that the transfer does not depend on it.
            (Flavor::PerconaXtraDB, _) => sst.extend([
                ("encrypt", "4".into()),
                ("ssl-ca", file(&tls.ca)),
                ("ssl-cert", file(&tls.cert)),
                ("ssl-key", file(&tls.key)),
            ]),
            // socat with OpenSSL; the donor checks the joiner's
            // certificate against the CA and the joiner's name
            // (`localhost` for a local address).
            (Flavor::MariaDB, SstMethod::Mariabackup) => sst.extend([
                ("encrypt", "3".into()),
                ("tca", file(&tls.ca)),
                ("tcert", file(&tls.cert)),
                ("tkey", file(&tls.key)),
            ]),
            // rsync through stunnel (the SST fails, rather than copy in
            // clear text, when the stunnel binary is missing); the peer's
            // chain is checked against the CA (the script's default,
            // VERIFY_CA: its VERIFY_IDENTITY makes stunnel want the peer's
            // own certificate in the CA file, which a shared CA is not).
            (Flavor::MariaDB, _) => sst.extend([
                ("tca", file(&tls.ca)),
                ("tcert", file(&tls.cert)),
                ("tkey", file(&tls.key)),
            ]),
        }
    }
    if !sst.is_empty() {
        out.push_str("\n[sst]\n");
        for (k, v) in sst {
            out.push_str(&format!("{k}={v}\n"));
        }
    }
    for (group, options) in &s.my_cnf {
        let options: Vec<_> = options
            .iter()
            .filter(|(name, _)| {
                !(is_server_group(group) && canonical_name(name) == "wsrep_provider_options")
            })
            .collect();
        if options.is_empty() {
            continue;
        }
        out.push_str(&format!("\n[{group}]\n"));
        for (name, value) in options {
            match value {
                Some(v) => out.push_str(&format!("{name}={v}\n")),
                None => out.push_str(&format!("{name}\n")),
            }
        }
    }
    out
}

/// A MySQL string literal (single quotes, backslashes and quotes escaped).
/// Pure.
pub fn sql_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Passwords of the accounts the operator creates.
#[derive(Clone, Debug)]
pub struct AccountPasswords {
    /// `root@%` and `root@localhost`.
    pub root: String,
    /// `operator@%`: the instance manager's account.
    pub operator: String,
    /// `monitor@%`: proxy health checks and metrics.
    pub monitor: String,
    /// The SST/backup user (`mariabackup` or `xtrabackup`).
    pub sst: String,
}

/// The SQL that creates the operator's accounts on the member that
/// bootstraps a new cluster (run as the server's `--init-file`; Galera's
/// state transfers give the others the same `mysql` schema). Idempotent:
/// it only creates what is missing, so running it again on an existing
/// cluster changes nothing. Pure.
pub fn accounts_sql(flavor: Flavor, pw: &AccountPasswords) -> String {
    let sst_user = match flavor {
        Flavor::MariaDB => users::MARIABACKUP,
        Flavor::PerconaXtraDB => users::XTRABACKUP,
    };
    let sst_grants = match flavor {
        // mariabackup's documented minimum for a full backup (10.5+).
        Flavor::MariaDB => "RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR",
        Flavor::PerconaXtraDB => "RELOAD, PROCESS, LOCK TABLES, REPLICATION CLIENT, BACKUP_ADMIN",
    };
    let replication_client = match flavor {
        Flavor::MariaDB => "BINLOG MONITOR",
        Flavor::PerconaXtraDB => "REPLICATION CLIENT",
    };
    let mut sql = Vec::new();
    let mut account = |user: &str, host: &str, password: &str, grants: &str| {
        sql.push(format!(
            "CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY {};",
            sql_literal(password)
        ));
        // `WITH GRANT OPTION` goes after the grantee.
        let (privileges, option) = match grants.strip_suffix(" WITH GRANT OPTION") {
            Some(p) => (p, " WITH GRANT OPTION"),
            None => (grants, ""),
        };
        sql.push(format!("GRANT {privileges} TO '{user}'@'{host}'{option};"));
    };
    account(
        users::ROOT,
        "%",
        &pw.root,
        "ALL PRIVILEGES ON *.* WITH GRANT OPTION",
    );
    account(
        users::OPERATOR,
        "%",
        &pw.operator,
        "ALL PRIVILEGES ON *.* WITH GRANT OPTION",
    );
    account(
        users::MONITOR,
        "%",
        &pw.monitor,
        &format!("PROCESS, {replication_client} ON *.*"),
    );
    account(
        sst_user,
        "localhost",
        &pw.sst,
        &format!("{sst_grants} ON *.*"),
    );
    if flavor == Flavor::MariaDB {
        // Debian's install leaves root@localhost on the unix socket only;
        // let it log in with the Secret's password too.
        sql.push(format!(
            "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD({});",
            sql_literal(&pw.root)
        ));
    }
    sql.push(String::new());
    sql.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(my_cnf: &str) -> PxcInstanceSettings {
        PxcInstanceSettings {
            flavor: Flavor::MariaDB,
            version: "10.11".into(),
            cluster_name: "simple-pxc".into(),
            sst_method: SstMethod::Mariabackup,
            my_cnf: crate::mycnf::render(&crate::mycnf::parse(my_cnf).unwrap()),
            tls: None,
        }
    }

    fn inputs(s: &PxcInstanceSettings) -> MyCnfInputs<'_> {
        MyCnfInputs {
            settings: s,
            instance: "simple-pxc-1",
            server_id: 2,
            datadir: Path::new("/data/mysql"),
            run_dir: Path::new("/run/pxc"),
            provider: Path::new("/usr/lib/galera/libgalera_smm.so"),
            network: Network {
                listen_address: "127.0.0.1",
                host: "127.0.0.1",
                db_port: 13306,
                galera_port: 14567,
                ist_port: 14568,
                sst_port: 14444,
                peers: vec!["127.0.0.1:4567".into(), "127.0.0.1:14567".into()],
            },
            sst_auth: Some("mariabackup:pw".into()),
            tls: None,
        }
    }

    fn tls() -> Option<TlsFiles> {
        Some(TlsFiles::in_dir(Path::new("/etc/stratum/tls")))
    }

    /// The lines of group `[name]` (every occurrence), in order.
    fn group(cnf: &str, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut inside = false;
        for l in cnf.lines() {
            if l.starts_with('[') {
                inside = l == format!("[{name}]");
            } else if inside && !l.is_empty() {
                out.push(l.to_string());
            }
        }
        out
    }

    #[test]
    fn mariadb_tls_goes_to_provider_options_and_mariabackup_sst() {
        let s = settings("[sst]\nprogress=1\n");
        let cnf = render_my_cnf(&MyCnfInputs {
            tls: tls(),
            ..inputs(&s)
        });
        let opts = provider_options(&MyCnfInputs {
            tls: tls(),
            ..inputs(&s)
        });
        for want in [
            "socket.ssl=YES",
            "socket.ssl_ca=/etc/stratum/tls/ca.crt",
            "socket.ssl_cert=/etc/stratum/tls/tls.crt",
            "socket.ssl_key=/etc/stratum/tls/tls.key",
            // The fast-eviction defaults stay.
            "evs.suspect_timeout=PT2S",
            "gmcast.peer_timeout=PT3S",
        ] {
            assert!(
                opts.split(';').any(|o| o == want),
                "missing {want} in {opts}"
            );
        }
        assert_eq!(
            group(&cnf, "sst"),
            [
                "transferfmt=socat",
                "sst-log-archive-dir=/run/pxc/sst-log-archive",
                "encrypt=3",
                "tca=/etc/stratum/tls/ca.crt",
                "tcert=/etc/stratum/tls/tls.crt",
                "tkey=/etc/stratum/tls/tls.key",
                // The user's SST tuning comes after the operator's.
                "progress=1",
            ]
        );
        assert!(!cnf.contains("pxc_encrypt_cluster_traffic"), "{cnf}");
        assert!(!cnf.contains("\nssl_ca="), "{cnf}");

        // rsync: stunnel with the same files, no socat `encrypt` mode.
        let mut s = settings("");
        s.sst_method = SstMethod::Rsync;
        let cnf = render_my_cnf(&MyCnfInputs {
            tls: tls(),
            ..inputs(&s)
        });
        assert_eq!(
            group(&cnf, "sst"),
            [
                "tca=/etc/stratum/tls/ca.crt",
                "tcert=/etc/stratum/tls/tls.crt",
                "tkey=/etc/stratum/tls/tls.key",
            ]
        );

        // Without TLS: nothing of it.
        let s = settings("");
        let cnf = render_my_cnf(&inputs(&s));
        assert!(!cnf.contains("ssl"), "{cnf}");
        assert!(!cnf.contains("encrypt"), "{cnf}");
    }

    #[test]
    fn percona_tls_is_pxc_encrypt_cluster_traffic_with_the_secret_files() {
        let mut s = settings("");
        s.flavor = Flavor::PerconaXtraDB;
        s.sst_method = SstMethod::XtrabackupV2;
        let with = MyCnfInputs {
            tls: tls(),
            sst_auth: None,
            ..inputs(&s)
        };
        let cnf = render_my_cnf(&with);
        let mysqld = group(&cnf, "mysqld");
        for want in [
            "pxc_encrypt_cluster_traffic=ON",
            "ssl_ca=/etc/stratum/tls/ca.crt",
            "ssl_cert=/etc/stratum/tls/tls.crt",
            "ssl_key=/etc/stratum/tls/tls.key",
        ] {
            assert!(mysqld.iter().any(|l| l == want), "missing {want} in\n{cnf}");
        }
        assert_eq!(
            group(&cnf, "sst"),
            [
                "encrypt=4",
                "ssl-ca=/etc/stratum/tls/ca.crt",
                "ssl-cert=/etc/stratum/tls/tls.crt",
                "ssl-key=/etc/stratum/tls/tls.key",
            ]
        );
        // PXC derives the provider's socket.ssl_* itself.
        assert!(!provider_options(&with).contains("socket.ssl"), "{cnf}");

        let cnf = render_my_cnf(&MyCnfInputs {
            sst_auth: None,
            ..inputs(&s)
        });
        assert!(cnf.contains("\npxc_encrypt_cluster_traffic=OFF\n"), "{cnf}");
        assert!(!cnf.contains("ssl_ca"), "{cnf}");
        assert!(group(&cnf, "sst").is_empty(), "{cnf}");
    }

    #[test]
    fn renders_addresses_ports_and_merged_provider_options() {
        let s = settings(
            "[mysqld]\nmax_connections=77\nwsrep_provider_options=\"evs.suspect_timeout=PT3S; gcs.fc_limit=64\"\n[sst]\nprogress=1\n",
        );
        let cnf = render_my_cnf(&inputs(&s));
        for want in [
            "datadir=/data/mysql\n",
            "socket=/run/pxc/mysqld.sock\n",
            "port=13306\n",
            "server_id=2\n",
            "wsrep_cluster_address=gcomm://127.0.0.1:4567,127.0.0.1:14567\n",
            "wsrep_node_address=127.0.0.1:14567\n",
            "wsrep_sst_receive_address=127.0.0.1:14444\n",
            "wsrep_sst_method=mariabackup\n",
            "wsrep_sst_auth=mariabackup:pw\n",
            "\n[mysqld]\nmax_connections=77\n",
            "\n[sst]\nprogress=1\n",
            "sst-log-archive-dir=/run/pxc/sst-log-archive\n",
        ] {
            assert!(cnf.contains(want), "missing {want:?} in\n{cnf}");
        }
        let opts = provider_options(&inputs(&s));
        assert!(opts.contains("evs.suspect_timeout=PT3S"), "{opts}");
        assert!(!opts.contains("PT2S;evs.suspect"), "{opts}");
        assert!(opts.contains("gcs.fc_limit=64"), "{opts}");
        assert!(
            opts.contains("gmcast.listen_addr=tcp://127.0.0.1:14567"),
            "{opts}"
        );
        assert!(opts.contains("ist.recv_addr=127.0.0.1:14568"), "{opts}");
        assert!(opts.contains("pc.recovery=TRUE"), "{opts}");
        // The user's provider options are merged, not written twice.
        assert_eq!(cnf.matches("wsrep_provider_options").count(), 1, "{cnf}");
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(sql_literal("a'b\\c"), "'a\\'b\\\\c'");
    }

    #[test]
    fn accounts_per_flavor() {
        let pw = AccountPasswords {
            root: "r'oot".into(),
            operator: "op".into(),
            monitor: "mon".into(),
            sst: "sst".into(),
        };
        let sql = accounts_sql(Flavor::MariaDB, &pw);
        assert!(sql.contains("CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY 'r\\'oot';"));
        assert!(sql.contains("'mariabackup'@'localhost'"));
        assert!(sql.contains("GRANT ALL PRIVILEGES ON *.* TO 'operator'@'%' WITH GRANT OPTION;"));
        assert!(sql.contains("BINLOG MONITOR"));
        let sql = accounts_sql(Flavor::PerconaXtraDB, &pw);
        assert!(sql.contains("'xtrabackup'@'localhost'"));
        assert!(sql.contains("BACKUP_ADMIN"));
        assert!(!sql.contains("unix_socket"));
    }
}
