//! The doctor's checks and a connect-and-query against the server the environment describes
//! (`PG*` for the server, `AZURE_*` for the identity): a real Flexible Server, or the bed
//! `pg-entra testbed` starts. Skipped unless `PG_ENTRA_LIVE=1`; see the README, "Testing
//! against Azure".

use std::io::Write as _;
use std::process::Command;

use pg_entra::Connector;

/// The command, built by cargo for this test target.
const PG_ENTRA: &str = env!("CARGO_BIN_EXE_pg-entra");

/// Whether to run; says why not, in one line, when not.
fn live() -> bool {
    let on = std::env::var("PG_ENTRA_LIVE").is_ok_and(|v| v == "1");
    if !on {
        // Straight to stderr: the test harness would swallow `eprintln!` of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "live checks skipped: set PG_ENTRA_LIVE=1 with PGHOST (and PGUSER, AZURE_CLIENT_ID, … as needed) to run them against a server"
        );
    }
    on
}

// One test, in order: the test bed accepts only the newest token of its identity, so the
// doctor (its own process, its own token) and the connector must not log in at once.
#[tokio::test]
async fn the_doctor_passes_then_a_connection_queries_over_verified_tls() {
    if !live() {
        return;
    }
    doctor_passes_every_step();
    connects_and_queries().await;
}

fn doctor_passes_every_step() {
    let output = Command::new(PG_ENTRA)
        .args(["doctor", "--json"])
        .output()
        .expect("pg-entra runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stdout.contains("eyJ") && !stderr.contains("eyJ"),
        "no token in the doctor's output"
    );
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    assert!(
        output.status.success() && report["ok"] == true,
        "the doctor found a problem:\n{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    let steps = report["steps"].as_array().expect("steps");
    // Seven steps, and one more network step for each further host.
    assert!(steps.len() >= 7, "every step ran: {}", steps.len());
}

async fn connects_and_queries() {
    let connector = Connector::from_env().expect("PG* and AZURE_* describe a server");
    let token = connector.token_cache().token().await.expect("a token");
    let expected_user = connector.user_for(&token).expect("a user name");
    for _ in 0..2 {
        let client = connector.connect().await.expect("connects");
        let row = client
            .query_one(
                "select current_user::text, \
                 (select ssl from pg_stat_ssl where pid = pg_backend_pid())",
                &[],
            )
            .await
            .expect("queries");
        assert_eq!(row.get::<_, String>(0), expected_user);
        assert_eq!(row.get::<_, Option<bool>>(1), Some(true), "TLS");
    }
}
