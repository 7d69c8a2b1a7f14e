//! The managed identity of whatever Azure host the process runs on: App Service / Functions /
//! Container Apps, Azure Arc, Cloud Shell, the legacy App Service protocol, or IMDS on a VM.

mod error;
mod id;
mod imds;
mod retry;
mod source;

#[cfg(feature = "fuzzing")]
pub(crate) use source::arc_challenge_path;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use tokio::time::Instant;

pub use error::ManagedIdentityError;
pub use id::ManagedIdentityId;
pub use imds::{ImdsCredential, ImdsCredentialBuilder};
pub use retry::RetryOptions;

pub(crate) use retry::parse_retry_after;
use retry::{AttemptFailure, RetryState};
use source::{IMDS_AUTHORITY_HOST, Source, imds_token_url};

use self::source::ArcKeyProblem;
use super::http::{
    BodyError, Destination, HttpClient, SendError, content_type, innermost_cause, read_body,
};
use super::options::CredentialOptions;
use super::scope::only_scope;
use super::token_response::{ErrorBody, looks_like_imds, parse_token_response, shown_header};
use super::vars::{CLIENT_ID_VAR, POD_IDENTITY_AUTHORITY_HOST_VAR};
use crate::error::Error;
use crate::error::Hinted;
use crate::jitter::unit_random;

/// The longest single wait between two attempts, whatever the settings or `Retry-After` say.
const LONGEST_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// A token credential for the managed identity of the Azure host the process runs on.
///
/// The source is chosen from the environment as the Azure SDKs choose it:
/// `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` → App Service (also Functions and Container Apps);
/// `IDENTITY_ENDPOINT` + `IMDS_ENDPOINT` → Azure Arc (answering the agent's key challenge);
/// `MSI_ENDPOINT` + `MSI_SECRET` → the legacy App Service protocol; `MSI_ENDPOINT` alone →
/// Cloud Shell; otherwise IMDS, as [`ImdsCredential`]. Every source gets
/// the same retry policy and deadline ([`RetryOptions`]). It does not cache: wrap it in a
/// [`TokenCache`](crate::TokenCache) (the [`Connector`](crate::Connector) does).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use pg_entra::credential::ManagedIdentityCredential;
/// use pg_entra::{Cloud, TokenCredential};
///
/// let credential = ManagedIdentityCredential::from_env()?;
/// println!("managed identity source: {}", credential.source_name());
/// let token = credential.get_token(&[Cloud::Public.scope()], None).await?;
/// # Ok(()) }
/// ```
pub struct ManagedIdentityCredential {
    source: Source,
    identity: ManagedIdentityId,
    retry: RetryOptions,
    http: HttpClient,
}

impl ManagedIdentityCredential {
    /// A builder; it reads the process environment unless told otherwise.
    pub fn builder() -> ManagedIdentityCredentialBuilder {
        ManagedIdentityCredentialBuilder::default()
    }

    /// The credential the process environment describes.
    pub fn from_env() -> Result<Self, Error> {
        Self::builder().build()
    }

    /// The identity this credential asks for.
    pub fn identity(&self) -> &ManagedIdentityId {
        &self.identity
    }

