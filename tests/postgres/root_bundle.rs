//! A root file holding every root in play (people keep Baltimore, DigiCert Global Root G2 and
//! Microsoft RSA Root Certificate Authority 2017 in one `PGSSLROOTCERT`): with the issuing root
//! second, behind another root, each integration trusts the whole bundle, or, where it
//! cannot (sqlx), refuses it at build naming the way around. Neither root is in the system's
//! store, so a connection that succeeds used the bundle's second certificate.

use pg_entra::testing::{TestBed, TestCa};
use pg_entra::{ConnectorBuilder, Environment, Error};

use super::{bed, current_user};

/// The bed's connector builder with `PGSSLROOTCERT` naming [another root, the bed's root].
fn with_bundle(bed: &TestBed, dir: &tempfile::TempDir) -> ConnectorBuilder {
    let other = TestCa::generate("another root").unwrap();
    let mut bundle = other.certificate_pem().unwrap();
    bundle.extend(std::fs::read(bed.postgres().ca_certificate_path()).unwrap());
    let file = dir.path().join("roots.pem");
    std::fs::write(&file, bundle).unwrap();
    let vars: Vec<(String, String)> = bed
        .vars()
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "PGSSLROOTCERT" => (k, file.display().to_string()),
            _ => (k, v),
        })
        .collect();
    bed.connector_builder()
        .environment(Environment::from_vars(vars))
}

#[tokio::test]
async fn tokio_postgres_trusts_every_root_of_a_bundle() {
    let bed = bed().await;
    let dir = tempfile::tempdir().unwrap();
    let connector = with_bundle(&bed, &dir).build().unwrap();
    assert_eq!(
        current_user(&connector).await.unwrap(),
        bed.principal().name()
    );
}

#[cfg(all(feature = "deadpool", feature = "bb8"))]
#[tokio::test]
async fn the_pools_trust_every_root_of_a_bundle() {
    let bed = bed().await;
    let dir = tempfile::tempdir().unwrap();
    let connector = with_bundle(&bed, &dir).build().unwrap();
    let deadpool = connector.deadpool_pool(2).unwrap();
    let client = deadpool.get().await.unwrap();
    let user: String = client
        .query_one("select current_user", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, bed.principal().name());
    let bb8 = connector.bb8_pool(2).unwrap();
    let client = bb8.get().await.unwrap();
    let user: String = client
        .query_one("select current_user", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, bed.principal().name());
}

#[cfg(feature = "diesel-async")]
#[tokio::test]
async fn diesel_trusts_every_root_of_a_bundle() {
    use diesel::sql_types::Text;
    use diesel_async::RunQueryDsl;

    let bed = bed().await;
    let dir = tempfile::tempdir().unwrap();
    let connector = with_bundle(&bed, &dir).build().unwrap();
    let mut connection = connector.diesel_connection().await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        user: String,
    }
    let row: Row = diesel::sql_query("select current_user::text as user")
        .get_result(&mut connection)
        .await
        .unwrap();
    assert_eq!(row.user, bed.principal().name());
}

/// sqlx's native-tls backend reads one certificate of a root file: a bundle is refused at
/// build, with the ways around it, instead of a pool whose every acquire fails TLS.
#[cfg(feature = "sqlx")]
#[tokio::test]
async fn sqlx_refuses_a_bundle_at_build_naming_the_way_around() {
    let bed = bed().await;
    let dir = tempfile::tempdir().unwrap();
    let connector = with_bundle(&bed, &dir).build().unwrap();
    let error = connector
        .sqlx_pool(sqlx::postgres::PgPoolOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::Config(config) if config.setting() == "sslrootcert"),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(text.contains("holds 2 certificates"), "{text}");
    assert!(text.contains("alone in the file"), "{text}");
    assert!(text.contains("system's trust store"), "{text}");
}
