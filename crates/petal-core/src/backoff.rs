//! Retrying with exponential backoff and jitter (one home for every
//! reconnecting loop: the gRPC client, the Fleet node), and the 64-bit
//! mixer that derives seeds and jitter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The splitmix64 finalizer: a bijective scramble of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A factor in [0.5, 1], different for every call and process (the delay
/// jitter; it need not be a strong random number).
pub fn jitter() -> f64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let z = mix64(
        nanos
            ^ (u64::from(std::process::id()) << 32)
            ^ CALLS
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    0.5 + 0.5 * (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Exponential backoff with jitter: each delay is drawn between half and
/// all of its nominal value, which doubles up to `max`, so peers that
/// lost a server together do not return together.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    next: Duration,
    max: Duration,
    max_attempts: u32,
    /// Failed attempts so far.
    pub attempts: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`, gives up after `max_attempts` failures.
    pub fn new(initial: Duration, max: Duration, max_attempts: u32) -> Self {
        Backoff {
            initial,
            next: initial,
            max,
            max_attempts: max_attempts.max(1),
            attempts: 0,
        }
    }

    /// Counts a failed attempt; the delay before the next, or `None` when
    /// the attempts are used up.
    pub fn failed(&mut self) -> Option<Duration> {
        self.attempts += 1;
        if self.attempts >= self.max_attempts {
            return None;
        }
        let delay = self.next.mul_f64(jitter());
        self.next = (self.next * 2).min(self.max);
        Some(delay)
    }

    /// Forgets the failures (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_gives_up() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(300), 4);
        let d: Vec<Duration> = (0..3).map(|_| b.failed().unwrap()).collect();
        for (got, nominal) in d.iter().zip([100, 200, 300]) {
            let nominal = Duration::from_millis(nominal);
            assert!(
                *got >= nominal / 2 && *got <= nominal,
                "{got:?} vs {nominal:?}"
            );
        }
        assert_eq!(b.failed(), None);
        b.reset();
        assert!(b.failed().unwrap() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_varies_within_its_range() {
        let j: Vec<f64> = (0..100).map(|_| jitter()).collect();
        assert!(j.iter().all(|x| (0.5..=1.0).contains(x)));
        assert!(j.iter().any(|&x| x != j[0]));
    }
}
