//! Token credentials: where the access token comes from.
//!
//! [`DefaultAzureCredential`] (also at the crate root) tries the others in the Azure SDKs'
//! order. Each credential here is built the same way: `X::from_env()`, or
//! `X::builder().options(CredentialOptions)` plus its own settings, then `.build()`. Each
//! implements [`TokenCredential`], so any of them, or any credential from `azure_identity`,
//! plugs into the [`TokenCache`](crate::TokenCache) and the [`Connector`](crate::Connector).
//!
//! When a credential does not apply here (variables missing, no endpoint, tool not logged
//! in), its error carries a [`CredentialUnavailable`] and a chain moves on; any other error
//! stops a chain.

mod chain;
pub(crate) mod cli;
#[cfg(feature = "client-certificate")]
mod client_certificate;
mod entra;
mod http;
mod local_file;
pub(crate) use local_file::read_capped_blocking;
pub(crate) mod managed_identity;
mod options;
mod scope;
pub(crate) use scope::Scope;
#[cfg(feature = "test-util")]
pub(crate) use scope::only_scope;
pub(crate) mod token_response;
mod unavailable;
pub(crate) mod vars;

pub use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};

/// A scope in the form every credential of this crate sends: `<resource>/.default`. A
/// resource (`https://ossrdbms-aad.database.windows.net`), the same with a trailing slash, or
/// a `/.default` scope all give the same; managed identity endpoints get the resource alone,
/// without a trailing slash.
///
/// # Errors
/// [`Error::Config`](crate::Error::Config) for anything that is not one resource or its
/// scope, showing the expected form.
///
/// ```
/// use pg_entra::credential::normalize_scope;
///
/// let scope = "https://ossrdbms-aad.database.windows.net/.default";
/// assert_eq!(normalize_scope("https://ossrdbms-aad.database.windows.net/").unwrap(), scope);
/// assert!(normalize_scope("ossrdbms-aad").is_err());
/// ```
pub fn normalize_scope(scope: &str) -> Result<String, crate::Error> {
    Scope::parse(scope)
        .map(|scope| scope.scope())
        .map_err(|problem| crate::Error::invalid("scope", problem))
}
pub use chain::{DefaultAzureCredential, DefaultAzureCredentialBuilder};
pub use cli::{
    AzureCliCredential, AzureCliCredentialBuilder, AzureDeveloperCliCredential,
    AzureDeveloperCliCredentialBuilder,
};
pub use entra::{
    EnvironmentCredential, EnvironmentCredentialBuilder, WorkloadIdentityCredential,
    WorkloadIdentityCredentialBuilder,
};
pub use managed_identity::{
    ImdsCredential, ImdsCredentialBuilder, ManagedIdentityCredential,
    ManagedIdentityCredentialBuilder, ManagedIdentityError, ManagedIdentityId, RetryOptions,
};
pub use options::CredentialOptions;
pub use unavailable::CredentialUnavailable;
