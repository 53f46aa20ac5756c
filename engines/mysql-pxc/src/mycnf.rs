//! my.cnf option files: a small parser for `spec.configuration`, the list of
//! options the operator owns, and the rendered per-group map handed to the
//! instance side. Pure, no IO.
//!
//! Syntax (MySQL's "Using Option Files"): `[group]` headers; `name`,
//! `name=value` or `name = value` lines; comment lines start with `#` or
//! `;`; a `#` also starts a comment in the middle of a line unless it is
//! inside a quoted value. `-` and `_` are interchangeable in option names.
//! Values are kept as written (quotes and escapes included) so that the
//! instance side writes them back verbatim.

use std::collections::BTreeMap;

/// A parsed option file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionFile {
    /// Groups in file order. A group named twice appears twice.
    pub groups: Vec<OptionGroup>,
}

/// One `[group]` and the options under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionGroup {
    /// Group name, lower-cased (group names are case-insensitive).
    pub name: String,
    /// 1-based line of the header.
    pub line: usize,
    /// Options in file order.
    pub options: Vec<OptionLine>,
}

/// One option line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionLine {
    /// 1-based line number.
    pub line: usize,
    /// The name as written (trimmed).
    pub name: String,
    /// The value as written (trimmed, comment removed, quotes kept);
    /// `None` for a bare option such as `skip-name-resolve`.
    pub value: Option<String>,
}

/// A syntax error, or an option the user may not set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct MyCnfError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong and what to do.
    pub message: String,
}

impl MyCnfError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
}

/// Parse option-file text. Rejects `!include`/`!includedir` (the files
/// would not exist in the pod), options before the first group header,
/// malformed headers and unterminated quotes.
pub fn parse(text: &str) -> Result<OptionFile, MyCnfError> {
    let mut file = OptionFile::default();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if trimmed.starts_with('!') {
            let directive = trimmed.split_whitespace().next().unwrap_or(trimmed);
            return Err(MyCnfError::new(
                line,
                format!("{directive} is not supported; put the options inline"),
            ));
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let header = strip_comment(rest).trim_end();
            let Some(name) = header.strip_suffix(']') else {
                return Err(MyCnfError::new(
                    line,
                    format!("group header {trimmed:?} must end with ']'"),
                ));
            };
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(is_name_byte) {
                return Err(MyCnfError::new(
                    line,
                    format!(
                        "group name {name:?} must be letters, digits, '-', '_' or '.', e.g. [mysqld]"
                    ),
                ));
            }
            file.groups.push(OptionGroup {
                name: name.to_ascii_lowercase(),
                line,
                options: Vec::new(),
            });
            continue;
        }
        let option = parse_option(trimmed, line)?;
        let Some(group) = file.groups.last_mut() else {
            return Err(MyCnfError::new(
                line,
                format!(
                    "option {} appears before any group header; put it under [mysqld]",
                    option.name
                ),
            ));
        };
        group.options.push(option);
    }
    Ok(file)
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Text before an unquoted `#`.
fn strip_comment(s: &str) -> &str {
    s.split_once('#').map_or(s, |(before, _)| before)
}

fn parse_option(trimmed: &str, line: usize) -> Result<OptionLine, MyCnfError> {
    let eq = trimmed.find('=');
    let hash = trimmed.find('#');
    let (name, value) = match (eq, hash) {
        (Some(e), h) if h.is_none_or(|h| e < h) => {
            let value = parse_value(&trimmed[e + 1..], line)?;
            (trimmed[..e].trim(), Some(value))
        }
        _ => (strip_comment(trimmed).trim(), None),
    };
    if name.is_empty() || !name.bytes().all(is_name_byte) {
        return Err(MyCnfError::new(
            line,
            format!("{trimmed:?} is not an option line: expected name or name=value"),
        ));
    }
    Ok(OptionLine {
        line,
        name: name.to_string(),
        value,
    })
}

