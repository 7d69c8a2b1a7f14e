//! Whether a text gives a secret away, in any encoding an echo may use.
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
pub(crate) const PIECE_CHARS: usize = 8;

/// What is shown instead of a text that echoed a secret.
pub(crate) const WITHHELD: &str =
    "(the answer's text is withheld: it quoted a secret the request carried)";

/// Whether `text` contains `secret`, or any [`PIECE_CHARS`]-character piece of it, in any of
/// the encodings above (ASCII case ignored). An empty secret is never found.
pub(crate) fn echoes(text: &str, secret: &str) -> bool {
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
    const DECODERS: [fn(&str) -> Option<String>; 4] = [
        percent_decoded,
        form_decoded,
        json_unescaped,
        html_unescaped,
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
