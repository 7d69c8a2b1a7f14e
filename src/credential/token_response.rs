//! Lenient parsing of managed identity token responses and error bodies.
//!
//! Endpoints disagree on shapes: `expires_on` arrives as an epoch string, an epoch number or
//! (legacy App Service) a date string; some send only `expires_in`. Nothing here ever copies a
//! response body into an error: a success body holds the token.

use azure_core::credentials::AccessToken;
use time::OffsetDateTime;

use crate::redact::{WITHHELD, echoes_any};
use time::format_description::well_known::Rfc3339;

/// Error descriptions are the service's words; keep them to a readable length.
const MAX_DESCRIPTION_CHARS: usize = 300;
/// A header value quoted in an error (a `Content-Type` that is not JSON).
const MAX_HEADER_CHARS: usize = 60;
/// How much of a body that is not JSON an excerpt is made from.
const EXCERPT_SOURCE_BYTES: usize = 4 * 1024;

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
    legacy_date(text)
}

/// The legacy App Service date (`06/20/2019 02:57:58 +00:00`), which Windows hosts also write
/// on a 12-hour clock with unpadded fields (`11/23/2026 4:05:09 PM +00:00`).
fn legacy_date(text: &str) -> Option<OffsetDateTime> {
    let day_24h = time::macros::format_description!(
        "[month padding:none]/[day padding:none]/[year] [hour padding:none]:[minute]:[second] \
         [offset_hour sign:mandatory]:[offset_minute]"
    );
    let day_12h = time::macros::format_description!(
        "[month padding:none]/[day padding:none]/[year] [hour repr:12 padding:none]:[minute]:\
         [second] [period case_sensitive:false] [offset_hour sign:mandatory]:[offset_minute]"
    );
    OffsetDateTime::parse(text, day_24h)
        .or_else(|_| OffsetDateTime::parse(text, day_12h))
        .ok()
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

/// What an error answer said: the `error` code and `error_description` of an identity
/// endpoint's JSON (App Service's `message` counts as a description), or, when the body is not
/// JSON at all, a few of its words to say what answered instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    pub code: Option<String>,
    pub description: Option<String>,
    /// Whether the body is a JSON object, as every identity endpoint's errors are.
    pub is_json: bool,
    /// For a body that is not JSON: its first words (tags dropped, tokens redacted).
    pub excerpt: Option<String>,
}

impl ErrorBody {
    /// Reads an error answer. `secrets` are what the request carried (an App Service secret,
    /// an Arc key, a client secret or assertion): a part of the answer that echoes one, in any
    /// encoding ([`crate::redact`]), is withheld whole, judged on the untruncated text so that
    /// a cut cannot leave a piece of it behind.
    pub(crate) fn parse(body: &[u8], secrets: &[&str]) -> Self {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(body) else {
            let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_SOURCE_BYTES)]);
            // Judged as received and as it would be shown: making the excerpt drops
            // characters, which can join two harmless halves into a piece of a secret.
            let shown = excerpt(body);
            let excerpt = if echoes_any(&text, secrets) || echoes_any(&shown, secrets) {
                WITHHELD.to_owned()
            } else {
                shown
            };
            return Self {
                excerpt: Some(excerpt).filter(|e| !e.is_empty()),
                ..Self::default()
            };
        };
        let shown = |value: Option<&serde_json::Value>| {
            let text = value?.as_str()?.trim();
            // The field as sent (escapes and all) and as decoded are both judged.
            let raw = serde_json::to_string(text).unwrap_or_default();
            let redacted = redact_bearer_tokens(text);
            if echoes_any(text, secrets)
                || echoes_any(&raw, secrets)
                || echoes_any(&redacted, secrets)
            {
                return Some(WITHHELD.to_owned());
            }
            Some(redacted).filter(|s| !s.is_empty())
        };
        let field = |name: &str| shown(object.get(name));
        // Azure's shapes: OAuth's `error` + `error_description`; App Service's `message`;
        // legacy App Service's `Message` (with `StatusCode`); ARM's `{"error": {"code",
        // "message"}}`.
        let nested = |name: &str| shown(object.get("error").and_then(|e| e.get(name)));
        let description = field("error_description")
            .or_else(|| field("message"))
            .or_else(|| field("Message"))
            .or_else(|| nested("message"))
            .map(|d| {
                if d.chars().count() > MAX_DESCRIPTION_CHARS {
                    let cut: String = d.chars().take(MAX_DESCRIPTION_CHARS).collect();
                    format!("{cut}…")
                } else {
                    d
                }
            });
        Self {
            code: field("error")
                .or_else(|| nested("code"))
                .filter(|code| code != WITHHELD),
            description,
            is_json: true,
            excerpt: None,
        }
    }
}

