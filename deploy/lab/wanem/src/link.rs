//! The model of one direction of the emulated WAN link, free of IO and clocks.
//!
//! A packet offered at `now` is first serialised onto the wire at the link's
//! rate (behind the packets already queued), then propagates for the one-way
//! delay. The queue in front of the wire is bounded in time (`queue_max`) and
//! in bytes (`QUEUE_BYTES_MAX`): a packet that would wait longer is dropped at
//! the tail, as a router's buffer would. Random loss is applied on entry.
//!
//! Delivery times never go backwards, so packets leave in the order they came
//! even when the delay is lowered while packets are in flight.

use std::time::{Duration, Instant};

/// Hard bound on the bytes held in one direction, whatever the settings.
pub const QUEUE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Settings of one direction of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkSettings {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Rate in bit/s; 0 means unlimited.
    pub rate_bps: u64,
    /// Loss probability in parts per million.
    pub loss_ppm: u32,
    /// Longest time a packet may wait for the wire before it is dropped.
    pub queue_max: Duration,
}

impl LinkSettings {
    /// Default queue: long enough to hold a bandwidth-delay product at the
    /// given delay so loss-based congestion control can fill the link, and
    /// never under 100 ms.
    pub fn default_queue(delay: Duration) -> Duration {
        (delay * 2).max(Duration::from_millis(100))
    }
}

/// Why a packet did not make it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Random loss.
    Loss,
    /// The queue in front of the wire was full.
    QueueFull,
}

/// Counters of one direction, since the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Packets handed to the far side.
    pub packets: u64,
    /// Bytes (whole Ethernet frames) handed to the far side.
    pub bytes: u64,
    /// Packets dropped by random loss.
    pub dropped_loss: u64,
    /// Packets dropped because the queue was full.
    pub dropped_queue: u64,
    /// Packets the far side's socket refused.
    pub send_errors: u64,
}

/// One direction of the link.
pub struct Link {
    settings: LinkSettings,
    /// When the wire is next free.
    wire_free_at: Option<Instant>,
    /// Latest delivery time handed out, to keep order.
    last_due: Option<Instant>,
    /// Bytes accepted and not yet delivered.
    queued_bytes: u64,
    rng: XorShift,
}

impl Link {
    pub fn new(settings: LinkSettings, seed: u64) -> Self {
        Self {
            settings,
            wire_free_at: None,
            last_due: None,
            queued_bytes: 0,
            rng: XorShift::new(seed),
        }
    }

    pub fn set_settings(&mut self, settings: LinkSettings) {
        self.settings = settings;
    }

    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// Offers a packet of `len` bytes at `now`. Returns when it must be
    /// delivered, or why it is dropped.
    pub fn offer(&mut self, now: Instant, len: usize) -> Result<Instant, Drop> {
        let len = len as u64;
        if self.settings.loss_ppm > 0
            && self.rng.below(1_000_000) < u64::from(self.settings.loss_ppm)
        {
            return Err(Drop::Loss);
        }
        if self.queued_bytes + len > QUEUE_BYTES_MAX {
            return Err(Drop::QueueFull);
        }
        let start = match self.wire_free_at {
            Some(t) if t > now => t,
            _ => now,
        };
        let on_wire = match (len * 8)
            .saturating_mul(1_000_000_000)
            .checked_div(self.settings.rate_bps)
        {
            None => start,
            Some(nanos) => {
                if start.duration_since(now) > self.settings.queue_max {
                    return Err(Drop::QueueFull);
                }
                start + Duration::from_nanos(nanos)
            }
        };
        self.wire_free_at = Some(on_wire);
        let mut due = on_wire + self.settings.delay;
        if let Some(last) = self.last_due {
            due = due.max(last);
        }
        self.last_due = Some(due);
        self.queued_bytes += len;
        Ok(due)
    }

    /// Records that a packet of `len` bytes left the link.
    pub fn delivered(&mut self, len: usize) {
        self.queued_bytes = self.queued_bytes.saturating_sub(len as u64);
    }
}

/// Small deterministic PRNG (xorshift64*), enough for loss decisions.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(delay_ms: u64, rate_bps: u64, loss_ppm: u32) -> LinkSettings {
        let delay = Duration::from_millis(delay_ms);
        LinkSettings {
            delay,
            rate_bps,
            loss_ppm,
            queue_max: LinkSettings::default_queue(delay),
        }
    }

    #[test]
    fn unlimited_rate_adds_only_delay() {
        let t0 = Instant::now();
        let mut link = Link::new(settings(50, 0, 0), 1);
        assert_eq!(link.offer(t0, 1500), Ok(t0 + Duration::from_millis(50)));
        assert_eq!(link.offer(t0, 1500), Ok(t0 + Duration::from_millis(50)));
    }

    #[test]
    fn rate_serialises_back_to_back_packets() {
        let t0 = Instant::now();
        // 10 Mbit/s: 1250 bytes take exactly 1 ms on the wire.
        let mut link = Link::new(settings(0, 10_000_000, 0), 1);
        let d1 = link.offer(t0, 1250).expect("accepted");
        let d2 = link.offer(t0, 1250).expect("accepted");
        assert_eq!(d1, t0 + Duration::from_millis(1));
        assert_eq!(d2, t0 + Duration::from_millis(2));
    }

    #[test]
    fn throughput_over_a_second_matches_rate() {
        let t0 = Instant::now();
        let mut link = Link::new(settings(20, 10_000_000, 0), 1);
        // Offer far more than the link can carry, spread over one second.
        let mut last = t0;
        let mut sent = 0u64;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            if let Ok(due) = link.offer(now, 1500) {
                last = due;
                sent += 1500;
            }
        }
        let secs = last.duration_since(t0).as_secs_f64() - 0.020;
        let rate = sent as f64 * 8.0 / secs;
        assert!((rate - 10e6).abs() / 10e6 < 0.01, "rate {rate}");
    }

    #[test]
    fn full_queue_drops_at_the_tail() {
        let t0 = Instant::now();
        let mut link = Link::new(settings(0, 1_000_000, 0), 1);
        // 100 ms of queue at 1 Mbit/s holds 12_500 bytes: about 8 full frames.
        let accepted = (0..100).filter(|_| link.offer(t0, 1500).is_ok()).count();
        assert!((8..=10).contains(&accepted), "accepted {accepted}");
        assert_eq!(link.offer(t0, 1500), Err(Drop::QueueFull));
    }

    #[test]
    fn loss_rate_is_close_to_setting() {
        let t0 = Instant::now();
        let mut link = Link::new(settings(0, 0, 50_000), 7);
        let lost = (0..100_000)
            .filter(|_| link.offer(t0, 100) == Err(Drop::Loss))
            .count();
        assert!((4_500..5_500).contains(&lost), "lost {lost}");
    }

    #[test]
    fn lowering_delay_keeps_order() {
        let t0 = Instant::now();
        let mut link = Link::new(settings(100, 0, 0), 1);
        let d1 = link.offer(t0, 100).expect("accepted");
        link.set_settings(settings(10, 0, 0));
        let d2 = link
            .offer(t0 + Duration::from_millis(1), 100)
            .expect("accepted");
        assert!(d2 >= d1);
    }

    #[test]
    fn byte_bound_holds_with_unlimited_rate() {
        let t0 = Instant::now();
        let mut link = Link::new(settings(1000, 0, 0), 1);
        let mut n = 0u64;
        while link.offer(t0, 65_536).is_ok() {
            n += 1;
        }
        assert_eq!(n * 65_536, QUEUE_BYTES_MAX);
        link.delivered(65_536);
        assert!(link.offer(t0, 65_536).is_ok());
    }
}
