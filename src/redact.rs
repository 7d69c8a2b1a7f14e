//! Whether a text gives a secret away, in any encoding an echo may use: for a program that
//! relays a server's or an endpoint's text (the `pg-entra proxy` relays login refusals) and
//! must not relay a token with it.
//!
//! An identity endpoint or a server that echoes its request can put what the request carried
//! (a client secret, an App Service header, an Arc key, the token sent as a password) into
//! the text of its answer: raw, percent-encoded (`~` as `%7E`), form-encoded (` ` as `+`),
//! JSON-escaped (`\u007e`) or as HTML character references. Matching the exact bytes misses
//! all but the first, and matching after a text is cut short misses a prefix. So the whole
//! text is decoded every such way first, and any run of [`PIECE_CHARS`] characters of the
//! secret found in any decoding counts: a text that echoes a secret is withheld whole,
//! never quoted.

use std::collections::HashSet;

/// The length of a secret's piece that gives it away: long enough that ordinary words do not
/// match by chance, short enough that a cut-off echo still does. Secrets shorter than this
/// count only whole.
pub const PIECE_CHARS: usize = 8;

/// What is shown instead of a text that echoed a secret.
pub const WITHHELD: &str =
    "(the answer's text is withheld: it quoted a secret the request carried)";

/// Whether `text` contains `secret`, or any [`PIECE_CHARS`]-character piece of it, in any of
/// the encodings above (ASCII case ignored). An empty secret is never found.
///
/// ```
/// use pg_entra::redact::echoes;
///
/// let token = "eyJ0eXAiOiJKV1QifQ.eyJvaWQiOiIxIn0.c2lnbmF0dXJl";
/// // A cut-off, percent-encoded echo still counts.
/// assert!(echoes("password \"eyJ0eXAiOiJKV1QifQ%2EeyJv…\" refused", token));
/// assert!(!echoes("password authentication failed for user \"app\"", token));
/// ```
pub fn echoes(text: &str, secret: &str) -> bool {
    echoes_any(text, &[secret])
}

/// Whether `text` echoes any of `secrets` (see [`echoes`]).
pub(crate) fn echoes_any(text: &str, secrets: &[&str]) -> bool {
    let secrets: Vec<String> = secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .map(|secret| secret.to_ascii_lowercase())
        .collect();
    if secrets.is_empty() || text.is_empty() {
        return false;
    }
    let mut short: Vec<&str> = Vec::new();
    let mut pieces: HashSet<&str> = HashSet::new();
    for secret in &secrets {
        let bounds = char_bounds(secret);
        if bounds.len() <= PIECE_CHARS {
            short.push(secret);
        } else {
            pieces.extend(
                bounds
                    .windows(PIECE_CHARS + 1)
                    .map(|w| &secret[w[0]..w[PIECE_CHARS]]),
            );
        }
    }
    decodings(text).iter().any(|form| {
        let form = form.to_ascii_lowercase();
        short.iter().any(|secret| form.contains(secret))
            || (!pieces.is_empty() && {
                let bounds = char_bounds(&form);
                bounds
                    .windows(PIECE_CHARS + 1)
                    .any(|w| pieces.contains(&form[w[0]..w[PIECE_CHARS]]))
            })
    })
}

/// The byte offset of every character of `text`, and its end.
fn char_bounds(text: &str) -> Vec<usize> {
    text.char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(text.len()))
        .collect()
}

/// `text` as written and as each decoder (and each pair of them, for an echo encoded twice)
/// reads it.
fn decodings(text: &str) -> Vec<String> {
    const DECODERS: [fn(&str) -> Option<String>; 8] = [
        percent_decoded,
        form_decoded,
        json_unescaped,
        html_unescaped,
        hex_unescaped,
        without_markup,
        compacted,
        base64_decoded,
    ];
    let mut forms = vec![text.to_owned()];
    for _ in 0..2 {
        let mut next = Vec::new();
        for form in &forms {
            for decode in DECODERS {
                if let Some(decoded) = decode(form)
                    && !forms.contains(&decoded)
                    && !next.contains(&decoded)
                {
                    next.push(decoded);
                }
            }
        }
        forms.extend(next);
    }
    forms
}

