//! The few server messages the proxy writes to its clients itself. Everything else a client
//! receives is the server's own bytes, relayed.
//!
//! postgres-protocol encodes only the frontend's messages, so these (formats from the
//! protocol chapter "Message Formats") are built here; each is checked by parsing it back with
//! postgres-protocol's backend parser.

/// The answer to `SSLRequest` and `GSSENCRequest`: no encryption on the local hop.
pub(crate) const ENCRYPTION_REFUSED: u8 = b'N';

/// One message: tag, length (counting itself), body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(body.len() + 5);
    bytes.push(tag);
    // Every body built here is far below 2 GiB (error texts are short).
    bytes.extend(((body.len() + 4) as u32).to_be_bytes());
    bytes.extend(body);
    bytes
}

/// `AuthenticationOk`: the proxy logged the session in upstream.
pub(crate) fn authentication_ok() -> Vec<u8> {
    message(b'R', &0u32.to_be_bytes())
}

/// `BackendKeyData` with the proxy's own keys for the session (a client's cancel request
/// comes back to the proxy with them).
pub(crate) fn backend_key_data(process_id: u32, secret_key: u32) -> Vec<u8> {
    let mut body = process_id.to_be_bytes().to_vec();
    body.extend(secret_key.to_be_bytes());
    message(b'K', &body)
}

/// `NegotiateProtocolVersion`: the newest minor version of protocol 3 the proxy speaks (`0`)
/// and the protocol options it does not know.
pub(crate) fn negotiate_protocol_version(options: &[String]) -> Vec<u8> {
    let mut body = 0u32.to_be_bytes().to_vec();
    body.extend((options.len() as u32).to_be_bytes());
    for option in options {
        push_c_string(&mut body, option);
    }
    message(b'v', &body)
}

/// A `FATAL` `ErrorResponse` with SQLSTATE `code`, `text` and an optional hint. PostgreSQL
/// clients (libpq, pgAdmin, JDBC) show all three.
pub(crate) fn fatal(code: &str, text: &str, hint: Option<&str>) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', text)] {
        body.push(field);
        push_c_string(&mut body, value);
    }
    if let Some(hint) = hint {
        body.push(b'H');
        push_c_string(&mut body, hint);
    }
    body.push(0);
    message(b'E', &body)
}

/// A string and its terminating zero; a zero inside would end the field early, so it is
/// dropped.
fn push_c_string(body: &mut Vec<u8>, text: &str) {
    body.extend(text.bytes().filter(|&b| b != 0));
    body.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use fallible_iterator::FallibleIterator as _;
    use postgres_protocol::message::backend::Message;

    fn parse_one(bytes: Vec<u8>) -> Message {
        let mut buf = BytesMut::from(&bytes[..]);
        let message = Message::parse(&mut buf)
            .unwrap()
            .expect("one whole message");
        assert!(buf.is_empty(), "exactly one message");
        message
    }

    #[test]
    fn postgres_protocol_reads_them_back() {
        assert!(matches!(
            parse_one(authentication_ok()),
            Message::AuthenticationOk
        ));
        let Message::BackendKeyData(keys) = parse_one(backend_key_data(42, 0xdead_beef)) else {
            panic!("BackendKeyData")
        };
        assert_eq!(keys.process_id(), 42);
        assert_eq!(keys.secret_key() as u32, 0xdead_beef);
        let Message::ErrorResponse(error) =
            parse_one(fatal("28P01", "refused\0 here", Some("do this")))
        else {
            panic!("ErrorResponse")
        };
        let fields: Vec<(u8, String)> = error
            .fields()
            .map(|f| {
                Ok((
                    f.type_(),
                    String::from_utf8_lossy(f.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .unwrap();
        assert!(fields.contains(&(b'C', "28P01".to_owned())));
        assert!(fields.contains(&(b'M', "refused here".to_owned())));
        assert!(fields.contains(&(b'H', "do this".to_owned())));
        assert!(fields.contains(&(b'S', "FATAL".to_owned())));
    }

    #[test]
    fn negotiate_protocol_version_lists_the_options() {
        let bytes = negotiate_protocol_version(&["_pq_.a".to_owned()]);
        assert_eq!(bytes[0], b'v');
        assert_eq!(&bytes[5..13], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&bytes[13..], b"_pq_.a\0");
        assert_eq!(
            u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize,
            bytes.len() - 1
        );
    }
}
