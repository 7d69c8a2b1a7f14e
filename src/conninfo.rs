//! Connection settings the way PostgreSQL users write them: libpq environment variables, a
//! `postgresql://` URL, or a `key=value` string.
//!
//! Settings this crate acts on (hosts, TLS, user, …) are kept as fields; any other libpq key
//! that tokio-postgres understands (`keepalives`, `target_session_attrs`, …) is passed through
//! to it.

use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::environment::Environment;
use crate::error::Error;
use crate::tls::SslMode;

/// Connection settings from one source. `None` means "not given here".
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Settings {
    pub hosts: Option<Vec<String>>,
    pub ports: Option<Vec<u16>>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub ssl_mode: Option<SslMode>,
    pub ssl_root_cert: Option<String>,
    pub application_name: Option<String>,
    pub connect_timeout: Option<Duration>,
    pub options: Option<String>,
    /// Other libpq keys, for tokio-postgres to interpret.
    pub passthrough: Vec<(String, String)>,
}

impl Settings {
    /// The settings in libpq's environment variables.
    pub(crate) fn from_env(env: &Environment) -> Result<Self, Error> {
        if env.var("PGPASSWORD").is_some() {
            tracing::info!("PGPASSWORD is set and ignored: the access token is the password");
        }
        let mut settings = Settings::default();
        let pairs = [
            ("PGHOST", "host"),
            ("PGHOSTADDR", "hostaddr"),
            ("PGPORT", "port"),
            ("PGDATABASE", "dbname"),
            ("PGUSER", "user"),
            ("PGSSLMODE", "sslmode"),
            ("PGSSLROOTCERT", "sslrootcert"),
            ("PGAPPNAME", "application_name"),
            ("PGCONNECT_TIMEOUT", "connect_timeout"),
            ("PGOPTIONS", "options"),
            ("PGTARGETSESSIONATTRS", "target_session_attrs"),
        ];
        for (var, key) in pairs {
            if let Some(value) = env.var(var) {
                settings
                    .set(key, &value)
                    .map_err(|e| reword(e, &format!("environment variable {var}")))?;
            }
        }
        Ok(settings)
    }

    /// Parses a `postgresql://` URL or a libpq `key=value` string.
    pub(crate) fn parse(conninfo: &str) -> Result<Self, Error> {
        let trimmed = conninfo.trim();
        let pairs = if trimmed.starts_with("postgresql://") || trimmed.starts_with("postgres://") {
            url_pairs(trimmed)?
        } else {
            key_value_pairs(trimmed)?
        };
        let mut settings = Settings::default();
        for (key, value) in pairs {
            settings
                .set(&key, &value)
                .map_err(|e| reword(e, "the connection string"))?;
        }
        Ok(settings)
    }

