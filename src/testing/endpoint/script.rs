//! The fault script: what the endpoint answers instead of a token, and what it recorded of
//! each request.

use std::time::Duration;

/// How the endpoint writes `expires_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExpiresOnFormat {
    /// `"expires_on": "1506484173"` (what IMDS sends).
    #[default]
    EpochString,
    /// `"expires_on": 1506484173`.
    EpochNumber,
    /// No `expires_on`; only `expires_in`.
    Absent,
    /// `"expires_on": "06/20/2019 02:57:58 +00:00"` (legacy App Service).
    LegacyDate,
    /// `"expires_on": "11/23/2026 4:05:09 PM +00:00"`: legacy App Service on a 12-hour clock.
    LegacyDate12Hour,
}

/// One scripted answer. Requests consume scripted replies in order; when the script is empty
/// the endpoint answers normally.
#[derive(Debug, Clone)]
pub struct Reply {
    pub(super) kind: ReplyKind,
    pub(super) delay: Duration,
    pub(super) retry_after: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) enum ReplyKind {
    Token,
    Status(u16),
    MalformedJson,
    MissingToken,
    /// Any status, content type and body.
    Raw {
        status: u16,
        content_type: String,
        body: String,
    },
    /// A redirect to another URL.
    Redirect {
        status: u16,
        location: String,
    },
}

impl Reply {
    /// A normal token answer (useful after a delay).
    pub fn token() -> Self {
        Self::of(ReplyKind::Token)
    }

    /// An error status with an IMDS-style JSON error body.
    pub fn status(status: u16) -> Self {
        Self::of(ReplyKind::Status(status))
    }

    /// 200 with a body that is not JSON (but does hold a token-like string).
    pub fn malformed_json() -> Self {
        Self::of(ReplyKind::MalformedJson)
    }

    /// 200 with JSON that lacks `access_token`.
    pub fn missing_token() -> Self {
        Self::of(ReplyKind::MissingToken)
    }

    /// Any status with this content type and body, as something other than an identity
    /// endpoint might answer (an HTML page from a proxy, say).
    pub fn raw(status: u16, content_type: &str, body: impl Into<String>) -> Self {
        Self::of(ReplyKind::Raw {
            status,
            content_type: content_type.to_owned(),
            body: body.into(),
        })
    }

    /// `307 Temporary Redirect` to `location`.
    pub fn redirect(location: impl Into<String>) -> Self {
        Self::of(ReplyKind::Redirect {
            status: 307,
            location: location.into(),
        })
    }

    /// Waits this long before answering.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sends `Retry-After: <seconds>` (any `u64`, as a hostile endpoint might).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.to_string());
        self
    }

    fn of(kind: ReplyKind) -> Self {
        Self {
            kind,
            delay: Duration::ZERO,
            retry_after: None,
        }
    }
}

/// What the endpoint saw of one request.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request method.
    pub method: String,
    /// The path.
    pub path: String,
    /// The query parameters, decoded.
    pub query: Vec<(String, String)>,
    /// Whether `Metadata: true` was present.
    pub metadata_header: bool,
    /// The `X-IDENTITY-HEADER` value, if any (App Service).
    pub identity_header: Option<String>,
    /// The `secret` header, if any (legacy App Service).
    pub secret_header: Option<String>,
    /// The `Authorization` header, if any (Arc's challenge answer).
    pub authorization: Option<String>,
    /// The form fields of a form-encoded body (Cloud Shell).
    pub form: Vec<(String, String)>,
    /// When the request arrived.
    pub received_at: std::time::Instant,
}

impl RecordedRequest {
    /// A query parameter's or form field's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .chain(&self.form)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
