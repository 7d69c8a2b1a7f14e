//! Why a managed identity credential could not produce a token.

use std::time::Duration;

/// A managed identity endpoint's failure, in words that say what to do.
///
/// Carried inside the `azure_core::Error` that [`TokenCredential::get_token`] returns; reach it
/// with `error.downcast_ref::<ManagedIdentityError>()`. When the endpoint answered with a
/// status, that error's kind is `HttpResponse` with the status, as for any Azure SDK
/// credential, so callers (and this crate's [`Error`](crate::Error)) tell a refusal from an
/// outage without knowing this type. Never contains a token or a response body.
///
/// [`TokenCredential::get_token`]: azure_core::credentials::TokenCredential::get_token
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagedIdentityError {
    /// Nothing answered: connections were refused or timed out on every attempt.
    #[error(
        "no managed identity endpoint answered at {endpoint} after {attempts} attempt(s) ({last}); \
         on an Azure VM enable a managed identity (and set AZURE_CLIENT_ID for a user-assigned one); \
         off Azure, use DefaultAzureCredential (the connector's default) after `az login`, or \
         another credential; set AZURE_POD_IDENTITY_AUTHORITY_HOST to reach a local endpoint"
    )]
    Unreachable {
        /// The endpoint that was tried.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure, described.
        last: String,
    },

    /// The endpoint answered with a status that is not retried (400, 401, 403, other 4xx).
    #[error("the managed identity endpoint at {endpoint} refused with HTTP {status}{}: {}",
        code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(),
        description.as_deref().unwrap_or(refusal_hint(*status)))]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The endpoint's `error` code.
        code: Option<String>,
        /// The endpoint's `error_description`.
        description: Option<String>,
    },

    /// The endpoint kept answering with a transient status until the retries ran out.
    #[error("the managed identity endpoint at {endpoint} kept failing: HTTP {status}{} after {attempts} attempt(s)",
        code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Failing {
        /// The endpoint.
        endpoint: String,
        /// The last HTTP status.
        status: u16,
        /// The endpoint's last `error` code.
        code: Option<String>,
        /// Attempts made.
        attempts: u32,
    },

    /// The endpoint answered 200 with something that is not a usable token response.
    #[error(
        "the managed identity endpoint at {endpoint} sent an unusable token response: {problem}"
    )]
    InvalidResponse {
        /// The endpoint.
        endpoint: String,
        /// What was wrong (never the body itself).
        problem: String,
    },

    /// Azure Arc: this account may not read the agent's key file, so the endpoint's challenge
    /// cannot be answered.
    #[error(
        "this account cannot read the Azure Arc agent's key file {key_file}, which answers the \
         endpoint's challenge: it must be in the `himds` group or run privileged"
    )]
    ArcKeyUnreadable {
        /// The key file the endpoint named.
        key_file: String,
        /// Why, and what to do (the error's hint).
        #[source]
        advice: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The endpoint asked (`Retry-After`) to wait longer than the deadline allows.
    #[error(
        "the managed identity endpoint at {endpoint} asked to wait {asked:?} before retrying \
         (Retry-After, HTTP {status}), longer than the {deadline:?} deadline allows"
    )]
    AskedToWaitTooLong {
        /// The endpoint.
        endpoint: String,
        /// The status it answered with.
        status: u16,
        /// How long it asked to wait.
        asked: Duration,
        /// The deadline.
        deadline: Duration,
    },

    /// The overall deadline passed before a token arrived.
    #[error(
        "no token from the managed identity endpoint at {endpoint} within {deadline:?} \
         ({attempts} attempt(s); last: {last})"
    )]
    DeadlineExceeded {
        /// The endpoint.
        endpoint: String,
        /// The deadline.
        deadline: Duration,
        /// Attempts made.
        attempts: u32,
        /// The last failure, described.
        last: String,
    },

    /// Something answered that does not speak a managed identity protocol: an HTML or text
    /// page, or a redirect (never followed). A proxy or Docker Desktop answering the address, or
    /// an endpoint variable pointing at the wrong service; not a refusal of this identity.
    #[error(
        "the answer from {endpoint} is not a managed identity endpoint's: HTTP {status}{}{}; a \
         proxy or Docker Desktop may be answering this address, or the endpoint variable \
         (IDENTITY_ENDPOINT, MSI_ENDPOINT, AZURE_POD_IDENTITY_AUTHORITY_HOST) points elsewhere",
        content_type.as_deref().map(|t| format!(", {t}")).unwrap_or_default(),
        match (status / 100, excerpt.as_deref()) {
            (3, _) => ", a redirect, which is never followed".to_owned(),
            (_, Some(words)) => format!(", \"{words}\""),
            (_, None) => String::new(),
        }
    )]
    UnexpectedAnswer {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The answer's content type, if it named one.
        content_type: Option<String>,
        /// The first words of the answer (markup dropped, anything token-shaped redacted).
        excerpt: Option<String>,
    },
}

impl ManagedIdentityError {
    /// True when the endpoint answered and said no (as opposed to not answering usefully).
    pub fn is_rejection(&self) -> bool {
        matches!(self, ManagedIdentityError::Refused { .. })
    }

    /// The last HTTP status the endpoint answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ManagedIdentityError::Refused { status, .. }
            | ManagedIdentityError::Failing { status, .. }
            | ManagedIdentityError::AskedToWaitTooLong { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl ManagedIdentityError {
    /// As the `azure_core` error a credential returns: kind `HttpResponse` with the last status
    /// when the endpoint answered with one, else `Credential`.
    pub(crate) fn into_azure(self) -> azure_core::Error {
        let kind = match self.status().map(azure_core::http::StatusCode::from) {
            Some(status) => azure_core::error::ErrorKind::HttpResponse {
                status,
                error_code: None,
                raw_response: None,
            },
            None => azure_core::error::ErrorKind::Credential,
        };
        azure_core::Error::new(kind, self)
    }
}

fn refusal_hint(status: u16) -> &'static str {
    match status {
        400 => {
            "the identity is not assigned to this resource, or the request named one it does not \
             have (check AZURE_CLIENT_ID)"
        }
        401 | 403 => "not authorized to get a token for this identity",
        _ => "the request was not accepted",
    }
}
