//! Step 6: each host's DNS answer, TCP connect time, and TLS handshake (the PostgreSQL TLS
//! request, then the server's certificate: subject, issuer, expiry, the root it chains to).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::ssl::{HandshakeError, SslConnector, SslMethod, SslRef, SslVerifyMode};
use openssl::x509::{X509, X509NameRef, X509Ref, X509VerifyResult};
use pg_entra::{Connector, Environment};
use tokio_postgres::config::Host;

use super::{Report, Step};
use crate::exit::Failure;

/// The most of a root certificate file that is read (the connector's own cap).
const MAX_ROOT_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// The issuer of the test bed's certificates (`pg_entra::testing`).
const TEST_CA: &str = "pg-entra test CA";
/// Azure Database for PostgreSQL's certificates chain to these (facts doc, TLS).
const AZURE_ROOTS: &str =
    "DigiCert Global Root G2 or Microsoft RSA Root Certificate Authority 2017";

/// Checks every configured host; the first that fails ends the check.
pub(super) async fn check(
    connector: &Connector,
    timeout: Duration,
    report: &mut Report,
) -> Result<(), Failure> {
    let config = connector.base_config();
    let ports = config.get_ports();
    let hostaddrs = config.get_hostaddrs();
    let root_file = Environment::process()
        .var("PGSSLROOTCERT")
        .filter(|file| file != "system");
    for (index, host) in config.get_hosts().iter().enumerate() {
        let Host::Tcp(host) = host else { continue };
        let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
        let fixed = hostaddrs.get(index).copied();
        match check_host(host, port, fixed, root_file.clone(), timeout).await {
            Ok(step) => report.add(step),
            Err((step, failure)) => return Err(report.fail(step, failure)),
        }
    }
    Ok(())
}

/// DNS, TCP and TLS for one host: the step that passed, or the one that failed and its class.
async fn check_host(
    host: &str,
    port: u16,
    hostaddr: Option<IpAddr>,
    root_file: Option<String>,
    timeout: Duration,
) -> Result<Step, (Step, Failure)> {
    let title = "network";
    let mut facts: Vec<(String, String)> = Vec::new();
    let finish = |step: Step, facts: &[(String, String)]| step.details_first(facts);

    // DNS (skipped when a hostaddr is given, as libpq does).
    let addresses: Vec<SocketAddr> = match hostaddr {
        Some(address) => {
            facts.push(("hostaddr".into(), address.to_string()));
            vec![SocketAddr::new(address, port)]
        }
        None => match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(found)) => {
                let found: Vec<SocketAddr> = found.collect();
                let shown: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                facts.push(("DNS".into(), format!("{host} → {}", shown.join(", "))));
                found
            }
            Ok(Err(error)) => {
                let step = Step::failed(title, format!("{host} does not resolve: {error}"))
                    .cause("a typo in the server name (Flexible Server: <name>.postgres.database.azure.com)")
                    .cause("a private endpoint whose private DNS zone (privatelink.postgres.database.azure.com) is not linked to this network")
                    .cause("no DNS server reachable from here");
                return Err((finish(step, &facts), Failure::Network));
            }
            Err(_) => {
                let step = Step::failed(
                    title,
                    format!("resolving {host} took longer than {timeout:?}"),
                )
                .next("check this machine's DNS servers");
                return Err((finish(step, &facts), Failure::Timeout));
            }
        },
    };

    // TCP: the first address that accepts, as libpq tries them in order.
    let mut connected = None;
    let mut last_error = None;
    for address in &addresses {
        let started = Instant::now();
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                facts.push((
                    "TCP".into(),
                    format!("{address} connected in {:.1} ms", ms(started.elapsed())),
                ));
                connected = Some(stream);
                break;
            }
            Ok(Err(error)) => last_error = Some((*address, Some(error))),
            Err(_) => last_error = Some((*address, None)),
        }
    }
    let Some(stream) = connected else {
        let step = match last_error {
            Some((address, Some(error))) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                let step = Step::failed(title, format!("nothing is listening on {address} (connection refused)"))
                    .cause(format!("the port is wrong (Azure Database for PostgreSQL: 5432; its PgBouncer: 6432); this check used {port}"))
                    .cause("the server is stopped or restarting")
                    .cause("the name resolves to a different machine than the server");
                (step, Failure::Network)
            }
            Some((address, Some(error))) => (
                Step::failed(title, format!("cannot connect to {address}: {error}"))
                    .next("check routes and network security groups between this machine and the server"),
                Failure::Network,
            ),
            Some((address, None)) => (
                Step::failed(title, format!("no answer from {address} within {timeout:?}"))
                    .cause("a firewall drops the packets: add this machine's address to the server's firewall rules (Networking), or reach it through its private endpoint")
                    .cause(format!("a network security group or route blocks port {port}")),
                Failure::Timeout,
            ),
            None => (
                Step::failed(title, format!("{host} resolved to no address")),
                Failure::Network,
            ),
        };
        return Err((finish(step.0, &facts), step.1));
    };

    // TLS, on a blocking socket with timeouts (openssl's blocking API shows the chain).
    let server_name = host.to_owned();
    // The connection just timed, handed to the blocking side; the whole handshake is bounded
    // too, as a server could answer one byte per read timeout.
    let stream = stream.into_std().and_then(|stream| {
        stream.set_nonblocking(false)?;
        Ok(stream)
    });
    // The blocking side stops at the same deadline by itself (no thread outlives the step).
    let bound = timeout.saturating_mul(2);
    let progress = Arc::new(Progress::default());
    let seen = Arc::clone(&progress);
    let blocking = tokio::task::spawn_blocking(move || {
        let stream = DeadlineStream::new(stream?, timeout, bound, seen);
        handshake(stream, &server_name, root_file.as_deref())
    });
    // A safety net only: the blocking side gives its own verdict at the deadline.
    let net = bound.saturating_add(Duration::from_millis(500));
    let handshake = match tokio::time::timeout(net, blocking).await {
        Ok(Ok(handshake)) => handshake,
        Ok(Err(join)) => Err(TlsProblem::Other(join.to_string())),
        Err(_) => {
            progress.deadline_passed.store(true, Ordering::Relaxed);
            Err(TlsProblem::Io(std::io::ErrorKind::TimedOut.into()))
        }
    };
    // A timeout is "silent" only when the server sent nothing in a whole read timeout.
    let handshake = handshake.map_err(|problem| match problem {
        TlsProblem::Io(error) if progress.deadline_passed() => TlsProblem::TooSlow {
            received: progress.received(),
            bound,
            cause: error,
        },
        other => other,
    });
    match handshake {
        Ok(tls) => {
            facts.push(("TLS".into(), format!("{}, {}", tls.protocol, tls.cipher)));
            facts.push(("certificate".into(), tls.leaf.subject.clone()));
            if !tls.leaf.names.is_empty() {
                facts.push(("names".into(), tls.leaf.names.join(", ")));
            }
            facts.push(("issuer".into(), tls.leaf.issuer.clone()));
            facts.push(("expires".into(), tls.leaf.expiry()));
            facts.push(("root".into(), tls.root.clone()));
            let mut step = Step::passed(
                title,
                format!("{host}:{port} reachable, certificate verified"),
            );
            if tls.leaf.days_left < 14 {
                step = step.warning("the server certificate expires within 14 days");
            }
            Ok(finish(step, &facts))
        }
        Err(problem) => {
            let (step, failure) = problem.diagnose(host);
            Err((finish(step, &facts), failure))
        }
    }
}

