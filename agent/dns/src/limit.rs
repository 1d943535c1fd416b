//! The query rate bound.
use std::time::Instant;

/// A token bucket: `burst` queries at once, refilled at `per_second`. The clock is passed in.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: u32,
    burst: u32,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        Self { per_second, burst, tokens: f64::from(burst), last: now }
    }

    /// Takes one token; false when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(self.per_second)).min(f64::from(self.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let t = Instant::now();
        let mut bucket = TokenBucket::new(10, 3, t);
        assert!(bucket.take(t) && bucket.take(t) && bucket.take(t));
        assert!(!bucket.take(t), "the burst is spent");
        assert!(!bucket.take(t + Duration::from_millis(50)), "half a token is no token");
        assert!(bucket.take(t + Duration::from_millis(100)));
        assert!(!bucket.take(t + Duration::from_millis(100)));
        let later = t + Duration::from_secs(60);
        assert!(bucket.take(later) && bucket.take(later) && bucket.take(later));
        assert!(!bucket.take(later), "refill stops at the burst");
        assert!(!TokenBucket::new(0, 0, t).take(t), "a zero bucket admits nothing");
    }
}
