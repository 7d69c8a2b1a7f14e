//! An emulation of Azure's Entra role functions, installed in the bed's `postgres` database,
//! so that the SQL an administrator runs on Azure (and `pg-entra doctor` prints) runs here,
//! and provisioning scripts can be tested without Azure.
//!
//! Only the shapes are emulated, as Microsoft documents them ("Manage Microsoft Entra roles in
//! Azure Database for PostgreSQL"): the names, arguments and results of
//! `pgaadauth_create_principal(roleName, isAdmin, isMfa)`,
//! `pgaadauth_create_principal_with_oid(roleName, objectId, objectType, isAdmin, isMfa)` and
//! `pgaadauth_list_principals(isAdminValue)`, all in `pg_catalog` as on Azure. Nothing is
//! looked up in Entra: a name given to `pgaadauth_create_principal` is not checked and its
//! object id, type and tenant stay unknown (null); an object id given with its type is
//! recorded as given. An administrator's role gets `CREATEROLE CREATEDB` and
//! `azure_pg_admin`, as on Azure.

/// The SQL that installs it (run once, as the superuser).
pub(crate) fn install_sql(tenant_id: &str) -> String {
    let tenant = tenant_id.replace('\'', "''");
    format!(
        r#"
CREATE ROLE azure_pg_admin NOLOGIN;
CREATE SCHEMA pgaadauth;
REVOKE ALL ON SCHEMA pgaadauth FROM PUBLIC;
CREATE TABLE pgaadauth.principals (
    rolname name PRIMARY KEY,
    principaltype text,
    objectid text,
    tenantid text,
    ismfa integer NOT NULL,
    isadmin integer NOT NULL
);
SET allow_system_table_mods = on;

CREATE FUNCTION pg_catalog.pgaadauth_create_principal_with_oid(
    roleName text, objectId text, objectType text, isAdmin boolean, isMfa boolean
) RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF objectType IS NOT NULL AND objectType NOT IN ('user', 'group', 'service') THEN
        RAISE EXCEPTION 'objectType must be user, group or service, not %', objectType
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF objectId IS NOT NULL
        AND objectId !~* '^[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$' THEN
        RAISE EXCEPTION 'objectId % is not a GUID', objectId
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = roleName) THEN
        RAISE EXCEPTION 'role "%" already exists', roleName USING ERRCODE = 'duplicate_object';
    END IF;
    EXECUTE format('CREATE ROLE %I LOGIN', roleName);
    IF isAdmin THEN
        EXECUTE format('ALTER ROLE %I CREATEROLE CREATEDB', roleName);
        EXECUTE format('GRANT azure_pg_admin TO %I', roleName);
    END IF;
    INSERT INTO pgaadauth.principals VALUES (
        roleName, objectType, lower(objectId),
        CASE WHEN objectId IS NULL THEN NULL ELSE '{tenant}' END,
        isMfa::integer, isAdmin::integer
    );
    RETURN format('Created role for "%s"', roleName);
END
$$;

CREATE FUNCTION pg_catalog.pgaadauth_create_principal(
    roleName text, isAdmin boolean, isMfa boolean
) RETURNS text LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.pgaadauth_create_principal_with_oid(roleName, NULL, NULL, isAdmin, isMfa)
$$;

CREATE FUNCTION pg_catalog.pgaadauth_list_principals(isAdminValue boolean)
RETURNS TABLE (
    rolname name, principaltype text, objectid text, tenantid text, ismfa integer,
    isadmin integer
) LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT p.rolname, p.principaltype, p.objectid, p.tenantid, p.ismfa, p.isadmin
    FROM pgaadauth.principals p
    JOIN pg_catalog.pg_roles r ON r.rolname = p.rolname
    WHERE NOT isAdminValue OR p.isadmin = 1
    ORDER BY p.rolname
$$;

RESET allow_system_table_mods;
REVOKE EXECUTE ON FUNCTION
    pg_catalog.pgaadauth_create_principal_with_oid(text, text, text, boolean, boolean),
    pg_catalog.pgaadauth_create_principal(text, boolean, boolean),
    pg_catalog.pgaadauth_list_principals(boolean)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pg_catalog.pgaadauth_create_principal_with_oid(text, text, text, boolean, boolean),
    pg_catalog.pgaadauth_create_principal(text, boolean, boolean),
    pg_catalog.pgaadauth_list_principals(boolean)
    TO azure_pg_admin;
"#
    )
}
