//! Every credential here gets a token for one scope at a time; the check is written once.

use azure_core::error::ErrorKind;

/// The one scope in `scopes`, or the error every credential of this crate gives otherwise.
pub(crate) fn only_scope<'a>(credential: &str, scopes: &[&'a str]) -> azure_core::Result<&'a str> {
    match scopes {
        [scope] => Ok(scope),
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

    #[test]
    fn one_scope_or_a_credential_error_naming_the_count() {
        assert_eq!(only_scope("X", &["a"]).unwrap(), "a");
        for scopes in [&[][..], &["a", "b"][..]] {
            let error = only_scope("XCredential", scopes).unwrap_err();
            assert!(matches!(error.kind(), ErrorKind::Credential));
            let text = error.to_string();
            assert!(text.contains("XCredential") && text.contains(&scopes.len().to_string()));
        }
    }
}
