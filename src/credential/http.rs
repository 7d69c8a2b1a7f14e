//! The HTTP rules every credential shares: redirects are never followed, every wait is
//! bounded, and no response body is read past a size cap.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;

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

/// The HTTP client of one credential. Plain `http://` endpoints (every managed identity
/// source, and local test endpoints) are spoken to directly through hyper, with no TLS set up
/// at all: loading the system's root certificates costs tens of milliseconds that a
/// cold-started process would otherwise spend before its first identity request. `https://`
/// endpoints (Entra) go through reqwest, built at the first such request with the process's
/// one TLS connector ([`crate::tls::system_connector`]).
///
/// Neither follows a redirect: a `307` from an identity endpoint would otherwise carry
/// `X-IDENTITY-HEADER`, a client secret or an assertion to another host (`azure_core` refuses
/// redirects for the same reason). Neither goes through a proxy to a host-local endpoint.
pub(crate) struct HttpClient {
    destination: Destination,
    plain: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    tls: OnceLock<reqwest::Client>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The request's time limit ran out.
    TimedOut,
    /// No connection, or it failed before an answer.
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl SendError {
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, SendError::TimedOut)
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::TimedOut => f.write_str("no answer within the time limit"),
            SendError::Failed(error) => f.write_str(&innermost_cause(error.as_ref())),
        }
    }
}

impl std::error::Error for SendError {}

impl From<reqwest::Error> for SendError {
    fn from(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            SendError::TimedOut
        } else {
            SendError::Failed(Box::new(error))
        }
    }
}

impl HttpClient {
    /// A client for `destination`. Sets up no TLS: that waits for the first `https://` request.
    pub(crate) fn new(destination: Destination) -> Self {
        let mut connector = HttpConnector::new();
        connector.enforce_http(true);
        connector.set_nodelay(true);
        if let Destination::Entra {
            connect_timeout, ..
        } = destination
        {
            connector.set_connect_timeout(Some(connect_timeout));
        }
        let plain =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Self {
            destination,
            plain,
            tls: OnceLock::new(),
        }
    }

    /// Sends `request`; the answer, whatever its status. Redirects are answers, not followed.
    pub(crate) async fn send(
        &self,
        request: reqwest::Request,
    ) -> Result<reqwest::Response, SendError> {
        let limit = match self.destination {
            Destination::HostLocal => None,
            Destination::Entra {
                request_timeout, ..
            } => Some(request_timeout),
        };
        let sent = async {
            if request.url().scheme() == "https" {
                Ok(self.tls_client()?.execute(request).await?)
            } else {
                self.send_plain(request).await
            }
        };
        match limit {
            Some(limit) => tokio::time::timeout(limit, sent)
                .await
                .unwrap_or(Err(SendError::TimedOut)),
            None => sent.await,
        }
    }

    async fn send_plain(&self, request: reqwest::Request) -> Result<reqwest::Response, SendError> {
        let failed = |e: Box<dyn std::error::Error + Send + Sync>| SendError::Failed(e);
        let body = request
            .body()
            .and_then(reqwest::Body::as_bytes)
            .map(Bytes::copy_from_slice)
            .unwrap_or_default();
        let mut builder = http::Request::builder()
            .method(request.method().clone())
            .uri(request.url().as_str());
        for (name, value) in request.headers() {
            builder = builder.header(name, value);
        }
        let outgoing = builder
            .body(Full::new(body))
            .map_err(|e| failed(Box::new(e)))?;
        let answer = self
            .plain
            .request(outgoing)
            .await
            .map_err(|e| failed(Box::new(e)))?;
        Ok(reqwest::Response::from(answer.map(reqwest::Body::wrap)))
    }

    /// The TLS client, built at the first `https://` request.
    fn tls_client(&self) -> Result<&reqwest::Client, SendError> {
        if let Some(client) = self.tls.get() {
            return Ok(client);
        }
        let tls = crate::tls::system_connector().map_err(|e| SendError::Failed(Box::new(e)))?;
        let builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .tls_backend_preconfigured(tls);
        let builder = match self.destination {
            Destination::HostLocal => builder.no_proxy(),
            Destination::Entra {
                connect_timeout, ..
            } => builder.connect_timeout(connect_timeout),
        };
        let client = builder
            .build()
            .map_err(|e| SendError::Failed(Box::new(e)))?;
        Ok(self.tls.get_or_init(|| client))
    }
}

/// A request being put together: method, URL, headers, body. Built into a
/// `reqwest::Request`, which [`HttpClient::send`] sends.
pub(crate) struct RequestBuilder {
    request: reqwest::Request,
}

impl RequestBuilder {
    pub(crate) fn get(url: reqwest::Url) -> Self {
        Self {
            request: reqwest::Request::new(reqwest::Method::GET, url),
        }
    }

    pub(crate) fn post(url: reqwest::Url) -> Self {
        Self {
            request: reqwest::Request::new(reqwest::Method::POST, url),
        }
    }

    /// Adds a header. A value that is not a valid header value (a control character in a
    /// secret read from the environment, say) is left out and the endpoint refuses the request.
    pub(crate) fn header(mut self, name: &'static str, value: impl AsRef<str>) -> Self {
        match reqwest::header::HeaderValue::from_str(value.as_ref()) {
            Ok(mut value) => {
                // Secrets travel in headers: keep them out of `Debug`.
                value.set_sensitive(name != "Content-Type");
                self.request.headers_mut().append(name, value);
            }
            Err(_) => tracing::warn!(header = name, "a header value is not valid HTTP; left out"),
        }
        self
    }

    pub(crate) fn body(mut self, body: String) -> Self {
        *self.request.body_mut() = Some(reqwest::Body::from(body));
        self
    }

    pub(crate) fn build(self) -> reqwest::Request {
        self.request
    }
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A one-answer HTTP server on loopback; returns its URL and what it received.
    async fn answer_once(answer: &'static str) -> (reqwest::Url, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token?x=1", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut received = vec![0; 4096];
            let n = stream.read(&mut received).await.unwrap();
            stream.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&received[..n]).into_owned()
        });
        (reqwest::Url::parse(&url).unwrap(), server)
    }

    /// A plain-HTTP endpoint is asked without any TLS set up, headers and body as built; a
    /// redirect comes back as the answer, not followed.
    #[tokio::test]
    async fn plain_http_needs_no_tls_and_follows_no_redirect() {
        let (url, server) = answer_once(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere.example/\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let client = HttpClient::new(Destination::HostLocal);
        let request = RequestBuilder::post(url)
            .header("Metadata", "true")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("resource=r".to_owned())
            .build();
        let response = client.send(request).await.unwrap();
        assert_eq!(response.status().as_u16(), 307);
        let received = server.await.unwrap();
        assert!(
            received.starts_with("POST /token?x=1 HTTP/1.1\r\n"),
            "{received}"
        );
        assert!(
            received.to_ascii_lowercase().contains("metadata: true"),
            "{received}"
        );
        assert!(received.ends_with("resource=r"), "{received}");
        assert!(client.tls.get().is_none(), "no TLS client was built");
    }

    /// Entra's request limit holds for a plain endpoint that never answers.
    #[tokio::test]
    async fn the_request_limit_holds_without_tls_too() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/t", listener.local_addr().unwrap());
        let _silent = tokio::spawn(async move {
            let (_stream, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let client = HttpClient::new(Destination::Entra {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_millis(200),
        });
        let request = RequestBuilder::get(reqwest::Url::parse(&url).unwrap()).build();
        let error = client.send(request).await.unwrap_err();
        assert!(error.is_timeout(), "{error}");
    }
}
