//! Which server, which credential: the flags every command shares, where each setting comes
//! from, and the connector and credential chain they describe.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use pg_entra::credential::{AccessToken, CredentialOptions, TokenRequestOptions};
use pg_entra::{Cloud, Connector, DefaultAzureCredential, Environment, TokenCredential};

/// The server and token flags. Each beats its libpq variable, which beats the default.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServerArgs {
    /// The server's host name [default: $PGHOST].
    #[arg(long, value_name = "HOST")]
    pub(crate) host: Option<String>,
    /// The server's port [default: $PGPORT, else 5432].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) port: Option<u16>,
    /// The database [default: $PGDATABASE, else postgres].
    #[arg(long, value_name = "NAME")]
    pub(crate) dbname: Option<String>,
    /// The PostgreSQL role [default: $PGUSER, else the name in the token].
    #[arg(long, value_name = "ROLE")]
    pub(crate) user: Option<String>,
    /// The token scope [default: the scope of the server's cloud].
    #[arg(long, value_name = "SCOPE")]
    pub(crate) scope: Option<String>,
    /// Azure Database for PostgreSQL Single Server: user names get `@<server>`.
    #[arg(long)]
    pub(crate) single_server: bool,
    /// The Entra tenant the Azure CLI and azd get the token in: the server's, for a guest
    /// [default: $AZURE_TENANT_ID, else the tool's own].
    #[arg(long, value_name = "TENANT")]
    pub(crate) tenant: Option<String>,
}

/// One setting as shown to a person: its value and where the value came from.
#[derive(Debug, Clone)]
pub(crate) struct Setting {
    pub(crate) name: &'static str,
    pub(crate) value: Option<String>,
    pub(crate) source: String,
}

/// The settings the doctor shows: name, flag, libpq variable, default.
const SHOWN: [(&str, &str, &str, Option<&str>); 7] = [
    ("host", "--host", "PGHOST", None),
    ("hostaddr", "", "PGHOSTADDR", None),
    ("port", "--port", "PGPORT", Some("5432")),
    ("database", "--dbname", "PGDATABASE", Some("postgres")),
    ("user", "--user", "PGUSER", None),
    ("sslmode", "", "PGSSLMODE", Some("verify-full")),
    (
        "sslrootcert",
        "",
        "PGSSLROOTCERT",
        Some("system roots only"),
    ),
];

impl ServerArgs {
    fn flag(&self, name: &str) -> Option<String> {
        match name {
            "host" => self.host.clone(),
            "port" => self.port.map(|p| p.to_string()),
            "database" => self.dbname.clone(),
            "user" => self.user.clone(),
            _ => None,
        }
    }

    /// Host, port, database, user and TLS settings with their sources, in the order the
    /// connector applies them (flag, then libpq variable, then default). A host address only
    /// when one is set.
    pub(crate) fn settings(&self) -> Vec<Setting> {
        let env = Environment::process();
        SHOWN
            .iter()
            .filter(|(name, _, var, _)| *name != "hostaddr" || env.var(var).is_some())
            .map(|&(name, flag, var, default)| {
                let (value, source) = match (self.flag(name), env.var(var)) {
                    (Some(value), _) => (Some(value), flag.to_owned()),
                    (None, Some(value)) => (Some(value), var.to_owned()),
                    (None, None) if name == "user" => (None, "the token".to_owned()),
                    (None, None) => (default.map(str::to_owned), "default".to_owned()),
                };
                Setting {
                    name,
                    value,
                    source,
                }
            })
            .collect()
    }

    /// The configured host names (a libpq list may hold several).
    pub(crate) fn hosts(&self) -> Vec<String> {
        let hosts = self
            .host
            .clone()
            .or_else(|| Environment::process().var("PGHOST"));
        hosts
            .map(|list| list.split(',').map(|h| h.trim().to_owned()).collect())
            .unwrap_or_default()
    }

