//! The `pg-entra` command, run as a separate process against the test bed: each failure class
//! of `doctor` on purpose, `token`'s output, `psql` through the real psql, and `testbed`.

mod commands;
mod doctor;
mod proxy;

use std::path::PathBuf;
use std::time::Duration;

/// The command under test, built by cargo for this test target.
const PG_ENTRA: &str = env!("CARGO_BIN_EXE_pg-entra");
/// A `PATH` with nothing on it: no Azure CLI or azd, so the credential chain ends at the
/// managed identity whatever this machine has installed.
const EMPTY_PATH: &str = "/nonexistent/pg-entra-test";
/// Every JWT starts so (base64url of `{"`): no output but `token`'s stdout may contain it.
const JWT_START: &str = "eyJ";

/// One finished run of the command.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Fails the test, showing the output, unless stdout contains `text`.
    #[track_caller]
    fn assert_says(&self, text: impl AsRef<str>) {
        let text = text.as_ref();
        assert!(
            self.stdout.contains(text),
            "{text:?} not in the output:\n{}",
            self.stdout
        );
    }

    /// Fails the test if a token appears anywhere in the output.
    fn assert_no_token(&self) {
        assert!(
            !self.stdout.contains(JWT_START) && !self.stderr.contains(JWT_START),
            "a token was printed:\n{}\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `pg-entra args…` with exactly `vars` as its environment (plus an empty `PATH`). Async,
/// so that the bed's identity endpoint on this runtime keeps answering meanwhile.
async fn pg_entra(args: &[&str], vars: &[(String, String)]) -> Run {
    let mut command = tokio::process::Command::new(PG_ENTRA);
    command
        .args(args)
        .env_clear()
        .env("PATH", EMPTY_PATH)
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("pg-entra finishes within 2 minutes")
        .expect("pg-entra runs");
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!(
        "pg-entra {args:?} → {:?}\n{}{}",
        run.code, run.stdout, run.stderr
    );
    run
}

/// `vars` with `name` set to `value` (replacing it).
fn with(vars: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = vars.iter().filter(|(k, _)| k != name).cloned().collect();
    vars.push((name.to_owned(), value.to_owned()));
    vars
}

/// The real psql: the test bed's server binaries' directory first, as the bed finds them.
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
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("psql")));
    }
    candidates
        .into_iter()
        .find(|candidate| candidate.is_file())
        .expect("psql is installed (the PostgreSQL client comes with the server package)")
}
