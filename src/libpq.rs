//! A connector's settings in libpq's words, for programs that hand them to libpq: psql
//! (`pg-entra psql`) and Diesel's `PgConnection` (feature `diesel-sync`).

use std::path::Path;

use crate::connector::Connector;
use crate::error::Error;

/// Where distributions keep the system's CA bundle, for libpq versions without
/// `sslrootcert=system` (before 16).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

impl Connector {
    /// The connection as libpq keywords and values, for `user`: hosts, ports and host
    /// addresses, database, `sslmode=verify-full` with a root file (the `sslrootcert` given,
    /// else the system's bundle, which libpq 15 cannot name itself), `gssencmode=disable` (GSS
    /// encryption would stand in for TLS), and every other setting the connector holds that
    /// libpq knows. Never a password: give the token to libpq apart (`PGPASSWORD` in a child's
    /// environment, say).
    ///
    /// With a root file, libpq trusts that file alone, where the connector trusts the system's
    /// roots too.
    ///
    /// # Errors
    /// [`Error::Config`] (`sslrootcert`) when no root file is given and no system bundle is
    /// found (`SSL_CERT_FILE`, then the usual places).
    pub fn libpq_parameters(&self, user: &str) -> Result<Vec<(&'static str, String)>, Error> {
        let root_file = match self.ssl_root_cert() {
            Some(file) if file != "system" => file.to_owned(),
            _ => system_bundle().ok_or_else(|| {
                Error::invalid(
                    "sslrootcert",
                    "no system CA bundle found for libpq; set PGSSLROOTCERT to a PEM file with \
                     the server's root (Azure: DigiCert Global Root G2 and Microsoft RSA Root \
                     Certificate Authority 2017)",
                )
            })?,
        };
        Ok(self.libpq_pairs(user, root_file))
    }

    fn libpq_pairs(&self, user: &str, root_file: String) -> Vec<(&'static str, String)> {
        use tokio_postgres::config::{ChannelBinding, Host, LoadBalanceHosts};

        let config = self.base_config();
        let list = |items: Vec<String>| items.join(",");
        let mut pairs: Vec<(&'static str, String)> = vec![
            (
                "host",
                list(
                    config
                        .get_hosts()
                        .iter()
                        .filter_map(|host| match host {
                            Host::Tcp(name) => Some(name.clone()),
                            // Refused by the connector; never reaches here.
                            #[cfg(unix)]
                            Host::Unix(_) => None,
                        })
                        .collect(),
                ),
            ),
            (
                "port",
                list(config.get_ports().iter().map(u16::to_string).collect()),
            ),
            (
                "dbname",
                config.get_dbname().unwrap_or("postgres").to_owned(),
            ),
            ("user", user.to_owned()),
            ("sslmode", "verify-full".to_owned()),
            ("sslrootcert", root_file),
            ("gssencmode", "disable".to_owned()),
        ];
        if !config.get_hostaddrs().is_empty() {
            pairs.push((
                "hostaddr",
                list(
                    config
                        .get_hostaddrs()
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                ),
            ));
        }
        if let Some(name) = config.get_application_name() {
            pairs.push(("application_name", name.to_owned()));
        }
        if let Some(options) = config.get_options() {
            pairs.push(("options", options.to_owned()));
        }
        if let Some(timeout) = config.get_connect_timeout() {
            pairs.push(("connect_timeout", timeout.as_secs().max(1).to_string()));
        }
        if !config.get_keepalives() {
            pairs.push(("keepalives", "0".to_owned()));
        }
        // libpq checks every kind itself, as the connector does.
        if self.target_session_attrs() != crate::TargetSessionAttrs::Any {
            pairs.push((
                "target_session_attrs",
                self.target_session_attrs().as_str().to_owned(),
            ));
        }
        match config.get_channel_binding() {
            ChannelBinding::Disable => pairs.push(("channel_binding", "disable".to_owned())),
            ChannelBinding::Require => pairs.push(("channel_binding", "require".to_owned())),
            _ => {}
        }
        if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
            pairs.push(("load_balance_hosts", "random".to_owned()));
        }
        pairs
    }
}

/// `key='value' …`, each value single-quoted with `\` and `'` escaped, as libpq reads it.
pub fn conninfo(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{key}={}", quote(value)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A libpq `key=value` value: single-quoted, `\` and `'` escaped.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The system CA bundle for libpq: `SSL_CERT_FILE`, else the first that exists.
fn system_bundle() -> Option<String> {
    crate::Environment::process()
        .var("SSL_CERT_FILE")
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(|path| (*path).to_owned()))
        .find(|path| Path::new(path).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_survive_libpq_quoting() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote(r"it's \ here"), r"'it\'s \\ here'");
        assert_eq!(
            conninfo(&[("host", "h".into()), ("user", "o'x".into())]),
            r"host='h' user='o\'x'"
        );
    }
}
