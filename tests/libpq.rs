//! Connection strings and URLs read exactly as libpq reads them: each input goes to libpq's
//! own parser (`PQconninfoParse`, from the system's libpq, loaded at run time) and to the connector, and
//! the two must agree: both refuse it, or both accept it and read the same host list, port
//! list, database, user, options, application name and connect timeout. The connector may
//! also refuse what libpq accepts, but only for one of its documented reasons (see
//! `documented_refusal`).

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use pg_entra::testing::{FakeCredential, Principal};
use pg_entra::{Connector, Environment, Error, TokenCache};
use proptest::prelude::*;

/// libpq's `PQconninfoOption`.
#[repr(C)]
struct ConninfoOption {
    keyword: *mut c_char,
    envvar: *mut c_char,
    compiled: *mut c_char,
    val: *mut c_char,
    label: *mut c_char,
    dispchar: *mut c_char,
    dispsize: c_int,
}

type ConninfoParse = unsafe extern "C" fn(*const c_char, *mut *mut c_char) -> *mut ConninfoOption;
type ConninfoFree = unsafe extern "C" fn(*mut ConninfoOption);
type FreeMem = unsafe extern "C" fn(*mut c_void);
type LibVersion = unsafe extern "C" fn() -> c_int;

/// The system's libpq, loaded at run time: it comes with PostgreSQL (`libpq5`), so the test
/// needs no development package to link.
struct Libpq {
    parse: ConninfoParse,
    free: ConninfoFree,
    free_mem: FreeMem,
    version: c_int,
    /// Keeps the functions above loaded.
    _library: libloading::Library,
}

impl Libpq {
    fn load() -> Self {
        // SAFETY: loading libpq runs its initialisers, which have no preconditions; the
        // symbols are looked up by their documented C names and given their C signatures.
        unsafe {
            let library = ["libpq.so.5", "libpq.so", "libpq.5.dylib"]
                .iter()
                .find_map(|name| libloading::Library::new(name).ok())
                .expect(
                    "this test needs the system's libpq (Debian/Ubuntu: libpq5, installed with \
                     PostgreSQL)",
                );
            let parse = *library
                .get::<ConninfoParse>(b"PQconninfoParse\0")
                .expect("PQconninfoParse");
            let free = *library
                .get::<ConninfoFree>(b"PQconninfoFree\0")
                .expect("PQconninfoFree");
            let free_mem = *library.get::<FreeMem>(b"PQfreemem\0").expect("PQfreemem");
            let version = (*library
                .get::<LibVersion>(b"PQlibVersion\0")
                .expect("PQlibVersion"))();
            Self {
                parse,
                free,
                free_mem,
                version,
                _library: library,
            }
        }
    }
}

static LIBPQ: std::sync::LazyLock<Libpq> = std::sync::LazyLock::new(Libpq::load);

/// `load_balance_hosts` came with libpq 16; an older system libpq refuses it, the connector
/// (and tokio-postgres) knows it.
fn newer_than_this_libpq(conninfo: &str) -> bool {
    LIBPQ.version < 160_000 && conninfo.contains("load_balance_hosts")
}

/// libpq's reading of `conninfo`: the keywords it set, or its error message.
fn libpq_parse(conninfo: &str) -> Result<HashMap<String, String>, String> {
    let libpq = &*LIBPQ;
    let text = CString::new(conninfo).expect("inputs have no NUL");
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: `text` is a valid C string for the call; libpq returns either an array ended by
    // an entry with a null keyword, or null with `error` set (or null if out of memory). Both
    // are freed with the functions libpq documents for them, once.
    unsafe {
        let options = (libpq.parse)(text.as_ptr(), &mut error);
        if options.is_null() {
            let message = if error.is_null() {
                "out of memory".to_owned()
            } else {
                let message = CStr::from_ptr(error).to_string_lossy().trim().to_owned();
                (libpq.free_mem)(error.cast());
                message
            };
            return Err(message);
        }
        let mut values = HashMap::new();
        let mut option = options;
        while !(*option).keyword.is_null() {
            if !(*option).val.is_null() {
                let keyword = CStr::from_ptr((*option).keyword).to_string_lossy();
                let value = CStr::from_ptr((*option).val).to_string_lossy();
                values.insert(keyword.into_owned(), value.into_owned());
            }
            option = option.add(1);
        }
        (libpq.free)(options);
        Ok(values)
    }
}

/// The user name the test token names, used when the string names none.
const TOKEN_USER: &str = "token-user@contoso.com";

