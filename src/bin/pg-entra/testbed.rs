//! `pg-entra testbed`: the crate's local PostgreSQL and identity endpoint, for any program.

use crate::exit::Failure;

/// Starts the bed, prints `export` lines for a shell on stdout (and how to use them on
/// stderr), and runs until Ctrl-C, SIGTERM or SIGHUP; then stops the server and deletes its
/// files. The signal handlers are installed before anything starts: a signal during start-up
/// lets the start-up finish and then removes what it made.
#[cfg(feature = "testing")]
pub(crate) async fn run() -> Result<(), Failure> {
    use std::io::Write as _;

    let mut stop = Stop::install().map_err(|error| {
        eprintln!("pg-entra: cannot install the signal handlers: {error}");
        Failure::Internal
    })?;
    let start = pg_entra::testing::TestBed::start();
    tokio::pin!(start);
    let started = tokio::select! {
        started = &mut start => started,
        signal = stop.received() => {
            say(&format!("# {signal} during start-up: removing what was started"));
            // Dropped as soon as it is whole, so that its Drop stops the server and deletes
            // the directory (a start-up cut in the middle would leave both behind).
            drop(start.await);
            return Ok(());
        }
    };
    let bed = started.map_err(|error| {
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
    let signal = stop.received().await;
    say(&format!("# {signal}: stopping the test bed"));
    drop(bed);
    Ok(())
}

/// A line on stderr, if stderr still takes one: after SIGHUP the terminal is gone, and a
/// failed write must not stop the clean-up.
#[cfg(feature = "testing")]
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The signals that stop the bed: Ctrl-C (SIGINT), SIGTERM (`kill`, service managers) and
/// SIGHUP (the terminal closed).
#[cfg(feature = "testing")]
struct Stop {
    #[cfg(unix)]
    signals: [(tokio::signal::unix::Signal, &'static str); 3],
}

#[cfg(feature = "testing")]
impl Stop {
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            signals: [
                (signal(SignalKind::interrupt())?, "Ctrl-C"),
                (signal(SignalKind::terminate())?, "SIGTERM"),
                (signal(SignalKind::hangup())?, "SIGHUP"),
            ],
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Self {})
    }

    /// Waits for the next stopping signal; names it.
    #[cfg(unix)]
    async fn received(&mut self) -> &'static str {
        let [(interrupt, a), (terminate, b), (hangup, c)] = &mut self.signals;
        tokio::select! {
            _ = interrupt.recv() => a,
            _ = terminate.recv() => b,
            _ = hangup.recv() => c,
        }
    }

    #[cfg(not(unix))]
    async fn received(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
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
