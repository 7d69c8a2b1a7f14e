//! The comparison anchor: `azure_identity`'s `ManagedIdentityCredential` (App Service source,
//! with its own token cache) pointed at the local identity endpoint.
//!
//! `azure_identity` is built without its default features so that no second TLS stack is
//! compiled; it gets a small `HttpClient` over the same reqwest this crate uses (plain HTTP to
//! 127.0.0.1 is all it needs here).

use std::sync::Arc;

use azure_core::http::headers::Headers;
use azure_core::http::{AsyncRawResponse, Body, ClientOptions, HttpClient, Request, Transport};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions};
use pg_entra::testing::IdentityEndpoint;

#[derive(Debug)]
struct ReqwestTransport(reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for ReqwestTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let io_error = |error: reqwest::Error| {
            azure_core::Error::with_error(azure_core::error::ErrorKind::Io, error, "request failed")
        };
        let method = reqwest::Method::from_bytes(request.method().as_str().as_bytes())
            .expect("azure_core methods are valid HTTP methods");
        let mut outgoing = self.0.request(method, request.url().as_str());
        for (name, value) in request.headers().iter() {
            outgoing = outgoing.header(name.as_str(), value.as_str());
        }
        if let Body::Bytes(bytes) = request.body() {
            outgoing = outgoing.body(bytes.to_vec());
        }
        let response = outgoing.send().await.map_err(io_error)?;
        let status = response.status().as_u16();
        let mut headers = Headers::new();
        for (name, value) in response.headers() {
            if let Ok(value) = value.to_str() {
                headers.insert(name.as_str().to_owned(), value.to_owned());
            }
        }
        let body = response.bytes().await.map_err(io_error)?;
        Ok(AsyncRawResponse::from_bytes(status.into(), headers, body))
    }
}

/// Points the process's App Service variables at `endpoint`. Call before any other thread
/// reads the environment (azure_identity reads it when a credential is made).
pub fn point_app_service_at(endpoint: &IdentityEndpoint) {
    // SAFETY: called once at start-up, while the benchmark's runtime threads are idle and no
    // other thread reads or writes the environment.
    unsafe {
        std::env::set_var("IDENTITY_ENDPOINT", endpoint.app_service_endpoint());
        std::env::set_var("IDENTITY_HEADER", endpoint.identity_header());
    }
}

/// A new anchor credential with an empty cache.
pub fn credential() -> Arc<ManagedIdentityCredential> {
    let transport = Transport::new(Arc::new(ReqwestTransport(
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a plain HTTP client builds"),
    )));
    let options = ManagedIdentityCredentialOptions {
        client_options: ClientOptions {
            transport: Some(transport),
            ..ClientOptions::default()
        },
        ..ManagedIdentityCredentialOptions::default()
    };
    ManagedIdentityCredential::new(Some(options)).expect("the App Service source is configured")
}