/// What the connector read, in libpq's terms.
#[derive(Debug, PartialEq)]
struct Reading {
    hosts: String,
    ports: Vec<u16>,
    dbname: String,
    user: String,
    options: Option<String>,
    application_name: Option<String>,
    connect_timeout: Duration,
    /// libpq's spelling of the session kind asked for.
    target_session_attrs: String,
}

/// The connector's reading of `conninfo` (no environment).
fn ours(cache: &TokenCache, conninfo: &str) -> Result<Reading, Error> {
    let connector = Connector::builder()
        .environment(Environment::empty())
        .connection_string(conninfo)
        .token_cache(cache.clone())
        .build()?;
    let config = connector
        .config()
        .now_or_never()
        .expect("the token is cached")?;
    let hosts = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            other => panic!("a socket host reached the config: {other:?}"),
        })
        .collect::<Vec<_>>()
        .join(",");
    Ok(Reading {
        hosts,
        ports: config.get_ports().to_vec(),
        dbname: config.get_dbname().unwrap_or_default().to_owned(),
        user: config.get_user().unwrap_or_default().to_owned(),
        options: config.get_options().map(str::to_owned),
        application_name: config.get_application_name().map(str::to_owned),
        connect_timeout: config.get_connect_timeout().copied().unwrap_or_default(),
        target_session_attrs: connector.target_session_attrs().as_str().to_owned(),
    })
}

/// What libpq's values mean once the connector's defaults are applied.
fn expected(values: &HashMap<String, String>) -> Reading {
    let value = |key: &str| values.get(key).filter(|v| !v.is_empty()).cloned();
    let ports = value("port")
        .map(|ports| {
            ports
                .split(',')
                .map(|p| match p.trim() {
                    "" => 5432,
                    p => p.parse().expect("a port libpq and the connector accepted"),
                })
                .collect()
        })
        .unwrap_or_else(|| vec![5432]);
    let connect_timeout = value("connect_timeout")
        .and_then(|t| t.trim().parse::<i64>().ok())
        .filter(|t| *t > 0)
        .map_or(Duration::from_secs(30), |t| {
            Duration::from_secs(t.unsigned_abs())
        });
    Reading {
        hosts: values.get("host").cloned().unwrap_or_default(),
        ports,
        dbname: value("dbname").unwrap_or_else(|| "postgres".to_owned()),
        user: value("user").unwrap_or_else(|| TOKEN_USER.to_owned()),
        options: values.get("options").cloned(),
        application_name: values
            .get("application_name")
            .or(values.get("fallback_application_name"))
            .cloned(),
        connect_timeout,
        target_session_attrs: value("target_session_attrs").unwrap_or_else(|| "any".to_owned()),
    }
}

/// The reasons the connector refuses what libpq accepts, each documented in the README's
/// configuration section.
fn documented_refusal(error: &Error) -> bool {
    if matches!(error, Error::TlsRequired { .. }) {
        return true;
    }
    let text = error.to_string();
    [
        "password",               // the token is the password
        "Unix-domain socket",     // no TLS
        "no server host",         // no host name to verify
        "is not supported",       // client certificates, GSS, service files, …
        "invalid ",               // a value libpq checks only when connecting
        "unknown sslmode",        // likewise
        "a port is not a number", // likewise, in a URL (not repeated)
        "ports for",              // libpq: "could not match N port numbers to M hosts"
        "host addresses for",     // likewise for hostaddr
        "not valid UTF-8",        // names that are not text
    ]
    .iter()
    .any(|reason| text.contains(reason))
}

/// How many inputs both parsers accepted and compared field by field (a generator that only
/// produced garbage would test refusals alone).
static BOTH_ACCEPTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs one input through both; `Err` describes a disagreement.
fn compare(cache: &TokenCache, conninfo: &str) -> Result<(), String> {
    match (libpq_parse(conninfo), ours(cache, conninfo)) {
        (Err(_), Err(_)) => Ok(()),
        (Err(_), Ok(_)) if newer_than_this_libpq(conninfo) => Ok(()),
        (Err(libpq), Ok(reading)) => Err(format!(
            "{conninfo:?}: libpq refuses ({libpq}) but the connector accepts: {reading:?}"
        )),
        (Ok(_), Err(error)) if documented_refusal(&error) => Ok(()),
        (Ok(values), Err(error)) => Err(format!(
            "{conninfo:?}: libpq accepts {values:?} but the connector refuses: {error}"
        )),
        (Ok(values), Ok(reading)) => {
            BOTH_ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let expected = expected(&values);
            if reading == expected {
                Ok(())
            } else {
                Err(format!(
                    "{conninfo:?}: libpq reads {expected:?}, the connector {reading:?}"
                ))
            }
        }
    }
}

