//! Lenient parsing of managed identity token responses and error bodies.
//!
//! Endpoints disagree on shapes: `expires_on` arrives as an epoch string, an epoch number or
//! (legacy App Service) a date string; some send only `expires_in`. Nothing here ever copies a
//! response body into an error: a success body holds the token.

use azure_core::credentials::AccessToken;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Error descriptions are the service's words; keep them to a readable length.
const MAX_DESCRIPTION_CHARS: usize = 300;

/// Why a success response could not be turned into a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResponseProblem {
    /// The body is not JSON (position only: the body is never echoed).
    #[error("the body is not JSON (syntax error at line {line}, column {column})")]
    NotJson { line: usize, column: usize },
    /// The body is JSON but not an object.
    #[error("the body is not a JSON object")]
    NotAnObject,
    /// `access_token` is missing, empty or not a string.
    #[error("the response has no access_token")]
    MissingToken,
    /// Neither `expires_on` nor `expires_in` could be read.
    #[error("the response has no usable expires_on or expires_in")]
    MissingExpiry,
}

/// Turns a success body into a token. `now` anchors `expires_in`.
pub(crate) fn parse_token_response(
    body: &[u8],
    now: OffsetDateTime,
) -> Result<AccessToken, ResponseProblem> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ResponseProblem::NotJson {
            line: e.line(),
            column: e.column(),
        })?;
    let object = value.as_object().ok_or(ResponseProblem::NotAnObject)?;
    let token = object
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or(ResponseProblem::MissingToken)?;
    let expires_on = object
        .get("expires_on")
        .and_then(expires_on_from_json)
        .or_else(|| {
            let seconds = object.get("expires_in").and_then(integer_from_json)?;
            now.checked_add(time::Duration::seconds(seconds))
        })
        .ok_or(ResponseProblem::MissingExpiry)?;
    Ok(AccessToken::new(token.to_owned(), expires_on))
}

/// `expires_on` as epoch seconds (number or string), RFC 3339, or the legacy App Service
/// form `06/20/2019 02:57:58 +00:00`.
fn expires_on_from_json(value: &serde_json::Value) -> Option<OffsetDateTime> {
    if let Some(epoch) = integer_from_json(value) {
        return OffsetDateTime::from_unix_timestamp(epoch).ok();
    }
    let text = value.as_str()?.trim();
    if let Ok(date) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(date);
    }
    let legacy = time::macros::format_description!(
        "[month]/[day]/[year] [hour]:[minute]:[second] [offset_hour sign:mandatory]:[offset_minute]"
    );
    OffsetDateTime::parse(text, legacy).ok()
}

/// A whole number given as a JSON number or a numeric string.
fn integer_from_json(value: &serde_json::Value) -> Option<i64> {
    match value {
        serde_json::Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The `error` code and `error_description` of an error body, when it is JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    pub code: Option<String>,
    pub description: Option<String>,
}

impl ErrorBody {
    pub(crate) fn parse(body: &[u8]) -> Self {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(body) else {
            return Self::default();
        };
        let field = |name: &str| {
            object
                .get(name)
                .and_then(|v| v.as_str())
                .map(|s| redact_bearer_tokens(s.trim()))
                .filter(|s| !s.is_empty())
        };
        let description = field("error_description").map(|d| {
            if d.chars().count() > MAX_DESCRIPTION_CHARS {
                let cut: String = d.chars().take(MAX_DESCRIPTION_CHARS).collect();
                format!("{cut}…")
            } else {
                d
            }
        });
        Self {
            code: field("error"),
            description,
        }
    }
}

/// Replaces anything shaped like a JWT (`eyJ….….…`) with `<redacted>`: an error description is
/// the service's text, but a misbehaving endpoint could still put a token in it.
pub(crate) fn redact_bearer_tokens(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            let looks_like_jwt = word.contains("eyJ") && word.matches('.').count() >= 2;
            if looks_like_jwt { "<redacted>" } else { word }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 12:00:00 UTC);

    fn parse(body: &str) -> Result<AccessToken, ResponseProblem> {
        parse_token_response(body.as_bytes(), NOW)
    }

    #[test]
    fn expires_on_as_string_number_and_dates() {
        let epoch = 1_800_000_000;
        let expected = OffsetDateTime::from_unix_timestamp(epoch).unwrap();
        for body in [
            format!(r#"{{"access_token":"t","expires_on":"{epoch}"}}"#),
            format!(r#"{{"access_token":"t","expires_on":{epoch}}}"#),
            format!(r#"{{"access_token":"t","expires_on":{epoch}.0}}"#),
            r#"{"access_token":"t","expires_on":"2027-01-15T08:00:00Z"}"#
                .replace("2027-01-15T08:00:00Z", &expected.format(&Rfc3339).unwrap()),
        ] {
            assert_eq!(parse(&body).unwrap().expires_on, expected, "{body}");
        }
        let legacy = parse(r#"{"access_token":"t","expires_on":"06/20/2019 02:57:58 +00:00"}"#);
        assert_eq!(
            legacy.unwrap().expires_on,
            datetime!(2019-06-20 02:57:58 UTC)
        );
    }

    #[test]
    fn expires_in_when_expires_on_is_absent_or_unreadable() {
        for body in [
            r#"{"access_token":"t","expires_in":"3599"}"#,
            r#"{"access_token":"t","expires_in":3599}"#,
            r#"{"access_token":"t","expires_on":"later","expires_in":3599}"#,
        ] {
            assert_eq!(
                parse(body).unwrap().expires_on,
                NOW + time::Duration::seconds(3599),
                "{body}"
            );
        }
    }

    #[test]
    fn problems_are_typed_and_never_echo_the_body() {
        assert_eq!(
            parse(r#"{"access_token":"t"}"#).unwrap_err(),
            ResponseProblem::MissingExpiry
        );
        assert_eq!(
            parse(r#"{"expires_in":"1"}"#).unwrap_err(),
            ResponseProblem::MissingToken
        );
        assert_eq!(
            parse(r#"{"access_token":"","expires_in":"1"}"#).unwrap_err(),
            ResponseProblem::MissingToken
        );
        assert_eq!(parse("[1]").unwrap_err(), ResponseProblem::NotAnObject);
        let broken = parse(r#"{"access_token":"eyJsecret.x.y","expires_in":"#).unwrap_err();
        assert!(matches!(broken, ResponseProblem::NotJson { .. }));
        assert!(!broken.to_string().contains("eyJsecret"));
    }

    #[test]
    fn error_bodies_keep_code_and_description_without_tokens() {
        let body = ErrorBody::parse(
            br#"{"error":"invalid_request","error_description":"Identity not found eyJa.b.c"}"#,
        );
        assert_eq!(body.code.as_deref(), Some("invalid_request"));
        assert_eq!(
            body.description.as_deref(),
            Some("Identity not found <redacted>")
        );
        assert_eq!(ErrorBody::parse(b"<html>"), ErrorBody::default());
    }
}
