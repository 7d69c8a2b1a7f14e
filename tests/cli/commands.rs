//! `pg-entra token`, `psql` and `testbed`.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use pg_entra::testing::TestBed;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

use super::{PG_ENTRA, pg_entra, psql, with};

#[tokio::test(flavor = "multi_thread")]
async fn token_prints_the_token_and_nothing_else() {
    let bed = TestBed::start().await.unwrap();
    let run = pg_entra(&["token"], &bed.vars()).await;
    assert_eq!(run.code, Some(0));
    assert_eq!(run.stderr, "");
    let token = run.stdout.strip_suffix('\n').expect("one line");
    assert!(!token.contains(char::is_whitespace), "only the token");
    // Exactly the token: it is the role's password now.
    let (client, connection) = tokio_postgres::Config::new()
        .host("localhost")
        .port(bed.postgres().port())
        .dbname("postgres")
        .user(bed.principal().name())
        .password(token)
        .connect(tls(&bed))
        .await
        .expect("the printed token logs in");
    tokio::spawn(connection);
    let row = client.query_one("select current_user", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), bed.principal().name());

    // --json adds what a script wants to know, and the same kind of token.
    let run = pg_entra(&["token", "--json"], &bed.vars()).await;
    assert_eq!(run.code, Some(0));
    let answer: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(answer["credential"], "ManagedIdentityCredential");
    assert_eq!(answer["user"], bed.principal().name());
    assert_eq!(answer["user_claim"], "xms_mirid");
    assert_eq!(
        answer["scope"],
        "https://ossrdbms-aad.database.windows.net/.default"
    );
    let seconds = answer["expires_in"].as_i64().unwrap();
    assert!((3000..=3600).contains(&seconds), "{seconds}");
    assert!(answer["access_token"].as_str().unwrap().starts_with("eyJ"));
    assert_eq!(answer.as_object().unwrap().len(), 7, "no claims: {answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_failures_go_to_stderr_with_the_credential_exit_code() {
    let bed = TestBed::start().await.unwrap();
    bed.identity()
        .script([pg_entra::testing::Reply::status(400)]);
    let run = pg_entra(&["token"], &bed.vars()).await;
    assert_eq!(run.code, Some(4));
    assert_eq!(run.stdout, "", "nothing a script could mistake for a token");
    assert!(
        run.stderr.contains("does not know this identity"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_logs_in_through_the_real_psql() {
    let bed = TestBed::start().await.unwrap();
    let psql = psql();
    let vars = with(&bed.vars(), "PG_ENTRA_PSQL", psql.to_str().unwrap());
    let run = pg_entra(
        &[
            "psql",
            "--",
            "-At",
            "-c",
            "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ],
        &vars,
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout.trim(), format!("{}|t", bed.principal().name()));
    run.assert_no_token();

    // psql's own exit status comes back.
    let run = pg_entra(&["psql", "--", "-c", "select 1/0"], &vars).await;
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("division by zero"));
    run.assert_no_token();
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_gets_the_token_in_its_environment_only() {
    let bed = TestBed::start().await.unwrap();
    // A stand-in psql that shows its arguments and environment (the password's length only).
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("psql");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor a in \"$@\"; do echo \"arg=$a\"; done\n\
         echo \"PGUSER=$PGUSER\"\necho \"PGSSLMODE=$PGSSLMODE\"\necho \"PGDATABASE=$PGDATABASE\"\n\
         echo \"password_length=${#PGPASSWORD}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let vars = with(
        &with(&bed.vars(), "PG_ENTRA_PSQL", fake.to_str().unwrap()),
        "PGSSLMODE",
        "require",
    );
    let vars: Vec<_> = vars
        .into_iter()
        .filter(|(k, _)| k != "PGDATABASE")
        .collect();
    let run = pg_entra(&["psql", "--", "-c", "select 1"], &vars).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    run.assert_no_token();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[..2], ["arg=-c", "arg=select 1"]);
    assert!(lines.contains(&format!("PGUSER={}", bed.principal().name()).as_str()));
    // `require` does not verify in libpq: raised to verify-full.
    assert!(lines.contains(&"PGSSLMODE=verify-full"));
    // libpq would default to the user's name; Entra roles live in `postgres`.
    assert!(lines.contains(&"PGDATABASE=postgres"));
    let length: usize = lines
        .iter()
        .find_map(|l| l.strip_prefix("password_length="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 500, "a JWT-sized password: {length}");

    // Plaintext is refused, from the environment or from psql's own arguments, before any
    // token is requested.
    let before = bed.identity().requests();
    for (vars, args) in [
        (with(&vars, "PGSSLMODE", "disable"), vec!["psql"]),
        (
            vars.clone(),
            vec!["psql", "--", "host=localhost sslmode=prefer"],
        ),
    ] {
        let run = pg_entra(&args, &vars).await;
        assert_eq!(run.code, Some(3));
        assert!(run.stderr.contains("refused"), "{}", run.stderr);
        assert_eq!(run.stdout, "");
    }
    assert_eq!(bed.identity().requests(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_prints_variables_that_doctor_accepts_and_stops_on_ctrl_c() {
    let mut testbed = tokio::process::Command::new(PG_ENTRA)
        .arg("testbed")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(testbed.stdout.take().unwrap()).lines();
    let mut vars = Vec::new();
    while vars.len() < 6 {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the bed starts within a minute")
            .unwrap()
            .expect("an export line");
        let (name, value) = line
            .strip_prefix("export ")
            .and_then(|rest| rest.split_once('='))
            .expect("export NAME='value'");
        let value = value
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap();
        vars.push((name.to_owned(), value.to_owned()));
    }
    let names: Vec<&str> = vars.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "PGHOST",
            "PGPORT",
            "PGDATABASE",
            "PGSSLMODE",
            "PGSSLROOTCERT",
            "AZURE_POD_IDENTITY_AUTHORITY_HOST"
        ]
    );
    let run = pg_entra(&["doctor"], &vars).await;
    assert_eq!(run.code, Some(0));
    assert_eq!(run.stdout.lines().filter(|l| l.starts_with('✓')).count(), 8);

    // Ctrl-C stops it cleanly: exit 0, its files gone.
    let pid = testbed.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(60), testbed.wait())
        .await
        .expect("the bed stops within a minute")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let root_cert = &vars.iter().find(|(k, _)| k == "PGSSLROOTCERT").unwrap().1;
    assert!(
        !std::path::Path::new(root_cert).exists(),
        "the bed's files are removed"
    );
}

/// The TLS connector trusting the bed's CA, for connecting without pg-entra.
fn tls(bed: &TestBed) -> postgres_native_tls::MakeTlsConnector {
    let ca = std::fs::read(bed.postgres().ca_certificate_path()).unwrap();
    let connector = native_tls::TlsConnector::builder()
        .add_root_certificate(native_tls::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    postgres_native_tls::MakeTlsConnector::new(connector)
}

/// A directory for the bed's files that the server's account can reach (as root, the bed
/// hands its own directory to `postgres`), and nothing else in it.
fn private_tmpdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// What a bed left in `tmpdir` and the processes still running from it.
fn leftovers(tmpdir: &std::path::Path) -> (Vec<std::path::PathBuf>, String) {
    let files: Vec<_> = std::fs::read_dir(tmpdir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    let processes = std::process::Command::new("pgrep")
        .args(["-a", "-f"])
        .arg(tmpdir)
        .output()
        .unwrap();
    (
        files,
        String::from_utf8_lossy(&processes.stdout).into_owned(),
    )
}

fn send(signal: &str, child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(kill.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_stopped_by_any_signal_at_any_moment_leaves_nothing() {
    // During start-up: once its directory exists (initdb is running or about to).
    for signal in ["HUP", "TERM", "INT"] {
        let tmpdir = private_tmpdir();
        let mut testbed = tokio::process::Command::new(PG_ENTRA)
            .arg("testbed")
            .env("TMPDIR", tmpdir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let began = tokio::time::timeout(Duration::from_secs(60), async {
            while leftovers(tmpdir.path()).0.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(began.is_ok(), "the bed made no directory within a minute");
        send(signal, &testbed);
        let output = tokio::time::timeout(Duration::from_secs(60), async {
            let status = testbed.wait().await.unwrap();
            let mut stderr = String::new();
            testbed
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await
                .unwrap();
            (status, stderr)
        })
        .await
        .expect("the bed stops within a minute");
        assert!(output.0.success(), "SIG{signal}: {output:?}");
        assert!(
            output.1.contains("during start-up"),
            "SIG{signal}: {}",
            output.1
        );
        let (files, processes) = leftovers(tmpdir.path());
        assert!(files.is_empty(), "SIG{signal} left {files:?}");
        assert!(
            processes.is_empty(),
            "SIG{signal} left running:\n{processes}"
        );
    }

    // After start-up: SIGHUP (the terminal closed) stops it like Ctrl-C.
    let tmpdir = private_tmpdir();
    let mut testbed = tokio::process::Command::new(PG_ENTRA)
        .arg("testbed")
        .env("TMPDIR", tmpdir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(testbed.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the bed starts within a minute")
        .unwrap()
        .expect("an export line");
    send("HUP", &testbed);
    let status = tokio::time::timeout(Duration::from_secs(60), testbed.wait())
        .await
        .expect("the bed stops within a minute")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let (files, processes) = leftovers(tmpdir.path());
    assert!(files.is_empty(), "SIGHUP left {files:?}");
    assert!(processes.is_empty(), "SIGHUP left running:\n{processes}");
}
