//! Connection settings the way PostgreSQL users write them: libpq environment variables, a
//! `postgresql://` URL, or a `key=value` string, read exactly as libpq reads them.
//!
//! The parsers follow libpq's own (`conninfo_parse` and `conninfo_uri_parse_options` in
//! `fe-connect.c`): the same delimiters, quoting, escapes and percent-decoding, the same
//! keywords, and the same inputs refused. A differential test (`tests/libpq.rs`) holds them to
//! libpq's `PQconninfoParse`. On top of that this crate refuses, for its own documented
//! reasons, what it cannot do safely: a password (the token is the password), a Unix socket or
//! no host (no TLS), a plaintext `sslmode`, and the libpq features listed in
//! [`Settings::set`] (client certificates, GSS, service files, …). Every setting lands in a
//! typed field: nothing a caller writes is passed on as text.

use std::net::IpAddr;
use std::time::Duration;

use tokio_postgres::config::{ChannelBinding, LoadBalanceHosts};

use crate::environment::Environment;
use crate::error::Error;
use crate::session_attrs::TargetSessionAttrs;
use crate::tls::SslMode;

/// Every keyword libpq 15 knows, plus `load_balance_hosts` (libpq 16). libpq refuses any other
/// keyword in a `key=value` string or a URL's query; so does this crate, naming it.
const LIBPQ_KEYWORDS: [&str; 37] = [
    "service",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "dbname",
    "host",
    "hostaddr",
    "port",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslmode",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "replication",
    "target_session_attrs",
    "load_balance_hosts",
];

