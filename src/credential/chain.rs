//! `DefaultAzureCredential`: the credentials other Azure SDKs try in order, with
//! `AZURE_TOKEN_CREDENTIALS`, a fast IMDS probe off Azure, and one error that lists them all.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use tracing::Instrument as _;

use super::cli::{AzureCliCredential, AzureDeveloperCliCredential};
use super::entra::{DEFAULT_REQUEST_TIMEOUT, EnvironmentCredential, WorkloadIdentityCredential};
use super::managed_identity::{ManagedIdentityCredential, ManagedIdentityError, RetryOptions};
use super::options::CredentialOptions;
use super::scope::only_scope;
use super::unavailable::CredentialUnavailable;
use super::vars::{TENANT_ID_VAR, TOKEN_CREDENTIALS_VAR};
use crate::error::{Error, Hinted};
use crate::lock::lock;

/// How long the first IMDS request may take before the chain decides there is no IMDS.
const DEFAULT_IMDS_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One member of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Environment,
    WorkloadIdentity,
    ManagedIdentity,
    AzureCli,
    AzureDeveloperCli,
}

impl Member {
    const ALL: [Member; 5] = [
        Member::Environment,
        Member::WorkloadIdentity,
        Member::ManagedIdentity,
        Member::AzureCli,
        Member::AzureDeveloperCli,
    ];

    fn name(self) -> &'static str {
        match self {
            Member::Environment => "EnvironmentCredential",
            Member::WorkloadIdentity => "WorkloadIdentityCredential",
            Member::ManagedIdentity => "ManagedIdentityCredential",
            Member::AzureCli => "AzureCliCredential",
            Member::AzureDeveloperCli => "AzureDeveloperCliCredential",
        }
    }

    fn is_deployed(self) -> bool {
        matches!(
            self,
            Member::Environment | Member::WorkloadIdentity | Member::ManagedIdentity
        )
    }

    /// The members `AZURE_TOKEN_CREDENTIALS` selects.
    fn selected(value: Option<&str>) -> Result<Vec<Member>, Error> {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(Member::ALL.to_vec());
        };
        match value.to_ascii_lowercase().as_str() {
            "prod" => Ok(Member::ALL
                .into_iter()
                .filter(|m| m.is_deployed())
                .collect()),
            "dev" => Ok(Member::ALL
                .into_iter()
                .filter(|m| !m.is_deployed())
                .collect()),
            _ => Member::ALL
                .into_iter()
                .find(|m| m.name().eq_ignore_ascii_case(value))
                .map(|m| vec![m])
                .ok_or_else(|| {
                    Error::invalid(
                        TOKEN_CREDENTIALS_VAR,
                        format!(
                            "{TOKEN_CREDENTIALS_VAR}={value:?} is not `prod`, `dev` or one of {}",
                            Member::ALL.map(Member::name).join(", ")
                        ),
                    )
                }),
        }
    }
}

/// Tries Environment → WorkloadIdentity → ManagedIdentity → AzureCli → AzureDeveloperCli, as
/// the other Azure SDKs' `DefaultAzureCredential` does (the Rust SDK has none).
///
/// - A credential that is *unavailable* (variables missing, no IMDS, CLI not installed or not
///   logged in) passes to the next; one that was tried and refused stops the chain with its
///   error.
/// - Once one succeeds, later calls go straight to it.
/// - IMDS is probed first, as the Python and Go SDKs do: the token request without its
///   `Metadata` header, which IMDS refuses at once. No answer within 1 s, or an answer that is
///   not IMDS's (a proxy's page, Docker Desktop's 403), means "not here"; once IMDS has
///   answered, the real request gets the full retry policy (a restart's 410s, a slow first
///   token). A `400` (identity not assigned) is "not here" too; any other JSON 401/403 stops
///   the chain. A managed identity chosen by name is not probed.
/// - `AZURE_TOKEN_CREDENTIALS` narrows the chain: `prod` (the first three), `dev` (the two
///   CLIs) or one credential's name; any other value is an error when the chain is built.
/// - When every one is unavailable, the error lists each and why, in order.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use pg_entra::{Cloud, DefaultAzureCredential, TokenCredential};
///
/// let credential = DefaultAzureCredential::from_env()?;
/// let token = credential.get_token(&[Cloud::Public.scope()], None).await?;
/// eprintln!("token from {}", credential.selected_credential().unwrap_or("?"));
/// # Ok(()) }
/// ```
pub struct DefaultAzureCredential {
    members: Vec<(Member, Arc<dyn TokenCredential>)>,
    /// The member that produced a token.
    winner: OnceLock<usize>,
    /// The members the last search through the chain passed over, and why.
    skipped: Mutex<Vec<(&'static str, String)>>,
}

impl DefaultAzureCredential {
    /// A builder; it reads the process environment unless told otherwise.
    pub fn builder() -> DefaultAzureCredentialBuilder {
        DefaultAzureCredentialBuilder::default()
    }

