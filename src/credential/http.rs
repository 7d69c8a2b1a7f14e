//! The HTTP rules every credential shares: redirects are never followed, every wait is
//! bounded, and no response body is read past a size cap.

use std::time::Duration;

use crate::error::Error;

/// The most any identity endpoint's answer may weigh. Token responses are a few KiB; anything
/// larger is not one, and reading it all would let a hostile endpoint exhaust memory.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// Which endpoints a client talks to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Destination {
    /// Managed identity endpoints: local to the host, so never through a proxy.
    HostLocal,
    /// Entra's token endpoint: may go through the proxy the environment names, and gets its own
    /// connect and request limits (the managed identity retry loop bounds its own attempts).
    Entra {
        connect_timeout: Duration,
        request_timeout: Duration,
    },
}

/// An HTTP client that never follows a redirect: a `307` from an identity endpoint would
/// otherwise carry `X-IDENTITY-HEADER`, a client secret or an assertion to another host
/// (`azure_core` refuses redirects for the same reason).
pub(crate) fn client(destination: Destination) -> Result<reqwest::Client, Error> {
    let builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    let builder = match destination {
        Destination::HostLocal => builder.no_proxy(),
        Destination::Entra {
            connect_timeout,
            request_timeout,
        } => builder
            .connect_timeout(connect_timeout)
            .timeout(request_timeout),
    };
    builder.build().map_err(|e| Error::Tls {
        message: "cannot create the HTTP client for the identity endpoint".to_owned(),
        source: Some(Box::new(e)),
    })
}

/// Why a response body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The body is larger than [`MAX_BODY_BYTES`].
    TooLarge,
    /// The connection failed while reading.
    Transport(reqwest::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge => write!(
                f,
                "the answer is larger than {} KiB, so it is not a token response",
                MAX_BODY_BYTES / 1024
            ),
            BodyError::Transport(error) => write!(f, "{}", innermost_cause(error)),
        }
    }
}

/// Reads a response body, giving up as soon as it passes [`MAX_BODY_BYTES`].
pub(crate) async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > MAX_BODY_BYTES as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The response's `Content-Type`, whole, for describing answers that are not what was
/// expected: judge and shorten it with `token_response::shown_header` before showing it.
pub(crate) fn content_type(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The most specific message in an error chain ("Connection refused" rather than "error
/// sending request").
pub(crate) fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