/// libpq's environment variables and the keyword each stands for.
const ENVIRONMENT: [(&str, &str); 24] = [
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGOPTIONS", "options"),
    ("PGAPPNAME", "application_name"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGCLIENTENCODING", "client_encoding"),
    ("PGSERVICE", "service"),
    ("PGSERVICEFILE", "service"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGSSLCRL", "sslcrl"),
    ("PGSSLCRLDIR", "sslcrldir"),
    ("PGREQUIREPEER", "requirepeer"),
    ("PGGSSENCMODE", "gssencmode"),
    ("PGKRBSRVNAME", "krbsrvname"),
    ("PGGSSLIB", "gsslib"),
];

/// Connection settings from one source. `None` means "not given here".
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Settings {
    pub hosts: Option<Vec<String>>,
    pub hostaddrs: Option<Vec<IpAddr>>,
    /// One per host, or one for all; `None` entries mean the default port.
    pub ports: Option<Vec<Option<u16>>>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub ssl_mode: Option<SslMode>,
    pub ssl_root_cert: Option<String>,
    pub application_name: Option<String>,
    pub fallback_application_name: Option<String>,
    /// `Some(None)`: given as zero or less, which means the connector's default bound.
    pub connect_timeout: Option<Option<Duration>>,
    pub options: Option<String>,
    pub keepalives: Option<bool>,
    pub keepalives_idle: Option<Duration>,
    pub keepalives_interval: Option<Duration>,
    pub keepalives_count: Option<u32>,
    pub tcp_user_timeout: Option<Duration>,
    pub target_session_attrs: Option<TargetSessionAttrs>,
    pub load_balance_hosts: Option<LoadBalanceHosts>,
    pub channel_binding: Option<ChannelBinding>,
}

impl Settings {
    /// The settings in libpq's environment variables.
    pub(crate) fn from_env(env: &Environment) -> Result<Self, Error> {
        if env.var("PGPASSWORD").is_some() || env.var("PGPASSFILE").is_some() {
            tracing::info!(
                "PGPASSWORD / PGPASSFILE are set and ignored: the access token is the password"
            );
        }
        let mut settings = Settings::default();
        if env.var("PGREQUIRESSL").is_some_and(|v| v.starts_with('1')) {
            settings.ssl_mode = Some(SslMode::Require);
        }
        for (var, key) in ENVIRONMENT {
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
        if conninfo.contains('\0') {
            return Err(Error::invalid(
                "connection string",
                "the connection string contains a NUL character",
            ));
        }
        let pairs = match uri_body(conninfo) {
            Some(body) => uri_pairs(body)?,
            None => key_value_pairs(conninfo)?,
        };
        let mut settings = Settings::default();
        for (key, value) in pairs {
            settings
                .set(&key, &value)
                .map_err(|e| reword(e, "the connection string"))?;
        }
        Ok(settings)
    }

    /// Sets one libpq keyword. Keywords libpq does not know are refused, naming them; so are
    /// those this crate cannot honour, saying why.
    fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        match key {
            "host" => self.hosts = Some(split_list(value)),
            "hostaddr" => {
                let addresses = split_list(value)
                    .iter()
                    .map(|a| a.parse::<IpAddr>().ok())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid(key, value, "IP addresses, separated by commas"))?;
                self.hostaddrs = Some(addresses);
            }
            "port" => {
                let ports = split_list(value)
                    .iter()
                    .map(|p| match p.as_str() {
                        "" => Some(None),
                        p => libpq_int(p)
                            .and_then(|p| u16::try_from(p).ok())
                            .filter(|p| *p != 0)
                            .map(Some),
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid(key, value, "port numbers, separated by commas"))?;
                self.ports = Some(ports);
            }
            "dbname" => self.dbname = Some(value.to_owned()),
            // As in libpq, an empty user means "not given": here, derived from the token.
            "user" => self.user = Some(value.to_owned()).filter(|user| !user.is_empty()),
            "options" => self.options = Some(value.to_owned()),
            "application_name" => self.application_name = Some(value.to_owned()),
            "fallback_application_name" => self.fallback_application_name = Some(value.to_owned()),
            "password" => {
                return Err(Error::unsupported(
                    "password",
                    "a password was given, but the Entra access token is the password; remove it",
                ));
            }
            "sslmode" => self.ssl_mode = Some(value.parse()?),
            // libpq's old spelling: 1 is `require`, anything else `prefer`.
            "requiressl" => {
                self.ssl_mode = Some(if value.starts_with('1') {
                    SslMode::Require
                } else {
                    "prefer".parse()?
                })
            }
            "sslrootcert" => self.ssl_root_cert = Some(value.to_owned()),
            "connect_timeout" => {
                let seconds = libpq_int(value)
                    .ok_or_else(|| invalid(key, value, "a whole number of seconds"))?;
                // libpq waits forever on zero or less; here that means the default bound.
                self.connect_timeout = Some(
                    u64::try_from(seconds)
                        .ok()
                        .filter(|s| *s > 0)
                        .map(Duration::from_secs),
                );
            }
            "keepalives" => {
                let on = libpq_int(value).ok_or_else(|| invalid(key, value, "0 or 1"))?;
                self.keepalives = Some(on != 0);
            }
            "keepalives_idle" | "keepalives_interval" => {
                let seconds = libpq_int(value)
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or_else(|| invalid(key, value, "a whole number of seconds"))?;
                let duration = Some(Duration::from_secs(seconds));
                match key {
                    "keepalives_idle" => self.keepalives_idle = duration,
                    _ => self.keepalives_interval = duration,
                }
            }
            "keepalives_count" => {
                let count = libpq_int(value)
                    .and_then(|c| u32::try_from(c).ok())
                    .ok_or_else(|| invalid(key, value, "a whole number"))?;
                self.keepalives_count = Some(count);
            }
            "tcp_user_timeout" => {
                let millis = libpq_int(value)
                    .and_then(|m| u64::try_from(m).ok())
                    .ok_or_else(|| invalid(key, value, "a whole number of milliseconds"))?;
                self.tcp_user_timeout = Some(Duration::from_millis(millis));
            }
            "target_session_attrs" => {
                self.target_session_attrs =
                    Some(TargetSessionAttrs::parse(value).ok_or_else(|| {
                        invalid(
                            key,
                            value,
                            "any, read-write, read-only, primary, standby or prefer-standby",
                        )
                    })?);
            }
            "load_balance_hosts" => {
                self.load_balance_hosts = Some(match value {
                    "disable" => LoadBalanceHosts::Disable,
                    "random" => LoadBalanceHosts::Random,
                    _ => return Err(invalid(key, value, "disable or random")),
                });
            }
            "channel_binding" => {
                self.channel_binding = Some(match value {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    _ => return Err(invalid(key, value, "disable, prefer or require")),
                });
            }
            // tokio-postgres always speaks UTF-8.
            "client_encoding" if value.eq_ignore_ascii_case("UTF8") || value == "auto" => {}
            // Settings that change nothing here: libpq ignores sslcompression; SNI is always
            // sent; there is no GSS encryption to turn off.
            "sslcompression" => {}
            "sslsni" if value == "1" => {}
            "gssencmode" if value == "disable" => {}
            "service" => {
                return Err(Error::unsupported(
                    "service",
                    "service (PGSERVICE, PGSERVICEFILE) is not supported: pg_service.conf files \
                     are not read; give the host, port, dbname and user directly",
                ));
            }
            "client_encoding"
            | "sslsni"
            | "gssencmode"
            | "passfile"
            | "sslcert"
            | "sslkey"
            | "sslpassword"
            | "sslcrl"
            | "sslcrldir"
            | "requirepeer"
            | "ssl_min_protocol_version"
            | "ssl_max_protocol_version"
            | "krbsrvname"
            | "gsslib"
            | "replication" => {
                return Err(Error::unsupported(
                    key.to_owned(),
                    format!(
                        "{key} is not supported: the connection authenticates with an Entra token \
                     over verified TLS"
                    ),
                ));
            }
            _ => {
                return Err(Error::invalid(
                    "connection string",
                    format!("{key:?} is not a libpq connection keyword"),
                ));
            }
        }
        Ok(())
    }

    /// These settings, with anything they leave unset taken from `lower`.
    pub(crate) fn over(self, lower: Settings) -> Settings {
        Settings {
            hosts: self.hosts.or(lower.hosts),
            hostaddrs: self.hostaddrs.or(lower.hostaddrs),
            ports: self.ports.or(lower.ports),
            dbname: self.dbname.or(lower.dbname),
            user: self.user.or(lower.user),
            ssl_mode: self.ssl_mode.or(lower.ssl_mode),
            ssl_root_cert: self.ssl_root_cert.or(lower.ssl_root_cert),
            application_name: self.application_name.or(lower.application_name),
            fallback_application_name: self
                .fallback_application_name
                .or(lower.fallback_application_name),
            connect_timeout: self.connect_timeout.or(lower.connect_timeout),
            options: self.options.or(lower.options),
            keepalives: self.keepalives.or(lower.keepalives),
            keepalives_idle: self.keepalives_idle.or(lower.keepalives_idle),
            keepalives_interval: self.keepalives_interval.or(lower.keepalives_interval),
            keepalives_count: self.keepalives_count.or(lower.keepalives_count),
            tcp_user_timeout: self.tcp_user_timeout.or(lower.tcp_user_timeout),
            target_session_attrs: self.target_session_attrs.or(lower.target_session_attrs),
            load_balance_hosts: self.load_balance_hosts.or(lower.load_balance_hosts),
            channel_binding: self.channel_binding.or(lower.channel_binding),
        }
    }

    /// Sets everything but hosts, ports and host addresses on a tokio-postgres config.
    pub(crate) fn apply(&self, config: &mut tokio_postgres::Config) {
        if let Some(name) = self
            .application_name
            .as_ref()
            .or(self.fallback_application_name.as_ref())
        {
            config.application_name(name);
        }
        if let Some(options) = &self.options {
            config.options(options);
        }
        if let Some(on) = self.keepalives {
            config.keepalives(on);
        }
        if let Some(idle) = self.keepalives_idle {
            config.keepalives_idle(idle);
        }
        if let Some(interval) = self.keepalives_interval {
            config.keepalives_interval(interval);
        }
        if let Some(count) = self.keepalives_count {
            config.keepalives_retries(count);
        }
        if let Some(timeout) = self.tcp_user_timeout {
            config.tcp_user_timeout(timeout);
        }
        if let Some(attrs) = self.target_session_attrs {
            config.target_session_attrs(attrs.for_tokio_postgres());
        }
        if let Some(balance) = self.load_balance_hosts {
            config.load_balance_hosts(balance);
        }
        if let Some(binding) = self.channel_binding {
            config.channel_binding(binding);
        }
    }
}

fn invalid(key: &str, value: &str, expected: &str) -> Error {
    Error::invalid(
        key.to_owned(),
        format!("invalid {key} {value:?}: expected {expected}"),
    )
}

fn reword(error: Error, origin: &str) -> Error {
    match error {
        Error::Config(config) => Error::Config(config.with_origin(origin)),
        other => other,
    }
}

/// libpq's comma-separated lists (hosts, ports, addresses): no trimming, empty entries kept.
fn split_list(value: &str) -> Vec<String> {
    value.split(',').map(str::to_owned).collect()
}

/// An integer as libpq's `parse_int_param` reads it: surrounding white space allowed, nothing
/// else, and within C's `int` (which also bounds every duration built from it).
fn libpq_int(value: &str) -> Option<i64> {
    value
        .trim_matches(is_space)
        .parse::<i32>()
        .ok()
        .map(i64::from)
}

/// C's `isspace` in the C locale, which libpq's parser uses.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{b}' | '\u{c}' | '\r')
}

/// What follows `postgresql://` or `postgres://`, if the string is a URI.
fn uri_body(conninfo: &str) -> Option<&str> {
    conninfo
        .strip_prefix("postgresql://")
        .or_else(|| conninfo.strip_prefix("postgres://"))
}

/// libpq `key=value` syntax: white space around `=` allowed; values may be single-quoted;
/// a backslash takes the next character literally, inside quotes or not.
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| is_space(*c)).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !is_space(*c)) {
            key.push(c);
        }
        while chars.next_if(|c| is_space(*c)).is_some() {}
        if chars.next() != Some('=') {
            return Err(Error::invalid(
                "connection string",
                format!("connection string: expected \"=\" after {key:?}"),
            ));
        }
        while chars.next_if(|c| is_space(*c)).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(Error::invalid(
                            "connection string",
                            format!("connection string: unterminated quoted value for {key:?}"),
                        ));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !is_space(*c)) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        check_keyword(&key)?;
        pairs.push((key, value));
    }
}

