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
         echo \"PGUSER=$PGUSER\"\necho \"PGSSLMODE=$PGSSLMODE\"\necho \"PGHOST=$PGHOST\"\n\
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
    // `require` does not verify the host name in libpq: run as verify-full, and said so.
    assert!(
        run.stderr.contains("sslmode=require is run as verify-full"),
        "{}",
        run.stderr
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    // One connection string says everything; libpq's variables are gone.
    let conninfo = lines[0]
        .strip_prefix("arg=--dbname=")
        .expect("--dbname first");
    let port = bed.postgres().port();
    let root = bed.postgres().ca_certificate_path();
    for pair in [
        "host='localhost'".to_owned(),
        format!("port='{port}'"),
        // libpq would default to the user's name; Entra roles live in `postgres`.
        "dbname='postgres'".to_owned(),
        format!("user='{}'", bed.principal().name()),
        "sslmode='verify-full'".to_owned(),
        format!("sslrootcert='{}'", root.display()),
        "gssencmode='disable'".to_owned(),
    ] {
        assert!(conninfo.contains(&pair), "{pair} not in {conninfo}");
    }
    assert_eq!(lines[1..3], ["arg=-c", "arg=select 1"]);
    // The same settings as variables, for later connections of the session (`\connect`).
    for var in [
        format!("PGUSER={}", bed.principal().name()),
        "PGSSLMODE=verify-full".to_owned(),
        "PGHOST=localhost".to_owned(),
    ] {
        assert!(lines.contains(&var.as_str()), "{var} not set: {lines:?}");
    }
    let length: usize = lines
        .iter()
        .find_map(|l| l.strip_prefix("password_length="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 500, "a JWT-sized password: {length}");

    // Plaintext, a service file, a Unix socket and arguments psql would read otherwise are
    // refused before any token is requested, however they are spelt.
    let before = bed.identity().requests();
    for (vars, args) in [
        (with(&vars, "PGSSLMODE", "disable"), vec!["psql"]),
        (
            vars.clone(),
            vec!["psql", "--", "host=localhost sslmode=prefer"],
        ),
        (
            vars.clone(),
            vec![
                "psql",
                "--",
                "postgresql://localhost/postgres?sslmode=%64isable",
            ],
        ),
        (
            vars.clone(),
            vec![
                "psql",
                "--",
                "postgresql://localhost/postgres?%73slmode=prefer",
            ],
        ),
        (
            vars.clone(),
            vec!["psql", "--", r"host=localhost sslmode=dis\able"],
        ),
        (vars.clone(), vec!["psql", "--", "-d", "service=azure"]),
        (with(&vars, "PGSERVICE", "azure"), vec!["psql"]),
        (
            vars.clone(),
            vec!["psql", "--", "-h", "/var/run/postgresql"],
        ),
        (vars.clone(), vec!["psql", "--", "--hostaddr=127.0.0.1"]),
        (vars.clone(), vec!["psql", "--", "db", "user", "third"]),
    ] {
        let run = pg_entra(&args, &vars).await;
        assert_eq!(run.code, Some(3), "{args:?}: {}", run.stderr);
        assert_eq!(run.stdout, "", "{args:?}");
    }
    assert_eq!(bed.identity().requests(), before);
}

/// The environment a command runs with.
type Vars = Vec<(String, String)>;

/// Servers that must never see the token: one that offers no TLS, and one whose certificate
/// chains to a trusted root but names another host. Whatever libpq settings and psql
/// arguments ask for, through the real psql, neither receives a password message.
#[tokio::test(flavor = "multi_thread")]
async fn psql_sends_the_token_only_to_a_verified_host_name() {
    use pg_entra::testing::{LoginAnswer, ScriptedPostgres, TestCa, TlsOffer};

    let bed = TestBed::start().await.unwrap();
    let refuse = LoginAnswer::Refuse {
        code: "28P01".into(),
        message: "password authentication failed".into(),
    };
    let plaintext = ScriptedPostgres::start(TlsOffer::None, refuse.clone())
        .await
        .unwrap();
    let ca = TestCa::generate("another trusted CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.certificate_pem().unwrap()).unwrap();
    let other_name = ScriptedPostgres::start(
        TlsOffer::Certificate(ca.issue_certificate_for("db.other.example").unwrap()),
        refuse,
    )
    .await
    .unwrap();
    let psql = psql();
    let ca_path = ca_file.to_str().unwrap();
    // Both CAs, for a session that starts at the bed and then goes elsewhere.
    let bundle = dir.path().join("bundle.crt");
    let mut both = std::fs::read(bed.postgres().ca_certificate_path()).unwrap();
    both.extend(ca.certificate_pem().unwrap());
    std::fs::write(&bundle, both).unwrap();

    // The control: psql on its own, with sslmode=require (Azure's own snippet), sends the
    // other-name server a password.
    let direct = tokio::process::Command::new(&psql)
        .arg(format!(
            "host=localhost port={} user=x dbname=postgres sslmode=require",
            other_name.port()
        ))
        .args(["-w", "-c", "select 1"])
        .env_clear()
        .env("PGPASSWORD", "not-a-token")
        .output()
        .await
        .unwrap();
    assert!(!direct.status.success());
    assert_eq!(other_name.passwords_received(), 1, "the control sent one");

    let base = with(&bed.vars(), "PG_ENTRA_PSQL", psql.to_str().unwrap());
    let plain_port = plaintext.port().to_string();
    let other_port = other_name.port().to_string();
    let to = |port: &str| with(&base, "PGPORT", port);
    let trusting = |port: &str| with(&to(port), "PGSSLROOTCERT", ca_path);
    let cases: Vec<(Vars, Vec<String>)> = vec![
        // The server that offers no TLS.
        (with(&to(&plain_port), "PGSSLMODE", "verify-ca"), vec![]),
        (with(&to(&plain_port), "PGSSLMODE", "require"), vec![]),
        (
            base.clone(),
            vec![format!("host=localhost port={plain_port} sslmode=require")],
        ),
        (
            base.clone(),
            vec![format!(
                "postgresql://localhost:{plain_port}/postgres?sslmode=%64isable"
            )],
        ),
        (
            base.clone(),
            vec![format!(
                "postgresql://localhost:{plain_port}/postgres?%73slmode=prefer"
            )],
        ),
        (
            base.clone(),
            vec![format!(
                r"host=localhost port={plain_port} sslmode=dis\able"
            )],
        ),
        (
            base.clone(),
            vec![
                "-p".into(),
                plain_port.clone(),
                "-h".into(),
                "localhost".into(),
            ],
        ),
        (
            with(&to(&plain_port), "PGSSLMODE", "allow"),
            vec!["--port".into(), plain_port.clone()],
        ),
        // The server whose certificate is trusted but for another name.
        (
            with(&trusting(&other_port), "PGSSLMODE", "verify-ca"),
            vec![],
        ),
        (with(&trusting(&other_port), "PGSSLMODE", "require"), vec![]),
        (
            base.clone(),
            vec![format!(
                "host=localhost port={other_port} sslmode=require sslrootcert={ca_path}"
            )],
        ),
        (
            base.clone(),
            vec![format!(
                "postgresql://localhost:{other_port}/postgres?sslmode=verify-ca&sslrootcert={ca_path}"
            )],
        ),
        (
            trusting(&plain_port),
            vec!["-d".into(), format!("sslmode=verify-ca port={other_port}")],
        ),
        (
            with(&trusting(&other_port), "PGSSLMODE", "require"),
            vec!["--host=localhost".into(), "-Upg-entra-test-vm".into()],
        ),
        // A later connection of the session: to the bed first, then elsewhere.
        (
            base.clone(),
            vec![
                "-c".into(),
                format!("\\connect 'host=localhost port={plain_port}'"),
            ],
        ),
        (
            with(&base, "PGSSLROOTCERT", bundle.to_str().unwrap()),
            vec![
                "-c".into(),
                format!("\\connect 'host=localhost port={other_port}'"),
            ],
        ),
    ];
    for (vars, psql_args) in cases {
        let mut args = vec!["psql", "--", "-c", "select 1"];
        args.extend(psql_args.iter().map(String::as_str));
        let run = pg_entra(&args, &vars).await;
        assert_ne!(run.code, Some(0), "{psql_args:?}");
        if psql_args.iter().any(|arg| arg.starts_with("\\connect")) {
            assert!(
                run.stdout.contains("(1 row)"),
                "the session began at the bed"
            );
        }
        run.assert_no_token();
        assert_eq!(
            plaintext.passwords_received(),
            0,
            "{psql_args:?} sent a password in clear"
        );
        assert_eq!(
            other_name.passwords_received(),
            1,
            "{psql_args:?} sent a password to another name"
        );
    }
    // psql did reach the other-name server: it refused the certificate, it was not kept away.
    assert!(other_name.connections() > 2, "{}", other_name.connections());
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

/// A token the connector would not use (it expires as it is issued) is not printed: `token`
/// applies the connector's rule, exits with the token class, and the doctor says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_too_close_to_its_expiry_is_not_printed() {
    let bed = TestBed::start().await.unwrap();
    bed.identity().set_token_lifetime(Duration::ZERO);
    let run = pg_entra(&["token"], &bed.vars()).await;
    assert_eq!(run.code, Some(5), "{}", run.stderr);
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("too soon to use"), "{}", run.stderr);
    run.assert_no_token();
    let run = pg_entra(&["doctor"], &bed.vars()).await;
    assert_eq!(run.code, Some(5), "{}", run.stdout);
    run.assert_no_token();
}

/// `target_session_attrs` reaches psql as given, whichever kind: libpq checks each itself.
#[tokio::test(flavor = "multi_thread")]
async fn psql_gets_the_session_kind_asked_for() {
    let bed = TestBed::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("psql");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor a in \"$@\"; do echo \"arg=$a\"; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let vars = with(&bed.vars(), "PG_ENTRA_PSQL", fake.to_str().unwrap());
    for attrs in ["read-only", "primary", "standby", "prefer-standby"] {
        let run = pg_entra(&["psql"], &with(&vars, "PGTARGETSESSIONATTRS", attrs)).await;
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let conninfo = run.stdout.lines().next().unwrap();
        assert!(
            conninfo.contains(&format!("target_session_attrs='{attrs}'")),
            "{attrs}: {conninfo}"
        );
    }
}