    /// The chain the process environment describes, for the public cloud.
    pub fn from_env() -> Result<Self, Error> {
        Self::builder().build()
    }

    /// The credentials in the chain, in the order they are tried.
    pub fn credential_names(&self) -> Vec<&'static str> {
        self.members.iter().map(|(m, _)| m.name()).collect()
    }

    /// The credential that produced a token, once one has (`EnvironmentCredential`,
    /// `ManagedIdentityCredential`, ...).
    pub fn selected_credential(&self) -> Option<&'static str> {
        self.winner.get().map(|&i| self.members[i].0.name())
    }

    /// The credentials the last search through the chain passed over, each with why it was
    /// unavailable (variables not set, no endpoint, tool not logged in): those before the
    /// [selected one](Self::selected_credential) once one has produced a token, else every
    /// one that was unavailable. Empty before the first token request.
    pub fn skipped_credentials(&self) -> Vec<(&'static str, String)> {
        lock(&self.skipped).clone()
    }
}

#[async_trait::async_trait]
impl TokenCredential for DefaultAzureCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        if let Some(&winner) = self.winner.get() {
            let (member, credential) = &self.members[winner];
            return credential
                .get_token(scopes, options)
                .instrument(crate::observe::acquire_span(member.name()))
                .await;
        }
        let mut unavailable = Vec::new();
        let mut skipped = Vec::new();
        for (index, (member, credential)) in self.members.iter().enumerate() {
            let asked = credential
                .get_token(scopes, options.clone())
                .instrument(crate::observe::acquire_span(member.name()));
            match asked.await {
                Ok(token) => {
                    // Reasons first: whoever sees the winner also sees why the others lost.
                    *lock(&self.skipped) = skipped;
                    let _ = self.winner.set(index);
                    tracing::info!(
                        credential = member.name(),
                        "DefaultAzureCredential got a token"
                    );
                    return Ok(token);
                }
                Err(error) if CredentialUnavailable::is_in(&error) => {
                    tracing::debug!(credential = member.name(), %error, "credential unavailable; trying the next");
                    let reason = error
                        .downcast_ref::<CredentialUnavailable>()
                        .map_or_else(|| error.to_string(), |u| u.reason().to_owned());
                    skipped.push((member.name(), reason));
                    unavailable.push(error.to_string());
                }
                Err(error) => {
                    *lock(&self.skipped) = skipped;
                    tracing::warn!(credential = member.name(), %error, "credential failed; the chain stops here");
                    let kind = error.kind().clone();
                    let message = format!(
                        "{} was tried and failed, so DefaultAzureCredential stops: {error}",
                        member.name()
                    );
                    return Err(azure_core::Error::with_error(kind, error, message));
                }
            }
        }
        *lock(&self.skipped) = skipped;
        // The advice travels as the hint, once, not also in the text.
        Err(azure_core::Error::new(
            ErrorKind::Credential,
            Hinted::new(
                NoCredential {
                    failures: unavailable,
                }
                .to_string(),
                NO_CREDENTIAL_ADVICE,
            ),
        ))
    }
}

impl fmt::Debug for DefaultAzureCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DefaultAzureCredential")
            .field("credentials", &self.credential_names())
            .field("selected", &self.selected_credential())
            .finish()
    }
}

/// Every credential in the chain was unavailable.
#[derive(Debug)]
struct NoCredential {
    failures: Vec<String>,
}

impl fmt::Display for NoCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DefaultAzureCredential found no usable credential:")?;
        for failure in &self.failures {
            write!(f, "\n  - {failure}")?;
        }
        Ok(())
    }
}

/// What to do when no member of the chain applies (the error's hint).
const NO_CREDENTIAL_ADVICE: &str = "on Azure, assign a managed identity to this resource (and \
     set AZURE_CLIENT_ID for a user-assigned one); elsewhere run `az login` or `azd auth login`, \
     or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET for a service principal";

