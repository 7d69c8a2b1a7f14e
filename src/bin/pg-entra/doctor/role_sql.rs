//! Step 5: the SQL a server administrator runs to create the role for this principal.

use super::Step;
use crate::claims::{Claims, PrincipalKind};
use crate::server::ServerArgs;

/// Cosmos DB for PostgreSQL clusters end with this; their Entra roles are added in the portal.
const COSMOS_SUFFIX: &str = ".postgres.cosmos.azure.com";

/// The role-creation SQL for `user` (the login name) and the principal the token names.
pub(super) fn step(user: &str, claims: &Claims, server: &ServerArgs) -> Step {
    let kind = claims.kind();
    if server.hosts().iter().any(|h| {
        h.trim_end_matches('.')
            .to_ascii_lowercase()
            .ends_with(COSMOS_SUFFIX)
    }) {
        return Step::passed("role", "Cosmos DB for PostgreSQL: roles are added in the portal")
            .next(format!(
                "Azure portal → the cluster → Authentication: add the {} `{user}` as a Microsoft Entra role",
                kind.describe()
            ));
    }
    if server.single_server {
        // The login name carries `@<server>`; the role does not. The gateway strips only that
        // last part: a UPN keeps its own `@`.
        let server_name = server
            .hosts()
            .first()
            .and_then(|host| host.split('.').next().map(str::to_owned))
            .unwrap_or_default();
        let role = without_server(user, &server_name);
        return Step::passed(
            "role",
            "if it is missing, an Entra administrator creates it on Single Server (in `postgres`) with:",
        )
        .sql(single_server_sql(role, kind, claims.app_id().as_deref()));
    }
    let name = literal(user);
    let oid = claims.object_id().map(|oid| literal(&oid));
    let object_type = if kind == PrincipalKind::User {
        "user"
    } else {
        "service"
    };
    let with_oid = |oid: &str| {
        format!(
            "select * from pgaadauth_create_principal_with_oid({name}, {oid}, '{object_type}', false, false);"
        )
    };
    let mut sql = String::new();
    match (kind, &oid) {
        // An application's display name need not be unique: bind the role to the object id.
        (PrincipalKind::ServicePrincipal, Some(oid)) => sql += &with_oid(oid),
        (_, Some(oid)) => {
            sql += &format!("select * from pgaadauth_create_principal({name}, false, false);\n");
            sql += "-- or, bound to this principal's object id (when its name is not unique):\n";
            sql += &with_oid(oid);
        }
        (_, None) => {
            sql += &format!("select * from pgaadauth_create_principal({name}, false, false);")
        }
    }
    Step::passed(
        "role",
        "if it is missing, an Entra administrator creates it in the `postgres` database with:",
    )
    .sql(sql)
}

/// `name` without a final `@<server>` (ASCII case ignored), if it has one.
fn without_server<'a>(name: &'a str, server: &str) -> &'a str {
    match name.len().checked_sub(server.len() + 1) {
        Some(at)
            if !server.is_empty()
                && name.is_char_boundary(at)
                && name[at..].starts_with('@')
                && name[at + 1..].eq_ignore_ascii_case(server) =>
        {
            &name[..at]
        }
        _ => name,
    }
}

/// Single Server's form: a role in `azure_ad_user` whose password is the application id.
fn single_server_sql(role: &str, kind: PrincipalKind, app_id: Option<&str>) -> String {
    let role = identifier(role);
    match (kind, app_id) {
        (PrincipalKind::User, _) | (_, None) => {
            format!("CREATE ROLE {role} WITH LOGIN IN ROLE azure_ad_user;")
        }
        (_, Some(app_id)) => format!(
            "SET aad_validate_oids_in_tenant = off;\nCREATE ROLE {role} WITH LOGIN PASSWORD {} IN ROLE azure_ad_user;",
            literal(app_id)
        ),
    }
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A SQL quoted identifier.
fn identifier(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(literal("o'brien"), "'o''brien'");
        assert_eq!(identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn only_the_final_server_part_is_removed() {
        for (login, role) in [
            ("alice@contoso.com@mysrv", "alice@contoso.com"),
            ("alice@contoso.com@MYSRV", "alice@contoso.com"),
            ("orders-api@mysrv", "orders-api"),
            ("alice@contoso.com", "alice@contoso.com"),
            ("x@other", "x@other"),
        ] {
            assert_eq!(without_server(login, "mysrv"), role, "{login}");
        }
    }

    #[test]
    fn single_server_forms() {
        assert_eq!(
            single_server_sql("api", PrincipalKind::UserAssignedIdentity, Some("c1")),
            "SET aad_validate_oids_in_tenant = off;\nCREATE ROLE \"api\" WITH LOGIN PASSWORD 'c1' IN ROLE azure_ad_user;"
        );
        assert_eq!(
            single_server_sql("ada@contoso.com", PrincipalKind::User, None),
            "CREATE ROLE \"ada@contoso.com\" WITH LOGIN IN ROLE azure_ad_user;"
        );
    }
}
