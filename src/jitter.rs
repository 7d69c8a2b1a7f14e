//! Randomness for jitter. Not cryptographic: it only spreads clients apart in time.

use std::hash::{BuildHasher, RandomState};

/// 64 random bits.
pub(crate) fn random_u64() -> u64 {
    // Every RandomState is freshly seeded, so hashing nothing gives an unpredictable u64.
    RandomState::new().hash_one(())
}

/// A number in [0, 1).
pub(crate) fn unit_random() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_unit_interval_and_varies() {
        let samples: Vec<f64> = (0..1000).map(|_| unit_random()).collect();
        assert!(samples.iter().all(|x| (0.0..1.0).contains(x)));
        let distinct = samples
            .iter()
            .map(|x| x.to_bits())
            .collect::<std::collections::HashSet<_>>();
        assert!(distinct.len() > 990);
    }
}