/// `%XX` sequences decoded; `None` when there are none.
fn percent_decoded(text: &str) -> Option<String> {
    text.contains('%').then(|| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    })
}

/// As an `application/x-www-form-urlencoded` value: `+` is a space, then `%XX` decoded.
fn form_decoded(text: &str) -> Option<String> {
    text.contains('+').then(|| {
        percent_encoding::percent_decode_str(&text.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    })
}

/// JSON string escapes (`\uXXXX`, `\/`, `\"`, …) decoded; `None` when there are none.
fn json_unescaped(text: &str) -> Option<String> {
    if !text.contains('\\') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = (hex.len() == 4)
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten();
                match code {
                    // A lone half of a surrogate pair stands for a character the secret's
                    // pieces cannot be made of anyway.
                    Some(code) => out.push(char::from_u32(code).unwrap_or('\u{fffd}')),
                    None => {
                        out.push_str("\\u");
                        out.push_str(&hex);
                    }
                }
            }
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Some(out)
}

/// `\xNN` and `%uXXXX` escapes (C, Python, JavaScript's `escape`) decoded; `None` when there
/// are none.
fn hex_unescaped(text: &str) -> Option<String> {
    if !text.contains("\\x") && !text.contains("%u") {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let digits = if rest.starts_with("\\x") {
            2
        } else if rest.starts_with("%u") {
            4
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        };
        let decoded = rest
            .get(2..2 + digits)
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .and_then(char::from_u32);
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[2 + digits..];
            }
            None => {
                out.push_str(&rest[..2]);
                rest = &rest[2..];
            }
        }
    }
    Some(out)
}

/// The text with markup (`<…>`) taken out and nothing put in its place: `<wbr>` or a tag
/// between two halves of a secret must not hide it.
fn without_markup(text: &str) -> Option<String> {
    if !text.contains('<') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    Some(out)
}

/// Whitespace, and the formatting characters a reader does not see (soft hyphen, zero-width
/// space and joiners, direction marks, word joiner, byte-order mark).
fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}'
        )
}

/// The text without what a reader does not see between the pieces of a secret.
fn compacted(text: &str) -> Option<String> {
    text.chars()
        .any(is_invisible)
        .then(|| text.chars().filter(|c| !is_invisible(*c)).collect())
}

/// Each run of base64 or base64url characters long enough to hold a piece of a secret,
/// decoded (a `Basic` header echoed back, say); `None` when there is none.
fn base64_decoded(text: &str) -> Option<String> {
    use base64::Engine as _;
    const SHORTEST_RUN: usize = 12;
    let is_base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_');
    let mut decoded = Vec::new();
    for run in text.split(|c: char| !is_base64(c)) {
        if run.len() < SHORTEST_RUN {
            continue;
        }
        let url_safe = run.replace('+', "-").replace('/', "_");
        // A length of 4n+1 cannot all be base64: the last character is not part of it.
        let usable = match url_safe.len() % 4 {
            1 => &url_safe[..url_safe.len() - 1],
            _ => &url_safe[..],
        };
        if let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(usable) {
            decoded.extend_from_slice(&bytes);
            decoded.push(b' ');
        }
    }
    (!decoded.is_empty()).then(|| String::from_utf8_lossy(&decoded).into_owned())
}