fn check_keyword(key: &str) -> Result<(), Error> {
    if key == "requiressl" || LIBPQ_KEYWORDS.contains(&key) {
        Ok(())
    } else {
        Err(Error::invalid(
            "connection string",
            format!("{key:?} is not a libpq connection keyword"),
        ))
    }
}

/// `postgresql://[user[:password]@][host[:port][,...]][/dbname][?key=value&...]`, split as
/// libpq splits it. `body` is what follows the scheme.
fn uri_pairs(body: &str) -> Result<Vec<(String, String)>, Error> {
    if has_unencoded_password_delimiter(body) {
        // Nothing of the URL is repeated: the part before `@` is a password.
        return Err(Error::unsupported(
            "password",
            "connection URL: the user info holds an unencoded `/` or `?`, so it looks like a \
             password; the Entra access token is the password: remove it (and percent-encode \
             `/` as %2F and `?` as %3F in user names)",
        ));
    }
    let mut pairs = Vec::new();
    let bytes = body.as_bytes();
    let find = |from: usize, stops: &[u8]| {
        bytes[from..]
            .iter()
            .position(|b| stops.contains(b))
            .map_or(bytes.len(), |i| from + i)
    };
    // User info ends at an `@` met before any `/` (libpq does not stop at `?` here).
    let mut at = 0;
    let credentials_end = find(0, b"@/");
    if bytes.get(credentials_end) == Some(&b'@') {
        let user_end = find(0, b":@");
        let user = &body[..user_end];
        if !user.is_empty() {
            pairs.push(("user".to_owned(), decode(user)?));
        }
        if bytes[user_end] == b':' {
            let password = &body[user_end + 1..credentials_end];
            if !password.is_empty() {
                // Not decoded or kept: refused by `set` without repeating it.
                pairs.push(("password".to_owned(), String::new()));
            }
        }
        at = credentials_end + 1;
    }
    let (mut hosts, mut ports) = (String::new(), String::new());
    let mut terminator;
    loop {
        let host;
        if bytes.get(at) == Some(&b'[') {
            let start = at + 1;
            let end = find(start, b"]");
            if end == bytes.len() {
                return Err(Error::invalid(
                    "connection URL",
                    "connection URL: no \"]\" closes the IPv6 address",
                ));
            }
            if end == start {
                return Err(Error::invalid(
                    "connection URL",
                    "connection URL: empty IPv6 address",
                ));
            }
            host = &body[start..end];
            at = end + 1;
            if let Some(&next) = bytes.get(at)
                && !b":/?,".contains(&next)
            {
                return Err(Error::invalid(
                    "connection URL",
                    "connection URL: unexpected character after an IPv6 address (expected \":\", \
                     \"/\", \"?\" or \",\")",
                ));
            }
        } else {
            let end = find(at, b":/?,");
            host = &body[at..end];
            at = end;
        }
        hosts.push_str(host);
        terminator = bytes.get(at).copied();
        if terminator == Some(b':') {
            let end = find(at + 1, b"/?,");
            ports.push_str(&body[at + 1..end]);
            at = end;
            terminator = bytes.get(at).copied();
        }
        if terminator != Some(b',') {
            break;
        }
        at += 1;
        hosts.push(',');
        ports.push(',');
    }
    if !hosts.is_empty() {
        pairs.push(("host".to_owned(), decode(&hosts)?));
    }
    if !ports.is_empty() {
        let ports = decode(&ports)?;
        if !ports
            .split(',')
            .all(|port| port.is_empty() || libpq_int(port).is_some())
        {
            // Not repeated: in a mistyped URL this may be part of a password.
            return Err(Error::invalid(
                "connection URL",
                "connection URL: a port is not a number (percent-encode `:` in host names)",
            ));
        }
        pairs.push(("port".to_owned(), ports));
    }
    if terminator == Some(b'/') {
        let start = at + 1;
        let end = find(start, b"?");
        if end > start {
            pairs.push(("dbname".to_owned(), decode(&body[start..end])?));
        }
        at = end;
        terminator = bytes.get(at).copied();
    }
    if terminator == Some(b'?') {
        for parameter in body[at + 1..].split('&').filter(|p| !p.is_empty()) {
            pairs.push(query_pair(parameter)?);
        }
        // libpq refuses an empty parameter between two `&` but not a trailing one.
        let query = &body[at + 1..];
        if query.contains("&&") || query.starts_with('&') {
            return Err(Error::invalid(
                "connection URL",
                "connection URL: an empty query parameter (missing \"=\")",
            ));
        }
    }
    Ok(pairs)
}

