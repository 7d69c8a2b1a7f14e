//! The Azure VM / VMSS managed identity, through the Instance Metadata Service (IMDS).

use std::fmt;
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use tokio::time::Instant;

use super::managed_identity_error::ManagedIdentityError;
use super::retry::{AttemptFailure, RetryOptions, RetryState, parse_retry_after};
use super::token_response::{ErrorBody, parse_token_response};
use crate::cloud::resource_for_scope;
use crate::environment::Environment;
use crate::error::Error;
use crate::jitter::unit_random;

/// Where IMDS lives on every Azure VM.
pub const IMDS_AUTHORITY_HOST: &str = "http://169.254.169.254";
/// The token path on IMDS (and on a replacement authority host).
const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
const IMDS_API_VERSION: &str = "2018-02-01";
/// Replaces [`IMDS_AUTHORITY_HOST`], as in the other Azure SDKs.
pub const POD_IDENTITY_AUTHORITY_HOST_VAR: &str = "AZURE_POD_IDENTITY_AUTHORITY_HOST";
/// Selects a user-assigned identity by client id when nothing else is chosen.
pub const CLIENT_ID_VAR: &str = "AZURE_CLIENT_ID";

/// Which managed identity to get a token for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ManagedIdentityId {
    /// The resource's own (system-assigned) identity.
    #[default]
    SystemAssigned,
    /// A user-assigned identity by its client (application) id.
    ClientId(String),
    /// A user-assigned identity by its object (principal) id.
    ObjectId(String),
    /// A user-assigned identity by its Azure resource id.
    ResourceId(String),
}

impl ManagedIdentityId {
    /// The IMDS query parameter naming this identity, if it is user-assigned.
    fn imds_query(&self) -> Option<(&'static str, &str)> {
        match self {
            ManagedIdentityId::SystemAssigned => None,
            ManagedIdentityId::ClientId(id) => Some(("client_id", id)),
            ManagedIdentityId::ObjectId(id) => Some(("object_id", id)),
            ManagedIdentityId::ResourceId(id) => Some(("msi_res_id", id)),
        }
    }
}

/// A token credential for the managed identity of an Azure VM or scale set, through IMDS.
///
/// Retries as Microsoft advises (404, 408, 429, 5xx, timeouts and refused connections with
/// jittered exponential backoff honouring `Retry-After`; 410 for up to 70 s; never 400, 401 or
/// 403), all within one deadline. Never goes through a proxy. It does not cache: wrap it in a
/// [`TokenCache`](crate::TokenCache) (the [`Connector`](crate::Connector) does).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use pg_entra::{ImdsCredential, TokenCredential, PUBLIC_SCOPE};
///
/// // System-assigned, or the client id in AZURE_CLIENT_ID.
/// let credential = ImdsCredential::from_env()?;
/// let token = credential.get_token(&[PUBLIC_SCOPE], None).await?;
/// # Ok(()) }
/// ```
pub struct ImdsCredential {
    /// The token URL without a query.
    token_url: reqwest::Url,
    identity: ManagedIdentityId,
    retry: RetryOptions,
    http: reqwest::Client,
}

impl ImdsCredential {
    /// A builder; it reads `AZURE_CLIENT_ID` and `AZURE_POD_IDENTITY_AUTHORITY_HOST` from the
    /// process environment unless told otherwise.
    pub fn builder() -> ImdsCredentialBuilder {
        ImdsCredentialBuilder::default()
    }

    /// The credential the process environment describes: the user-assigned identity whose
    /// client id is in `AZURE_CLIENT_ID`, else the system-assigned one; IMDS at
    /// `AZURE_POD_IDENTITY_AUTHORITY_HOST` if set, else at 169.254.169.254.
    pub fn from_env() -> Result<Self, Error> {
        Self::builder().build()
    }

    /// The identity this credential asks for.
    pub fn identity(&self) -> &ManagedIdentityId {
        &self.identity
    }

    fn endpoint(&self) -> String {
        self.token_url.to_string()
    }

