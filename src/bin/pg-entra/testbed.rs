//! `pg-entra testbed`: the crate's local PostgreSQL and identity endpoint, for any program.

use crate::exit::Failure;

/// Starts the bed, prints `export` lines for a shell on stdout (and how to use them on
/// stderr), and runs until Ctrl-C or SIGTERM; then stops the server and deletes its files.
#[cfg(feature = "testing")]
pub(crate) async fn run() -> Result<(), Failure> {
    use std::io::Write as _;

    let bed = pg_entra::testing::TestBed::start().await.map_err(|error| {
        eprintln!("pg-entra: the test bed did not start: {error}");
        Failure::Internal
    })?;
    let mut out = std::io::stdout().lock();
    for (name, value) in bed.vars() {
        // Quoted for any POSIX shell: nothing in a value is expanded.
        let _ = writeln!(out, "export {name}='{}'", value.replace('\'', r"'\''"));
    }
    let _ = out.flush();
    drop(out);
    eprintln!(
        "# pg-entra test bed: PostgreSQL {}:{} (TLS, password login), managed identity endpoint {}",
        bed.postgres().host(),
        bed.postgres().port(),
        bed.identity().authority_host()
    );
    eprintln!(
        "# identity {:?}: its tokens are the role's password until they expire",
        bed.principal().name()
    );
    eprintln!(
        "# it runs until stopped: in another shell, paste the lines above, or start it as `pg-entra testbed > bed.env &` and `. ./bed.env`"
    );
    eprintln!(
        "# a token without pg-entra: curl -s -H Metadata:true \"$AZURE_POD_IDENTITY_AUTHORITY_HOST/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://ossrdbms-aad.database.windows.net\""
    );
    eprintln!("# Ctrl-C stops it");
    stopped().await;
    eprintln!("# stopping the test bed");
    drop(bed);
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (what `kill` and service managers send).
#[cfg(feature = "testing")]
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Without the `testing` feature there is no bed to start.
#[cfg(not(feature = "testing"))]
pub(crate) async fn run() -> Result<(), Failure> {
    eprintln!(
        "pg-entra: this build has no test bed; install with `cargo install pg-entra --features cli,testing`"
    );
    Err(Failure::Configuration)
}