/// `user:pa/ss@host`: the `/` inside the password ends the authority early, and what is left
/// of it (`user:pa`) reads as a host with a port that is not a number, while the `@` turns up
/// later. libpq reads a host `user` and a port `pa`, and would repeat `pa` in its error.
fn has_unencoded_password_delimiter(body: &str) -> bool {
    let authority_end = body.find(['/', '?']).unwrap_or(body.len());
    let (authority, after) = body.split_at(authority_end);
    !authority.contains('@')
        && after.contains('@')
        && authority.rsplit_once(':').is_some_and(|(_, port)| {
            !port.is_empty() && !port.chars().all(|c| c.is_ascii_digit() || c == ',')
        })
}

/// One `key=value` of a URL's query, decoded; `ssl=true` means `sslmode=require`.
fn query_pair(parameter: &str) -> Result<(String, String), Error> {
    let (key, value) = parameter.split_once('=').ok_or_else(|| {
        Error::invalid(
            "connection URL",
            "connection URL: a query parameter has no \"=\" between key and value",
        )
    })?;
    if value.contains('=') {
        return Err(Error::invalid(
            "connection URL",
            "connection URL: a query parameter has more than one \"=\"",
        ));
    }
    let (key, value) = (decode(key)?, decode(value)?);
    if key == "ssl" && value == "true" {
        return Ok(("sslmode".to_owned(), "require".to_owned()));
    }
    if !LIBPQ_KEYWORDS.contains(&key.as_str()) || key == "requiressl" {
        return Err(Error::invalid(
            "connection URL",
            format!("connection URL: {key:?} is not a libpq connection keyword"),
        ));
    }
    Ok((key, value))
}