    fn request_url(&self, resource: &str) -> reqwest::Url {
        let mut url = self.token_url.clone();
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("api-version", IMDS_API_VERSION);
            query.append_pair("resource", resource);
            if let Some((name, value)) = self.identity.imds_query() {
                query.append_pair(name, value);
            }
        }
        url
    }

    /// One token request, retried within the deadline.
    async fn fetch(&self, resource: &str) -> Result<AccessToken, ManagedIdentityError> {
        let url = self.request_url(resource);
        let started = Instant::now();
        let deadline = started + self.retry.deadline;
        let mut attempts = 0u32;
        let mut transient_retries = 0u32;
        let mut first_gone: Option<Instant> = None;
        loop {
            let now = Instant::now();
            attempts += 1;
            let budget = self
                .retry
                .attempt_timeout
                .min(deadline.saturating_duration_since(now));
            let (failure, retry_after, last) = match self.attempt(&url, budget).await {
                Attempt::Token(token) => {
                    tracing::debug!(attempts, endpoint = %self.token_url, "managed identity token received");
                    return Ok(token);
                }
                Attempt::Invalid(problem) => {
                    return Err(ManagedIdentityError::InvalidResponse {
                        endpoint: self.endpoint(),
                        problem: problem.to_string(),
                    });
                }
                Attempt::Status {
                    status,
                    retry_after,
                    body,
                } => (
                    AttemptFailure::Status(status),
                    retry_after,
                    StatusOrCause::Status(status, body),
                ),
                Attempt::Timeout => (
                    AttemptFailure::Timeout,
                    None,
                    StatusOrCause::Cause(format!("no answer within {budget:?}")),
                ),
                Attempt::Connection(cause) => (
                    AttemptFailure::Connection,
                    None,
                    StatusOrCause::Cause(cause),
                ),
            };
            if failure == AttemptFailure::Status(410) {
                first_gone.get_or_insert(now);
            }
            let state = RetryState {
                transient_retries,
                total_retries: attempts - 1,
                gone_for: first_gone.map(|t| now.saturating_duration_since(t)),
                retry_after,
                jitter: 0.8 + 0.4 * unit_random(),
            };
            let Some(delay) = self.retry.delay_before_retry(failure, state) else {
                return Err(last.into_final_error(self.endpoint(), attempts));
            };
            if Instant::now() + delay >= deadline {
                return Err(ManagedIdentityError::DeadlineExceeded {
                    endpoint: self.endpoint(),
                    deadline: self.retry.deadline,
                    attempts,
                    last: last.describe(),
                });
            }
            tracing::debug!(
                attempts,
                failure = %last.describe(),
                delay_ms = delay.as_millis() as u64,
                "managed identity request failed; retrying"
            );
            if failure != AttemptFailure::Status(410) {
                transient_retries += 1;
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, url: &reqwest::Url, budget: Duration) -> Attempt {
        let exchange = async {
            let response = self
                .http
                .get(url.clone())
                .header("Metadata", "true")
                .send()
                .await?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, time::OffsetDateTime::now_utc()));
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, retry_after, body))
        };
        match tokio::time::timeout(budget, exchange).await {
            Err(_) => Attempt::Timeout,
            Ok(Err(error)) if error.is_timeout() => Attempt::Timeout,
            Ok(Err(error)) => Attempt::Connection(innermost_cause(&error)),
            Ok(Ok((200, _, body))) => {
                match parse_token_response(&body, time::OffsetDateTime::now_utc()) {
                    Ok(token) => Attempt::Token(token),
                    Err(problem) => Attempt::Invalid(problem),
                }
            }
            Ok(Ok((status, retry_after, body))) => Attempt::Status {
                status,
                retry_after,
                body: ErrorBody::parse(&body),
            },
        }
    }
}

#[async_trait::async_trait]
impl TokenCredential for ImdsCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let [scope] = scopes else {
            return Err(azure_core::Error::new(
                ErrorKind::Credential,
                ManagedIdentityError::ScopeCount {
                    count: scopes.len(),
                },
            ));
        };
        self.fetch(resource_for_scope(scope))
            .await
            .map_err(|e| azure_core::Error::new(ErrorKind::Credential, e))
    }
}

impl fmt::Debug for ImdsCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImdsCredential")
            .field("endpoint", &self.token_url.as_str())
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Builds an [`ImdsCredential`].
#[derive(Debug, Default)]
pub struct ImdsCredentialBuilder {
    identity: Option<ManagedIdentityId>,
    authority_host: Option<String>,
    retry: RetryOptions,
    environment: Environment,
}

impl ImdsCredentialBuilder {
    /// The identity to ask for. Without this, `AZURE_CLIENT_ID` if set, else system-assigned.
    pub fn identity(mut self, identity: ManagedIdentityId) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Where IMDS is, as a base URL such as `http://127.0.0.1:8080`; the token path is
    /// appended. Without this, `AZURE_POD_IDENTITY_AUTHORITY_HOST` if set, else
    /// [`IMDS_AUTHORITY_HOST`].
    pub fn authority_host(mut self, url: impl Into<String>) -> Self {
        self.authority_host = Some(url.into());
        self
    }

    /// How to retry (the defaults follow Microsoft's guidance).
    pub fn retry(mut self, retry: RetryOptions) -> Self {
        self.retry = retry;
        self
    }

    /// Where to read `AZURE_CLIENT_ID` and `AZURE_POD_IDENTITY_AUTHORITY_HOST` (default: the
    /// process environment).
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = environment;
        self
    }

    /// Checks the settings and builds the credential.
    pub fn build(self) -> Result<ImdsCredential, Error> {
        let identity = match self.identity {
            Some(identity) => identity,
            None => self
                .environment
                .var(CLIENT_ID_VAR)
                .map(ManagedIdentityId::ClientId)
                .unwrap_or_default(),
        };
        let (authority, origin) = match self.authority_host {
            Some(url) => (url, "the authority host"),
            None => match self.environment.var(POD_IDENTITY_AUTHORITY_HOST_VAR) {
                Some(url) => (url, POD_IDENTITY_AUTHORITY_HOST_VAR),
                None => (IMDS_AUTHORITY_HOST.to_owned(), "the IMDS address"),
            },
        };
        let token_url = token_url(&authority).map_err(|problem| {
            Error::config(format!(
                "{origin} {authority:?} is not a usable base URL ({problem}); give one like http://169.254.169.254"
            ))
        })?;
        let http = reqwest::Client::builder()
            // IMDS must never be reached through a proxy.
            .no_proxy()
            .build()
            .map_err(|e| Error::config(format!("cannot create an HTTP client: {e}")))?;
        Ok(ImdsCredential {
            token_url,
            identity,
            retry: self.retry,
            http,
        })
    }
}