/// What the TLS step learnt from a verified handshake.
struct TlsFacts {
    protocol: String,
    cipher: String,
    leaf: CertificateFacts,
    /// The subject of the trusted root the chain ended at.
    root: String,
}

/// The facts of one certificate a person checks.
struct CertificateFacts {
    subject: String,
    issuer: String,
    /// DNS names and addresses it is valid for.
    names: Vec<String>,
    not_after: String,
    days_left: i32,
}

impl CertificateFacts {
    fn of(certificate: &X509Ref) -> Self {
        let names = certificate
            .subject_alt_names()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|name| {
                        name.dnsname().map(str::to_owned).or_else(|| {
                            name.ipaddress().and_then(|bytes| match bytes.len() {
                                4 => <[u8; 4]>::try_from(bytes)
                                    .ok()
                                    .map(|b| IpAddr::from(b).to_string()),
                                16 => <[u8; 16]>::try_from(bytes)
                                    .ok()
                                    .map(|b| IpAddr::from(b).to_string()),
                                _ => None,
                            })
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let days_left = Asn1Time::days_from_now(0)
            .ok()
            .and_then(|now| now.diff(certificate.not_after()).ok())
            .map_or(0, |diff| diff.days);
        Self {
            subject: name(certificate.subject_name()),
            issuer: name(certificate.issuer_name()),
            names,
            not_after: certificate.not_after().to_string(),
            days_left,
        }
    }

    fn expiry(&self) -> String {
        if self.days_left >= 0 {
            format!("{} (in {} days)", self.not_after, self.days_left)
        } else {
            format!("{} ({} days ago)", self.not_after, -self.days_left)
        }
    }
}

/// Why the TLS step failed.
enum TlsProblem {
    /// The server answered the TLS request with `N`.
    NoTls,
    /// The certificate was not accepted; the presented one, when there was one.
    Untrusted {
        reason: String,
        presented: Option<Box<CertificateFacts>>,
    },
    Io(std::io::Error),
    /// The server kept sending, too slowly to finish the handshake within `bound`.
    TooSlow {
        received: usize,
        bound: Duration,
        cause: std::io::Error,
    },
    Other(String),
}

impl TlsProblem {
    fn diagnose(self, host: &str) -> (Step, Failure) {
        let title = "network";
        match self {
            TlsProblem::NoTls => (
                Step::failed(title, "the server does not offer TLS, so the token cannot be sent")
                    .cause("this is not Azure Database for PostgreSQL (which always offers TLS), or a proxy in between strips it")
                    .next("check the host and port"),
                Failure::Tls,
            ),
            TlsProblem::Untrusted { reason, presented } => {
                let mut step = Step::failed(
                    title,
                    format!("the server's certificate is not trusted: {reason}"),
                );
                if let Some(presented) = &presented {
                    step = step
                        .detail("presented", presented.subject.clone())
                        .detail("issuer", presented.issuer.clone());
                    if !presented.names.is_empty() {
                        step = step.detail("names", presented.names.join(", "));
                    }
                }
                if reason.contains("hostname mismatch") || reason.contains("IP address mismatch") {
                    step = step.next(format!(
                        "connect with a name the certificate lists, not {host}: for a private endpoint keep the server's own name and let DNS resolve it to the private address"
                    ));
                } else if presented
                    .as_ref()
                    .is_some_and(|p| p.issuer.contains(TEST_CA))
                {
                    step = step.next(
                        "this is the pg-entra test bed's certificate: set PGSSLROOTCERT to the CA file `pg-entra testbed` printed",
                    );
                } else {
                    step = step
                        .cause(format!("this machine lacks the root the chain ends at (Azure: {AZURE_ROOTS})"))
                        .cause("PGSSLROOTCERT names a file without that root (it adds to the system roots here; in libpq it replaces them)")
                        .next("install the system CA bundle (Debian/Ubuntu: ca-certificates), or set PGSSLROOTCERT to a PEM file holding the root; never pin the intermediate or the server certificate, which Azure rotates");
                }
                (step, Failure::Tls)
            }
            TlsProblem::Io(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                (
                    Step::failed(title, "the server accepted the connection and then went silent during TLS")
                        .cause("a firewall or proxy that lets the connection in but not the traffic")
                        .cause("the server is overloaded or hung"),
                    Failure::Timeout,
                )
            }
            TlsProblem::TooSlow {
                received,
                bound,
                cause,
            } => (
                Step::failed(
                    title,
                    format!(
                        "the server sent {received} bytes of the TLS handshake but did not finish it within {bound:?} (twice --timeout): {cause}"
                    ),
                )
                .cause("the server or the network in between is very slow, or something answers the port a byte at a time")
                .next("try again with a longer --timeout; if it stays this slow, check the network path"),
                Failure::Timeout,
            ),
            TlsProblem::Io(error) => (
                Step::failed(title, format!("the connection failed during TLS: {error}")),
                Failure::Tls,
            ),
            TlsProblem::Other(message) => (
                Step::failed(title, format!("the TLS handshake failed: {message}")),
                Failure::Tls,
            ),
        }
    }
}

impl From<std::io::Error> for TlsProblem {
    fn from(error: std::io::Error) -> Self {
        TlsProblem::Io(error)
    }
}

impl From<openssl::error::ErrorStack> for TlsProblem {
    fn from(error: openssl::error::ErrorStack) -> Self {
        TlsProblem::Other(error.to_string())
    }
}

/// What the server sent during the handshake, shared with the async side.
#[derive(Default)]
struct Progress {
    received: AtomicUsize,
    deadline_passed: AtomicBool,
}

impl Progress {
    fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    fn deadline_passed(&self) -> bool {
        self.deadline_passed.load(Ordering::Relaxed)
    }
}

/// A blocking TCP stream on which every read and write waits at most `per_call` and none
/// goes past an overall deadline: a server that answers one byte per read timeout still ends
/// the handshake at the deadline, and the thread with it.
struct DeadlineStream {
    inner: TcpStream,
    per_call: Duration,
    deadline: Instant,
    progress: Arc<Progress>,
}

impl DeadlineStream {
    fn new(inner: TcpStream, per_call: Duration, bound: Duration, progress: Arc<Progress>) -> Self {
        Self {
            inner,
            per_call,
            deadline: Instant::now() + bound,
            progress,
        }
    }

    /// The wait allowed for the next call, or a timeout error once the deadline has passed.
    fn next_wait(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.progress.deadline_passed.store(true, Ordering::Relaxed);
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake's time ran out",
            ));
        }
        Ok(left.min(self.per_call))
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.set_read_timeout(Some(self.next_wait()?))?;
        let read = self.inner.read(buf);
        if let Ok(n) = read {
            self.progress.received.fetch_add(n, Ordering::Relaxed);
        }
        // A read cut short by the deadline (not by the per-call wait) is the deadline's.
        if read.is_err() && Instant::now() >= self.deadline {
            self.progress.deadline_passed.store(true, Ordering::Relaxed);
        }
        read
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.set_write_timeout(Some(self.next_wait()?))?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The PostgreSQL TLS request, then a verifying handshake for `host`: the system roots plus
/// `root_file`, the host name checked, as the connector does.
fn handshake(
    mut stream: DeadlineStream,
    host: &str,
    root_file: Option<&str>,
) -> Result<TlsFacts, TlsProblem> {
    stream.write_all(&SSL_REQUEST)?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer)?;
    match answer[0] {
        b'S' => {}
        b'N' => return Err(TlsProblem::NoTls),
        other => {
            return Err(TlsProblem::Other(format!(
                "the server answered the TLS request with {:?}, not S or N",
                char::from(other)
            )));
        }
    }
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    if let Some(file) = root_file {
        for root in read_roots(file)? {
            builder.cert_store_mut().add_cert(root)?;
        }
    }
    // A refused handshake keeps no peer certificate: note the presented one as it is refused.
    let presented: Arc<Mutex<Option<Box<CertificateFacts>>>> = Arc::default();
    let seen = Arc::clone(&presented);
    builder.set_verify_callback(SslVerifyMode::PEER, move |ok, context| {
        if !ok {
            let mut seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if seen.is_none() {
                let leaf = context.chain().and_then(|chain| chain.iter().next());
                *seen = leaf.map(|leaf| Box::new(CertificateFacts::of(leaf)));
            }
        }
        ok
    });
    match builder.build().connect(host, stream) {
        Ok(tls) => Ok(facts(tls.ssl())),
        Err(HandshakeError::Failure(failed)) => {
            let verify = failed.ssl().verify_result();
            if verify == X509VerifyResult::OK {
                Err(TlsProblem::Other(failed.error().to_string()))
            } else {
                let presented = presented
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                Err(TlsProblem::Untrusted {
                    reason: verify.error_string().to_owned(),
                    presented,
                })
            }
        }
        Err(HandshakeError::WouldBlock(_)) => {
            Err(TlsProblem::Io(std::io::ErrorKind::TimedOut.into()))
        }
        Err(HandshakeError::SetupFailure(error)) => Err(error.into()),
    }
}

fn facts(ssl: &SslRef) -> TlsFacts {
    let chain: Vec<&X509Ref> = ssl
        .verified_chain()
        .map(|chain| chain.iter().collect())
        .unwrap_or_default();
    let leaf = ssl
        .peer_certificate()
        .map(|c| CertificateFacts::of(&c))
        .or_else(|| chain.first().map(|c| CertificateFacts::of(c)));
    TlsFacts {
        protocol: ssl.version_str().to_owned(),
        cipher: ssl
            .current_cipher()
            .map_or_else(String::new, |c| c.name().to_owned()),
        leaf: leaf.unwrap_or(CertificateFacts {
            subject: String::new(),
            issuer: String::new(),
            names: Vec::new(),
            not_after: String::new(),
            days_left: 0,
        }),
        root: chain
            .last()
            .map_or_else(String::new, |root| name(root.subject_name())),
    }
}

/// A root certificate file: a PEM bundle, or one DER certificate (as libpq accepts).
fn read_roots(file: &str) -> Result<Vec<X509>, TlsProblem> {
    let unreadable =
        |why: String| TlsProblem::Other(format!("cannot read PGSSLROOTCERT {file}: {why}"));
    // As the connector reads it (which has already checked it): a regular file, capped; a
    // FIFO or a device swapped in since is not waited on.
    if !std::fs::metadata(file).is_ok_and(|m| m.is_file()) {
        return Err(unreadable("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_ROOT_FILE_BYTES).read_to_end(&mut bytes))
        .map_err(|error| unreadable(error.to_string()))?;
    let text_begins = bytes.windows(11).any(|w| w == b"-----BEGIN ");
    let roots = if text_begins {
        X509::stack_from_pem(&bytes)?
    } else {
        vec![X509::from_der(&bytes)?]
    };
    Ok(roots)
}

/// `CN=…, O=…` in the certificate's order.
fn name(name: &X509NameRef) -> String {
    name.entries()
        .map(|entry| {
            let key = entry.object().nid().short_name().unwrap_or("?");
            let value = entry.data().to_string().unwrap_or_default();
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
