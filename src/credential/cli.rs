//! The Azure CLI and Azure Developer CLI credentials: a token from the developer's own login,
//! by running `az` or `azd`. Each call spawns a process (hundreds of milliseconds), so wrap
//! them in a [`TokenCache`](crate::TokenCache), as the [`Connector`](crate::Connector) does.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use tokio::io::AsyncReadExt as _;

use super::http::MAX_BODY_BYTES;
use super::options::CredentialOptions;
use super::scope::only_scope;
use super::token_response::redact_bearer_tokens;
use super::unavailable::CredentialUnavailable;
use crate::environment::Environment;
use crate::error::Error;

/// How long a CLI may take before it is given up on.
const DEFAULT_CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// The Azure CLI's error text is shown up to this length.
const MAX_ERROR_TEXT: usize = 600;

/// The token out of `az` (`azure_cli`) or `azd` output, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn parse_output(azure_cli: bool, stdout: &[u8]) -> Result<AccessToken, String> {
    let tool = if azure_cli {
        Tool::AzureCli
    } else {
        Tool::AzureDeveloperCli
    };
    tool.parse(stdout)
}

/// Which developer tool, and how to ask it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    AzureCli,
    AzureDeveloperCli,
}

impl Tool {
    fn credential_name(self) -> &'static str {
        match self {
            Tool::AzureCli => "AzureCliCredential",
            Tool::AzureDeveloperCli => "AzureDeveloperCliCredential",
        }
    }

    fn program(self) -> &'static str {
        match (self, cfg!(windows)) {
            (Tool::AzureCli, false) => "az",
            (Tool::AzureCli, true) => "az.cmd",
            (Tool::AzureDeveloperCli, false) => "azd",
            (Tool::AzureDeveloperCli, true) => "azd.exe",
        }
    }

    fn arguments(self, scope: &str, tenant: Option<&str>) -> Vec<String> {
        let fixed: &[&str] = match self {
            Tool::AzureCli => &["account", "get-access-token", "--output", "json", "--scope"],
            Tool::AzureDeveloperCli => &[
                "auth",
                "token",
                "--output",
                "json",
                "--no-prompt",
                "--scope",
            ],
        };
        let mut args: Vec<String> = fixed.iter().map(|s| (*s).to_owned()).collect();
        args.push(scope.to_owned());
        if let Some(tenant) = tenant {
            args.push(match self {
                Tool::AzureCli => "--tenant".to_owned(),
                Tool::AzureDeveloperCli => "--tenant-id".to_owned(),
            });
            args.push(tenant.to_owned());
        }
        args
    }

    fn login_hint(self) -> &'static str {
        match self {
            Tool::AzureCli => "run `az login`",
            Tool::AzureDeveloperCli => "run `azd auth login`",
        }
    }

    /// The token out of the tool's JSON: `az` gives `accessToken` and the integer `expires_on`
    /// (CLI 2.54 and later; `expiresOn` is local time without a zone, so it is not used);
    /// `azd` gives `token` and an RFC 3339 `expiresOn`.
    fn parse(self, stdout: &[u8]) -> Result<AccessToken, String> {
        let json: serde_json::Value =
            serde_json::from_slice(stdout).map_err(|_| "its output is not JSON".to_owned())?;
        let field = |name: &str| json.get(name);
        let (token, expires_on) = match self {
            Tool::AzureCli => {
                let token = field("accessToken").and_then(|v| v.as_str());
                let expires_on = match field("expires_on") {
                    Some(v) => v
                        .as_i64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok()),
                    None => {
                        return Err("its output has no `expires_on`; upgrade the Azure CLI to \
                                    2.54 or later"
                            .to_owned());
                    }
                };
                (token, expires_on)
            }
            Tool::AzureDeveloperCli => (
                field("token").and_then(|v| v.as_str()),
                field("expiresOn")
                    .and_then(|v| v.as_str())
                    .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok()),
            ),
        };
        match (token.filter(|t| !t.is_empty()), expires_on) {
            (Some(token), Some(expires_on)) => Ok(AccessToken::new(token.to_owned(), expires_on)),
            (None, _) => Err("its output has no token".to_owned()),
            (Some(_), None) => Err("its output has no readable expiry".to_owned()),
        }
    }
}

/// Runs one of the developer CLIs with a timeout.
struct CliCredential {
    tool: Tool,
    tenant: Option<String>,
    timeout: Duration,
    /// The child's `PATH` (and the lookup path for the program), when not the process's own.
    path: Option<String>,
}

impl CliCredential {
    fn new(tool: Tool, environment: &Environment) -> Self {
        Self {
            tool,
            tenant: None,
            timeout: DEFAULT_CLI_TIMEOUT,
            path: environment.var("PATH"),
        }
    }

    fn unavailable(&self, reason: impl Into<String>) -> azure_core::Error {
        CredentialUnavailable::new(self.tool.credential_name(), reason).into_azure()
    }

