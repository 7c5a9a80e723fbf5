//! A stream's credit window: the sender keeps at most `size` bytes in
//! flight beyond what the receiver has consumed (it says so in `Credit`
//! frames), and gives up if a full window waits longer than `stall` for
//! the receiver to take anything (an agent that is stopped, a disk that
//! hangs). Small requests to other hosts then wait behind little.

use std::time::{Duration, Instant};

/// What the receiver reports when it drops the stream (it failed, and
/// says why in its answer).
pub const DROPPED: u64 = u64::MAX;

#[derive(Debug, PartialEq, Eq)]
pub enum Reserve {
    /// The bytes fit: send them.
    Go,
    /// Wait for credit (until [`Window::poll_timeout`] at the latest).
    Wait,
    /// The receiver dropped the stream.
    Dropped,
    /// The window has been full for `stall` with no credit.
    Stalled(Duration),
}

#[derive(Debug)]
pub struct Window {
    sent: u64,
    consumed: u64,
    size: u64,
    stall: Duration,
    /// Since when a full window has waited with no credit.
    waiting_since: Option<Instant>,
}

impl Window {
    pub fn new(size: u64, stall: Duration) -> Self {
        Window {
            sent: 0,
            consumed: 0,
            size,
            stall,
            waiting_since: None,
        }
    }

    /// The receiver has consumed `consumed` bytes in all ([`DROPPED`]: it
    /// dropped the stream).
    pub fn credit(&mut self, now: Instant, consumed: u64) {
        if consumed > self.consumed {
            self.consumed = consumed;
            if self.waiting_since.is_some() {
                self.waiting_since = Some(now);
            }
        }
    }

    /// Whether `len` more bytes may go now; if so they count as sent.
    pub fn reserve(&mut self, now: Instant, len: usize) -> Reserve {
        if self.consumed == DROPPED {
            return Reserve::Dropped;
        }
        if self.sent + len as u64 <= self.consumed.saturating_add(self.size) {
            self.sent += len as u64;
            self.waiting_since = None;
            return Reserve::Go;
        }
        let since = *self.waiting_since.get_or_insert(now);
        if now.duration_since(since) >= self.stall {
            return Reserve::Stalled(self.stall);
        }
        Reserve::Wait
    }

    /// When a waiting sender must look again (its stall deadline).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.waiting_since.map(|t| t + self.stall)
    }

    /// Bytes sent and not yet consumed.
    pub fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.consumed.min(self.sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_paces_by_credit_and_gives_up_on_a_stalled_receiver() {
        let t0 = Instant::now();
        let stall = Duration::from_secs(300);
        let mut w = Window::new(100, stall);
        assert_eq!(w.reserve(t0, 60), Reserve::Go);
        assert_eq!(w.reserve(t0, 40), Reserve::Go);
        assert_eq!(w.reserve(t0, 1), Reserve::Wait);
        assert_eq!(w.poll_timeout(), Some(t0 + stall));
        // Credit that moves restarts the wait.
        let t1 = t0 + Duration::from_secs(200);
        w.credit(t1, 50);
        assert_eq!(w.reserve(t1, 60), Reserve::Wait);
        assert_eq!(w.poll_timeout(), Some(t1 + stall));
        assert_eq!(w.reserve(t1 + stall, 60), Reserve::Stalled(stall));
        w.credit(t1 + stall, 50); // no news: no restart
        assert_eq!(w.reserve(t1 + stall, 60), Reserve::Stalled(stall));
        w.credit(t1 + stall, DROPPED);
        assert_eq!(w.reserve(t1 + stall, 1), Reserve::Dropped);
    }
}
