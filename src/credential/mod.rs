//! Token credentials this crate ships. Each implements
//! [`azure_core::credentials::TokenCredential`], so any of them, or any credential from
//! `azure_identity`, plugs into the [`TokenCache`](crate::TokenCache) and the
//! [`Connector`](crate::Connector).

mod chain;
mod cli;
#[cfg(feature = "client-certificate")]
mod client_certificate;
mod entra;
mod http;
mod imds;
mod managed_identity;
mod managed_identity_error;
mod retry;
mod source;
mod token_response;
mod unavailable;

pub use chain::{
    DEFAULT_IMDS_PROBE_TIMEOUT, DefaultAzureCredential, DefaultAzureCredentialBuilder,
    TOKEN_CREDENTIALS_VAR,
};
pub use cli::{
    AzureCliCredential, AzureCliCredentialBuilder, AzureDeveloperCliCredential,
    AzureDeveloperCliCredentialBuilder, DEFAULT_CLI_TIMEOUT,
};
pub use entra::{AUTHORITY_HOST_VAR, EnvironmentCredential, WorkloadIdentityCredential};
pub use imds::{
    CLIENT_ID_VAR, IMDS_AUTHORITY_HOST, ImdsCredential, ImdsCredentialBuilder, ManagedIdentityId,
    POD_IDENTITY_AUTHORITY_HOST_VAR,
};
pub use managed_identity::{ManagedIdentityCredential, ManagedIdentityCredentialBuilder};
pub use managed_identity_error::ManagedIdentityError;
pub use retry::RetryOptions;
pub use source::{
    IDENTITY_ENDPOINT_VAR, IDENTITY_HEADER_VAR, IMDS_ENDPOINT_VAR, MSI_ENDPOINT_VAR, MSI_SECRET_VAR,
};
pub use unavailable::CredentialUnavailable;
