//! Entra's client-credentials flow, with the checks Entra makes of secrets, federated tokens
//! and certificate-signed assertions.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use time::OffsetDateTime;

use crate::lock::lock;

use super::managed_identity::token_response;
use super::respond::*;
use super::script::*;
use super::state::*;

/// Entra's OAuth 2.0 client-credentials flow, as service principals and workload identities
/// use it: `POST /{tenant}/oauth2/v2.0/token`.
pub(super) async fn issue_client_credentials(
    state: &EndpointState,
    request: &RecordedRequest,
) -> Response<Full<Bytes>> {
    if request.method != "POST" {
        return error_response(405, "method not allowed");
    }
    if request.param("grant_type") != Some("client_credentials") {
        return error_response(400, "AADSTS900144: grant_type must be client_credentials");
    }
    let Some(resource) = request
        .param("scope")
        .and_then(|scope| scope.strip_suffix("/.default"))
    else {
        return error_response(400, "AADSTS70011: the scope must end with /.default");
    };
    let Some(principal) = request
        .param("client_id")
        .and_then(|id| state.principals.iter().find(|p| p.client_id() == id))
    else {
        return error_response(400, "AADSTS700016: Application not found in the directory");
    };
    let federated = lock(&state.federated_token).clone();
    let authenticated = match (
        request.param("client_secret"),
        request.param("client_assertion"),
    ) {
        (Some(secret), None) => secret == state.client_secret,
        (None, Some(assertion)) => {
            request.param("client_assertion_type")
                == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                && (assertion == federated
                    || state.client_certificate.get().is_some_and(|pair| {
                        certificate_assertion_is_valid(
                            pair,
                            assertion,
                            principal.client_id(),
                            request,
                        )
                    }))
        }
        _ => false,
    };
    if !authenticated {
        return json_response(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret or assertion provided.",
            })
            .to_string(),
        );
    }
    let principal = principal.clone();
    token_response(state, &principal, resource, ExpiresOnFormat::Absent).await
}

/// Checks a certificate-signed client assertion as Entra does: RS256 signature by the
/// registered certificate, its `x5t`, issuer and subject the client, audience this token URL,
/// not expired.
pub(super) fn certificate_assertion_is_valid(
    pair: &ClientCertificate,
    assertion: &str,
    client_id: &str,
    request: &RecordedRequest,
) -> bool {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        return false;
    };
    let json = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
    };
    let (Some(header_json), Some(claims), Ok(signature)) = (
        json(header),
        json(payload),
        URL_SAFE_NO_PAD.decode(signature),
    ) else {
        return false;
    };
    let thumbprint = pair
        .certificate
        .digest(openssl::hash::MessageDigest::sha1())
        .map(|d| URL_SAFE_NO_PAD.encode(d))
        .unwrap_or_default();
    let verified = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &pair.key)
        .and_then(|mut verifier| {
            verifier.verify_oneshot(&signature, format!("{header}.{payload}").as_bytes())
        })
        .unwrap_or(false);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    verified
        && header_json["alg"] == "RS256"
        && header_json["x5t"] == thumbprint.as_str()
        && claims["iss"] == client_id
        && claims["sub"] == client_id
        && claims["aud"]
            .as_str()
            .is_some_and(|aud| aud.ends_with(&request.path))
        && claims["exp"].as_i64().is_some_and(|exp| exp > now)
}
