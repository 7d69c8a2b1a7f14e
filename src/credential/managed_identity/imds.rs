//! The Azure VM / VMSS managed identity, through the Instance Metadata Service (IMDS).

use std::fmt;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};

use super::id::ManagedIdentityId;
use super::retry::RetryOptions;
use super::{ManagedIdentityCredential, ManagedIdentityCredentialBuilder};
use crate::credential::CredentialOptions;
use crate::error::Error;

/// A token credential for the managed identity of an Azure VM or scale set, through IMDS.
///
/// Retries as Microsoft advises (404, 408, 429, 5xx, timeouts and refused connections with
/// jittered exponential backoff honouring `Retry-After`; 410 for up to 70 s; never 400, 401 or
/// 403), all within one deadline. Never goes through a proxy. It does not cache: wrap it in a
/// [`TokenCache`](crate::TokenCache) (the [`Connector`](crate::Connector) does).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use pg_entra::credential::ImdsCredential;
/// use pg_entra::{Cloud, TokenCredential};
///
/// // System-assigned, or the client id in AZURE_CLIENT_ID.
/// let credential = ImdsCredential::from_env()?;
/// let token = credential.get_token(&[Cloud::Public.scope()], None).await?;
/// # Ok(()) }
/// ```
pub struct ImdsCredential {
    inner: ManagedIdentityCredential,
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
        self.inner.identity()
    }

    #[cfg(test)]
    fn request_url(&self, resource: &str) -> reqwest::Url {
        self.inner.request_url(resource)
    }
}

#[async_trait::async_trait]
impl TokenCredential for ImdsCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.inner.get_token(scopes, options).await
    }
}

impl fmt::Debug for ImdsCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImdsCredential")
            .field("endpoint", &self.inner.endpoint_str())
            .field("identity", self.inner.identity())
            .finish_non_exhaustive()
    }
}

/// Builds an [`ImdsCredential`].
#[derive(Debug, Default)]
pub struct ImdsCredentialBuilder {
    inner: ManagedIdentityCredentialBuilder,
}

impl ImdsCredentialBuilder {
    /// The identity to ask for. Without this, `AZURE_CLIENT_ID` if set, else system-assigned.
    pub fn identity(mut self, identity: ManagedIdentityId) -> Self {
        self.inner = self.inner.identity(identity);
        self
    }

    /// Where IMDS is, as a base URL such as `http://127.0.0.1:8080`; the token path is
    /// appended. Without this, `AZURE_POD_IDENTITY_AUTHORITY_HOST` if set, else
    /// `http://169.254.169.254`.
    pub fn authority_host(mut self, url: impl Into<String>) -> Self {
        self.inner = self.inner.imds_authority_host(url);
        self
    }

    /// How to retry (the defaults follow Microsoft's guidance).
    pub fn retry(mut self, retry: RetryOptions) -> Self {
        self.inner = self.inner.retry(retry);
        self
    }

    /// Where to read `AZURE_CLIENT_ID` and `AZURE_POD_IDENTITY_AUTHORITY_HOST` (default: the
    /// process environment).
    pub fn options(mut self, options: impl Into<CredentialOptions>) -> Self {
        self.inner = self.inner.options(options);
        self
    }

    /// Checks the settings and builds the credential.
    pub fn build(self) -> Result<ImdsCredential, Error> {
        Ok(ImdsCredential {
            inner: self.inner.imds_only().build()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::source::imds_token_url as token_url;
    use crate::credential::vars::{CLIENT_ID_VAR, POD_IDENTITY_AUTHORITY_HOST_VAR};
    use crate::environment::Environment;

    fn options(vars: &[(&str, &str)]) -> CredentialOptions {
        CredentialOptions::default().environment(Environment::from_vars(vars.iter().copied()))
    }

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
            .options(options(&[
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
            .options(options(&[(CLIENT_ID_VAR, "from-env")]))
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
            .options(options(&[(CLIENT_ID_VAR, "from-env")]))
            .identity(ManagedIdentityId::SystemAssigned)
            .build()
            .unwrap();
        assert!(!system.request_url("r").as_str().contains("client_id"));
    }

    #[test]
    fn bad_authority_is_a_configuration_error() {
        let err = ImdsCredential::builder()
            .options(options(&[(POD_IDENTITY_AUTHORITY_HOST_VAR, "not a url")]))
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains(POD_IDENTITY_AUTHORITY_HOST_VAR),
            "{err}"
        );
    }
}
