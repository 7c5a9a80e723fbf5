//! Many file streams through one relay, each paced by its credit window
//! ([`arbor_core::window::Window`], the daemon's own rule), while one
//! receiver stops reading. Time is simulated; rates are bytes per second.
//!
//! The controller's uplink to the relay is one ordered link shared by all
//! streams; the relay forwards each stream's chunks to its receiver, which
//! consumes them at its own rate and credits what it consumed (after the
//! link's latency). The stopped receiver consumes nothing after `stop_at`.
//!
//! Checked: no stream ever has more than the window in flight (so the
//! relay never holds more than a window for the stopped receiver); every
//! other stream completes; the stopped one is given up exactly one stall
//! after its last credit.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use arbor_core::window::{Reserve, Window};

use crate::Rng;

#[derive(Clone, Copy, Debug)]
pub struct StreamsScenario {
    pub streams: usize,
    pub file_bytes: u64,
    pub chunk: u64,
    pub window: u64,
    pub stall: Duration,
    pub uplink_rate: f64,
    pub latency: Duration,
    /// Receivers' consuming rates are drawn between these.
    pub consume_rate: (f64, f64),
    /// Stream 0's receiver stops consuming at this time.
    pub stop_at: Duration,
}

#[derive(Debug, Default)]
pub struct StreamsReport {
    /// Per stream: when it completed, or was given up.
    pub completed: Vec<Option<Duration>>,
    pub stalled: Option<Duration>,
    /// Stream 0's last credit that moved its window.
    pub last_credit: Option<Duration>,
    pub most_in_flight: u64,
    pub violations: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A chunk of stream `i` reaches its receiver.
    Arrive(usize),
    /// Stream `i`'s receiver has consumed `n` bytes in all.
    Consumed(usize, u64),
    /// The credit reaches the sender.
    Credit(usize, u64),
    /// The sender of stream `i` looks again.
    Wake(usize),
}

struct Receiver {
    rate: f64,
    buffered: u64,
    consumed: u64,
    busy_until: Instant,
}

pub fn run(seed: u64, s: StreamsScenario) -> StreamsReport {
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();
    let mut q: BinaryHeap<Reverse<(Instant, Ev)>> = BinaryHeap::new();
    let mut windows: Vec<Window> = (0..s.streams)
        .map(|_| Window::new(s.window, s.stall))
        .collect();
    let mut sent = vec![0u64; s.streams];
    let mut rx: Vec<Receiver> = (0..s.streams)
        .map(|_| {
            let (lo, hi) = s.consume_rate;
            let rate = lo + (hi - lo) * (rng.below(1000) as f64 / 1000.0);
            Receiver {
                rate,
                buffered: 0,
                consumed: 0,
                busy_until: t0,
            }
        })
        .collect();
    let mut uplink_free = t0;
    let mut r = StreamsReport {
        completed: vec![None; s.streams],
        ..Default::default()
    };
    for i in 0..s.streams {
        q.push(Reverse((t0, Ev::Wake(i))));
    }
    let horizon = t0 + s.stop_at + s.stall * 4;
    while let Some(Reverse((now, ev))) = q.pop() {
        if now > horizon {
            break;
        }
        match ev {
            Ev::Wake(i) => {
                if r.completed[i].is_some() {
                    continue;
                }
                loop {
                    if sent[i] >= s.file_bytes {
                        break;
                    }
                    let len = s.chunk.min(s.file_bytes - sent[i]);
                    match windows[i].reserve(now, len as usize) {
                        Reserve::Go => {
                            sent[i] += len;
                            let start = uplink_free.max(now);
                            uplink_free =
                                start + Duration::from_secs_f64(len as f64 / s.uplink_rate);
                            q.push(Reverse((uplink_free + s.latency, Ev::Arrive(i))));
                            r.most_in_flight = r.most_in_flight.max(windows[i].in_flight());
                            if windows[i].in_flight() > s.window {
                                r.violations.push(format!(
                                    "stream {i}: {} in flight",
                                    windows[i].in_flight()
                                ));
                            }
                        }
                        Reserve::Wait => {
                            if let Some(t) = windows[i].poll_timeout() {
                                q.push(Reverse((t, Ev::Wake(i))));
                            }
                            break;
                        }
                        Reserve::Stalled(_) => {
                            r.completed[i] = Some(now - t0);
                            if i == 0 {
                                r.stalled = Some(now - t0);
                            } else {
                                r.violations.push(format!("stream {i} stalled"));
                            }
                            break;
                        }
                        Reserve::Dropped => break,
                    }
                }
            }
            Ev::Arrive(i) => {
                rx[i].buffered += s.chunk;
                if i == 0 && now >= t0 + s.stop_at {
                    continue;
                }
                let start = rx[i].busy_until.max(now);
                let done = start + Duration::from_secs_f64(s.chunk as f64 / rx[i].rate);
                rx[i].busy_until = done;
                if i == 0 && done >= t0 + s.stop_at {
                    continue; // stopped before it took this one
                }
                let consumed = (rx[i].consumed + s.chunk).min(s.file_bytes);
                rx[i].consumed = consumed;
                rx[i].buffered -= s.chunk;
                q.push(Reverse((done, Ev::Consumed(i, consumed))));
            }
            Ev::Consumed(i, n) => {
                if n >= s.file_bytes && r.completed[i].is_none() {
                    r.completed[i] = Some(now - t0);
                }
                q.push(Reverse((now + s.latency, Ev::Credit(i, n))));
            }
            Ev::Credit(i, n) => {
                windows[i].credit(now, n);
                if i == 0 {
                    r.last_credit = Some(now - t0);
                }
                q.push(Reverse((now, Ev::Wake(i))));
            }
        }
    }
    r
}
