//! From a managed identity to `current_user`, for each kind of identity.

use std::sync::Arc;

use futures_util::future::join_all;
use pg_entra::testing::{IdentityEndpoint, LocalPostgres, Principal, TestBed};
use pg_entra::{Connector, Environment};

use super::{bed, current_user};

#[tokio::test]
async fn system_assigned_identity_logs_in_as_its_vm_name() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    assert_eq!(current_user(&connector).await.unwrap(), "pg-entra-test-vm");
    let recorded = bed.identity().recorded();
    assert_eq!(recorded.len(), 1);
    assert!(recorded[0].metadata_header);
    assert_eq!(recorded[0].param("api-version"), Some("2018-02-01"));
    assert_eq!(
        recorded[0].param("resource"),
        Some("https://ossrdbms-aad.database.windows.net")
    );
    assert_eq!(recorded[0].param("client_id"), None);
}

#[tokio::test]
async fn user_assigned_identity_selected_by_azure_client_id() {
    let postgres = LocalPostgres::start().await.unwrap();
    let vm = Principal::system_assigned("orders-vm");
    let uami = Principal::user_assigned("orders-api");
    for principal in [&vm, &uami] {
        postgres.create_role(principal.name()).await.unwrap();
    }
    let endpoint = IdentityEndpoint::builder()
        .principal(vm.clone())
        .principal(uami.clone())
        .password_setter(postgres.password_setter())
        .start()
        .await
        .unwrap();

    // As a service would be configured on Azure: only environment variables.
    let mut vars = postgres.libpq_vars();
    vars.push((
        "AZURE_POD_IDENTITY_AUTHORITY_HOST".into(),
        endpoint.authority_host(),
    ));
    vars.push(("AZURE_CLIENT_ID".into(), uami.client_id().into()));
    let connector = pg_entra::Connector::builder()
        .environment(pg_entra::Environment::from_vars(vars))
        .build()
        .unwrap();
    assert_eq!(current_user(&connector).await.unwrap(), "orders-api");
    assert_eq!(
        endpoint.recorded()[0].param("client_id"),
        Some(uami.client_id())
    );

    // The same endpoint, system-assigned: the VM's role.
    let connector = postgres
        .connector_builder()
        .credential(Arc::new(endpoint.credential_for(&vm)))
        .build()
        .unwrap();
    assert_eq!(current_user(&connector).await.unwrap(), "orders-vm");
}