fn token_url(authority: &str) -> Result<reqwest::Url, String> {
    let base = reqwest::Url::parse(authority.trim_end_matches('/')).map_err(|e| e.to_string())?;
    if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
        return Err("it needs an http:// or https:// scheme and a host".into());
    }
    if base.query().is_some() {
        return Err("it must not have a query".into());
    }
    let mut url = base;
    let path = format!("{}{IMDS_TOKEN_PATH}", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

enum Attempt {
    Token(AccessToken),
    Invalid(super::token_response::ResponseProblem),
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: ErrorBody,
    },
    Timeout,
    Connection(String),
}

/// The last failure of a request, kept to word the final error.
enum StatusOrCause {
    Status(u16, ErrorBody),
    Cause(String),
}

impl StatusOrCause {
    fn describe(&self) -> String {
        match self {
            StatusOrCause::Status(status, body) => match &body.code {
                Some(code) => format!("HTTP {status} ({code})"),
                None => format!("HTTP {status}"),
            },
            StatusOrCause::Cause(cause) => cause.clone(),
        }
    }

    fn into_final_error(self, endpoint: String, attempts: u32) -> ManagedIdentityError {
        match self {
            StatusOrCause::Status(status, body)
                if (400..500).contains(&status) && !matches!(status, 404 | 408 | 410 | 429) =>
            {
                ManagedIdentityError::Refused {
                    endpoint,
                    status,
                    code: body.code,
                    description: body.description,
                }
            }
            StatusOrCause::Status(status, body) => ManagedIdentityError::Failing {
                endpoint,
                status,
                code: body.code,
                attempts,
            },
            StatusOrCause::Cause(last) => ManagedIdentityError::Unreachable {
                endpoint,
                attempts,
                last,
            },
        }
    }
}

/// The most specific message in an error chain ("Connection refused" rather than "error
/// sending request").
fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_url_appends_the_imds_path() {
        assert_eq!(
            token_url("http://169.254.169.254").unwrap().as_str(),
            "http://169.254.169.254/metadata/identity/oauth2/token"
        );
        assert_eq!(
            token_url("http://127.0.0.1:8080/").unwrap().as_str(),
            "http://127.0.0.1:8080/metadata/identity/oauth2/token"
        );
        assert!(token_url("169.254.169.254").is_err());
        assert!(token_url("ftp://host").is_err());
    }

    #[test]
    fn environment_selects_client_id_and_authority() {
        let credential = ImdsCredential::builder()
            .environment(Environment::from_vars([
                (CLIENT_ID_VAR, "11111111-2222-3333-4444-555555555555"),
                (POD_IDENTITY_AUTHORITY_HOST_VAR, "http://127.0.0.1:9"),
            ]))
            .build()
            .unwrap();
        assert_eq!(
            credential.identity(),
            &ManagedIdentityId::ClientId("11111111-2222-3333-4444-555555555555".into())
        );
        let url = credential.request_url("https://ossrdbms-aad.database.windows.net");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/metadata/identity/oauth2/token?api-version=2018-02-01\
             &resource=https%3A%2F%2Fossrdbms-aad.database.windows.net\
             &client_id=11111111-2222-3333-4444-555555555555"
        );
    }

    #[test]
    fn explicit_identity_beats_environment() {
        let credential = ImdsCredential::builder()
            .environment(Environment::from_vars([(CLIENT_ID_VAR, "from-env")]))
            .identity(ManagedIdentityId::ResourceId("/subscriptions/x/id".into()))
            .build()
            .unwrap();
        let url = credential.request_url("r");
        assert!(
            url.as_str()
                .ends_with("msi_res_id=%2Fsubscriptions%2Fx%2Fid"),
            "{url}"
        );
        let system = ImdsCredential::builder()
            .environment(Environment::from_vars([(CLIENT_ID_VAR, "from-env")]))
            .identity(ManagedIdentityId::SystemAssigned)
            .build()
            .unwrap();
        assert!(!system.request_url("r").as_str().contains("client_id"));
    }

    #[test]
    fn bad_authority_is_a_configuration_error() {
        let err = ImdsCredential::builder()
            .environment(Environment::from_vars([(
                POD_IDENTITY_AUTHORITY_HOST_VAR,
                "not a url",
            )]))
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains(POD_IDENTITY_AUTHORITY_HOST_VAR),
            "{err}"
        );
    }
}