fn cache() -> TokenCache {
    let cache = TokenCache::builder(Arc::new(FakeCredential::new(Principal::user(TOKEN_USER))))
        .build()
        .unwrap();
    // Fetch the token once; every connector below shares it.
    futures_executor_block_on(cache.token()).unwrap();
    cache
}

/// The cache's first fetch needs a runtime for its refresh task.
fn futures_executor_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// URLs: credentials, host lists, IPv6, ports, paths, query parameters and every kind of
/// percent-escape, well- and ill-formed. Written for this test (PostgreSQL's own
/// `src/interfaces/libpq/test/regress.in` covers the same ground; it is not copied here).
const URLS: &[&str] = &[
    "postgresql://app@srv.postgres.database.azure.com:5432/orders",
    "postgresql://app:secret@srv.postgres.database.azure.com/orders",
    "postgresql://app@srv.postgres.database.azure.com",
    "postgresql://srv.postgres.database.azure.com:6432/",
    "postgresql://srv.postgres.database.azure.com/",
    "postgresql://srv.postgres.database.azure.com",
    "postgres://srv.postgres.database.azure.com/db",
    "postgresql://",
    "postgres://",
    "postgres:///",
    "postgres:///db",
    "postgresql://app@",
    "postgres://app@/db",
    "postgres://@srv",
    "postgres://srv:/",
    "postgres://:6432/",
    "postgresql://%73rv/",
    "postgresql://srv/db?user=app",
    "postgresql://srv/db?user=app&port=6432",
    "postgresql://srv/db?u%73er=other&port=6432",
    "postgresql://srv/db?u%7aer=other&port=6432",
    "postgresql://srv:6432?user=app",
    "postgresql://srv?user=app",
    "postgresql://srv?",
    "postgresql://srv?&",
    "postgresql://srv?user=app&",
    "postgresql://srv?&user=app",
    "postgresql://srv?user=app&&port=1",
    "postgresql://[::1]:6432/db",
    "postgresql://[::1]/db",
    "postgresql://[2001:db8::1234]/",
    "postgresql://[200z:db8::1234]/",
    "postgresql://[::1]",
    "postgresql://[::1],srv:6432/db",
    "postgres://[::1",
    "postgres://[]",
    "postgres://[::1]z",
    "postgres://[::1]:x",
    "postgresql://srv?zzz",
    "postgresql://srv?value1&value2",
    "postgresql://srv?key=key=value",
    "postgresql://srv?uzer=",
    "postgresql://srv?user=",
    "postgresql://srv?sslmode=require",
    "postgresql://srv?sslmode=disable",
    "postgresql://srv?sslmode=bogus",
    "postgresql://srv?ssl=true",
    "postgresql://srv?ssl=false",
    "postgresql://srv?requiressl=1",
    "postgresql://srv?connect_timeout=5",
    "postgresql://srv?connect_timeout=0",
    "postgresql://srv?connect_timeout=-3",
    "postgresql://srv?connect_timeout=%205%20",
    "postgresql://srv?connect_timeout=soon",
    "postgresql://srv?application_name=orders%20api",
    "postgresql://srv?fallback_application_name=fb",
    "postgresql://srv?options=-c%20search_path%3Dapp",
    "postgresql://srv?host=other",
    "postgresql://srv?hostaddr=127.0.0.1",
    "postgresql://?hostaddr=127.0.0.1",
    "postgresql://srv?hostaddr=not-an-ip",
    "postgres://srv?dbname=%XXfoo",
    "postgresql://a%00b",
    "postgresql://%zz",
    "postgresql://%1",
    "postgresql://%",
    "postgresql://srv/%",
    "postgresql://srv?user=%",
    "postgresql://srv?user=%f0%9f%98%80",
    "postgresql://%ff/",
    "postgres://?host=/path/to/socket/dir",
    "postgres://app@?host=/no/such/directory",
    "postgres://app@/?host=/no/such/directory",
    "postgres://app@:6432?host=/path",
    "postgres://:6432/db?host=/path",
    "postgres://%2Fvar%2Flib%2Fpostgresql/dbname",
    "postgresql://h1,h2,h3/db",
    "postgresql://h1:1,h2:2,h3:3/db",
    "postgresql://h1:1,h2,h3:3/db",
    "postgresql://h1,,h3/db",
    "postgresql://h1%2Ch2/db",
    "postgresql://srv:0/db",
    "postgresql://srv:70000/db",
    "postgresql://srv:%36%34%33%32/db",
    "postgresql://srv/db/extra",
    "postgresql://srv/db?keepalives%3D1%20host%3Devil.example%20keepalives_idle=1",
    "postgresql://srv/db?keepalives=1&keepalives_idle=30",
    "postgresql://srv/db?target_session_attrs=read-write",
    "postgresql://srv/db?target_session_attrs=primary",
    "postgresql://srv/db?target_session_attrs=read-only",
    "postgresql://a,b/db?target_session_attrs=standby",
    "postgresql://a,b/db?target_session_attrs=prefer-standby",
    "postgresql://a,b/db?target_session_attrs=any",
    "postgresql://a,b/db?target_session_attrs=READ-ONLY",
    "postgresql://srv/db?sslcert=/c.pem",
    "postgresql://srv/db?service=orders",
    "postgresql://srv/db?gssencmode=disable",
    "postgresql://u%3Ap@srv/db",
    "postgresql://u:p@ss@srv/db",
    "postgresql://u:pa/ss@srv/db",
    "postgresql://u:pa?ss@srv/db",
    "postgre://srv",
    "postgresql:/srv",
    "POSTGRESQL://srv",
];

