//! The environment variables the credentials read, named once. The Azure SDKs read the same
//! names, so a process configured for them is configured for this crate.

/// The tenant of a service principal or workload identity.
pub(crate) const TENANT_ID_VAR: &str = "AZURE_TENANT_ID";
/// A service principal's or workload identity's client id; for a managed identity, the
/// user-assigned identity to ask for.
pub(crate) const CLIENT_ID_VAR: &str = "AZURE_CLIENT_ID";
pub(crate) const CLIENT_SECRET_VAR: &str = "AZURE_CLIENT_SECRET";
pub(crate) const CLIENT_CERTIFICATE_PATH_VAR: &str = "AZURE_CLIENT_CERTIFICATE_PATH";
#[cfg_attr(not(feature = "client-certificate"), allow(dead_code))]
pub(crate) const CLIENT_CERTIFICATE_PASSWORD_VAR: &str = "AZURE_CLIENT_CERTIFICATE_PASSWORD";
pub(crate) const FEDERATED_TOKEN_FILE_VAR: &str = "AZURE_FEDERATED_TOKEN_FILE";
/// Replaces the cloud's Entra authority host.
pub(crate) const AUTHORITY_HOST_VAR: &str = "AZURE_AUTHORITY_HOST";
/// Narrows `DefaultAzureCredential` to `dev`, `prod` or one credential's name.
pub(crate) const TOKEN_CREDENTIALS_VAR: &str = "AZURE_TOKEN_CREDENTIALS";

/// Replaces IMDS's address (AKS pod identity).
pub(crate) const POD_IDENTITY_AUTHORITY_HOST_VAR: &str = "AZURE_POD_IDENTITY_AUTHORITY_HOST";
/// App Service, Functions, Container Apps (and Arc, with `IMDS_ENDPOINT`).
pub(crate) const IDENTITY_ENDPOINT_VAR: &str = "IDENTITY_ENDPOINT";
/// App Service's shared secret, sent as `X-IDENTITY-HEADER`.
pub(crate) const IDENTITY_HEADER_VAR: &str = "IDENTITY_HEADER";
/// Present (with `IDENTITY_ENDPOINT`) on Azure Arc machines.
pub(crate) const IMDS_ENDPOINT_VAR: &str = "IMDS_ENDPOINT";
/// Cloud Shell, or the legacy App Service protocol (with `MSI_SECRET`).
pub(crate) const MSI_ENDPOINT_VAR: &str = "MSI_ENDPOINT";
/// The legacy App Service protocol's secret, sent as `secret`.
pub(crate) const MSI_SECRET_VAR: &str = "MSI_SECRET";
/// Service Fabric's managed identity (refused: it needs the cluster's certificate pinned).
pub(crate) const IDENTITY_SERVER_THUMBPRINT_VAR: &str = "IDENTITY_SERVER_THUMBPRINT";