#[tokio::test]
async fn explicit_user_always_wins_over_the_token() {
    let bed = bed().await;
    // The token names pg-entra-test-vm; an explicit (wrong) user is used as given, and the
    // server, not this crate, says no.
    let connector = bed
        .connector_builder()
        .user("someone-else")
        .build()
        .unwrap();
    let error = current_user(&connector).await.unwrap_err();
    assert!(error.is_auth_failure(), "{error:?}");
    assert!(error.hint().unwrap().contains("pgaadauth_create_principal"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_configs_on_a_cold_cache_make_one_request() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let hold = bed.identity().hold();
    let configs = join_all((0..1000).map(|_| {
        let connector = connector.clone();
        tokio::spawn(async move { connector.config().await })
    }));
    let release = async {
        while bed.identity().requests() == 0 {
            tokio::task::yield_now().await;
        }
        drop(hold);
    };
    let (configs, ()) = tokio::join!(configs, release);
    for config in configs {
        let config = config.unwrap().unwrap();
        assert_eq!(config.get_user(), Some("pg-entra-test-vm"));
    }
    assert_eq!(bed.identity().requests(), 1);
    assert_eq!(current_user(&connector).await.unwrap(), "pg-entra-test-vm");
    assert_eq!(bed.identity().requests(), 1);
}

#[tokio::test]
async fn a_user_the_token_cannot_name_is_a_clear_error() {
    let bed = bed().await;
    // An opaque (non-JWT) token, as a service principal's would lack the name claims.
    let credential = Arc::new(StaticCredential("opaque-token-value".into()));
    let connector = bed
        .postgres()
        .connector_builder()
        .credential(credential)
        .build()
        .unwrap();
    let error = connector.config().await.unwrap_err();
    assert!(
        matches!(error, pg_entra::Error::UnknownUser { .. }),
        "{error:?}"
    );
    assert!(error.hint().unwrap().contains("PGUSER"));
    assert!(!format!("{error} {error:?}").contains("opaque-token-value"));
}

/// A credential that always returns the same token, valid for an hour.
#[derive(Debug)]
struct StaticCredential(String);

#[async_trait::async_trait]
impl pg_entra::TokenCredential for StaticCredential {
    async fn get_token(
        &self,
        _: &[&str],
        _: Option<pg_entra::credential::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<pg_entra::credential::AccessToken> {
        Ok(pg_entra::credential::AccessToken::new(
            self.0.clone(),
            azure_core::time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(3600),
        ))
    }
}

/// A connector configured as on App Service: only `PG*` and the App Service variables.
fn app_service_connector(bed: &TestBed) -> Connector {
    let mut vars = bed.postgres().libpq_vars();
    vars.push((
        "IDENTITY_ENDPOINT".into(),
        bed.identity().app_service_endpoint(),
    ));
    vars.push((
        "IDENTITY_HEADER".into(),
        bed.identity().identity_header().into(),
    ));
    Connector::builder()
        .environment(Environment::from_vars(vars))
        .build()
        .unwrap()
}

#[tokio::test]
async fn app_service_identity_through_the_default_chain() {
    let bed = bed().await;
    let connector = app_service_connector(&bed);
    assert_eq!(
        current_user(&connector).await.unwrap(),
        bed.principal().name()
    );
    assert!(bed.identity().recorded()[0].identity_header.is_some());
}

#[tokio::test]
async fn a_deployment_slot_logs_in_as_app_slots_slot() {
    // Microsoft names a slot's system-assigned identity `<app>/slots/<slot>`, and that is the
    // role an Entra admin creates for it.
    let bed = TestBed::start_with(Principal::app_service_slot("shop", "staging"))
        .await
        .unwrap();
    let connector = app_service_connector(&bed);
    assert_eq!(
        current_user(&connector).await.unwrap(),
        "shop/slots/staging"
    );
}

#[tokio::test]
async fn a_service_principal_needs_an_explicit_user_and_then_connects() {
    let app = Principal::service_principal("reporting-app");
    let bed = TestBed::start_with(app.clone()).await.unwrap();
    let mut vars = bed.postgres().libpq_vars();
    vars.extend([
        (
            "AZURE_TENANT_ID".to_owned(),
            "contoso.onmicrosoft.com".to_owned(),
        ),
        ("AZURE_CLIENT_ID".to_owned(), app.client_id().to_owned()),
        (
            "AZURE_CLIENT_SECRET".to_owned(),
            bed.identity().client_secret().to_owned(),
        ),
        (
            "AZURE_AUTHORITY_HOST".to_owned(),
            bed.identity().authority_host(),
        ),
    ]);
    let without_user = Connector::builder()
        .environment(Environment::from_vars(vars.clone()))
        .build()
        .unwrap();
    let error = current_user(&without_user).await.unwrap_err();
    assert!(
        matches!(error, pg_entra::Error::UnknownUser { .. }),
        "{error:?}"
    );

    vars.push(("PGUSER".to_owned(), "reporting-app".to_owned()));
    let with_user = Connector::builder()
        .environment(Environment::from_vars(vars))
        .build()
        .unwrap();
    assert_eq!(current_user(&with_user).await.unwrap(), "reporting-app");
}

/// A row of `pgaadauth_list_principals`: role, type, object id, MFA, admin.
type Listed = (String, Option<String>, Option<String>, i32, i32);

/// The role SQL Azure documents (and the doctor prints) runs on the bed: the role it makes
/// logs in with the identity's tokens, and the listing shows what was created.
#[tokio::test]
async fn azures_role_functions_run_on_the_bed() {
    let postgres = LocalPostgres::start().await.unwrap();
    let app = Principal::user_assigned("orders-api");
    let admin = postgres.admin().await.unwrap();
    let created: String = admin
        .query_one(
            "select * from pgaadauth_create_principal('orders-api', false, false)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, "Created role for \"orders-api\"");
    admin
        .batch_execute(&format!(
            "select * from pg_catalog.pgaadauth_create_principal_with_oid('ops-admins', '{}', 'group', true, true)",
            app.object_id()
        ))
        .await
        .unwrap();
    let again = admin
        .batch_execute("select * from pgaadauth_create_principal('orders-api', false, false)")
        .await
        .unwrap_err();
    assert_eq!(again.code().map(|c| c.code()), Some("42710"), "{again}");
    let wrong_type = admin
        .batch_execute(&format!(
            "select * from pgaadauth_create_principal_with_oid('x', '{}', 'robot', false, false)",
            app.object_id()
        ))
        .await
        .unwrap_err();
    assert!(wrong_type.to_string().contains("db error"), "{wrong_type}");

    let rows = admin
        .query(
            "select * from pg_catalog.pgaadauth_list_principals(false)",
            &[],
        )
        .await
        .unwrap();
    let listed: Vec<Listed> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>("rolname"),
                r.get("principaltype"),
                r.get("objectid"),
                r.get("ismfa"),
                r.get("isadmin"),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (
                "ops-admins".to_owned(),
                Some("group".into()),
                Some(app.object_id().into()),
                1,
                1
            ),
            ("orders-api".into(), None, None, 0, 0),
        ]
    );
    let admins = admin
        .query(
            "select rolname::text from pgaadauth_list_principals(true)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(admins.len(), 1);
    assert_eq!(admins[0].get::<_, String>(0), "ops-admins");

    // The role made by the function logs in with the identity's token.
    let endpoint = IdentityEndpoint::builder()
        .principal(app.clone())
        .password_setter(postgres.password_setter())
        .start()
        .await
        .unwrap();
    let connector = postgres
        .connector_builder()
        .credential(Arc::new(endpoint.credential_for(&app)))
        .build()
        .unwrap();
    assert_eq!(super::current_user(&connector).await.unwrap(), "orders-api");
}
