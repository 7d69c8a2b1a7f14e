//! Dispatch: recording each request, applying the fault script, routing to a protocol.

use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

use crate::lock::lock;

use super::entra::issue_client_credentials;
use super::managed_identity::issue;
use super::respond::*;
use super::script::*;
use super::state::*;

pub(super) async fn handle(
    state: &EndpointState,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    state.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let form = match body.collect().await {
        Ok(body)
            if header("content-type")
                .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded")) =>
        {
            form_urlencoded::parse(&body.to_bytes())
                .into_owned()
                .collect()
        }
        _ => Vec::new(),
    };
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| {
            reqwest::Url::parse(&format!("http://x/?{q}"))
                .map(|u| u.query_pairs().into_owned().collect())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query,
        metadata_header: parts
            .headers
            .get("metadata")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true")),
        identity_header: header("x-identity-header"),
        secret_header: header("secret"),
        authorization: header("authorization"),
        form,
        received_at: std::time::Instant::now(),
    };
    lock(&state.recorded).push(recorded.clone());

    let mut held = state.held.subscribe();
    // Ends at once when not held; an error means the endpoint is gone, so answer anyway.
    let _ = held.wait_for(|held| !*held).await;

    let impersonation = lock(&state.impersonation).clone();
    // IMDS validates a request before it does any work: one without `Metadata: true` (the
    // DefaultAzureCredential probe) is refused at once, without a scripted delay or fault.
    if impersonation.is_none() && recorded.path == TOKEN_PATH && !recorded.metadata_header {
        return error_response(400, "Required metadata header not specified");
    }
    let reply = impersonation
        .or_else(|| lock(&state.script).pop_front())
        .unwrap_or_else(Reply::token);
    let delay = reply.delay + *lock(&state.latency);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = match reply.kind {
        ReplyKind::Status(status) => error_response(status, "scripted fault"),
        ReplyKind::MalformedJson => json_response(
            StatusCode::OK,
            r#"{"access_token":"eyJmalformed.eyJbody.c2ln","expires_in":"#.to_owned(),
        ),
        ReplyKind::MissingToken => json_response(
            StatusCode::OK,
            r#"{"expires_in":"3599","token_type":"Bearer"}"#.to_owned(),
        ),
        ReplyKind::Raw {
            status,
            content_type,
            body,
        } => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if let Ok(value) = content_type.parse() {
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, value);
            }
            response
        }
        ReplyKind::Redirect { status, location } => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::TEMPORARY_REDIRECT);
            if let Ok(value) = location.parse() {
                response
                    .headers_mut()
                    .insert(hyper::header::LOCATION, value);
            }
            response
        }
        ReplyKind::Token if recorded.path.ends_with(ENTRA_TOKEN_PATH_SUFFIX) => {
            issue_client_credentials(state, &recorded).await
        }
        ReplyKind::Token => issue(state, &recorded).await,
    };
    if let Some(after) = reply.retry_after
        && let Ok(value) = after.parse()
    {
        response.headers_mut().insert("retry-after", value);
    }
    response
}