/// A header's value for an error message: withheld when it echoes one of `secrets` (judged
/// whole), else cut to a readable length.
pub(crate) fn shown_header(value: Option<String>, secrets: &[&str]) -> Option<String> {
    let value = value?;
    if echoes_any(&value, secrets) {
        Some(WITHHELD.to_owned())
    } else {
        Some(value.chars().take(MAX_HEADER_CHARS).collect())
    }
}

/// Whether a body has the shape IMDS always answers with: a JSON object holding `error` (its
/// errors) or `access_token` (a token). Proxies and Docker Desktop answer 169.254.169.254 with
/// HTML or plain text.
pub(crate) fn looks_like_imds(body: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<serde_json::Value>(body),
        Ok(serde_json::Value::Object(object))
            if object.contains_key("error") || object.contains_key("access_token")
    )
}

/// Words an excerpt keeps: enough to recognise a proxy's page, too few to carry a document.
const EXCERPT_WORDS: usize = 12;
const EXCERPT_CHARS: usize = 100;

/// The first words of a body that is not JSON: markup dropped, whitespace collapsed, anything
/// token-shaped redacted, and cut short.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_SOURCE_BYTES)]);
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => {
                in_tag = true;
                plain.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag && !c.is_control() => plain.push(c),
            _ if !in_tag => plain.push(' '),
            _ => {}
        }
    }
    let words: Vec<&str> = plain.split_whitespace().take(EXCERPT_WORDS).collect();
    let mut excerpt = redact_bearer_tokens(&words.join(" "));
    if excerpt.chars().count() > EXCERPT_CHARS {
        excerpt = excerpt.chars().take(EXCERPT_CHARS).collect();
        excerpt.push('…');
    }
    excerpt
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
            &[],
        );
        assert_eq!(body.code.as_deref(), Some("invalid_request"));
        assert_eq!(
            body.description.as_deref(),
            Some("Identity not found <redacted>")
        );
        let html = ErrorBody::parse(
            b"<html><head><title>Access denied</title></head></html>",
            &[],
        );
        assert!(!html.is_json);
        assert_eq!(html.excerpt.as_deref(), Some("Access denied"));
        assert_eq!(html.code, None);
    }

    #[test]
    fn every_error_shape_azure_sends_is_read() {
        for (body, code, description) in [
            (
                r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
                Some("invalid_request"),
                "Identity not found",
            ),
            (
                r#"{"statusCode":400,"message":"No identity found"}"#,
                None,
                "No identity found",
            ),
            (
                r#"{"StatusCode":400,"Message":"No MSI found for specified ClientId/ResourceId.","CorrelationId":"x"}"#,
                None,
                "No MSI found for specified ClientId/ResourceId.",
            ),
            (
                r#"{"error":{"code":"InvalidResource","message":"The resource is not valid"}}"#,
                Some("InvalidResource"),
                "The resource is not valid",
            ),
        ] {
            let parsed = ErrorBody::parse(body.as_bytes(), &[]);
            assert_eq!(parsed.code.as_deref(), code, "{body}");
            assert_eq!(parsed.description.as_deref(), Some(description), "{body}");
        }
    }

    #[test]
    fn echoed_secrets_are_withheld() {
        let echoed = ErrorBody::parse(
            b"<html>bad header X-IDENTITY-HEADER: 0123abcd</html>",
            &["0123abcd"],
        );
        assert_eq!(echoed.excerpt.as_deref(), Some(WITHHELD));
        let json = ErrorBody::parse(
            br#"{"error":"x","error_description":"secret s3 refused"}"#,
            &["s3"],
        );
        assert_eq!(json.description.as_deref(), Some(WITHHELD));
        assert_eq!(json.code.as_deref(), Some("x"));
        // Percent-encoded in a form echo (`~` as `%7E`), and cut off by the excerpt's limit:
        // neither hides it.
        let secret = "Zq8~Lm3pXv_7Rt2.Wn5~Kd9s";
        let form = format!(
            r#"{{"error":"invalid_client","error_description":"bad form: client_id=1&client_secret={}"}}"#,
            secret.replace('~', "%7E")
        );
        let body = ErrorBody::parse(form.as_bytes(), &[secret]);
        assert_eq!(body.description.as_deref(), Some(WITHHELD));
        assert_eq!(body.code.as_deref(), Some("invalid_client"));
        let cut = format!("{} X-IDENTITY-HEADER: {secret}", "word ".repeat(11));
        let body = ErrorBody::parse(cut.as_bytes(), &[secret]);
        assert_eq!(body.excerpt.as_deref(), Some(WITHHELD));
        assert_eq!(
            shown_header(Some(format!("text/plain; echo={secret}")), &[secret]).as_deref(),
            Some(WITHHELD)
        );
        assert_eq!(
            shown_header(Some("text/html".into()), &[secret]).as_deref(),
            Some("text/html")
        );
    }

    /// Found by the `token_response` fuzz target: the excerpt drops a stray `>`, which joined
    /// `z-secr` and `et` into a piece of the secret that the received text did not hold.
    #[test]
    fn a_piece_made_by_the_excerpt_is_withheld() {
        let secret = "fuzz-secret-5e7b1c9a0d2f4e68";
        let body = b"{\"a{\"acNess/to ccesz-secr>>>>>>>>et:\"t,\"\"ex198,\"token_type :}";
        let parsed = ErrorBody::parse(body, &[secret]);
        assert_eq!(parsed.excerpt.as_deref(), Some(WITHHELD));
        // Without the secret, the same body is shown, with the stray `>`s dropped.
        let shown = ErrorBody::parse(body, &[]).excerpt.unwrap();
        assert!(shown.contains("z-secret"), "{shown}");
    }

    #[test]
    fn imds_shape_and_excerpts() {
        assert!(looks_like_imds(br#"{"error":"invalid_request"}"#));
        assert!(looks_like_imds(br#"{"access_token":"t"}"#));
        assert!(!looks_like_imds(br#"{"statusCode":403}"#));
        assert!(!looks_like_imds(b"<html>Forbidden</html>"));
        assert!(!looks_like_imds(
            b"connecting to 169.254.169.254:80: unreachable network"
        ));
        let long = format!("{} eyJhbGciOi.eyJzdWIiOi.c2ln", "word ".repeat(40));
        let cut = excerpt(long.as_bytes());
        assert_eq!(cut.split(' ').count(), EXCERPT_WORDS, "{cut}");
        assert!(!cut.contains("eyJ"));
        let secret = excerpt(b"denied eyJhbGciOi.eyJzdWIiOi.c2ln");
        assert_eq!(secret, "denied <redacted>");
    }

    #[test]
    fn legacy_dates_on_both_clocks() {
        let expected = datetime!(2026-11-23 16:05:09 UTC);
        for text in [
            "11/23/2026 16:05:09 +00:00",
            "11/23/2026 4:05:09 PM +00:00",
            "11/23/2026 4:05:09 pm +00:00",
        ] {
            assert_eq!(legacy_date(text), Some(expected), "{text}");
        }
        assert_eq!(
            legacy_date("1/2/2027 12:00:00 AM +00:00"),
            Some(datetime!(2027-01-02 00:00:00 UTC))
        );
        assert_eq!(
            legacy_date("1/2/2027 12:00:00 PM +01:00"),
            Some(datetime!(2027-01-02 11:00:00 UTC))
        );
        assert_eq!(legacy_date("13/45/2027 99:00:00 PM +00:00"), None);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Any instant `time` can hold, the far ends included.
    fn any_now() -> impl Strategy<Value = OffsetDateTime> {
        (-377_705_116_800i64..=253_402_300_799)
            .prop_map(|s| OffsetDateTime::from_unix_timestamp(s).expect("within time's range"))
    }

    /// A JSON value of the kinds endpoints put in `expires_on` / `expires_in`, extremes included.
    fn any_number_or_text() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            any::<i64>().prop_map(|n| serde_json::Value::from(n.to_string())),
            ".{0,40}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::from("11/23/2026 4:05:09 PM +00:00")),
            Just(serde_json::Value::from("99/99/9999 99:99:99 +99:99")),
            Just(serde_json::Value::Null),
        ]
    }

    proptest! {
        #[test]
        fn token_responses_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), now in any_now()) {
            let _ = parse_token_response(&body, now);
            let parsed = ErrorBody::parse(&body, &[]);
            let _ = looks_like_imds(&body);
            if let Some(excerpt) = parsed.excerpt {
                prop_assert!(excerpt.chars().count() <= EXCERPT_CHARS + 1);
            }
        }

        #[test]
        fn every_expiry_shape_gives_a_token_or_a_typed_problem(
            expires_on in proptest::option::of(any_number_or_text()),
            expires_in in proptest::option::of(any_number_or_text()),
            now in any_now(),
        ) {
            let mut body = serde_json::json!({"access_token": "t"});
            if let Some(value) = expires_on { body["expires_on"] = value; }
            if let Some(value) = expires_in { body["expires_in"] = value; }
            match parse_token_response(body.to_string().as_bytes(), now) {
                Ok(token) => prop_assert_eq!(token.token.secret(), "t"),
                Err(problem) => prop_assert_eq!(problem, ResponseProblem::MissingExpiry),
            }
        }

        /// Whatever the secret and however the answer echoes it (raw, percent-encoded, form,
        /// JSON-escaped; in a JSON field or a page; cut off anywhere past a piece of it), no
        /// part of what is shown holds the secret or any 8-character piece of it.
        #[test]
        fn no_shown_text_holds_a_piece_of_an_echoed_secret(
            secret in "[!-~]{8,40}",
            shape in 0u8..4,
            json in any::<bool>(),
            before in "[a-zA-Z :=<>]{0,120}",
            keep in 8usize..200,
        ) {
            let echo = match shape {
                0 => secret.clone(),
                1 => secret.bytes().map(|b| format!("%{b:02X}")).collect(),
                2 => form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
                _ => secret.chars().map(|c| format!("\\u{:04x}", c as u32)).collect(),
            };
            let echo: String = echo.chars().take(keep).collect();
            let body = if json {
                serde_json::json!({"error": "invalid_client", "error_description": format!("{before}{echo}")}).to_string()
            } else {
                format!("<html><body>{before} {echo}</body></html>")
            };
            let parsed = ErrorBody::parse(body.as_bytes(), &[&secret]);
            for shown in [parsed.code, parsed.description, parsed.excerpt].into_iter().flatten() {
                prop_assert!(!crate::redact::echoes(&shown, &secret) || shown == WITHHELD, "{}", shown);
                let lower = shown.to_ascii_lowercase();
                let secret = secret.to_ascii_lowercase();
                for start in 0..=secret.len() - 8 {
                    prop_assert!(!lower.contains(&secret[start..start + 8]), "{}", shown);
                }
            }
        }

        #[test]
        fn legacy_dates_never_panic(text in ".{0,40}") {
            let _ = legacy_date(&text);
        }
    }
}