/// The value text after `=`: a quoted string (kept with its quotes), or
/// everything up to an unquoted `#`.
fn parse_value(rest: &str, line: usize) -> Result<String, MyCnfError> {
    let rest = rest.trim_start();
    let Some(quote) = rest.chars().next().filter(|c| *c == '"' || *c == '\'') else {
        return Ok(strip_comment(rest).trim_end().to_string());
    };
    let mut escaped = false;
    for (i, c) in rest.char_indices().skip(1) {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == quote {
            let after = rest[i + 1..].trim_start();
            if !after.is_empty() && !after.starts_with('#') {
                return Err(MyCnfError::new(
                    line,
                    format!("unexpected text {after:?} after the quoted value"),
                ));
            }
            return Ok(rest[..=i].to_string());
        }
    }
    Err(MyCnfError::new(
        line,
        format!("the value {rest} has no closing {quote}"),
    ))
}

/// The canonical form of an option name for comparisons: lower case, `_`
/// for `-`, without the `loose_` prefix (which only makes an unknown option
/// a warning).
pub fn canonical_name(name: &str) -> String {
    let n = name.to_ascii_lowercase().replace('-', "_");
    match n.strip_prefix("loose_") {
        Some(rest) => rest.to_string(),
        None => n,
    }
}

/// Whether a group is read by the database server (as opposed to the
/// SST/backup tools): `mysqld`, `server`, `galera`, `mariadb`, `mariadbd`,
/// `client-server`, and `mysqld-8.0`-style versioned forms.
pub fn is_server_group(name: &str) -> bool {
    const SERVER: &[&str] = &[
        "mysqld",
        "server",
        "galera",
        "mariadb",
        "mariadbd",
        "client-server",
    ];
    const VERSIONED: &[&str] = &["mysqld-", "mariadb-", "mariadbd-"];
    SERVER.contains(&name)
        || VERSIONED.iter().any(|p| {
            name.strip_prefix(p).is_some_and(|v| {
                !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            })
        })
}

/// Groups read by the SST and backup tools, which users may tune.
pub const TOOL_GROUPS: &[&str] = &["sst", "xtrabackup", "mariabackup"];

/// Server options the operator sets itself, with the reason shown to the
/// user. Names are canonical (see [`canonical_name`]); a `skip_`,
/// `disable_` or `enable_` prefix on a user option is stripped before the
/// lookup, so `skip-wsrep-on` is rejected too.
pub const OPERATOR_OWNED: &[(&str, &str)] = &[
    // Membership and identity of the Galera group.
    ("wsrep_on", "Galera replication is always on"),
    (
        "wsrep_provider",
        "the operator points it at the image's Galera library",
    ),
    (
        "wsrep_cluster_address",
        "the operator builds it from the members",
    ),
    (
        "wsrep_cluster_name",
        "the operator sets it to the cluster name",
    ),
    (
        "wsrep_node_name",
        "the operator sets it to the instance name",
    ),
    (
        "wsrep_node_address",
        "the operator sets it to the instance address",
    ),
    (
        "wsrep_node_incoming_address",
        "the operator sets it to the instance address",
    ),
    (
        "wsrep_sst_receive_address",
        "the operator sets it to the instance address",
    ),
    ("wsrep_sst_method", "set spec.sstMethod instead"),
    (
        "pxc_encrypt_cluster_traffic",
        "set spec.tls.encryptClusterTraffic instead",
    ),
    (
        "wsrep_sst_auth",
        "SST credentials come from the cluster's Secret",
    ),
    // Replication format Galera requires.
    ("binlog_format", "Galera requires ROW"),
    (
        "server_id",
        "the operator derives it from the instance ordinal",
    ),
    // Network endpoints.
    (
        "port",
        "the operator assigns the client port (3306 in pods)",
    ),
    ("bind_address", "the operator sets the listen address"),
    (
        "socket",
        "the operator keeps the socket in its run directory",
    ),
    ("skip_networking", "clients and peers connect over TCP"),
    ("mysqlx_port", "the operator assigns ports"),
    (
        "mysqlx_bind_address",
        "the operator sets the listen address",
    ),
    (
        "mysqlx_socket",
        "the operator keeps sockets in its run directory",
    ),
    ("admin_address", "the operator sets the listen address"),
    ("admin_port", "the operator assigns ports"),
    (
        "report_host",
        "the operator sets it to the instance address",
    ),
    ("report_port", "the operator assigns ports"),
    // Files and the process.
    ("datadir", "the data directory is on the instance's volume"),
    ("pid_file", "the operator keeps it in its run directory"),
    ("user", "the image's user runs the server"),
    (
        "log_error",
        "the instance manager collects the server log from stderr",
    ),
];