/// HTML character references (`&#126;`, `&#x7E;`, `&amp;`, …) decoded; `None` when there
/// are none.
fn html_unescaped(text: &str) -> Option<String> {
    if !text.contains('&') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let reference = rest[1..]
            .find(';')
            .filter(|end| *end <= 10)
            .map(|end| &rest[1..=end]);
        let decoded = reference.and_then(|name| match name {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => {
                let number = name.strip_prefix('#')?;
                let code = match number.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => number.parse().ok()?,
                };
                char::from_u32(code)
            }
        });
        match (reference, decoded) {
            (Some(name), Some(c)) => {
                out.push(c);
                rest = &rest[name.len() + 2..];
            }
            _ => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "Qx7~rT_9.vLm2-Kp8sW4";

    #[test]
    fn every_encoding_of_the_whole_secret() {
        let percent_all: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
        let json_all: String = SECRET
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        let html_all: String = SECRET.chars().map(|c| format!("&#{};", c as u32)).collect();
        for text in [
            format!("client_secret={SECRET}&x=1"),
            format!("client_secret={}", SECRET.replace('~', "%7E")),
            format!("client_secret={}", SECRET.replace('~', "%7e")),
            percent_all.clone(),
            json_all,
            html_all,
            SECRET.to_ascii_uppercase(),
            SECRET.bytes().map(|b| format!("\\x{b:02x}")).collect(),
            SECRET
                .chars()
                .map(|c| format!("%u{:04X}", c as u32))
                .collect(),
            // Invisible characters or markup between its pieces.
            SECRET.chars().flat_map(|c| [c, '\u{200b}']).collect(),
            SECRET.chars().flat_map(|c| [c, '\u{ad}', ' ']).collect(),
            format!("{}<wbr>{}", &SECRET[..6], &SECRET[6..]),
            {
                use base64::Engine as _;
                let basic =
                    base64::engine::general_purpose::STANDARD.encode(format!("app:{SECRET}"));
                format!("Authorization: Basic {basic}")
            },
            // Percent-encoded, then JSON-escaped inside an answer.
            serde_json::to_string(&percent_all.replace('%', "%25")).unwrap(),
        ] {
            assert!(echoes(&text, SECRET), "{text}");
        }
    }

    #[test]
    fn a_piece_of_the_secret_counts_and_a_word_does_not() {
        assert!(echoes(&format!("header: {}", &SECRET[..12]), SECRET));
        assert!(echoes(&format!("…{}", &SECRET[10..18]), SECRET));
        assert!(!echoes(&format!("…{}", &SECRET[10..17]), SECRET));
        assert!(!echoes(
            "AADSTS7000215: Invalid client secret provided.",
            SECRET
        ));
        assert!(!echoes("anything", ""));
        // A short secret counts only whole.
        assert!(echoes("key=s3%21", "s3!"));
        assert!(!echoes("s3", "s3!"));
    }

    #[test]
    fn decoders_leave_malformed_input_alone() {
        assert_eq!(json_unescaped(r"a\u12"), Some(r"a\u12".to_owned()));
        assert_eq!(
            html_unescaped("a & b &#xZZ; &#126;"),
            Some("a & b &#xZZ; ~".to_owned())
        );
        assert_eq!(percent_decoded("100%"), Some("100%".to_owned()));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// The ways an endpoint has been seen to echo what it was sent.
    fn echo(secret: &str, shape: u8) -> String {
        match shape % 6 {
            0 => secret.to_owned(),
            1 => secret.bytes().map(|b| format!("%{b:02X}")).collect(),
            2 => form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
            3 => serde_json::to_string(secret).unwrap(),
            4 => secret
                .chars()
                .map(|c| format!("\\u{:04X}", c as u32))
                .collect(),
            _ => secret
                .chars()
                .map(|c| format!("&#x{:x};", c as u32))
                .collect(),
        }
    }

    proptest! {
        #[test]
        fn any_echo_of_a_secret_is_found(
            secret in "[!-~]{8,48}",
            shape in any::<u8>(),
            before in "[a-z :=<>\"]{0,40}",
            after in "[a-z :=<>\"]{0,40}",
        ) {
            let text = format!("{before}{}{after}", echo(&secret, shape));
            prop_assert!(echoes(&text, &secret), "{}", text);
        }

        #[test]
        fn never_panics(text in ".{0,200}", secret in ".{0,40}") {
            let _ = echoes(&text, &secret);
        }
    }
}