    async fn run(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let scope = only_scope(self.tool.credential_name(), scopes)?.scope();
        let program = self.tool.program();
        let mut command = tokio::process::Command::new(program);
        command
            .args(self.tool.arguments(&scope, self.tenant.as_deref()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match &self.path {
            Some(path) => {
                command.env("PATH", path);
            }
            None => return Err(self.unavailable("PATH is not set, so `az`/`azd` cannot be found")),
        }
        tracing::debug!(program, scope, "asking a developer CLI for a token");
        let mut child = command.spawn().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                self.unavailable(format!("`{program}` is not installed or not on PATH"))
            } else {
                self.unavailable(format!("cannot run `{program}`: {error}"))
            }
        })?;
        let source = match self.tool {
            Tool::AzureCli => "azure_cli",
            Tool::AzureDeveloperCli => "azure_developer_cli",
        };
        let answered = tokio::time::timeout(self.timeout, read_output(&mut child)).await;
        crate::observe::identity_request(
            source,
            match &answered {
                Ok(Ok(output)) => output
                    .status
                    .code()
                    .and_then(|code| u16::try_from(code).ok()),
                _ => None,
            },
        );
        let output = match answered {
            Err(_) => {
                return Err(self.unavailable(format!(
                    "`{program}` did not answer within {:?}",
                    self.timeout
                )));
            }
            Ok(Err(OutputError::TooLarge)) => {
                return Err(self.unavailable(format!(
                    "`{program}` wrote more than {} KiB, which is not a token answer",
                    MAX_BODY_BYTES / 1024
                )));
            }
            Ok(Err(OutputError::Io(error))) => {
                return Err(self.unavailable(format!("`{program}` failed: {error}")));
            }
            Ok(Ok(output)) => output,
        };
        if !output.status.success() {
            // The CLI's own words ("Please run 'az login' to setup account.") reach the user,
            // with anything token-shaped removed.
            let stderr = String::from_utf8_lossy(&output.stderr);
            let mut text = redact_bearer_tokens(stderr.trim());
            if text.len() > MAX_ERROR_TEXT {
                let cut = (0..=MAX_ERROR_TEXT)
                    .rev()
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(0);
                text.truncate(cut);
                text.push('…');
            }
            if text.is_empty() {
                text = format!("`{program}` exited with {}", output.status);
            }
            return Err(self.unavailable(format!("{text} ({})", self.tool.login_hint())));
        }
        self.tool
            .parse(&output.stdout)
            .map_err(|problem| self.unavailable(format!("`{program}` answered, but {problem}")))
    }
}