/// The managed identity as a chain member. What it follows, by behaviour:
/// - Python (`ImdsCredential` inside a chain): the first request is the token request without
///   the `Metadata` header, with a 1 s connection timeout and no retries; any HTTP answer means
///   IMDS is there (except Docker Desktop's 403), and the real request follows;
/// - Go (`managedIdentityClient`, `probeIMDS`): a header-less request under a 1 s deadline; an
///   answer that is not JSON means something else answered (unavailable); a 400 for a
///   system-assigned identity and a 403 whose body says "unreachable" are unavailable;
/// - .NET (its older IMDS source) bounded only a TCP connection to the IMDS address by 1 s
///   before deciding IMDS was there.
///
/// Here:
/// - until IMDS has answered once, each attempt first probes it ([`probe_imds`]) with a short
///   timeout, so that a machine without IMDS falls through in about a second; once anything
///   IMDS-shaped has answered, the full retry policy and deadline apply (410 for up to 70 s,
///   429/5xx with backoff, a cold identity taking seconds to mint);
/// - "not here, try the next": no answer to the probe, an answer that is not IMDS's (HTML or
///   text from a proxy, Docker Desktop's 403 "unreachable network"), HTTP 400 (the identity is
///   not assigned), or an endpoint that does not speak the protocol at all;
/// - anything else (a JSON 401/403, a source that kept failing) stops the chain with its error.
///
/// [`probe_imds`]: ManagedIdentityCredential::probe_imds
struct ChainManagedIdentity {
    credential: ManagedIdentityCredential,
    probe_timeout: Duration,
    /// Set once IMDS has answered the probe; other sources are never probed.
    imds_answered: AtomicBool,
}

impl ChainManagedIdentity {
    fn unavailable(reason: String) -> azure_core::Error {
        CredentialUnavailable::new("ManagedIdentityCredential", reason).into_azure()
    }

    /// The error for the chain: "unavailable" for answers that say this identity is not here.
    fn classify(error: azure_core::Error) -> azure_core::Error {
        match error.downcast_ref::<ManagedIdentityError>() {
            Some(managed) if managed.status() == Some(400) => Self::unavailable(format!(
                "the endpoint does not know this identity ({error}); assign one to the resource, \
                 or set AZURE_CLIENT_ID to a user-assigned identity's client id"
            )),
            Some(ManagedIdentityError::UnexpectedAnswer { .. }) => {
                Self::unavailable(error.to_string())
            }
            Some(ManagedIdentityError::Refused {
                status: 403,
                description: Some(description),
                ..
            }) if description.to_ascii_lowercase().contains("unreachable") => Self::unavailable(
                format!("the endpoint says the network is unreachable ({error}); not on Azure?"),
            ),
            _ => error,
        }
    }
}

/// The IMDS endpoints that have answered a probe in this process: IMDS does not go away, so
/// every chain (for any scope) skips the probe once one has seen it answer.
static IMDS_ANSWERED: std::sync::LazyLock<Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(|| Mutex::new(std::collections::HashSet::new()));

fn imds_answered_before(endpoint: &str) -> bool {
    lock(&IMDS_ANSWERED).contains(endpoint)
}

#[async_trait::async_trait]
impl TokenCredential for ChainManagedIdentity {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        if self.credential.is_imds()
            && !self.imds_answered.load(Ordering::Acquire)
            && !imds_answered_before(self.credential.endpoint_str())
        {
            let scope = only_scope("ManagedIdentityCredential", scopes)?;
            self.credential
                .probe_imds(scope.resource(), self.probe_timeout)
                .await
                .map_err(Self::unavailable)?;
            lock(&IMDS_ANSWERED).insert(self.credential.endpoint_str().to_owned());
            self.imds_answered.store(true, Ordering::Release);
        }
        self.credential
            .get_token(scopes, options)
            .await
            .map_err(Self::classify)
    }
}

impl fmt::Debug for ChainManagedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.credential.fmt(f)
    }
}

/// Builds a [`DefaultAzureCredential`].
#[derive(Debug)]
pub struct DefaultAzureCredentialBuilder {
    options: CredentialOptions,
    probe_timeout: Duration,
    managed_identity_retry: RetryOptions,
    cli_timeout: Option<Duration>,
    entra_timeout: Duration,
    tenant: Option<String>,
}

impl Default for DefaultAzureCredentialBuilder {
    fn default() -> Self {
        Self {
            options: CredentialOptions::default(),
            probe_timeout: DEFAULT_IMDS_PROBE_TIMEOUT,
            managed_identity_retry: RetryOptions::default(),
            cli_timeout: None,
            entra_timeout: DEFAULT_REQUEST_TIMEOUT,
            tenant: None,
        }
    }
}

impl DefaultAzureCredentialBuilder {
    /// Where every member reads its variables, and the cloud whose Entra authority service
    /// principals and workload identities use (default: the process environment, the public
    /// cloud). Every member gets the same options.
    pub fn options(mut self, options: impl Into<CredentialOptions>) -> Self {
        self.options = options.into();
        self
    }

    /// How long the IMDS probe may take, connection and answer together (default 1 s). The
    /// probe asks nothing IMDS must compute, so this never limits the minting of a token.
    pub fn imds_probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The managed identity's retries once its endpoint has answered.
    pub fn managed_identity_retry(mut self, retry: RetryOptions) -> Self {
        self.managed_identity_retry = retry;
        self
    }

