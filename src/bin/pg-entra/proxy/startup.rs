//! The first packet a PostgreSQL client sends, read from untrusted bytes: a TLS or GSSAPI
//! encryption request, a cancel request, or the startup message with its parameters.
//!
//! Rules from PostgreSQL's `ProcessStartupPacket` (`src/backend/tcop/backend_startup.c`) and
//! the protocol chapter "Message Formats". Any input gives a [`Packet`] or a
//! [`StartupError`], never a panic; the fuzz target `startup_packet` and this file's property
//! test hold it to that. Standard library only, so that the fuzz crate can include this file.

use std::fmt;

/// The shortest packet: its length and its code.
pub(crate) const MIN_PACKET: usize = 8;
/// The longest startup packet PostgreSQL reads (`MAX_STARTUP_PACKET_LENGTH`); longer is a
/// client error, not a bigger buffer.
pub(crate) const MAX_PACKET: usize = 10_000;

/// Protocol 3.x: major version 3 in the high 16 bits of the code.
const PROTOCOL_3: u32 = 3 << 16;
/// Codes PostgreSQL reserves in the major version 1234.
const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;
const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;
const GSSENC_REQUEST_CODE: u32 = (1234 << 16) | 5680;
/// Protocol 3.2 allows cancel keys of up to 256 bytes; 3.0 has exactly 4.
const LONGEST_CANCEL_KEY: usize = 256;

/// What a client's first (or, after an encryption request, second) packet asks for.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Packet {
    /// `SSLRequest`: TLS on this connection.
    SslRequest,
    /// `GSSENCRequest`: GSSAPI encryption on this connection.
    GssEncRequest,
    /// `CancelRequest`: cancel the query of the session these keys belong to.
    Cancel {
        /// The backend process ID the session was given.
        process_id: u32,
        /// The secret key the session was given (4 bytes in protocol 3.0).
        secret_key: Vec<u8>,
    },
    /// `StartupMessage`: open a session.
    Startup(Startup),
}

// The cancel key is a capability: not shown.
impl fmt::Debug for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Packet::SslRequest => f.write_str("SslRequest"),
            Packet::GssEncRequest => f.write_str("GssEncRequest"),
            Packet::Cancel { process_id, .. } => f
                .debug_struct("Cancel")
                .field("process_id", process_id)
                .finish_non_exhaustive(),
            Packet::Startup(startup) => startup.fmt(f),
        }
    }
}

/// A startup message: the protocol version asked for and the parameters, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Startup {
    /// The minor protocol version (`0` for 3.0; libpq 18 may ask for `2`).
    pub(crate) minor_version: u16,
    /// Every `name`/`value` pair but the protocol options, in the order sent. A name sent
    /// twice keeps its last value, as in PostgreSQL.
    pub(crate) parameters: Vec<(String, String)>,
    /// The names of protocol options (`_pq_.…`) the client asked for.
    pub(crate) protocol_options: Vec<String>,
}

