//! Writing answers the way the real endpoints write them.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};

pub(super) fn error_response(status: u16, description: &str) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match status.as_u16() {
        400 => "invalid_request",
        401 | 403 => "unauthorized_client",
        _ => "server_error",
    };
    let body = serde_json::json!({"error": code, "error_description": description});
    json_response(status, body.to_string())
}

pub(super) fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}