/// `key=value` strings: quoting, escapes, spaces, lists, empty values, unknown keywords,
/// missing `=`.
const KEY_VALUES: &[&str] = &[
    "host=srv.postgres.database.azure.com dbname=orders user=app",
    "host = srv  port =  6432 ",
    "host='srv' user='ada lovelace'",
    r"host=srv user='it\'s' dbname='a\\b'",
    r"host=srv user=ada\ lovelace",
    r"host=srv user=\'x",
    "host=srv user='unterminated",
    "host=srv user=",
    "host=srv user=''",
    "host= user=app",
    "host=",
    "",
    "   ",
    "host=srv port=6432,6433",
    "host=h1,h2 port=6432,6433",
    "host=h1,h2 port=6432",
    "host=h1,h2,h3 port=1,2",
    "host=h1,,h3",
    "host=srv port=",
    "host=srv port=abc",
    "host=srv port=' 6432 '",
    "host=srv frobnicate=1",
    "host=srv user",
    "host=srv =app",
    "host srv",
    "host=srv user=app=x",
    "host=srv dbname=a=b",
    "host=srv password=x",
    "host=srv sslmode=prefer",
    "host=srv sslmode=verify-full",
    "host=srv sslmode=VERIFY-FULL",
    "host=srv requiressl=1",
    "host=srv requiressl=0",
    "host=srv connect_timeout=10",
    "host=srv connect_timeout=' 10 '",
    "host=srv connect_timeout=10s",
    "host=srv connect_timeout=-1",
    "host=srv application_name=app fallback_application_name=fb",
    "host=srv fallback_application_name=fb",
    "host=srv options='-c statement_timeout=5s'",
    "host=srv hostaddr=127.0.0.1",
    "host=srv,srv2 hostaddr=127.0.0.1",
    "host=/var/run/postgresql",
    "host=@abstract",
    "host=srv service=orders",
    "host=srv passfile=/p",
    "host=srv load_balance_hosts=random",
    "host=srv keepalives=0 keepalives_idle=1 keepalives_interval=2 keepalives_count=3",
    "host=srv tcp_user_timeout=100",
    "host=srv channel_binding=require",
    "host=srv client_encoding=UTF8",
    "host=srv client_encoding=LATIN1",
    "host=srv\tuser=tab\nport=6432",
    "host=srv user=\u{e9}l\u{e8}ve",
    "host=srv dbname='",
    "host=srv dbname=\\",
];

/// Lines of an extra corpus file, one input per line: `PG_ENTRA_LIBPQ_CORPUS` may name
/// PostgreSQL's own `src/interfaces/libpq/test/regress.in` (PostgreSQL Licence), which this
/// repository does not carry.
fn extra_corpus() -> Vec<String> {
    match std::env::var_os("PG_ENTRA_LIBPQ_CORPUS") {
        Some(path) => std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("PG_ENTRA_LIBPQ_CORPUS={path:?}: {e}"))
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect(),
        None => {
            eprintln!(
                "PG_ENTRA_LIBPQ_CORPUS is not set: only the built-in corpus runs (set it to \
                 PostgreSQL's src/interfaces/libpq/test/regress.in to add that one)"
            );
            Vec::new()
        }
    }
}