impl Startup {
    /// The value of parameter `name`, if the client sent it.
    pub(crate) fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether the client asks for a replication connection (`replication` set to anything
    /// PostgreSQL reads as true, or to `database`).
    pub(crate) fn wants_replication(&self) -> bool {
        self.parameter("replication").is_some_and(|value| {
            !matches!(
                value.to_ascii_lowercase().as_str(),
                "false" | "off" | "no" | "0" | "f" | "n" | "of"
            )
        })
    }
}

/// Why a packet cannot be read. Each maps to the SQLSTATE PostgreSQL answers it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartupError {
    /// The length word is below 8 or above [`MAX_PACKET`].
    Length(i64),
    /// A protocol version this proxy does not speak (2.0 and older, 4 and newer).
    Version {
        /// The major version.
        major: u16,
        /// The minor version.
        minor: u16,
    },
    /// The packet's content does not follow the format.
    Malformed(&'static str),
}

impl StartupError {
    /// The SQLSTATE PostgreSQL reports this with.
    pub(crate) fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::Version { .. } => "0A000",
            StartupError::Length(_) | StartupError::Malformed(_) => "08P01",
        }
    }
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartupError::Length(length) => write!(
                f,
                "invalid length of startup packet: {length} (must be {MIN_PACKET} to {MAX_PACKET} bytes)"
            ),
            StartupError::Version { major, minor } => write!(
                f,
                "unsupported frontend protocol {major}.{minor}: the proxy speaks protocol 3"
            ),
            StartupError::Malformed(what) => write!(f, "invalid startup packet: {what}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// The whole packet's length (the length word counts itself), checked against
/// [`MIN_PACKET`]..=[`MAX_PACKET`] before anything more is read.
pub(crate) fn packet_length(length_word: [u8; 4]) -> Result<usize, StartupError> {
    let length = i32::from_be_bytes(length_word);
    match usize::try_from(length) {
        Ok(length) if (MIN_PACKET..=MAX_PACKET).contains(&length) => Ok(length),
        _ => Err(StartupError::Length(i64::from(length))),
    }
}

/// Reads one whole packet, its length word included.
pub(crate) fn parse(packet: &[u8]) -> Result<Packet, StartupError> {
    let (length_word, rest) = split4(packet).ok_or(StartupError::Length(packet.len() as i64))?;
    let length = packet_length(length_word)?;
    if length != packet.len() {
        return Err(StartupError::Malformed(
            "the length word does not match the packet",
        ));
    }
    let (code, body) = split4(rest).ok_or(StartupError::Malformed("no protocol code"))?;
    let code = u32::from_be_bytes(code);
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => Err(StartupError::Malformed(
            "an encryption request carries nothing after its code",
        )),
        SSL_REQUEST_CODE => Ok(Packet::SslRequest),
        GSSENC_REQUEST_CODE => Ok(Packet::GssEncRequest),
        CANCEL_REQUEST_CODE => cancel(body),
        _ => {
            let (major, minor) = ((code >> 16) as u16, code as u16);
            if code & 0xFFFF_0000 != PROTOCOL_3 {
                return Err(StartupError::Version { major, minor });
            }
            startup(minor, body).map(Packet::Startup)
        }
    }
}

fn cancel(body: &[u8]) -> Result<Packet, StartupError> {
    let (process_id, secret_key) =
        split4(body).ok_or(StartupError::Malformed("a cancel request without its keys"))?;
    if !(4..=LONGEST_CANCEL_KEY).contains(&secret_key.len()) {
        return Err(StartupError::Malformed(
            "a cancel request's secret key must be 4 to 256 bytes",
        ));
    }
    Ok(Packet::Cancel {
        process_id: u32::from_be_bytes(process_id),
        secret_key: secret_key.to_vec(),
    })
}

/// `name\0value\0…\0`: pairs of NUL-terminated strings, then one more NUL.
fn startup(minor_version: u16, mut body: &[u8]) -> Result<Startup, StartupError> {
    let mut parameters: Vec<(String, String)> = Vec::new();
    let mut protocol_options = Vec::new();
    loop {
        let (name, rest) = c_string(body)?;
        if name.is_empty() {
            if !rest.is_empty() {
                return Err(StartupError::Malformed("bytes after the last parameter"));
            }
            break;
        }
        let (value, rest) = c_string(rest)?;
        body = rest;
        if name.starts_with("_pq_.") {
            protocol_options.push(name.to_owned());
            continue;
        }
        match parameters.iter_mut().find(|(key, _)| key == name) {
            Some((_, old)) => value.clone_into(old),
            None => parameters.push((name.to_owned(), value.to_owned())),
        }
    }
    Ok(Startup {
        minor_version,
        parameters,
        protocol_options,
    })
}

/// One NUL-terminated UTF-8 string and what follows it.
fn c_string(bytes: &[u8]) -> Result<(&str, &[u8]), StartupError> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed(
            "a string without its terminating zero byte",
        ))?;
    let text = std::str::from_utf8(&bytes[..end])
        .map_err(|_| StartupError::Malformed("a parameter that is not UTF-8"))?;
    Ok((text, &bytes[end + 1..]))
}

