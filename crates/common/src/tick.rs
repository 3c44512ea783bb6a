//! Hybrid timestamps: `physical_ms << 18 | logical`.

use std::fmt;

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 18;
/// Largest logical counter value within one millisecond.
pub const MAX_LOGICAL: u64 = (1 << LOGICAL_BITS) - 1;

/// A hybrid timestamp from the timestamp oracle: the order of messages within a pchannel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimeTick(pub u64);

impl TimeTick {
    /// Builds a tick from its physical milliseconds and logical counter.
    pub fn compose(physical_ms: u64, logical: u64) -> Self {
        debug_assert!(logical <= MAX_LOGICAL);
        Self(physical_ms << LOGICAL_BITS | (logical & MAX_LOGICAL))
    }

    /// Milliseconds since the Unix epoch.
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The counter within the millisecond.
    pub fn logical(self) -> u64 {
        self.0 & MAX_LOGICAL
    }
}

impl fmt::Display for TimeTick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_and_split_are_inverse_and_order_follows_physical_then_logical() {
        let t = TimeTick::compose(1_700_000_000_123, 42);
        assert_eq!(t.physical_ms(), 1_700_000_000_123);
        assert_eq!(t.logical(), 42);
        assert!(TimeTick::compose(5, MAX_LOGICAL) < TimeTick::compose(6, 0));
        assert!(TimeTick::compose(5, 1) < TimeTick::compose(5, 2));
    }
}
