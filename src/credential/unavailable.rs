//! The error a credential gives when it does not apply here, as opposed to one that tried and
//! was refused: a credential chain moves past the first and stops at the second.

/// A credential that cannot be used on this machine or with this configuration (variables
/// missing, endpoint absent, tool not installed or not logged in).
#[derive(Debug, thiserror::Error)]
#[error("{credential} is unavailable: {reason}")]
pub struct CredentialUnavailable {
    credential: &'static str,
    reason: String,
}

impl CredentialUnavailable {
    pub(crate) fn new(credential: &'static str, reason: impl Into<String>) -> Self {
        Self {
            credential,
            reason: reason.into(),
        }
    }

    /// As the `azure_core` error credentials return.
    pub(crate) fn into_azure(self) -> azure_core::Error {
        azure_core::Error::new(azure_core::error::ErrorKind::Credential, self)
    }

    /// The credential's name, such as `AzureCliCredential`.
    pub fn credential(&self) -> &'static str {
        self.credential
    }

    /// Why it cannot be used.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Whether `error` (or its cause) says a credential is unavailable.
    pub fn is_in(error: &azure_core::Error) -> bool {
        error.downcast_ref::<CredentialUnavailable>().is_some()
    }
}
