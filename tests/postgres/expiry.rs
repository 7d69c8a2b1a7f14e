//! The bed refuses expired tokens as Azure does, and the cache's refresh ahead of expiry keeps
//! connections working across token lifetimes. These two tests run on the real clock for a
//! few seconds: PostgreSQL's `VALID UNTIL` knows no other.

use std::time::Duration;

use pg_entra::TokenCredential;
use pg_entra::testing::TestBed;

use super::bed;

async fn login_with_password(
    bed: &TestBed,
    connector: &pg_entra::Connector,
    password: &str,
) -> Result<(), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(bed.postgres().host())
        .port(bed.postgres().port())
        .dbname("postgres")
        .user(bed.principal().name())
        .password(password)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config.connect(connector.tls_connector().unwrap()).await?;
    tokio::spawn(connection);
    client.simple_query("select 1").await.map(drop)
}

#[tokio::test]
async fn postgres_rejects_an_expired_token() {
    let bed = bed().await;
    bed.identity().set_token_lifetime(Duration::from_secs(2));
    let connector = bed.connector_builder().build().unwrap();
    let token = bed
        .credential()
        .get_token(&[pg_entra::Cloud::Public.scope()], None)
        .await
        .unwrap();
    let secret = token.token.secret();
    login_with_password(&bed, &connector, secret).await.unwrap();

    let wait = (token.expires_on - azure_core::time::OffsetDateTime::now_utc()).unsigned_abs();
    tokio::time::sleep(wait + Duration::from_millis(500)).await;
    let error = login_with_password(&bed, &connector, secret)
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );
    assert!(
        bed.postgres().log().contains("expired password"),
        "{}",
        bed.postgres().log()
    );
}

#[tokio::test]
async fn refresh_ahead_keeps_connections_working_across_token_lifetimes() {
    let bed = bed().await;
    let lifetime = Duration::from_secs(3);
    bed.identity().set_token_lifetime(lifetime);
    let connector = bed.connector_builder().build().unwrap();
    let endpoint = bed.identity();

    let first = connector.config().await.unwrap();
    let first_password = String::from_utf8(first.get_password().unwrap().to_vec()).unwrap();
    let started = tokio::time::Instant::now();
    let mut connects = 0;
    while started.elapsed() < 2 * lifetime + Duration::from_secs(1) {
        // The bed keeps one password per role, so it accepts only the newest token (Azure
        // accepts every unexpired one). Holding the endpoint while connecting keeps a refresh
        // from replacing the password under a login that is using the previous token.
        let hold = endpoint.hold();
        let config = connector.config().await.unwrap();
        let (client, connection) = config
            .connect(connector.tls_connector().unwrap())
            .await
            .unwrap();
        tokio::spawn(connection);
        let user: String = client
            .query_one("select current_user", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, bed.principal().name());
        connects += 1;
        let issued_before = endpoint.tokens_issued();
        drop(hold);
        // Let a refresh that reached the endpoint finish and land in the cache.
        while endpoint.requests() != endpoint.tokens_issued()
            || (endpoint.tokens_issued() > issued_before
                && connector
                    .token_cache()
                    .cached()
                    .unwrap()
                    .secret()
                    .as_bytes()
                    == config.get_password().unwrap())
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(connects > 20, "{connects}");
    assert!(
        endpoint.tokens_issued() >= 3,
        "{} tokens",
        endpoint.tokens_issued()
    );
    // The first token, used as a fixed password, has long stopped working.
    let error = login_with_password(&bed, &connector, &first_password)
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );
}