    /// How long one token request to Entra may take, connection included, for the service
    /// principal and the workload identity (default 30 s; connecting alone at most 10 s).
    pub fn entra_timeout(mut self, timeout: Duration) -> Self {
        self.entra_timeout = timeout;
        self
    }

    /// The tenant the developer tools (Azure CLI, Azure Developer CLI) get tokens in
    /// (default: `AZURE_TENANT_ID`, else each tool's own default tenant), as the .NET SDK's
    /// `DefaultAzureCredentialOptions.TenantId` does. A guest (B2B) user needs a token from
    /// the server's tenant, not their home one. The service principal and the workload
    /// identity always use `AZURE_TENANT_ID`.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// How long each CLI may take (default 10 s).
    pub fn cli_timeout(mut self, timeout: Duration) -> Self {
        self.cli_timeout = Some(timeout);
        self
    }

    /// Reads `AZURE_TOKEN_CREDENTIALS` and builds the members it selects.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown `AZURE_TOKEN_CREDENTIALS` value or a malformed
    /// endpoint or authority variable.
    pub fn build(self) -> Result<DefaultAzureCredential, Error> {
        let environment = &self.options.environment;
        let selected = Member::selected(environment.var(TOKEN_CREDENTIALS_VAR).as_deref())?;
        // A tenant given to the builder must be one; one from the environment that is not (a
        // stray space, say) leaves the tools on their own tenant rather than failing every
        // member of the chain.
        let tenant = match self.tenant.clone() {
            Some(tenant) => Some(tenant),
            None => environment
                .var(TENANT_ID_VAR)
                .map(|tenant| tenant.trim().to_owned())
                .filter(|tenant| super::cli::check_tenant(tenant).is_ok()),
        };
        let explicit = selected.len() == 1;
        let mut members: Vec<(Member, Arc<dyn TokenCredential>)> = Vec::new();
        for member in selected {
            let credential: Arc<dyn TokenCredential> = match member {
                Member::Environment => Arc::new(
                    EnvironmentCredential::builder()
                        .options(self.options.clone())
                        .request_timeout(self.entra_timeout)
                        .build()?,
                ),
                Member::WorkloadIdentity => Arc::new(
                    WorkloadIdentityCredential::builder()
                        .options(self.options.clone())
                        .request_timeout(self.entra_timeout)
                        .build()?,
                ),
                Member::ManagedIdentity => {
                    let credential = ManagedIdentityCredential::builder()
                        .options(self.options.clone())
                        .retry(self.managed_identity_retry.clone())
                        .build()?;
                    if explicit {
                        // Chosen by name: used as it is on its own, without the probe or the
                        // chain's reading of its errors.
                        Arc::new(credential)
                    } else {
                        Arc::new(ChainManagedIdentity {
                            credential,
                            probe_timeout: self.probe_timeout,
                            imds_answered: AtomicBool::new(false),
                        })
                    }
                }
                Member::AzureCli => {
                    let mut cli = AzureCliCredential::builder().options(self.options.clone());
                    if let Some(timeout) = self.cli_timeout {
                        cli = cli.timeout(timeout);
                    }
                    if let Some(tenant) = &tenant {
                        cli = cli.tenant(tenant);
                    }
                    Arc::new(cli.build()?)
                }
                Member::AzureDeveloperCli => {
                    let mut cli =
                        AzureDeveloperCliCredential::builder().options(self.options.clone());
                    if let Some(timeout) = self.cli_timeout {
                        cli = cli.timeout(timeout);
                    }
                    if let Some(tenant) = &tenant {
                        cli = cli.tenant(tenant);
                    }
                    Arc::new(cli.build()?)
                }
            };
            members.push((member, credential));
        }
        Ok(DefaultAzureCredential {
            members,
            winner: OnceLock::new(),
            skipped: Mutex::new(Vec::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_credentials_values() {
        let names = |value: Option<&str>| {
            Member::selected(value)
                .map(|members| members.into_iter().map(Member::name).collect::<Vec<_>>())
        };
        assert_eq!(names(None).unwrap().len(), 5);
        assert_eq!(names(Some("  ")).unwrap().len(), 5);
        assert_eq!(
            names(Some("PROD")).unwrap(),
            [
                "EnvironmentCredential",
                "WorkloadIdentityCredential",
                "ManagedIdentityCredential"
            ]
        );
        assert_eq!(
            names(Some("dev")).unwrap(),
            ["AzureCliCredential", "AzureDeveloperCliCredential"]
        );
        assert_eq!(
            names(Some("managedidentitycredential")).unwrap(),
            ["ManagedIdentityCredential"]
        );
        let error = names(Some("AzurePowerShellCredential")).unwrap_err();
        assert!(matches!(error, Error::Config(_)));
        assert!(
            error.to_string().contains("AzurePowerShellCredential"),
            "{error}"
        );
    }
}