    /// The user name given by flag or `PGUSER`, if any, and which of them gave it.
    pub(crate) fn given_user(&self) -> Option<(String, &'static str)> {
        match &self.user {
            Some(user) => Some((user.clone(), "--user")),
            None => Environment::process().var("PGUSER").map(|u| (u, "PGUSER")),
        }
    }

    /// The cloud the host names belong to (public when they do not tell).
    pub(crate) fn cloud(&self) -> Cloud {
        self.hosts()
            .iter()
            .find_map(|h| Cloud::from_host(h))
            .unwrap_or_default()
    }

    /// The scope tokens are requested for, as given: `--scope`, else the scope of the server
    /// kind the host names (Cosmos DB for PostgreSQL has its own), else the cloud's.
    pub(crate) fn scope(&self) -> String {
        self.scope.clone().unwrap_or_else(|| {
            self.hosts()
                .iter()
                .find_map(|host| Cloud::server_scope(host))
                .unwrap_or_else(|| self.cloud().scope())
                .to_owned()
        })
    }

    /// [`scope`](Self::scope) in the form every credential sends, or the configuration error
    /// that shows the expected form.
    pub(crate) fn normal_scope(&self) -> Result<String, pg_entra::Error> {
        pg_entra::credential::normalize_scope(&self.scope())
    }

    /// The credential chain the process environment describes, for the server's cloud.
    pub(crate) fn chain(&self) -> Result<DefaultAzureCredential, pg_entra::Error> {
        let mut builder = DefaultAzureCredential::builder()
            .options(CredentialOptions::default().cloud(self.cloud()));
        if let Some(tenant) = &self.tenant {
            builder = builder.tenant(tenant);
        }
        builder.build()
    }

    /// A connector for these settings with `credential`; `timeout` replaces the connect
    /// timeout when given. Checks the settings (no network I/O).
    pub(crate) fn connector(
        &self,
        credential: Arc<dyn TokenCredential>,
        timeout: Option<Duration>,
    ) -> Result<Connector, pg_entra::Error> {
        let mut builder = Connector::builder()
            .credential(credential)
            .scope(self.scope())
            .single_server(self.single_server);
        if let Some(host) = &self.host {
            builder = builder.host(host);
        }
        if let Some(port) = self.port {
            builder = builder.port(port);
        }
        if let Some(dbname) = &self.dbname {
            builder = builder.dbname(dbname);
        }
        if let Some(user) = &self.user {
            builder = builder.user(user);
        }
        if let Some(timeout) = timeout {
            builder = builder.connect_timeout(timeout);
        }
        // Named in the server's log and pg_stat_activity, unless the user names it.
        if Environment::process().var("PGAPPNAME").is_none() {
            builder = builder.application_name("pg-entra");
        }
        builder.build()
    }
}

/// A credential that returns one token it was given: the doctor logs in with the very token
/// it inspected, and asks the identity endpoint once.
pub(crate) struct IssuedToken(pub(crate) AccessToken);

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("expires_on", &self.0.expires_on)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl TokenCredential for IssuedToken {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(self.0.clone())
    }
}

/// An error and its causes, one line each, without repeating a cause already shown.
pub(crate) fn causes(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(level) = current {
        let text = level.to_string();
        if !lines.iter().any(|shown| shown.contains(&text)) {
            lines.push(text);
        }
        current = level.source();
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_token_debug_hides_the_token() {
        let issued = IssuedToken(AccessToken::new(
            "eyJ.secret-token-value.sig".to_owned(),
            time::OffsetDateTime::UNIX_EPOCH,
        ));
        let shown = format!("{issued:?}");
        assert!(!shown.contains("secret-token-value"), "{shown}");
        assert!(shown.contains("expires_on"), "{shown}");
    }

    #[test]
    fn causes_are_not_repeated() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "connecting failed: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = Outer(std::io::Error::other("refused"));
        assert_eq!(causes(&error), ["connecting failed: refused"]);
    }
}
