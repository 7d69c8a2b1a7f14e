//! The test bed hands out nothing: its directory is private, and no local account, the one
//! running the tests included, logs in as the superuser without its password.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::process::Command;

use pg_entra::testing::TestBed;

use super::bed;

/// The real psql, beside the server binaries the bed uses.
fn psql() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("PG_ENTRA_PG_BINDIR") {
        candidates.push(PathBuf::from(dir).join("psql"));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|v| v.join("bin/psql")));
    }
    candidates
        .into_iter()
        .find(|candidate| candidate.is_file())
        .expect("psql is installed (it comes with the server package)")
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `psql -w` (never prompts) with `conninfo`, as `account` when given, with no libpq variable
/// but `password`; whether it logged in, and what it said.
fn psql_login(account: Option<&str>, conninfo: &str, password: Option<&str>) -> (bool, String) {
    let psql = psql();
    let mut command = match account {
        Some(account) => {
            let mut command = Command::new("runuser");
            command.args(["-u", account, "--"]).arg(psql);
            command
        }
        None => Command::new(psql),
    };
    command
        .args([
            "-w",
            "-X",
            "-A",
            "-t",
            "-c",
            "select current_user",
            conninfo,
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir("/");
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = command.output().expect("psql runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

fn socket_conninfo(bed: &TestBed, user: &str) -> String {
    format!(
        "host={} port={} user={user} dbname=postgres",
        bed.postgres().directory().display(),
        bed.postgres().port()
    )
}

/// Over TLS, verified against the bed's CA.
fn tcp_conninfo(bed: &TestBed, user: &str) -> String {
    format!(
        "host=localhost port={} user={user} dbname=postgres sslmode=verify-full sslrootcert={}",
        bed.postgres().port(),
        bed.postgres().ca_certificate_path().display()
    )
}

/// Over TLS without a root file (another account cannot read the bed's): a refusal is then
/// the server's, not the client's.
fn tcp_unverified_conninfo(bed: &TestBed, user: &str) -> String {
    format!(
        "host=localhost port={} user={user} dbname=postgres sslmode=require",
        bed.postgres().port()
    )
}

/// A token for the bed's identity, as its role's password.
async fn token_for(bed: &TestBed) -> String {
    use pg_entra::TokenCredential as _;
    let token = bed
        .credential()
        .get_token(
            &["https://ossrdbms-aad.database.windows.net/.default"],
            None,
        )
        .await
        .expect("the bed's identity gets a token");
    token.token.secret().to_owned()
}

#[tokio::test]
async fn the_directory_is_private_and_no_line_trusts() {
    let bed = bed().await;
    let dir = bed.postgres().directory();
    let metadata = std::fs::metadata(dir).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o700);
    let expected_owner = if running_as_root() {
        let id = Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&id.stdout).trim().parse().unwrap()
    } else {
        std::fs::metadata("/proc/self").unwrap().uid()
    };
    assert_eq!(metadata.uid(), expected_owner);
    let hba = std::fs::read_to_string(dir.join("data/pg_hba.conf")).unwrap();
    let methods: Vec<&str> = hba
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_whitespace().last())
        .collect();
    assert!(!methods.is_empty());
    assert!(!methods.contains(&"trust"), "{hba}");
}

#[tokio::test]
async fn no_local_account_is_the_superuser_without_its_password() {
    let bed = bed().await;
    let token = token_for(&bed).await;
    // The control: psql does log in, with the identity's token, over TLS.
    let (ok, said) = psql_login(
        None,
        &tcp_conninfo(&bed, bed.principal().name()),
        Some(&token),
    );
    assert!(ok, "the identity's own login failed: {said}");
    assert!(said.contains(bed.principal().name()), "{said}");

    // This account, as the superuser: neither over the socket nor over TCP.
    for conninfo in [
        socket_conninfo(&bed, "postgres"),
        tcp_unverified_conninfo(&bed, "postgres"),
    ] {
        let (ok, said) = psql_login(None, &conninfo, None);
        assert!(!ok, "logged in as the superuser with {conninfo}: {said}");
        // A token is no key to the superuser either.
        let (ok, said) = psql_login(None, &conninfo, Some(&token));
        assert!(!ok, "logged in as the superuser with a token: {said}");
    }
    // The identity's role has no way in over the socket (Azure has none).
    let (ok, said) = psql_login(
        None,
        &socket_conninfo(&bed, bed.principal().name()),
        Some(&token),
    );
    assert!(!ok, "{said}");

    if !running_as_root() {
        eprintln!("another account: skipped (needs root to run psql as `nobody`)");
        return;
    }
    // Another local account: the socket's directory is closed to it, and TCP wants the
    // password it does not have.
    for conninfo in [
        socket_conninfo(&bed, "postgres"),
        tcp_unverified_conninfo(&bed, "postgres"),
    ] {
        let (ok, said) = psql_login(Some("nobody"), &conninfo, None);
        assert!(!ok, "`nobody` logged in with {conninfo}: {said}");
    }
    let (_, said) = psql_login(Some("nobody"), &socket_conninfo(&bed, "postgres"), None);
    assert!(said.contains("Permission denied"), "{said}");
}