#[test]
fn corpus_agrees_with_libpq() {
    let cache = cache();
    let extra = extra_corpus();
    let disagreements: Vec<String> = URLS
        .iter()
        .chain(KEY_VALUES)
        .copied()
        .chain(extra.iter().map(String::as_str))
        .filter_map(|conninfo| compare(&cache, conninfo).err())
        .collect();
    assert!(
        disagreements.is_empty(),
        "{} disagreements with libpq:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}

/// Pieces libpq treats specially, for generated inputs.
fn url_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("postgresql://".to_owned()),
        Just("postgres://".to_owned()),
        "[a-z0-9.-]{0,8}",
        Just("@".to_owned()),
        Just(":".to_owned()),
        Just("/".to_owned()),
        Just("?".to_owned()),
        Just("&".to_owned()),
        Just("=".to_owned()),
        Just(",".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("::1".to_owned()),
        "[0-9]{1,5}",
        "%[0-9a-fA-FxX]{0,2}",
        prop::sample::select(vec![
            "user",
            "port",
            "dbname",
            "host",
            "sslmode",
            "ssl",
            "connect_timeout",
            "options",
            "application_name",
            "hostaddr",
            "uzer",
            "keepalives",
            "service",
        ])
        .prop_map(str::to_owned),
        prop::sample::select(vec!["require", "verify-full", "prefer", "true", "1", "-1"])
            .prop_map(str::to_owned),
    ]
}

fn key_value_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "host",
            "port",
            "dbname",
            "user",
            "options",
            "application_name",
            "connect_timeout",
            "sslmode",
            "password",
            "frobnicate",
            "hostaddr",
            "keepalives",
            "target_session_attrs",
        ])
        .prop_map(str::to_owned),
        Just("=".to_owned()),
        Just(" ".to_owned()),
        Just("\t".to_owned()),
        Just("'".to_owned()),
        Just("\\".to_owned()),
        Just("\\'".to_owned()),
        Just(",".to_owned()),
        "[a-z0-9.]{1,6}",
        "[0-9]{1,5}",
        prop::sample::select(vec!["require", "verify-full", "disable", "srv", "/tmp"])
            .prop_map(str::to_owned),
        prop::sample::select(vec![
            "read-only",
            "read-write",
            "any",
            "standby",
            "primary",
            "prefer-standby",
        ])
        .prop_map(str::to_owned),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_urls_agree_with_libpq(pieces in prop::collection::vec(url_piece(), 1..14)) {
        let conninfo = format!("postgresql://{}", pieces.concat());
        let cache = CACHE.with(|cache| cache.clone());
        prop_assert_eq!(compare(&cache, &conninfo), Ok(()));
    }

    #[test]
    fn generated_key_values_agree_with_libpq(pieces in prop::collection::vec(key_value_piece(), 1..14)) {
        let conninfo = pieces.concat();
        let cache = CACHE.with(|cache| cache.clone());
        prop_assert_eq!(compare(&cache, &conninfo), Ok(()));
    }
}

thread_local! {
    static CACHE: TokenCache = cache();
}

#[test]
fn generated_inputs_include_strings_both_accept() {
    // A smaller run of the two generators above, counted: most random mixes are refused by
    // both, but enough must be accepted for the field-by-field comparison to mean something.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let cache = CACHE.with(|cache| cache.clone());
    let before = BOTH_ACCEPTED.load(std::sync::atomic::Ordering::Relaxed);
    let mut runner = TestRunner::deterministic();
    let urls = prop::collection::vec(url_piece(), 1..8);
    let key_values = prop::collection::vec(key_value_piece(), 1..8);
    for _ in 0..300 {
        let url = format!(
            "postgresql://{}",
            urls.new_tree(&mut runner).unwrap().current().concat()
        );
        assert_eq!(compare(&cache, &url), Ok(()));
        let kv = key_values.new_tree(&mut runner).unwrap().current().concat();
        assert_eq!(compare(&cache, &kv), Ok(()));
    }
    let accepted = BOTH_ACCEPTED.load(std::sync::atomic::Ordering::Relaxed) - before;
    eprintln!("{accepted} of 600 generated inputs accepted by both and compared");
    assert!(
        accepted >= 30,
        "only {accepted} of 600 generated inputs were accepted by both"
    );
}