    /// Sets one libpq key.
    fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        match key {
            "host" => self.hosts = Some(split_list(value)),
            "port" => {
                let ports = split_list(value)
                    .iter()
                    .map(|p| p.parse::<u16>().ok().filter(|p| *p != 0))
                    .collect::<Option<Vec<u16>>>()
                    .ok_or_else(|| Error::config(format!("invalid port {value:?}")))?;
                self.ports = Some(ports);
            }
            "dbname" => self.dbname = Some(value.to_owned()),
            "user" => self.user = Some(value.to_owned()),
            "password" => {
                return Err(Error::config(
                    "a password was given, but the Entra access token is the password; remove it",
                ));
            }
            "sslmode" => self.ssl_mode = Some(value.parse()?),
            // libpq's URL shorthand for sslmode=require.
            "ssl" if value == "true" => self.ssl_mode = Some(SslMode::Require),
            "sslrootcert" => self.ssl_root_cert = Some(value.to_owned()),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" | "sslsni"
            | "requirepeer" | "gssencmode" | "krbsrvname" | "service" | "passfile" => {
                return Err(Error::config(format!(
                    "{key} is not supported: the connection authenticates with an Entra token over \
                     verified TLS"
                )));
            }
            "application_name" => self.application_name = Some(value.to_owned()),
            "connect_timeout" => {
                let seconds: u64 = value.trim().parse().map_err(|_| {
                    Error::config(format!("invalid connect_timeout {value:?} (whole seconds)"))
                })?;
                // libpq waits forever on zero; here zero means the connector's default bound.
                self.connect_timeout = (seconds > 0).then(|| Duration::from_secs(seconds));
            }
            "options" => self.options = Some(value.to_owned()),
            _ => {
                self.passthrough.retain(|(k, _)| k != key);
                self.passthrough.push((key.to_owned(), value.to_owned()));
            }
        }
        Ok(())
    }

    /// These settings, with anything they leave unset taken from `lower`.
    pub(crate) fn over(self, lower: Settings) -> Settings {
        let mut passthrough = lower.passthrough;
        passthrough.retain(|(key, _)| !self.passthrough.iter().any(|(k, _)| k == key));
        passthrough.extend(self.passthrough);
        Settings {
            hosts: self.hosts.or(lower.hosts),
            ports: self.ports.or(lower.ports),
            dbname: self.dbname.or(lower.dbname),
            user: self.user.or(lower.user),
            ssl_mode: self.ssl_mode.or(lower.ssl_mode),
            ssl_root_cert: self.ssl_root_cert.or(lower.ssl_root_cert),
            application_name: self.application_name.or(lower.application_name),
            connect_timeout: self.connect_timeout.or(lower.connect_timeout),
            options: self.options.or(lower.options),
            passthrough,
        }
    }

    /// The passed-through keys without `hostaddr`, and the `hostaddr` list (one address per
    /// host, when given), so that each host can be tried with its own address.
    pub(crate) fn split_hostaddrs(
        &self,
        hosts: usize,
    ) -> Result<(String, Vec<std::net::IpAddr>), Error> {
        let mut rest = self.clone();
        rest.passthrough.retain(|(key, _)| key != "hostaddr");
        let addresses = match self.passthrough.iter().find(|(key, _)| key == "hostaddr") {
            None => Vec::new(),
            Some((_, list)) => split_list(list)
                .iter()
                .map(|a| a.parse().ok())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::config(format!("invalid hostaddr {list:?}")))?,
        };
        if !addresses.is_empty() && addresses.len() != hosts {
            return Err(Error::config(format!(
                "{} host addresses for {hosts} hosts: give one hostaddr per host",
                addresses.len()
            )));
        }
        Ok((rest.passthrough_conninfo(), addresses))
    }

    /// The passed-through keys as a libpq `key=value` string for tokio-postgres to parse.
    pub(crate) fn passthrough_conninfo(&self) -> String {
        self.passthrough
            .iter()
            .map(|(key, value)| {
                let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
                format!("{key}='{escaped}'")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn reword(error: Error, origin: &str) -> Error {
    match error {
        Error::Config { message } => Error::config(format!("{origin}: {message}")),
        other => other,
    }
}

fn split_list(value: &str) -> Vec<String> {
    value.split(',').map(|s| s.trim().to_owned()).collect()
}

/// libpq `key=value` syntax: values may be single-quoted; backslash escapes `'` and `\`.
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(Error::config(format!(
                "connection string: expected \"=\" after {key:?}"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(Error::config(format!(
                            "connection string: unterminated quoted value for {key:?}"
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// `postgresql://[user[:password]@][host[:port][,...]][/dbname][?key=value&...]`
fn url_pairs(url: &str) -> Result<Vec<(String, String)>, Error> {
    let decode = |s: &str| -> Result<String, Error> {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| Error::config("connection URL: percent-encoding is not valid UTF-8"))
    };
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    if has_unencoded_password_delimiter(rest) {
        // Nothing of the URL is quoted: the part before `@` is a password.
        return Err(Error::config(
            "connection URL: the user info holds an unencoded `/` or `?`, so it looks like a \
             password; the Entra access token is the password: remove it (and percent-encode \
             `/` as %2F and `?` as %3F in user names)",
        ));
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut pairs = Vec::new();
    let hosts_part = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            if !user.is_empty() {
                pairs.push(("user".to_owned(), decode(user)?));
            }
            if !password.is_empty() {
                pairs.push(("password".to_owned(), String::new()));
            }
            hosts
        }
        None => authority,
    };
    if !hosts_part.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for spec in hosts_part.split(',') {
            let (host, port) = if let Some(bracketed) = spec.strip_prefix('[') {
                let (host, after) = bracketed.split_once(']').ok_or_else(|| {
                    Error::config("connection URL: unterminated [ in an IPv6 host")
                })?;
                (host, after.strip_prefix(':'))
            } else {
                match spec.rsplit_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (spec, None),
                }
            };
            if port.is_some_and(|p| !p.chars().all(|c| c.is_ascii_digit())) {
                // Not echoed: in a mistyped URL this may be part of a password.
                return Err(Error::config(
                    "connection URL: a port is not a number (percent-encode `:` in host names)",
                ));
            }
            hosts.push(decode(host)?);
            ports.push(port.map(str::to_owned).unwrap_or_default());
        }
        pairs.push(("host".to_owned(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            let filled: Vec<String> = ports
                .into_iter()
                .map(|p| if p.is_empty() { "5432".to_owned() } else { p })
                .collect();
            pairs.push(("port".to_owned(), filled.join(",")));
        }
    }
    if !path.is_empty() {
        pairs.push(("dbname".to_owned(), decode(path)?));
    }
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').ok_or_else(|| {
            Error::config(format!("connection URL: parameter {param:?} has no value"))
        })?;
        pairs.push((decode(key)?, decode(value)?));
    }
    Ok(pairs)
}

/// `user:pa/ss@host` or `user:pa?ss@host`: the authority ends at the `/` or `?` inside the
/// password, and what is left of it (`user:pa`) reads as a host with a port that is not a
/// number, while the `@` turns up later. libpq would read a host `user` and a port `pa`.
fn has_unencoded_password_delimiter(rest: &str) -> bool {
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(authority_end);
    !authority.contains('@')
        && after.contains('@')
        && authority.rsplit_once(':').is_some_and(|(_, port)| {
            !port.is_empty() && !port.chars().all(|c| c.is_ascii_digit() || c == ',')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_with_everything() {
        let settings = Settings::parse(
            "postgresql://orders%40api@srv.postgres.database.azure.com:6432,[::1]/my%20db\
             ?sslmode=verify-full&application_name=app&keepalives_idle=30&connect_timeout=10",
        )
        .unwrap();
        assert_eq!(
            settings.hosts,
            Some(vec!["srv.postgres.database.azure.com".into(), "::1".into()])
        );
        assert_eq!(settings.ports, Some(vec![6432, 5432]));
        assert_eq!(settings.user.as_deref(), Some("orders@api"));
        assert_eq!(settings.dbname.as_deref(), Some("my db"));
        assert_eq!(settings.ssl_mode, Some(SslMode::VerifyFull));
        assert_eq!(settings.application_name.as_deref(), Some("app"));
        assert_eq!(settings.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(
            settings.passthrough,
            vec![("keepalives_idle".into(), "30".into())]
        );
    }

    #[test]
    fn key_value_with_quotes_and_escapes() {
        let settings = Settings::parse(
            r"host=srv.postgres.database.azure.com port = 5432 dbname='my \'db\'' user=ada\ lovelace sslrootcert=/etc/ssl/root.pem",
        )
        .unwrap();
        assert_eq!(
            settings.hosts,
            Some(vec!["srv.postgres.database.azure.com".into()])
        );
        assert_eq!(settings.ports, Some(vec![5432]));
        assert_eq!(settings.dbname.as_deref(), Some("my 'db'"));
        assert_eq!(settings.user.as_deref(), Some("ada lovelace"));
        assert_eq!(settings.ssl_root_cert.as_deref(), Some("/etc/ssl/root.pem"));
    }

    #[test]
    fn plaintext_modes_and_passwords_are_refused() {
        assert!(matches!(
            Settings::parse("host=h sslmode=prefer").unwrap_err(),
            Error::TlsRequired { .. }
        ));
        assert!(matches!(
            Settings::parse("postgres://h/db?sslmode=disable").unwrap_err(),
            Error::TlsRequired { .. }
        ));
        let password = Settings::parse("postgres://u:hunter2@h/db").unwrap_err();
        assert!(password.to_string().contains("token is the password"));
        assert!(!password.to_string().contains("hunter2"));
        assert!(Settings::parse("host=h password=x").is_err());
    }

    #[test]
    fn passwords_with_url_delimiters_are_refused_without_echo() {
        for url in [
            "postgresql://u:pa/ss@h/db",
            "postgresql://u:pa?ss@h/db",
            "postgres://orders:s3cr/et?x@srv.postgres.database.azure.com:5432/db",
            "postgresql://u:pass:wo/rd@h",
        ] {
            let error = Settings::parse(url).unwrap_err().to_string();
            assert!(error.contains("password"), "{url}: {error}");
            for fragment in ["pa/ss", "pa?ss", "ss@", "s3cr", "et?x", "wo/rd", "\"pa"] {
                assert!(!error.contains(fragment), "{url}: {error}");
            }
        }
        // Ports and `@` further on are not mistaken for passwords.
        let fine = Settings::parse("postgresql://h:6432/db?application_name=a@b").unwrap();
        assert_eq!(fine.ports, Some(vec![6432]));
        let port = Settings::parse("postgresql://h:pa/db")
            .unwrap_err()
            .to_string();
        assert!(!port.contains("pa\""), "{port}");
    }

    #[test]
    fn environment_variables_and_their_errors() {
        let env = Environment::from_vars([
            ("PGHOST", "srv.postgres.database.azure.com"),
            ("PGPORT", "6432"),
            ("PGDATABASE", "orders"),
            ("PGUSER", "orders-api"),
            ("PGSSLMODE", "require"),
            ("PGSSLROOTCERT", "/root.crt"),
            ("PGAPPNAME", "svc"),
            ("PGCONNECT_TIMEOUT", "5"),
            ("PGPASSWORD", "ignored"),
        ]);
        let settings = Settings::from_env(&env).unwrap();
        assert_eq!(settings.ports, Some(vec![6432]));
        assert_eq!(settings.dbname.as_deref(), Some("orders"));
        assert_eq!(settings.ssl_mode, Some(SslMode::Require));
        assert_eq!(settings.connect_timeout, Some(Duration::from_secs(5)));

        let bad = Settings::from_env(&Environment::from_vars([("PGPORT", "x")])).unwrap_err();
        assert!(bad.to_string().contains("PGPORT"), "{bad}");
        assert!(matches!(
            Settings::from_env(&Environment::from_vars([("PGSSLMODE", "disable")])).unwrap_err(),
            Error::TlsRequired { .. }
        ));
    }

    #[test]
    fn higher_layer_wins_field_by_field() {
        let env =
            Settings::parse("host=env-host port=1 user=env-user keepalives=0 keepalives_idle=9")
                .unwrap();
        let explicit = Settings::parse("user=explicit keepalives=1").unwrap();
        let merged = explicit.over(env);
        assert_eq!(merged.hosts, Some(vec!["env-host".into()]));
        assert_eq!(merged.user.as_deref(), Some("explicit"));
        assert_eq!(
            merged.passthrough_conninfo(),
            "keepalives_idle='9' keepalives='1'"
        );
    }

    #[test]
    fn unsupported_client_certificates_are_explained() {
        let error = Settings::parse("host=h sslcert=/c.pem").unwrap_err();
        assert!(
            error.to_string().contains("sslcert is not supported"),
            "{error}"
        );
    }
}