/// The owned option `name` stands for and why, if any.
pub fn operator_owned(name: &str) -> Option<(&'static str, &'static str)> {
    let canonical = canonical_name(name);
    let lookup = |n: &str| OPERATOR_OWNED.iter().find(|(o, _)| *o == n).copied();
    lookup(&canonical).or_else(|| {
        ["skip_", "disable_", "enable_"]
            .iter()
            .find_map(|p| canonical.strip_prefix(p))
            .and_then(lookup)
    })
}

/// `wsrep_provider_options` keys the operator owns (addresses, ports, the
/// bootstrap switch, the TLS files), with the reason shown to the user;
/// the user may set the others (e.g. `gcache.size`).
pub const OPERATOR_OWNED_PROVIDER_OPTIONS: &[(&str, &str)] = &[
    ("base_host", "addresses"),
    ("base_port", "ports"),
    ("gmcast.listen_addr", "addresses"),
    ("ist.recv_addr", "addresses"),
    ("ist.recv_bind", "addresses"),
    ("pc.bootstrap", "the bootstrap after a full crash"),
    ("socket.ssl", "set spec.tls instead"),
    ("socket.ssl_ca", "set spec.tls instead"),
    ("socket.ssl_cert", "set spec.tls instead"),
    ("socket.ssl_key", "set spec.tls instead"),
];

/// Options the operator sets while cluster traffic is encrypted
/// (`spec.tls.encryptClusterTraffic`), by group kind: in a server group
/// the server's certificate (which Percona XtraDB Cluster uses for Galera
/// and SST), in a tool group the SST's encryption.
pub const TLS_OWNED_SERVER: &[&str] = &["ssl_ca", "ssl_capath", "ssl_cert", "ssl_key"];
/// See [`TLS_OWNED_SERVER`]: `[sst]`, `[xtrabackup]`, `[mariabackup]`.
pub const TLS_OWNED_TOOL: &[&str] = &[
    "encrypt",
    "ssl_mode",
    "ssl_ca",
    "ssl_capath",
    "ssl_cert",
    "ssl_key",
    "tca",
    "tcapath",
    "tcert",
    "tkey",
];