/// What a CLI printed, and how it ended.
struct Output {
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

enum OutputError {
    /// stdout or stderr passed the cap; the child is killed when dropped.
    TooLarge,
    Io(std::io::Error),
}

/// Reads the child's stdout and stderr, each up to [`MAX_BODY_BYTES`], and waits for it to exit.
async fn read_output(child: &mut tokio::process::Child) -> Result<Output, OutputError> {
    async fn capped(
        stream: Option<impl tokio::io::AsyncRead + Unpin>,
    ) -> Result<Vec<u8>, OutputError> {
        let mut bytes = Vec::new();
        if let Some(stream) = stream {
            stream
                .take(MAX_BODY_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
                .await
                .map_err(OutputError::Io)?;
        }
        if bytes.len() > MAX_BODY_BYTES {
            return Err(OutputError::TooLarge);
        }
        Ok(bytes)
    }
    let (stdout, stderr) =
        tokio::try_join!(capped(child.stdout.take()), capped(child.stderr.take()))?;
    let status = child.wait().await.map_err(OutputError::Io)?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

macro_rules! cli_credential {
    ($(#[$doc:meta])* $name:ident, $builder:ident, $tool:expr) => {
        $(#[$doc])*
        pub struct $name {
            cli: CliCredential,
        }

        impl $name {
            /// A credential that runs the tool found on the process's `PATH`.
            pub fn from_env() -> Result<Self, Error> {
                Self::builder().build()
            }

            /// A builder.
            pub fn builder() -> $builder {
                $builder {
                    cli: CliCredential::new($tool, &Environment::process()),
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("tenant", &self.cli.tenant)
                    .field("timeout", &self.cli.timeout)
                    .finish_non_exhaustive()
            }
        }

        #[async_trait::async_trait]
        impl TokenCredential for $name {
            async fn get_token(
                &self,
                scopes: &[&str],
                _options: Option<TokenRequestOptions<'_>>,
            ) -> azure_core::Result<AccessToken> {
                self.cli.run(scopes).await
            }
        }

        #[doc = concat!("Builds an [`", stringify!($name), "`].")]
        #[derive(Debug)]
        pub struct $builder {
            cli: CliCredential,
        }

        impl $builder {
            /// Ask for a token in this tenant instead of the tool's default one (`az
            /// --tenant`, `azd --tenant-id`): a guest signs in to the server's tenant this way.
            /// A tenant id (GUID) or domain; [`build`](Self::build) refuses anything else.
            pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
                self.cli.tenant = Some(tenant.into());
                self
            }

            /// How long the tool may take (default 10 s); after that the credential reports
            /// itself unavailable and the process is killed.
            pub fn timeout(mut self, timeout: Duration) -> Self {
                self.cli.timeout = timeout;
                self
            }

            /// Where `PATH` comes from (default: the process environment).
            pub fn options(mut self, options: impl Into<CredentialOptions>) -> Self {
                self.cli.path = options.into().environment.var("PATH");
                self
            }

            /// Builds the credential. Only the tenant is checked here: a missing or
            /// logged-out tool makes the credential unavailable, not invalid.
            pub fn build(self) -> Result<$name, Error> {
                if let Some(tenant) = &self.cli.tenant {
                    check_tenant(tenant)?;
                }
                Ok($name { cli: self.cli })
            }
        }
    };
}

/// A tenant id or domain, and nothing a CLI could read as an option.
pub(crate) fn check_tenant(tenant: &str) -> Result<(), Error> {
    let valid = !tenant.is_empty()
        && !tenant.starts_with(['-', '.'])
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            "tenant",
            format!(
                "{tenant:?} is not a tenant: expected its id (a GUID) or a domain such as \
                 contoso.onmicrosoft.com"
            ),
        ))
    }
}

cli_credential!(
    /// A token from the Azure CLI's login: `az account get-access-token --scope <scope>`.
    ///
    /// If `az` is missing, not logged in, fails or exceeds its timeout, the error is
    /// [`CredentialUnavailable`] carrying the CLI's own message, so that a chain moves on.
    AzureCliCredential,
    AzureCliCredentialBuilder,
    Tool::AzureCli
);

cli_credential!(
    /// A token from the Azure Developer CLI's login:
    /// `azd auth token --scope <scope> --no-prompt`.
    ///
    /// If `azd` is missing, not logged in, fails or exceeds its timeout, the error is
    /// [`CredentialUnavailable`] carrying the tool's own message, so that a chain moves on.
    AzureDeveloperCliCredential,
    AzureDeveloperCliCredentialBuilder,
    Tool::AzureDeveloperCli
);

impl fmt::Debug for CliCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CliCredential")
            .field("tool", &self.tool)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn az_json_uses_the_epoch_expiry() {
        let token = Tool::AzureCli
            .parse(
                br#"{"accessToken":"tok","expiresOn":"2026-11-23 10:00:00.000000","expires_on":1795000000,
                    "subscription":"s","tenant":"t","tokenType":"Bearer"}"#,
            )
            .unwrap();
        assert_eq!(token.token.secret(), "tok");
        assert_eq!(token.expires_on.unix_timestamp(), 1_795_000_000);
        let old = Tool::AzureCli
            .parse(br#"{"accessToken":"tok","expiresOn":"2026-11-23 10:00:00.000000"}"#)
            .unwrap_err();
        assert!(old.contains("2.54"), "{old}");
    }

    #[test]
    fn azd_json_uses_rfc3339() {
        let token = Tool::AzureDeveloperCli
            .parse(br#"{"token":"tok","expiresOn":"2026-11-23T10:00:00Z"}"#)
            .unwrap();
        assert_eq!(token.expires_on.unix_timestamp(), 1_795_428_000);
        assert!(Tool::AzureDeveloperCli.parse(b"not json").is_err());
        assert!(
            Tool::AzureDeveloperCli
                .parse(br#"{"expiresOn":"2026-11-23T10:00:00Z"}"#)
                .unwrap_err()
                .contains("no token")
        );
    }

    #[test]
    fn arguments_name_scope_and_tenant() {
        assert_eq!(
            Tool::AzureCli.arguments("s/.default", Some("t")),
            [
                "account",
                "get-access-token",
                "--output",
                "json",
                "--scope",
                "s/.default",
                "--tenant",
                "t"
            ]
        );
        assert_eq!(
            Tool::AzureDeveloperCli.arguments("s/.default", None),
            [
                "auth",
                "token",
                "--output",
                "json",
                "--no-prompt",
                "--scope",
                "s/.default"
            ]
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_cli_output_gives_a_token_or_a_reason(stdout in proptest::collection::vec(any::<u8>(), 0..512)) {
            for tool in [Tool::AzureCli, Tool::AzureDeveloperCli] {
                let _ = tool.parse(&stdout);
            }
        }

        #[test]
        fn any_expiry_in_cli_json_gives_a_token_or_a_reason(
            epoch in any::<i64>(), text in ".{0,40}", float in any::<f64>(),
        ) {
            for expires in [serde_json::json!(epoch), serde_json::json!(text), serde_json::json!(float)] {
                let az = serde_json::json!({"accessToken": "t", "expires_on": expires});
                let _ = Tool::AzureCli.parse(az.to_string().as_bytes());
                let azd = serde_json::json!({"token": "t", "expiresOn": expires});
                let _ = Tool::AzureDeveloperCli.parse(azd.to_string().as_bytes());
            }
        }
    }
}
