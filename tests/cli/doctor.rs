//! `pg-entra doctor`: all ✓ on a good set-up, and the right diagnosis and exit code for each
//! failure class.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pg_entra::testing::{IdentityEndpoint, LocalPostgres, Principal, Reply, TestBed};

use super::{Run, pg_entra, with};

/// The exit codes the README documents.
const CREDENTIAL: i32 = 4;
const TOKEN: i32 = 5;
const NETWORK: i32 = 6;
const TLS: i32 = 7;
const LOGIN_REFUSED: i32 = 8;
const DATABASE_MISSING: i32 = 10;
const TIMEOUT: i32 = 11;

async fn doctor(vars: &[(String, String)], extra: &[&str]) -> Run {
    let mut args = vec!["doctor"];
    args.extend_from_slice(extra);
    let run = pg_entra(&args, vars).await;
    run.assert_no_token();
    run
}

/// The step lines (`✓ 3. token: …`), in order.
fn marks(run: &Run) -> Vec<String> {
    run.stdout
        .lines()
        .filter(|line| line.starts_with('✓') || line.starts_with('✗'))
        .map(str::to_owned)
        .collect()
}

/// Asserts the run stopped at `step` (1-based) with `code`, every earlier step passed.
fn assert_stopped_at(run: &Run, step: usize, code: i32) {
    assert_eq!(run.code, Some(code), "exit code");
    let marks = marks(run);
    // The steps, then the closing line.
    assert_eq!(marks.len(), step + 1, "{marks:#?}");
    assert!(
        marks[..step - 1].iter().all(|m| m.starts_with('✓')),
        "{marks:#?}"
    );
    assert!(
        marks[step - 1].starts_with(&format!("✗ {step}.")),
        "{marks:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_set_up_passes_every_step() {
    let bed = TestBed::start().await.unwrap();
    let run = doctor(&bed.vars(), &[]).await;
    assert_eq!(run.code, Some(0));
    let marks = marks(&run);
    assert_eq!(marks.len(), 8, "{marks:#?}");
    assert!(marks.iter().all(|m| m.starts_with('✓')), "{marks:#?}");
    let name = bed.principal().name();
    for expected in [
        "✓ 2. credential: ManagedIdentityCredential".to_owned(),
        "EnvironmentCredential       skipped: AZURE_TENANT_ID".to_owned(),
        format!("✓ 4. user name: {name}"),
        "rule  from the token's xms_mirid claim".to_owned(),
        format!("select * from pgaadauth_create_principal('{name}', false, false);"),
        format!(
            "'{}', 'service', false, false);",
            bed.principal().object_id()
        ),
        "root         CN=pg-entra test CA".to_owned(),
        format!("current_user    {name}"),
        "TLS cipher      TLS_".to_owned(),
    ] {
        run.assert_says(expected);
    }

    // The same as JSON, for scripts.
    let run = doctor(&bed.vars(), &["--json"]).await;
    assert_eq!(run.code, Some(0));
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["exit_code"], 0);
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "configuration",
            "credential",
            "token",
            "user name",
            "role",
            "network",
            "login"
        ]
    );
    assert!(steps.iter().all(|s| s["ok"] == true));
    assert_eq!(
        steps[0]["details"][0],
        serde_json::json!({"label": "host", "value": "localhost", "source": "PGHOST"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_role_is_refused_and_the_sql_to_create_it_is_printed() {
    // A server without the identity's role, and an endpoint that issues its tokens.
    let postgres = LocalPostgres::start().await.unwrap();
    let principal = Principal::user_assigned("orders-api");
    let identity = IdentityEndpoint::builder()
        .principal(principal.clone())
        .start()
        .await
        .unwrap();
    let mut vars = postgres.libpq_vars();
    vars.push((
        "AZURE_POD_IDENTITY_AUTHORITY_HOST".into(),
        identity.authority_host(),
    ));
    vars.push(("AZURE_CLIENT_ID".into(), principal.client_id().into()));

    let run = doctor(&vars, &[]).await;
    assert_stopped_at(&run, 7, LOGIN_REFUSED);
    run.assert_says("password authentication failed for user \"orders-api\" (28P01)");
    run.assert_says("for a user-assigned managed identity");
    run.assert_says("select * from pgaadauth_create_principal('orders-api', false, false);");
    run.assert_says(format!(
        "select * from pgaadauth_create_principal_with_oid('orders-api', '{}', 'service', false, false);",
        principal.object_id()
    ));
    let causes = run.stdout.split("likely causes").nth(1).unwrap();
    assert!(
        causes.trim_start().contains("1. no role orders-api exists"),
        "with no user given, the missing role comes first:\n{causes}"
    );

    // Running the very SQL printed (the bed emulates Azure's pgaadauth functions) makes the
    // next check pass.
    let printed = run
        .stdout
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("select * from pgaadauth_create_principal("))
        .unwrap();
    postgres
        .admin()
        .await
        .unwrap()
        .batch_execute(printed)
        .await
        .unwrap();
    drop(identity);
    let identity = IdentityEndpoint::builder()
        .principal(principal.clone())
        .password_setter(postgres.password_setter())
        .start()
        .await
        .unwrap();
    let vars = with(
        &vars,
        "AZURE_POD_IDENTITY_AUTHORITY_HOST",
        &identity.authority_host(),
    );
    assert_eq!(doctor(&vars, &[]).await.code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_user_name_is_named_as_the_first_cause() {
    let bed = TestBed::start().await.unwrap();
    let run = doctor(&with(&bed.vars(), "PGUSER", "reporting"), &[]).await;
    assert_stopped_at(&run, 7, LOGIN_REFUSED);
    run.assert_says("user         reporting  from PGUSER");
    run.assert_says("rule  given by PGUSER");
    run.assert_says(format!(
        "PGUSER=reporting differs from the name in the token ({})",
        bed.principal().name()
    ));
    let causes = run.stdout.split("likely causes").nth(1).unwrap();
    assert!(
        causes.contains(&format!(
            "1. PGUSER=reporting is not this principal's name, {}",
            bed.principal().name()
        )),
        "{causes}"
    );
    // A flag beats the variable, and says so.
    let run = doctor(&bed.vars(), &["--user", "reporting"]).await;
    run.assert_says("1. --user=reporting is not this principal's name");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_endpoint_answering_400_means_no_identity_is_assigned() {
    let bed = TestBed::start().await.unwrap();
    bed.identity().script([Reply::status(400)]);
    let run = doctor(&bed.vars(), &[]).await;
    assert_stopped_at(&run, 2, CREDENTIAL);
    run.assert_says("managed identity endpoint answered 400");
    // Every member, and why it could not be used.
    for member in [
        "EnvironmentCredential",
        "WorkloadIdentityCredential",
        "ManagedIdentityCredential",
        "AzureCliCredential",
        "AzureDeveloperCliCredential",
    ] {
        run.assert_says(format!("{member} "));
    }
    run.assert_says("does not know this identity");
    run.assert_says("turn on the resource's managed identity");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_certificate_stops_before_the_login() {
    let bed = TestBed::start().await.unwrap();
    // The system roots only: the bed's CA is not among them.
    let run = doctor(&with(&bed.vars(), "PGSSLROOTCERT", "system"), &[]).await;
    assert_stopped_at(&run, 6, TLS);
    run.assert_says("the server's certificate is not trusted");
    run.assert_says("presented  CN=localhost");
    run.assert_says("issuer     CN=pg-entra test CA");
    assert!(!run.stdout.contains("7. login"));

    // A trusted certificate for another name: the name is checked too (the address comes
    // from PGHOSTADDR, so no DNS is needed for the made-up name).
    let vars = with(
        &with(&bed.vars(), "PGHOST", "db.example.test"),
        "PGHOSTADDR",
        "127.0.0.1",
    );
    let run = doctor(&vars, &[]).await;
    assert_stopped_at(&run, 6, TLS);
    run.assert_says("hostaddr     127.0.0.1  from PGHOSTADDR");
    assert!(
        !run.stdout.contains("    DNS "),
        "no DNS step with a host address"
    );
    run.assert_says("hostname mismatch");
    run.assert_says("connect with a name the certificate lists");
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_listening_on_the_port() {
    let bed = TestBed::start().await.unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port().to_string();
    drop(free);
    let run = doctor(&with(&bed.vars(), "PGPORT", &port), &[]).await;
    assert_stopped_at(&run, 6, NETWORK);
    run.assert_says(format!("nothing is listening on 127.0.0.1:{port}"));
    run.assert_says("DNS  localhost → 127.0.0.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_accepts_and_stays_silent_is_a_timeout() {
    let bed = TestBed::start().await.unwrap();
    // Accepts connections (the kernel does, from the backlog) and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    let run = doctor(&with(&bed.vars(), "PGPORT", &port), &["--timeout", "1"]).await;
    assert_stopped_at(&run, 6, TIMEOUT);
    run.assert_says(format!("TCP  127.0.0.1:{port} connected"));
    run.assert_says("accepted the connection and then went silent during TLS");
    drop(silent);
}

/// A server that answers the TLS request and then sends one byte every 300 ms, for ever: the
/// doctor's verdict says it was slow, not silent, and the process ends with it (before, a
/// blocking thread kept reading and the process ran as long as the server kept sending).
#[tokio::test(flavor = "multi_thread")]
async fn a_server_dribbling_its_handshake_ends_the_process_at_the_bound() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let bed = TestBed::start().await.unwrap();
    let dribbler = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = dribbler.local_addr().unwrap().port().to_string();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = dribbler.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                stream.read_exact(&mut request).await?;
                stream.write_all(b"S").await?;
                // A handshake record announced as 16 KiB, sent a byte at a time.
                let record = [0x16, 0x03, 0x03, 0x40, 0x00]
                    .into_iter()
                    .chain(std::iter::repeat(0));
                for byte in record {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    stream.write_all(&[byte]).await?;
                }
                Ok::<_, std::io::Error>(())
            });
        }
    });
    // `pg_entra` waits two minutes for the process; it must end long before.
    let run = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        doctor(&with(&bed.vars(), "PGPORT", &port), &["--timeout", "1"]),
    )
    .await
    .expect("the doctor ends at its bound while the server keeps sending");
    assert_stopped_at(&run, 6, TIMEOUT);
    run.assert_says("bytes of the TLS handshake but did not finish it within 2s");
    assert!(!run.stdout.contains("went silent"), "{}", run.stdout);
    server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_database() {
    let bed = TestBed::start().await.unwrap();
    let run = doctor(&bed.vars(), &["--dbname", "inventory"]).await;
    assert_stopped_at(&run, 7, DATABASE_MISSING);
    run.assert_says("database \"inventory\" does not exist (3D000)");
    run.assert_says("database     inventory  from --dbname");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_caught_before_it_is_sent() {
    let bed = TestBed::start().await.unwrap();
    // The endpoint hands out a token that expired ten minutes ago (a stale cache, a clock
    // far ahead).
    let expired = time::OffsetDateTime::now_utc().unix_timestamp() - 600;
    let payload = serde_json::json!({
        "aud": "https://ossrdbms-aad.database.windows.net",
        "tid": "72f988bf-0000-4000-8000-00000000c0de",
        "oid": bed.principal().object_id(),
        "xms_mirid": bed.principal().resource_id(),
        "exp": expired,
    });
    let token = format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256"}"#),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    let body = serde_json::json!({
        "access_token": token,
        "expires_on": expired.to_string(),
        "resource": "https://ossrdbms-aad.database.windows.net",
        "token_type": "Bearer",
    });
    bed.identity()
        .script([Reply::raw(200, "application/json", body.to_string())]);
    let run = doctor(&bed.vars(), &[]).await;
    assert_stopped_at(&run, 3, TOKEN);
    run.assert_says("the token has already expired");
    run.assert_says("(10 min ago)");
    assert!(!run.stdout.contains(&token[20..60]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_for_another_audience() {
    let bed = TestBed::start().await.unwrap();
    let run = doctor(
        &bed.vars(),
        &["--scope", "https://management.azure.com/.default"],
    )
    .await;
    assert_stopped_at(&run, 3, TOKEN);
    run.assert_says(
        "the token is for https://management.azure.com, not for Azure Database for PostgreSQL",
    );
}

/// A server that repeats the password in its refusal: the doctor shows its SQLSTATE and why
/// the message is withheld, never the message, in text and in JSON.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_repeating_the_token_is_not_quoted() {
    use pg_entra::testing::LoginAnswer;

    let principal = Principal::user_assigned("orders-api");
    let (server, _identity, vars) =
        scripted(LoginAnswer::RefuseRepeatingPassword, &principal).await;
    let run = doctor(&vars, &[]).await;
    assert_stopped_at(&run, 7, LOGIN_REFUSED);
    run.assert_says("(SQLSTATE 28P01) with a message that quoted the access token");
    run.assert_says("the server repeated the password it was sent");
    assert!(
        server.passwords_received() >= 1,
        "the control: a login happened"
    );
    let json = doctor(&vars, &["--json"]).await;
    assert_eq!(json.code, Some(LOGIN_REFUSED));
    assert!(
        json.stdout.contains("message is withheld"),
        "{}",
        json.stdout
    );
}

/// The variables of a scripted server (a certificate for `localhost` from its own CA) and an
/// identity endpoint for `principal`.
async fn scripted(
    answer: pg_entra::testing::LoginAnswer,
    principal: &Principal,
) -> (
    pg_entra::testing::ScriptedPostgres,
    IdentityEndpoint,
    Vec<(String, String)>,
) {
    let server = pg_entra::testing::ScriptedPostgres::start_trusted(answer)
        .await
        .unwrap();
    let identity = IdentityEndpoint::builder()
        .principal(principal.clone())
        .start()
        .await
        .unwrap();
    let mut vars = server.libpq_vars();
    vars.push((
        "AZURE_POD_IDENTITY_AUTHORITY_HOST".into(),
        identity.authority_host(),
    ));
    if !principal.is_system_assigned() {
        vars.push(("AZURE_CLIENT_ID".into(), principal.client_id().into()));
    }
    (server, identity, vars)
}

/// Each of Azure's refusal texts gets its own cause in the login step, not the same advice.
#[tokio::test(flavor = "multi_thread")]
async fn each_refusal_is_diagnosed_by_what_the_server_said() {
    use pg_entra::testing::LoginAnswer;

    let principal = Principal::user_assigned("orders-api");
    let refuse = |code: &str, message: &str| LoginAnswer::Refuse {
        code: code.into(),
        message: message.into(),
    };
    let table = [
        (
            refuse("28P01", "The access token has expired"),
            "clock is ahead of Entra's",
        ),
        (
            LoginAnswer::RequireAudience("https://token.postgres.cosmos.azure.com".into()),
            "request the scope https://token.postgres.cosmos.azure.com/.default",
        ),
        (
            LoginAnswer::RequireAudience("https://graph.microsoft.com".into()),
            "is not an Azure Database for PostgreSQL resource",
        ),
        (
            refuse(
                "28P01",
                "An error occurred while validating the access token. Please acquire a new token and retry.",
            ),
            "the token is from tenant",
        ),
        (
            refuse(
                "28000",
                "Service Principals cannot generate AAD_AUTH_TOKENTYPE_APP_USER tokens for role[orders-api]",
            ),
            "DROP ROLE \"orders-api\";",
        ),
        (
            refuse("08P01", "client sent partial pkt in startup phase"),
            "bytes, and PgBouncer up to 1.25 keeps at most 2,047",
        ),
        (
            refuse(
                "28P01",
                "password authentication failed for user \"orders-api\"",
            ),
            "no role orders-api exists",
        ),
    ];
    for (answer, says) in table {
        let (_server, _identity, vars) = scripted(answer.clone(), &principal).await;
        let run = doctor(&vars, &[]).await;
        assert_stopped_at(&run, 7, LOGIN_REFUSED);
        run.assert_says(says);
    }
}

/// A Cosmos DB for PostgreSQL host: its own scope in step 1, and a token for ossrdbms (asked
/// for with --scope) fails step 3 naming both resources.
#[tokio::test(flavor = "multi_thread")]
async fn cosmos_hosts_take_their_own_audience() {
    let bed = TestBed::start().await.unwrap();
    let cosmos = "c-orders.abc123.postgres.cosmos.azure.com";
    let vars = with(
        &with(&bed.vars(), "PGHOST", cosmos),
        "PGHOSTADDR",
        "127.0.0.1",
    );
    let run = doctor(&vars, &[]).await;
    run.assert_says(
        "scope        https://token.postgres.cosmos.azure.com/.default  from the server's host name",
    );
    assert!(marks(&run)[2].starts_with("✓ 3."), "{:#?}", marks(&run));
    let run = doctor(
        &vars,
        &["--scope", "https://ossrdbms-aad.database.windows.net"],
    )
    .await;
    assert_stopped_at(&run, 3, TOKEN);
    run.assert_says(format!(
        "the token is for \"https://ossrdbms-aad.database.windows.net\", but {cosmos} takes tokens for \"https://token.postgres.cosmos.azure.com\""
    ));
}

/// A guest: no name from its home address (step 4 says what to give), and with its `#EXT#`
/// name given, every step passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_is_told_which_name_to_give() {
    let guest = Principal::guest("alice@contoso.com", "fabrikam.onmicrosoft.com");
    let bed = TestBed::start_with(guest.clone()).await.unwrap();
    let run = doctor(&bed.vars(), &[]).await;
    assert_stopped_at(&run, 4, TOKEN);
    run.assert_says("guest account (alice@contoso.com)");
    run.assert_says("alice_contoso.com#EXT#@<tenant>.onmicrosoft.com");
    let run = doctor(&with(&bed.vars(), "PGUSER", guest.name()), &[]).await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    run.assert_says(format!("logged in as {}", guest.name()));
}

/// Single Server: a UPN logs in as `<upn>@<server>` (the gateway strips only that), and the
/// role SQL names the UPN alone; a name that already ends with `@<server>` is left as it is.
#[tokio::test(flavor = "multi_thread")]
async fn single_server_names_keep_a_upns_own_at() {
    let alice = Principal::user("alice@contoso.com");
    let bed = TestBed::start_with(alice).await.unwrap();
    for vars in [
        bed.vars(),
        with(&bed.vars(), "PGUSER", "alice@contoso.com@localhost"),
    ] {
        let run = doctor(&vars, &["--single-server"]).await;
        run.assert_says("alice@contoso.com@localhost");
        run.assert_says("CREATE ROLE \"alice@contoso.com\" WITH LOGIN IN ROLE azure_ad_user;");
        assert!(
            !run.stdout
                .contains("CREATE ROLE \"alice@contoso.com@localhost\""),
            "{}",
            run.stdout
        );
    }
}

/// `PGSSLROOTCERT` holding [another root, the issuing root]: the doctor's own TLS check and
/// its login trust the whole bundle.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_bundle_with_the_issuing_root_second_passes() {
    let bed = TestBed::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut bundle = pg_entra::testing::TestCa::generate("another root")
        .unwrap()
        .certificate_pem()
        .unwrap();
    bundle.extend(std::fs::read(bed.postgres().ca_certificate_path()).unwrap());
    let file = dir.path().join("roots.pem");
    std::fs::write(&file, bundle).unwrap();
    let run = doctor(
        &with(&bed.vars(), "PGSSLROOTCERT", file.to_str().unwrap()),
        &[],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
}

/// A real PgBouncer and a token past the 2,047 bytes it keeps (an identity in 40 groups): the
/// doctor names the length, not a refused token. `.ci/run` sets `PG_ENTRA_REQUIRE_PGBOUNCER`;
/// elsewhere a machine without PgBouncer skips this test, saying so.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_longer_than_pgbouncer_keeps_is_named_as_such() {
    use pg_entra::testing::{LocalPgBouncer, PoolMode};

    if let Err(why) = LocalPgBouncer::available() {
        assert!(
            std::env::var_os("PG_ENTRA_REQUIRE_PGBOUNCER").is_none(),
            "PgBouncer is required: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let bed = TestBed::start().await.unwrap();
    bed.identity().set_group_claims(40);
    let bouncer = LocalPgBouncer::start(bed.postgres(), PoolMode::Session)
        .await
        .unwrap();
    let vars = with(&bed.vars(), "PGPORT", &bouncer.port().to_string());
    let run = doctor(&vars, &[]).await;
    assert_stopped_at(&run, 7, LOGIN_REFUSED);
    run.assert_says("password authentication failed");
    run.assert_says("PgBouncer up to 1.25 keeps at most 2,047");
    run.assert_says("lists the identity's groups");
    // The same token, straight to PostgreSQL, gets in.
    assert_eq!(doctor(&bed.vars(), &[]).await.code, Some(0));
}