    /// Which endpoint protocol was chosen: `IMDS`, `App Service`, `Azure Arc`, `Cloud Shell`
    /// or `App Service (2017-09-01)`.
    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }

    pub(crate) fn is_imds(&self) -> bool {
        matches!(self.source, Source::Imds { .. })
    }

    fn endpoint(&self) -> String {
        self.source.endpoint().to_string()
    }

    pub(crate) fn endpoint_str(&self) -> &str {
        self.source.endpoint().as_str()
    }

    #[cfg(test)]
    pub(crate) fn request_url(&self, resource: &str) -> reqwest::Url {
        self.source
            .request(resource, &self.identity, None)
            .url()
            .clone()
    }

    /// One token request, retried within the deadline.
    async fn fetch(&self, resource: &str) -> Result<AccessToken, ManagedIdentityError> {
        let started = Instant::now();
        // A deadline too far away to represent (say `Duration::MAX`) is no deadline.
        let deadline = started.checked_add(self.retry.deadline);
        let remaining = || {
            deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            })
        };
        let mut attempts = 0u32;
        let mut transient_retries = 0u32;
        let mut first_gone: Option<Instant> = None;
        loop {
            let now = Instant::now();
            attempts = attempts.saturating_add(1);
            let budget = self.retry.attempt_timeout.min(remaining());
            let (failure, retry_after, last) = match self.attempt(resource, budget).await {
                Attempt::Token(token) => {
                    tracing::debug!(attempts, source = self.source.name(), endpoint = %self.source.endpoint(), "managed identity token received");
                    return Ok(token);
                }
                Attempt::Invalid(problem) => {
                    return Err(ManagedIdentityError::InvalidResponse {
                        endpoint: self.endpoint(),
                        problem,
                    });
                }
                Attempt::ArcKeyDenied(path) => {
                    return Err(ManagedIdentityError::ArcKeyUnreadable {
                        key_file: path.display().to_string(),
                        advice: Box::new(Hinted::new(
                            "the Arc agent's key folder is readable only by privileged users \
                             and the `himds` group",
                            "add the account this service runs as to the `himds` group \
                             (`sudo usermod -aG himds <account>`, then start it again), or run \
                             it as a privileged user",
                        )),
                    });
                }
                Attempt::Status {
                    status,
                    retry_after,
                    content_type,
                    body,
                } => (
                    AttemptFailure::Status(status),
                    retry_after,
                    StatusOrCause::Status {
                        status,
                        content_type,
                        body,
                    },
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
            // No wait may run past the deadline, nor last longer than a day (with an unbounded
            // deadline): a `Retry-After` of years, or of u64::MAX seconds, ends the call now
            // with the reason instead of sleeping uselessly.
            if delay >= remaining() || delay > LONGEST_WAIT {
                // The endpoint itself asked for the wait: say so, not "no token within".
                if let (Some(asked), AttemptFailure::Status(status)) = (retry_after, failure)
                    && asked >= delay
                    && asked >= remaining()
                {
                    return Err(ManagedIdentityError::AskedToWaitTooLong {
                        endpoint: self.endpoint(),
                        status,
                        asked,
                        deadline: self.retry.deadline,
                    });
                }
                let last = match retry_after {
                    Some(after) if after >= delay => {
                        format!(
                            "{}, asking to wait {after:?} before retrying",
                            last.describe()
                        )
                    }
                    _ => last.describe(),
                };
                return Err(ManagedIdentityError::DeadlineExceeded {
                    endpoint: self.endpoint(),
                    deadline: self.retry.deadline,
                    attempts,
                    last,
                });
            }
            tracing::debug!(
                attempts,
                failure = %last.describe(),
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "managed identity request failed; retrying"
            );
            if failure != AttemptFailure::Status(410) {
                transient_retries = transient_retries.saturating_add(1);
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, resource: &str, budget: Duration) -> Attempt {
        let exchange = async {
            let send = |key: Option<&str>| {
                let sent = self
                    .http
                    .send(self.source.request(resource, &self.identity, key));
                async move {
                    let answer = sent.await;
                    crate::observe::identity_request(
                        self.source.label(),
                        answer.as_ref().ok().map(|r| r.status().as_u16()),
                    );
                    answer
                }
            };
            let mut response = send(None).await.map_err(Exchange::Transport)?;
            let mut arc_key = None;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED
                && matches!(self.source, Source::Arc { .. })
            {
                let challenge = response
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok());
                let key = self
                    .source
                    .arc_key(challenge)
                    .await
                    .map_err(Exchange::Challenge)?;
                let key = key.trim_end().to_owned();
                response = send(Some(&key)).await.map_err(Exchange::Transport)?;
                arc_key = Some(key);
            }
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, time::OffsetDateTime::now_utc()));
            let content_type = content_type(&response);
            let body = read_body(response).await.map_err(Exchange::Body)?;
            Ok((status, retry_after, content_type, body, arc_key))
        };
        match tokio::time::timeout(budget, exchange).await {
            Err(_) => Attempt::Timeout,
            Ok(Err(Exchange::Challenge(ArcKeyProblem::Other(problem)))) => {
                Attempt::Invalid(problem)
            }
            Ok(Err(Exchange::Challenge(ArcKeyProblem::Denied(path)))) => {
                Attempt::ArcKeyDenied(path)
            }
            Ok(Err(Exchange::Body(BodyError::TooLarge))) => {
                Attempt::Invalid(BodyError::TooLarge.to_string())
            }
            Ok(Err(Exchange::Body(BodyError::Transport(error)))) if error.is_timeout() => {
                Attempt::Timeout
            }
            Ok(Err(Exchange::Transport(error))) if error.is_timeout() => Attempt::Timeout,
            Ok(Err(Exchange::Body(BodyError::Transport(error)))) => {
                Attempt::Connection(innermost_cause(&error))
            }
            Ok(Err(Exchange::Transport(error))) => Attempt::Connection(error.to_string()),
            Ok(Ok((200, _, _, body, _))) => {
                match parse_token_response(&body, time::OffsetDateTime::now_utc()) {
                    Ok(token) => Attempt::Token(token),
                    Err(problem) => Attempt::Invalid(problem.to_string()),
                }
            }
            Ok(Ok((status, retry_after, content_type, body, arc_key))) => {
                // What the request carried never comes back out in an error, even from an
                // endpoint that echoes its request.
                let secrets: Vec<&str> = [self.source.secret(), arc_key.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect();
                Attempt::Status {
                    status,
                    retry_after,
                    content_type: shown_header(content_type, &secrets),
                    body: ErrorBody::parse(&body, &secrets),
                }
            }
        }
    }

    /// Whether IMDS is at the configured address, asked as the Python and Go SDKs ask inside
    /// `DefaultAzureCredential`: with the token request minus its `Metadata` header, which IMDS
    /// refuses at once (HTTP 400, JSON) without minting anything. `timeout` therefore bounds
    /// reaching IMDS and its immediate answer, never the minting of a token, which on a cold
    /// identity takes seconds. `Err` says why this is not IMDS.
    pub(crate) async fn probe_imds(&self, resource: &str, timeout: Duration) -> Result<(), String> {
        let endpoint = self.source.endpoint();
        let exchange = async {
            let response = self
                .http
                .send(self.source.imds_probe(resource, &self.identity))
                .await;
            crate::observe::identity_request(
                self.source.label(),
                response.as_ref().ok().map(|r| r.status().as_u16()),
            );
            let response = response.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let content_type = shown_header(content_type(&response), &[]);
            let body = read_body(response).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, content_type, body))
        };
        let (status, content_type, body) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                return Err(format!(
                    "no IMDS endpoint answered at {endpoint} within {timeout:?}; not on an Azure VM?"
                ));
            }
            Ok(Err(cause)) => {
                return Err(format!(
                    "no IMDS endpoint answered at {endpoint} ({cause}); not on an Azure VM?"
                ));
            }
            Ok(Ok(answer)) => answer,
        };
        // Docker Desktop answers 169.254.169.254 itself, with 403 and "... unreachable network"
        // (the Go SDK checks for the same word).
        if status == 403
            && String::from_utf8_lossy(&body)
                .to_ascii_lowercase()
                .contains("unreachable")
        {
            return Err(format!(
                "{endpoint} answered HTTP 403 saying the network is unreachable (Docker Desktop \
                 answers so for 169.254.169.254); not on an Azure VM"
            ));
        }
        if !looks_like_imds(&body) {
            return Err(ManagedIdentityError::UnexpectedAnswer {
                endpoint: endpoint.to_string(),
                status,
                content_type,
                excerpt: ErrorBody::parse(&body, &[]).excerpt,
            }
            .to_string());
        }
        tracing::debug!(%endpoint, status, "IMDS answered the probe");
        Ok(())
    }
}

