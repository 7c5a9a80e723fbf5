//! Credit windows in the simulator: one receiver stops reading while many
//! streams go through the same relay. `ARBOR_SIM_SEEDS=N` runs more seeds;
//! a failing seed replays with `ARBOR_SIM_SEED=S`.

use std::time::Duration;

use arbor_sim::streams::{run, StreamsScenario};

fn seeds() -> Vec<u64> {
    arbor_sim::seeds(16)
}

#[test]
fn a_receiver_that_stops_reading_holds_one_window_and_no_other_stream() {
    const MIB: u64 = 1 << 20;
    let s = StreamsScenario {
        streams: 20,
        file_bytes: 8 * MIB,
        chunk: 256 << 10,
        window: MIB,
        stall: Duration::from_secs(300),
        uplink_rate: 10e6,
        latency: Duration::from_millis(50),
        consume_rate: (2e6, 20e6),
        stop_at: Duration::from_millis(500),
    };
    for seed in seeds() {
        let r = run(seed, s);
        assert!(
            r.violations.is_empty(),
            "seed {seed} (replay: ARBOR_SIM_SEED={seed}): {:?}",
            r.violations
        );
        assert!(r.most_in_flight <= s.window, "seed {seed}");
        // The others finish as if the stopped stream took only its window
        // of the shared uplink (and the slowest reader's last chunks).
        let others = (s.streams as u64 - 1) * s.file_bytes + s.window;
        let bound = Duration::from_secs_f64(others as f64 / s.uplink_rate) + Duration::from_secs(3);
        for (i, done) in r.completed.iter().enumerate().skip(1) {
            let done = done.unwrap_or_else(|| panic!("seed {seed}: stream {i} did not complete"));
            assert!(
                done <= bound,
                "seed {seed}: stream {i} took {done:?} (bound {bound:?})"
            );
        }
        // The stopped one is given up one stall after its last credit.
        let last = r.last_credit.expect("it took something before it stopped");
        assert_eq!(r.stalled, Some(last + s.stall), "seed {seed}");
    }
}
