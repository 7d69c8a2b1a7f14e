//! A view of environment variables that tests can replace.

use std::collections::BTreeMap;
use std::fmt;

/// Where configuration read from environment variables comes from.
///
/// [`Environment::process`] reads the process environment when asked; [`Environment::from_vars`]
/// is a fixed map, so that tests (yours and ours) can exercise environment-driven configuration
/// without `std::env::set_var`. Empty values count as unset, as in libpq.
///
/// ```
/// use pg_entra::Environment;
///
/// let env = Environment::from_vars([("PGHOST", "db.postgres.database.azure.com")]);
/// assert_eq!(env.var("PGHOST").as_deref(), Some("db.postgres.database.azure.com"));
/// assert_eq!(env.var("PGPORT"), None);
/// ```
#[derive(Clone, Default)]
pub struct Environment {
    /// `None` reads the process environment.
    fixed: Option<BTreeMap<String, String>>,
}

impl Environment {
    /// The process environment, read at the moment a value is needed.
    pub fn process() -> Self {
        Self { fixed: None }
    }

    /// No variables at all.
    pub fn empty() -> Self {
        Self {
            fixed: Some(BTreeMap::new()),
        }
    }

    /// A fixed set of variables.
    pub fn from_vars<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            fixed: Some(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
        }
    }

    /// The variable's value; `None` when unset, empty or not valid Unicode.
    pub fn var(&self, name: &str) -> Option<String> {
        let value = match &self.fixed {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        };
        value.filter(|v| !v.is_empty())
    }
}

impl fmt::Debug for Environment {
    // Names only: values can be secrets (AZURE_CLIENT_SECRET, PGPASSWORD).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fixed {
            None => f.write_str("Environment(process)"),
            Some(map) => f.debug_tuple("Environment").field(&map.keys()).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_are_unset() {
        let env = Environment::from_vars([("PGUSER", "")]);
        assert_eq!(env.var("PGUSER"), None);
    }

    #[test]
    fn debug_shows_names_not_values() {
        let env = Environment::from_vars([("AZURE_CLIENT_SECRET", "hunter2")]);
        let shown = format!("{env:?}");
        assert!(shown.contains("AZURE_CLIENT_SECRET"));
        assert!(!shown.contains("hunter2"));
    }
}