/// How one exchange with the endpoint failed before it gave an answer to judge.
enum Exchange {
    Transport(SendError),
    Body(BodyError),
    /// The Arc key challenge could not be answered.
    Challenge(ArcKeyProblem),
}

#[async_trait::async_trait]
impl TokenCredential for ManagedIdentityCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let scope = only_scope("ManagedIdentityCredential", scopes)?;
        self.fetch(scope.resource())
            .await
            .map_err(ManagedIdentityError::into_azure)
    }
}

impl fmt::Debug for ManagedIdentityCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The endpoint URL carries no secret; the App Service secrets are left out.
        f.debug_struct("ManagedIdentityCredential")
            .field("source", &self.source.name())
            .field("endpoint", &self.source.endpoint().as_str())
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Builds a [`ManagedIdentityCredential`].
#[derive(Debug, Default)]
pub struct ManagedIdentityCredentialBuilder {
    identity: Option<ManagedIdentityId>,
    imds_authority_host: Option<String>,
    arc_key_directory: Option<PathBuf>,
    retry: RetryOptions,
    options: CredentialOptions,
    imds_only: bool,
}

impl ManagedIdentityCredentialBuilder {
    /// The identity to ask for. Without this, `AZURE_CLIENT_ID` if set, else system-assigned.
    pub fn identity(mut self, identity: ManagedIdentityId) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Where IMDS is, when IMDS is the source (see
    /// [`ImdsCredentialBuilder::authority_host`]).
    pub fn imds_authority_host(mut self, url: impl Into<String>) -> Self {
        self.imds_authority_host = Some(url.into());
        self
    }

    /// The folder the Azure Arc agent writes its challenge keys to (default
    /// `/var/opt/azcmagent/tokens`, or `C:\ProgramData\AzureConnectedMachineAgent\Tokens` on
    /// Windows). A challenge naming a file elsewhere is refused.
    pub fn arc_key_directory(mut self, directory: impl Into<PathBuf>) -> Self {
        self.arc_key_directory = Some(directory.into());
        self
    }

    /// How to retry (the defaults follow Microsoft's guidance for IMDS).
    pub fn retry(mut self, retry: RetryOptions) -> Self {
        self.retry = retry;
        self
    }

    /// Where to read the variables (default: the process environment). The cloud does not
    /// matter here: each host's endpoint is local.
    pub fn options(mut self, options: impl Into<CredentialOptions>) -> Self {
        self.options = options.into();
        self
    }

    /// Ignore every source but IMDS.
    pub(crate) fn imds_only(mut self) -> Self {
        self.imds_only = true;
        self
    }

    /// Chooses the source, checks the settings and builds the credential.
    pub fn build(self) -> Result<ManagedIdentityCredential, Error> {
        let environment = &self.options.environment;
        let identity = match self.identity {
            Some(identity) => identity,
            None => environment
                .var(CLIENT_ID_VAR)
                .map(ManagedIdentityId::ClientId)
                .unwrap_or_default(),
        };
        let (authority, origin) = match self.imds_authority_host {
            Some(url) => (url, "imds_authority_host"),
            None => match environment.var(POD_IDENTITY_AUTHORITY_HOST_VAR) {
                Some(url) => (url, POD_IDENTITY_AUTHORITY_HOST_VAR),
                None => (IMDS_AUTHORITY_HOST.to_owned(), "imds_authority_host"),
            },
        };
        let imds_url = imds_token_url(&authority).map_err(|problem| {
            Error::invalid(origin, format!(
                "{origin} {authority:?} is not a usable base URL ({problem}); give one like http://169.254.169.254"
            ))
        })?;
        let source = if self.imds_only {
            Source::Imds { url: imds_url }
        } else {
            Source::detect(environment, imds_url, self.arc_key_directory)?
        };
        source.check_identity(&identity)?;
        let http = HttpClient::new(Destination::HostLocal);
        tracing::debug!(source = source.name(), endpoint = %source.endpoint(), ?identity, "managed identity source chosen");
        Ok(ManagedIdentityCredential {
            source,
            identity,
            retry: self.retry,
            http,
        })
    }
}

enum Attempt {
    Token(AccessToken),
    /// A final answer that cannot be used (never the body itself).
    Invalid(String),
    /// The Arc agent's key may not be read by this account.
    ArcKeyDenied(std::path::PathBuf),
    Status {
        status: u16,
        retry_after: Option<Duration>,
        content_type: Option<String>,
        body: ErrorBody,
    },
    Timeout,
    Connection(String),
}

/// The last failure of a request, kept to word the final error.
enum StatusOrCause {
    Status {
        status: u16,
        content_type: Option<String>,
        body: ErrorBody,
    },
    Cause(String),
}

impl StatusOrCause {
    fn describe(&self) -> String {
        match self {
            StatusOrCause::Status { status, body, .. } => match &body.code {
                Some(code) => format!("HTTP {status} ({code})"),
                None => format!("HTTP {status}"),
            },
            StatusOrCause::Cause(cause) => cause.clone(),
        }
    }

    fn into_final_error(self, endpoint: String, attempts: u32) -> ManagedIdentityError {
        match self {
            // A redirect (never followed) or a page that is not JSON: whatever answered is not
            // speaking the protocol, so this is no verdict on the identity.
            StatusOrCause::Status {
                status,
                content_type,
                body,
            } if (300..400).contains(&status) || (!body.is_json && !is_retried(status)) => {
                ManagedIdentityError::UnexpectedAnswer {
                    endpoint,
                    status,
                    content_type,
                    excerpt: body.excerpt,
                }
            }
            StatusOrCause::Status { status, body, .. } if !is_retried(status) => {
                ManagedIdentityError::Refused {
                    endpoint,
                    status,
                    code: body.code,
                    description: body.description,
                }
            }
            StatusOrCause::Status { status, body, .. } => ManagedIdentityError::Failing {
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

/// Statuses the retry policy retries, so that running out of retries is "kept failing".
fn is_retried(status: u16) -> bool {
    crate::status::is_transient(status) || status == 410
}