/// Check that a parsed file sets none of the certificate and encryption
/// options the operator sets while cluster traffic is encrypted. The
/// error names the option, the group and the line.
pub fn check_tls_options(file: &OptionFile) -> Result<(), MyCnfError> {
    for group in &file.groups {
        let owned = if is_server_group(&group.name) {
            TLS_OWNED_SERVER
        } else {
            TLS_OWNED_TOOL
        };
        for option in &group.options {
            if owned.contains(&canonical_name(&option.name).as_str()) {
                return Err(MyCnfError::new(
                    option.line,
                    format!(
                        "option {} in [{}] is managed by the operator while spec.tls.encryptClusterTraffic is true (the certificates come from the TLS Secret); remove it, or set spec.tls.secretName to use your own certificates",
                        option.name, group.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Check that a parsed file only uses supported groups and sets no option
/// the operator owns. The error names the group or option and the line.
pub fn check_user_options(file: &OptionFile) -> Result<(), MyCnfError> {
    for group in &file.groups {
        let server = is_server_group(&group.name);
        if !server && !TOOL_GROUPS.contains(&group.name.as_str()) {
            return Err(MyCnfError::new(
                group.line,
                format!(
                    "group [{}] is not supported: use a server group such as [mysqld], or one of [{}]",
                    group.name,
                    TOOL_GROUPS.join("], [")
                ),
            ));
        }
        if !server {
            continue;
        }
        for option in &group.options {
            if let Some((owned, why)) = operator_owned(&option.name) {
                let alias = if option.name == owned {
                    String::new()
                } else {
                    format!(" (as {owned})")
                };
                return Err(MyCnfError::new(
                    option.line,
                    format!(
                        "option {}{alias} in [{}] is managed by the operator ({why}); remove it",
                        option.name, group.name
                    ),
                ));
            }
            if canonical_name(&option.name) == "wsrep_provider_options" {
                check_provider_options(option)?;
            }
        }
    }
    Ok(())
}

fn check_provider_options(option: &OptionLine) -> Result<(), MyCnfError> {
    let value = option.value.as_deref().unwrap_or("");
    let unquoted = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(value);
    for item in unquoted.split(';') {
        let key = item.split_once('=').map_or(item, |(k, _)| k).trim();
        if let Some((_, why)) = OPERATOR_OWNED_PROVIDER_OPTIONS
            .iter()
            .find(|(o, _)| o.eq_ignore_ascii_case(key))
        {
            return Err(MyCnfError::new(
                option.line,
                format!(
                    "{} sets {key}, which the operator manages ({why}); remove it",
                    option.name
                ),
            ));
        }
    }
    Ok(())
}

/// Options by group for the instance side: group name → option name (with
/// `_` for `-`, otherwise as written) → value (`None` for a bare option).
/// A group named twice is merged; a later value of an option wins, as in
/// MySQL.
pub type RenderedMyCnf = BTreeMap<String, BTreeMap<String, Option<String>>>;

/// Merge a parsed file into a [`RenderedMyCnf`].
pub fn render(file: &OptionFile) -> RenderedMyCnf {
    let mut out = RenderedMyCnf::new();
    for group in &file.groups {
        let entries = out.entry(group.name.clone()).or_default();
        for option in &group.options {
            entries.insert(option.name.replace('-', "_"), option.value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(line: usize, name: &str, value: Option<&str>) -> OptionLine {
        OptionLine {
            line,
            name: name.into(),
            value: value.map(str::to_string),
        }
    }

    #[test]
    fn parses_groups_options_and_comments() {
        let text = "# tuning\n\
                    [mysqld]\n\
                    max_connections = 250 # inline comment\n\
                    skip-name-resolve\n\
                    ; another comment\n\
                    \n\
                    innodb_buffer_pool_size=1G\n\
                    [SST]  # header comment\n\
                    streamfmt=xbstream\n";
        let file = parse(text).unwrap();
        assert_eq!(file.groups.len(), 2);
        assert_eq!(file.groups[0].name, "mysqld");
        assert_eq!(file.groups[0].line, 2);
        assert_eq!(
            file.groups[0].options,
            vec![
                opt(3, "max_connections", Some("250")),
                opt(4, "skip-name-resolve", None),
                opt(7, "innodb_buffer_pool_size", Some("1G")),
            ]
        );
        assert_eq!(file.groups[1].name, "sst");
        assert_eq!(
            file.groups[1].options,
            vec![opt(9, "streamfmt", Some("xbstream"))]
        );
    }

    #[test]
    fn quoted_values_keep_hashes_and_quotes() {
        let file =
            parse("[mysqld]\ninit_connect=\"SET @a='#x'\" # c\nx = 'a\\'b'\nempty=\n").unwrap();
        assert_eq!(
            file.groups[0].options,
            vec![
                opt(2, "init_connect", Some("\"SET @a='#x'\"")),
                opt(3, "x", Some("'a\\'b'")),
                opt(4, "empty", Some("")),
            ]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        for (text, line, needle) in [
            ("max_connections=1\n", 1, "before any group header"),
            ("[mysqld\n", 1, "must end with ']'"),
            ("[]\n", 1, "group name"),
            (
                "[mysqld]\n!include /etc/x.cnf\n",
                2,
                "!include is not supported",
            ),
            ("[mysqld]\n!includedir /etc/conf.d\n", 2, "!includedir"),
            ("[mysqld]\nx=\"open\n", 2, "no closing"),
            ("[mysqld]\nx='a' b\n", 2, "after the quoted value"),
            ("[mysqld]\n= 5\n", 2, "not an option line"),
            ("[mysqld]\nmax connections=5\n", 2, "not an option line"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.message.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn canonical_names() {
        assert_eq!(canonical_name("Bind-Address"), "bind_address");
        assert_eq!(canonical_name("loose-wsrep_sst_method"), "wsrep_sst_method");
        assert_eq!(
            operator_owned("skip-wsrep-on").map(|o| o.0),
            Some("wsrep_on")
        );
        assert_eq!(
            operator_owned("skip-networking").map(|o| o.0),
            Some("skip_networking")
        );
        assert_eq!(operator_owned("skip-name-resolve"), None);
        assert_eq!(operator_owned("max_connections"), None);
    }

    #[test]
    fn server_groups() {
        for g in [
            "mysqld",
            "server",
            "galera",
            "mariadb",
            "mariadbd",
            "client-server",
            "mysqld-8.0",
            "mariadb-10.11",
        ] {
            assert!(is_server_group(g), "{g}");
        }
        for g in [
            "client",
            "mysql",
            "sst",
            "mysqld-",
            "mysqld-x",
            "mysqld_safe",
        ] {
            assert!(!is_server_group(g), "{g}");
        }
    }

    #[test]
    fn rejects_owned_options_by_any_spelling() {
        for (text, needle) in [
            (
                "[mysqld]\nwsrep_cluster_address=gcomm://\n",
                "option wsrep_cluster_address in [mysqld]",
            ),
            (
                "[mysqld]\nbind-address=0.0.0.0\n",
                "option bind-address (as bind_address)",
            ),
            ("[mysqld-8.0]\nloose-server-id=3\n", "(as server_id)"),
            ("[galera]\nBINLOG_FORMAT=STATEMENT\n", "Galera requires ROW"),
            (
                "[mysqld]\nwsrep_sst_method=rsync\n",
                "set spec.sstMethod instead",
            ),
            ("[mysqld]\nskip-networking\n", "option skip-networking"),
            (
                "[mysqld]\nwsrep_provider_options=\"gcache.size=1G; gmcast.listen_addr=tcp://0.0.0.0:4567\"\n",
                "sets gmcast.listen_addr",
            ),
            ("[client]\nport=3307\n", "group [client] is not supported"),
            (
                "[mysqld]\nwsrep_provider_options=\"socket.ssl_key=/k.pem\"\n",
                "sets socket.ssl_key, which the operator manages (set spec.tls instead)",
            ),
            (
                "[mysqld]\npxc-encrypt-cluster-traffic=OFF\n",
                "set spec.tls.encryptClusterTraffic instead",
            ),
        ] {
            let file = parse(text).unwrap();
            let err = check_user_options(&file).unwrap_err();
            assert!(err.message.contains(needle), "{text:?}: {err}");
            assert!(err.line >= 1);
        }
    }

    #[test]
    fn accepts_tuning_and_tool_groups() {
        let file = parse(
            "[mysqld]\nmax_connections=250\nwsrep_provider_options=\"gcache.size=1G\"\nwsrep_slave_threads=4\n\
             [sst]\nport=4444\n[xtrabackup]\nparallel=4\n",
        )
        .unwrap();
        check_user_options(&file).unwrap();
    }

    #[test]
    fn tls_options_are_refused_only_by_the_tls_check() {
        for (text, line, needle) in [
            (
                "[mysqld]\nmax_connections=9\nssl-ca=/ca.pem\n",
                3,
                "option ssl-ca in [mysqld]",
            ),
            (
                "[mariadb]\nssl_key=/k.pem\n",
                2,
                "option ssl_key in [mariadb]",
            ),
            ("[sst]\nencrypt=0\n", 2, "option encrypt in [sst]"),
            ("[sst]\ntcert=/c.pem\n", 2, "option tcert in [sst]"),
            (
                "[mariabackup]\nssl-mode=DISABLED\n",
                2,
                "option ssl-mode in [mariabackup]",
            ),
        ] {
            let file = parse(text).unwrap();
            check_user_options(&file).unwrap();
            let err = check_tls_options(&file).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.message.contains(needle), "{text:?}: {err}");
            assert!(
                err.message.contains("spec.tls.encryptClusterTraffic"),
                "{err}"
            );
        }
        check_tls_options(&parse("[mysqld]\nmax_connections=9\n[sst]\nprogress=1\n").unwrap())
            .unwrap();
    }

    #[test]
    fn render_merges_groups_last_value_wins() {
        let file = parse(
            "[mysqld]\nmax-connections=100\nskip-name-resolve\n[mysqld]\nmax_connections=200\n",
        )
        .unwrap();
        let map = render(&file);
        assert_eq!(map.len(), 1);
        let m = &map["mysqld"];
        assert_eq!(m["max_connections"], Some("200".into()));
        assert_eq!(m["skip_name_resolve"], None);
        assert_eq!(m.len(), 2);
    }
}
