//! What an identity endpoint's HTTP status means, decided once: the retry policy retries the
//! transient ones, and the error classification calls the other 4xx a refusal.

/// 404, 408, 429 and 5xx: worth another try (Microsoft's IMDS guidance; 410 has its own
/// window).
pub(crate) fn is_transient(status: u16) -> bool {
    matches!(status, 404 | 408 | 429) || (500..600).contains(&status)
}

/// A 4xx that is neither transient nor IMDS's 410 ("restarting"): the endpoint answered and
/// said no.
pub(crate) fn is_refusal(status: u16) -> bool {
    (400..500).contains(&status) && !is_transient(status) && status != 410
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_is_transient_a_refusal_or_neither() {
        for status in 100..600u16 {
            assert!(!(is_transient(status) && is_refusal(status)), "{status}");
        }
        assert!([404, 408, 429, 500, 503].iter().all(|s| is_transient(*s)));
        assert!([400, 401, 403, 405].iter().all(|s| is_refusal(*s)));
        assert!(!is_transient(410) && !is_refusal(410));
        assert!(!is_transient(307) && !is_refusal(307));
    }
}