/// Percent-decoding as libpq does it: `%` must be followed by two hex digits, and `%00` is
/// refused. The result must be UTF-8 (libpq takes any bytes; a host, user or database name
/// that is not text cannot be sent by this crate).
fn decode(text: &str) -> Result<String, Error> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] != b'%' {
            decoded.push(bytes[at]);
            at += 1;
            continue;
        }
        let hex = |i: usize| bytes.get(i).and_then(|b| (*b as char).to_digit(16));
        let (Some(high), Some(low)) = (hex(at + 1), hex(at + 2)) else {
            return Err(Error::invalid(
                "connection URL",
                "connection URL: a \"%\" is not followed by two hex digits",
            ));
        };
        let byte = (high * 16 + low) as u8;
        if byte == 0 {
            return Err(Error::invalid(
                "connection URL",
                "connection URL: %00 is not allowed",
            ));
        }
        decoded.push(byte);
        at += 3;
    }
    String::from_utf8(decoded).map_err(|_| {
        Error::invalid(
            "connection URL",
            "connection URL: percent-encoding is not valid UTF-8",
        )
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
        assert_eq!(settings.ports, Some(vec![Some(6432), None]));
        assert_eq!(settings.user.as_deref(), Some("orders@api"));
        assert_eq!(settings.dbname.as_deref(), Some("my db"));
        assert_eq!(settings.ssl_mode, Some(SslMode::VerifyFull));
        assert_eq!(settings.application_name.as_deref(), Some("app"));
        assert_eq!(
            settings.connect_timeout,
            Some(Some(Duration::from_secs(10)))
        );
        assert_eq!(settings.keepalives_idle, Some(Duration::from_secs(30)));
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
        assert_eq!(settings.ports, Some(vec![Some(5432)]));
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
        // libpq reads `u:pa?ss@h` as user `u`, password `pa?ss`: refused as a password. With
        // `/` in it, libpq reads host `u` and port `pa`: refused as a port, not echoed.
        for url in [
            "postgresql://u:pa/ss@h/db",
            "postgresql://u:pa?ss@h/db",
            "postgres://orders:s3cr/et?x@srv.postgres.database.azure.com:5432/db",
            "postgresql://u:pass:wo/rd@h",
        ] {
            let error = Settings::parse(url).unwrap_err().to_string();
            for fragment in ["pa/ss", "pa?ss", "ss@", "s3cr", "et?x", "wo/rd", "\"pa"] {
                assert!(!error.contains(fragment), "{url}: {error}");
            }
        }
        let fine = Settings::parse("postgresql://h:6432/db?application_name=a@b").unwrap();
        assert_eq!(fine.ports, Some(vec![Some(6432)]));
    }

    #[test]
    fn malformed_percent_escapes_and_ipv6_tails_are_refused() {
        for url in [
            "postgresql://%zz",
            "postgresql://%1",
            "postgresql://%",
            "postgresql://a%00b",
            "postgres://host?dbname=%XXfoo",
            "postgres://[::1]z",
            "postgres://[::1",
            "postgres://[]",
            "postgresql://host?zzz",
            "postgresql://host?key=key=value",
            "postgresql://host?uzer=",
        ] {
            assert!(Settings::parse(url).is_err(), "{url}");
        }
    }

    #[test]
    fn smuggled_keys_in_a_url_query_are_refused_by_name() {
        let error = Settings::parse(
            "postgresql://h/db?keepalives%3D1%20host%3Devil.example%20keepalives_idle=1",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("not a libpq connection keyword"), "{error}");
        assert!(error.contains("keepalives=1 host=evil.example"), "{error}");
        let unknown = Settings::parse("host=h frobnicate=1")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("\"frobnicate\""), "{unknown}");
    }

    #[test]
    fn environment_variables_and_their_errors() {
        let env = Environment::from_vars([
            (
                "PGHOST",
                "a.postgres.database.azure.com,b.postgres.database.azure.com",
            ),
            ("PGPORT", "6432,6433"),
            ("PGDATABASE", "orders"),
            ("PGUSER", "orders-api"),
            ("PGSSLMODE", "require"),
            ("PGSSLROOTCERT", "/root.crt"),
            ("PGAPPNAME", "svc"),
            ("PGCONNECT_TIMEOUT", "5"),
            ("PGOPTIONS", "-c search_path=app"),
            ("PGPASSWORD", "ignored"),
        ]);
        let settings = Settings::from_env(&env).unwrap();
        assert_eq!(settings.hosts.as_ref().map(Vec::len), Some(2));
        assert_eq!(settings.ports, Some(vec![Some(6432), Some(6433)]));
        assert_eq!(settings.dbname.as_deref(), Some("orders"));
        assert_eq!(settings.ssl_mode, Some(SslMode::Require));
        assert_eq!(settings.options.as_deref(), Some("-c search_path=app"));
        assert_eq!(settings.connect_timeout, Some(Some(Duration::from_secs(5))));

        let bad = Settings::from_env(&Environment::from_vars([("PGPORT", "x")])).unwrap_err();
        assert!(bad.to_string().contains("PGPORT"), "{bad}");
        assert!(matches!(
            Settings::from_env(&Environment::from_vars([("PGSSLMODE", "disable")])).unwrap_err(),
            Error::TlsRequired { .. }
        ));
        let service =
            Settings::from_env(&Environment::from_vars([("PGSERVICE", "orders")])).unwrap_err();
        assert!(service.to_string().contains("PGSERVICE"), "{service}");
        assert!(service.to_string().contains("pg_service.conf"), "{service}");
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
        assert_eq!(merged.keepalives, Some(true));
        assert_eq!(merged.keepalives_idle, Some(Duration::from_secs(9)));
    }

    #[test]
    fn unsupported_features_are_explained() {
        let error = Settings::parse("host=h sslcert=/c.pem").unwrap_err();
        assert!(
            error.to_string().contains("sslcert is not supported"),
            "{error}"
        );
        // Harmless settings pass.
        Settings::parse("host=h gssencmode=disable sslsni=1 client_encoding=UTF8").unwrap();
    }
}
