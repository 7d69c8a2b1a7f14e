//! The one rule for token scopes, written once for every credential.
//!
//! A scope may be given as the resource (`https://ossrdbms-aad.database.windows.net`), with a
//! trailing slash (`…windows.net/`) or as a scope (`…windows.net/.default`). Entra's
//! client-credentials flow and the CLIs take `<resource>/.default` (a bare resource is refused
//! with `AADSTS1002012` / `invalid_scope`), and a managed identity endpoint mints `aud` exactly
//! as the `resource` it is given, so a trailing slash yields a token the server refuses
//! (azure-sdk-for-java#42632). Every credential therefore sends the same normal form: the
//! resource without a trailing slash, with `/.default` where a scope is asked for.

use azure_core::error::ErrorKind;

const DEFAULT_SUFFIX: &str = "/.default";

/// A scope in normal form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope {
    resource: String,
}

impl Scope {
    /// Reads a resource or a scope in any of the forms above; `Err` says what is expected.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let expected = "expected a resource or its `/.default` scope, e.g. \
                        https://ossrdbms-aad.database.windows.net/.default";
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(format!("the token scope is empty: {expected}"));
        }
        if trimmed.chars().any(char::is_whitespace) {
            return Err(format!(
                "{text:?} holds more than one scope (a token is for one resource): {expected}"
            ));
        }
        let without_default = match trimmed.len().checked_sub(DEFAULT_SUFFIX.len()) {
            Some(at)
                if trimmed.is_char_boundary(at)
                    && trimmed[at..].eq_ignore_ascii_case(DEFAULT_SUFFIX) =>
            {
                &trimmed[..at]
            }
            _ => trimmed,
        };
        let resource = without_default.trim_end_matches('/');
        // `…/.default/` and the like: a `.default` left inside is a mistake, not a resource.
        if !is_resource(resource)
            || resource
                .rsplit('/')
                .next()
                .is_some_and(|last| last.eq_ignore_ascii_case(".default"))
        {
            return Err(format!("{text:?} is not a token scope: {expected}"));
        }
        Ok(Self {
            resource: lower_case_host(resource),
        })
    }

    /// What managed identity endpoints take as `resource`: no `/.default`, no trailing slash.
    pub(crate) fn resource(&self) -> &str {
        &self.resource
    }

    /// What Entra and the CLIs take as `scope`: `<resource>/.default`.
    pub(crate) fn scope(&self) -> String {
        format!("{}{DEFAULT_SUFFIX}", self.resource)
    }
}

/// `resource` with the scheme and host of an `https`/`http` URI in lower case (they are case
/// blind; the audience Entra mints is compared exactly); anything else as given.
fn lower_case_host(resource: &str) -> String {
    let Some((scheme, rest)) = resource.split_once("://") else {
        return resource.to_owned();
    };
    if !scheme.eq_ignore_ascii_case("https") && !scheme.eq_ignore_ascii_case("http") {
        return resource.to_owned();
    }
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    format!(
        "{}://{}{path}",
        scheme.to_ascii_lowercase(),
        host.to_ascii_lowercase()
    )
}

/// An application ID URI (`https://…`, `http://…`, `api://…`) or an application id (a GUID).
fn is_resource(resource: &str) -> bool {
    if is_guid(resource) {
        return true;
    }
    match url::Url::parse(resource) {
        Ok(url) => {
            matches!(url.scheme(), "https" | "http" | "api")
                && url.host_str().is_some_and(|host| !host.is_empty())
                && url.username().is_empty()
                && url.password().is_none()
                && url.query().is_none()
                && url.fragment().is_none()
        }
        Err(_) => false,
    }
}

fn is_guid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The one scope in `scopes`, in normal form, or the error every credential of this crate
/// gives otherwise.
pub(crate) fn only_scope(credential: &str, scopes: &[&str]) -> azure_core::Result<Scope> {
    match scopes {
        [scope] => Scope::parse(scope).map_err(|problem| {
            azure_core::Error::with_message(
                ErrorKind::Credential,
                format!("{credential}: {problem}"),
            )
        }),
        _ => Err(azure_core::Error::with_message(
            ErrorKind::Credential,
            format!(
                "{credential} gets a token for exactly one scope; {} were given",
                scopes.len()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESOURCE: &str = "https://ossrdbms-aad.database.windows.net";

    #[test]
    fn every_form_of_a_scope_is_one_scope() {
        for given in [
            RESOURCE.to_owned(),
            format!("{RESOURCE}/"),
            format!("{RESOURCE}//"),
            format!("{RESOURCE}/.default"),
            format!("{RESOURCE}/.DEFAULT"),
            format!("{RESOURCE}//.default"),
            format!(" {RESOURCE}/.default "),
            "HTTPS://OSSRDBMS-AAD.database.windows.net".to_owned(),
        ] {
            let scope = Scope::parse(&given).unwrap();
            assert_eq!(scope.resource(), RESOURCE, "{given}");
            assert_eq!(scope.scope(), format!("{RESOURCE}/.default"), "{given}");
        }
        let app = Scope::parse("api://9b8cb25b-01e2-4322-8dcc-5af4ba45a80b/.default").unwrap();
        assert_eq!(app.resource(), "api://9b8cb25b-01e2-4322-8dcc-5af4ba45a80b");
        let guid = Scope::parse("9b8cb25b-01e2-4322-8dcc-5af4ba45a80b").unwrap();
        assert_eq!(
            guid.scope(),
            "9b8cb25b-01e2-4322-8dcc-5af4ba45a80b/.default"
        );
    }

    #[test]
    fn what_is_not_a_scope_is_refused_showing_the_expected_form() {
        for given in [
            "",
            "  ",
            "ossrdbms-aad.database.windows.net",
            "https://",
            "/.default",
            "https://a/.default https://b/.default",
            "https://a?x=1",
            "ftp://a",
            "https://ossrdbms-aad.database.windows.net/.default/",
            "https://user:pass@ossrdbms-aad.database.windows.net",
        ] {
            let problem = Scope::parse(given).unwrap_err();
            assert!(
                problem.contains("https://ossrdbms-aad.database.windows.net/.default"),
                "{given:?}: {problem}"
            );
        }
    }

    #[test]
    fn one_scope_or_a_credential_error_naming_the_count() {
        assert_eq!(only_scope("X", &[RESOURCE]).unwrap().resource(), RESOURCE);
        for scopes in [&[][..], &["a", "b"][..]] {
            let error = only_scope("XCredential", scopes).unwrap_err();
            assert!(matches!(error.kind(), ErrorKind::Credential));
            let text = error.to_string();
            assert!(text.contains("XCredential") && text.contains(&scopes.len().to_string()));
        }
        let bad = only_scope("XCredential", &["not a scope"]).unwrap_err();
        assert!(bad.to_string().contains("XCredential"), "{bad}");
    }
}