fn split4(bytes: &[u8]) -> Option<([u8; 4], &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<4>()?;
    Some((*head, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        bytes.extend(code.to_be_bytes());
        bytes.extend(body);
        bytes
    }

    #[test]
    fn reads_what_libpq_sends() {
        let body =
            b"user\0alice\0database\0postgres\0application_name\0psql\0client_encoding\0UTF8\0\0";
        let Packet::Startup(startup) = parse(&packet(PROTOCOL_3, body)).unwrap() else {
            panic!("a startup message")
        };
        assert_eq!(startup.minor_version, 0);
        assert_eq!(startup.parameter("user"), Some("alice"));
        assert_eq!(startup.parameter("database"), Some("postgres"));
        assert_eq!(startup.parameters.len(), 4);
        assert!(!startup.wants_replication());
        assert_eq!(
            parse(&packet(SSL_REQUEST_CODE, b"")),
            Ok(Packet::SslRequest)
        );
        assert_eq!(
            parse(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(Packet::GssEncRequest)
        );
        let cancel = parse(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4])).unwrap();
        assert_eq!(
            cancel,
            Packet::Cancel {
                process_id: 7,
                secret_key: vec![1, 2, 3, 4]
            }
        );
        assert!(!format!("{cancel:?}").contains("1, 2, 3, 4"), "{cancel:?}");
    }

    #[test]
    fn protocol_3_2_and_its_options_are_read_for_negotiation() {
        let body = b"user\0a\0_pq_.test_option\0x\0\0";
        let Packet::Startup(startup) = parse(&packet(PROTOCOL_3 | 2, body)).unwrap() else {
            panic!("a startup message")
        };
        assert_eq!(startup.minor_version, 2);
        assert_eq!(startup.protocol_options, ["_pq_.test_option"]);
        assert_eq!(startup.parameters, [("user".to_owned(), "a".to_owned())]);
    }

    #[test]
    fn refuses_what_postgresql_refuses() {
        assert_eq!(
            packet_length(4u32.to_be_bytes()),
            Err(StartupError::Length(4))
        );
        assert_eq!(
            packet_length(10_001u32.to_be_bytes()),
            Err(StartupError::Length(10_001))
        );
        assert_eq!(
            packet_length((-1i32).to_be_bytes()),
            Err(StartupError::Length(-1))
        );
        assert_eq!(
            parse(&packet(2 << 16, b"\0")),
            Err(StartupError::Version { major: 2, minor: 0 })
        );
        assert!(matches!(
            parse(&packet(PROTOCOL_3, b"user\0alice\0")),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            parse(&packet(PROTOCOL_3, b"user\0\xff\0\0")),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            parse(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 1, 2])),
            Err(StartupError::Malformed(_))
        ));
        let replication = b"user\0a\0replication\0database\0\0";
        let Ok(Packet::Startup(startup)) = parse(&packet(PROTOCOL_3, replication)) else {
            panic!("a startup message")
        };
        assert!(startup.wants_replication());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any bytes: a packet or an error, never a panic; what is read agrees with its
        /// length word.
        #[test]
        fn any_bytes_give_a_packet_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if parse(&bytes).is_ok() {
                prop_assert_eq!(packet_length(bytes[..4].try_into().unwrap()), Ok(bytes.len()));
            }
        }

        /// Well-formed startup messages come back as they were written.
        #[test]
        fn startup_messages_round_trip(
            pairs in proptest::collection::vec(("[a-z_]{1,12}", "[^\u{0}]{0,20}"), 0..8),
            minor in 0u16..4,
        ) {
            let mut body = Vec::new();
            for (name, value) in &pairs {
                body.extend(name.as_bytes());
                body.push(0);
                body.extend(value.as_bytes());
                body.push(0);
            }
            body.push(0);
            let bytes = packet(PROTOCOL_3 | u32::from(minor), &body);
            match parse(&bytes) {
                Ok(Packet::Startup(startup)) => {
                    prop_assert_eq!(startup.minor_version, minor);
                    for (name, _) in &pairs {
                        let last = pairs.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
                        if !name.starts_with("_pq_.") {
                            prop_assert_eq!(startup.parameter(name), last);
                        }
                    }
                }
                Err(StartupError::Length(_)) => prop_assert!(bytes.len() > MAX_PACKET),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
