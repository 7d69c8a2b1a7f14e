//! The five managed identity protocols, validated as the real endpoints validate them.

use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use time::OffsetDateTime;

use super::super::identity::Principal;
use super::super::jwt::mint;
use crate::lock::lock;

use super::respond::*;
use super::script::*;
use super::state::*;

/// Validates the request as the protocol's real endpoint does, then mints a token.
pub(super) async fn issue(
    state: &EndpointState,
    request: &RecordedRequest,
) -> Response<Full<Bytes>> {
    let expected_method = if request.path == CLOUD_SHELL_PATH {
        "POST"
    } else {
        "GET"
    };
    if request.method != expected_method {
        return error_response(405, "method not allowed");
    }
    // The user-assigned parameter names differ between the protocols.
    let (object_param, resource_param) = match request.path.as_str() {
        TOKEN_PATH => {
            if !request.metadata_header {
                return error_response(400, "Required metadata header not specified");
            }
            if request.param("api-version").is_none() {
                return error_response(400, "Required query variable 'api-version' is missing");
            }
            ("object_id", "msi_res_id")
        }
        APP_SERVICE_PATH => {
            if request.identity_header.as_deref() != Some(state.identity_header.as_str()) {
                return error_response(401, "X-IDENTITY-HEADER is missing or wrong");
            }
            if request.param("api-version") != Some(APP_SERVICE_API_VERSION) {
                return error_response(400, "api-version must be 2019-08-01");
            }
            ("principal_id", "mi_res_id")
        }
        ARC_PATH => {
            let key = std::fs::read_to_string(&state.arc_key_file).unwrap_or_default();
            if request.authorization.as_deref() != Some(format!("Basic {key}").as_str()) {
                let mut challenge = error_response(401, "answer the challenge with the key file");
                let realm = format!("Basic realm={}", state.arc_key_file.display());
                if let Ok(value) = realm.parse() {
                    challenge.headers_mut().insert("www-authenticate", value);
                }
                return challenge;
            }
            if !request.metadata_header {
                return error_response(400, "Required metadata header not specified");
            }
            ("-", "-")
        }
        CLOUD_SHELL_PATH => {
            if !request.metadata_header {
                return error_response(400, "Required metadata header not specified");
            }
            ("-", "-")
        }
        LEGACY_APP_SERVICE_PATH => {
            if request.secret_header.as_deref() != Some(state.identity_header.as_str()) {
                return error_response(401, "secret is missing or wrong");
            }
            if request.param("api-version") != Some("2017-09-01") {
                return error_response(400, "api-version must be 2017-09-01");
            }
            ("-", "-")
        }
        _ => return error_response(404, "unknown path"),
    };
    let client_param = if request.path == LEGACY_APP_SERVICE_PATH {
        "clientid"
    } else {
        "client_id"
    };
    let Some(resource) = request.param("resource") else {
        return error_response(400, "Required query variable 'resource' is missing");
    };
    let principal = state.principals.iter().find(|p| {
        match (
            request.param(client_param),
            request.param(object_param),
            request.param(resource_param),
        ) {
            (Some(id), _, _) => p.client_id() == id,
            (_, Some(id), _) => p.object_id() == id,
            (_, _, Some(id)) => p.resource_id().eq_ignore_ascii_case(id),
            (None, None, None) => p.is_system_assigned(),
        }
    });
    let Some(principal) = principal else {
        return error_response(400, "Identity not found");
    };

    let format = match (request.path.as_str(), *lock(&state.expires_on_format)) {
        (LEGACY_APP_SERVICE_PATH, ExpiresOnFormat::LegacyDate12Hour) => {
            ExpiresOnFormat::LegacyDate12Hour
        }
        (LEGACY_APP_SERVICE_PATH, _) => ExpiresOnFormat::LegacyDate,
        (_, format) => format,
    };
    let principal = principal.clone();
    token_response(state, &principal, resource, format).await
}

/// Mints a token, sets it as the role's password if asked to, and answers with it.
/// `ExpiresOnFormat::Absent` answers as Entra's v2 endpoint does (`expires_in` as a number).
pub(super) async fn token_response(
    state: &EndpointState,
    principal: &Principal,
    resource: &str,
    format: ExpiresOnFormat,
) -> Response<Full<Bytes>> {
    let lifetime = *lock(&state.lifetime);
    // Whole seconds, as Entra issues them: the expiry the response states is exactly the one
    // PostgreSQL enforces.
    let issued = OffsetDateTime::now_utc().truncate_to_second();
    let expires = issued + lifetime;
    let groups = state.groups.load(Ordering::Relaxed);
    let token = mint(principal, resource, issued, expires, groups);
    if let Some(setter) = &state.password_setter
        && let Err(error) = setter.set_password(principal.name(), &token, expires).await
    {
        tracing::error!(%error, role = principal.name(), "test bed could not set the role password");
        return error_response(500, "the test bed could not set the role's password");
    }
    state.tokens_issued.fetch_add(1, Ordering::SeqCst);

    let expires_in = lifetime.as_secs();
    let epoch = expires.unix_timestamp();
    let mut body = if format == ExpiresOnFormat::Absent {
        serde_json::json!({
            "access_token": token,
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "token_type": "Bearer",
        })
    } else {
        serde_json::json!({
            "access_token": token,
            "client_id": principal.client_id(),
            "expires_in": expires_in.to_string(),
            "ext_expires_in": expires_in.to_string(),
            "not_before": issued.unix_timestamp().to_string(),
            "resource": resource,
            "token_type": "Bearer",
        })
    };
    let expires_on = match format {
        ExpiresOnFormat::EpochString => Some(serde_json::json!(epoch.to_string())),
        ExpiresOnFormat::EpochNumber => Some(serde_json::json!(epoch)),
        ExpiresOnFormat::Absent => None,
        ExpiresOnFormat::LegacyDate => {
            let format = time::macros::format_description!(
                "[month]/[day]/[year] [hour]:[minute]:[second] +00:00"
            );
            expires.format(format).ok().map(serde_json::Value::from)
        }
        ExpiresOnFormat::LegacyDate12Hour => {
            let format = time::macros::format_description!(
                "[month padding:none]/[day padding:none]/[year] [hour repr:12 padding:none]:\
                 [minute]:[second] [period] +00:00"
            );
            expires.format(format).ok().map(serde_json::Value::from)
        }
    };
    if let Some(expires_on) = expires_on {
        body["expires_on"] = expires_on;
    }
    // The 2017-09-01 protocol sends only the date: its expiry must be read from `expires_on`.
    if matches!(
        format,
        ExpiresOnFormat::LegacyDate | ExpiresOnFormat::LegacyDate12Hour
    ) && let Some(fields) = body.as_object_mut()
    {
        for field in ["expires_in", "ext_expires_in", "not_before", "client_id"] {
            fields.remove(field);
        }
    }
    json_response(StatusCode::OK, body.to_string())
}
