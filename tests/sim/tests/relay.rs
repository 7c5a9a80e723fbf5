//! A relay's own rules (the spawn queue and its bound, connect deadlines,
//! the parent's keepalive) in the simulator. `ARBOR_SIM_SEEDS=N` runs more
//! seeds; a failing seed is printed and replays with `ARBOR_SIM_SEED=S`.

use std::time::Duration;

use arbor_core::relay::WAITING_SPAWNS_MAX;
use arbor_sim::relay::{run, RelayReport, RelayScenario};

fn seeds() -> Vec<u64> {
    arbor_sim::seeds(32)
}

fn check(seed: u64, s: RelayScenario) -> RelayReport {
    let r = run(seed, s);
    assert!(
        r.violations.is_empty(),
        "seed {seed} (replay: ARBOR_SIM_SEED={seed}): {:#?}",
        r.violations
    );
    r
}

const BASE: RelayScenario = RelayScenario {
    spawns: 200,
    max_connecting: 8,
    connect_timeout: Duration::from_secs(3),
    hang_percent: 10,
    fail_percent: 10,
    keepalive: Duration::from_secs(15),
    partition: None,
    run_for: Duration::from_secs(600),
};

#[test]
fn a_spawn_burst_above_the_bound_connects_in_order_within_it() {
    for seed in seeds() {
        let r = check(seed, BASE);
        assert_eq!(r.unanswered, 0, "seed {seed}: every spawn is answered");
        assert_eq!(r.spawned + r.failed.len(), 200, "seed {seed}");
        assert_eq!(
            r.most_connecting, 8,
            "seed {seed}: the bound is used, not passed"
        );
        // The hung tenth fail at their deadline, the refused tenth at once.
        let killed = r
            .failed
            .iter()
            .filter(|m| m.contains("did not join in time"))
            .count();
        let refused = r
            .failed
            .iter()
            .filter(|m| m.contains("Connection refused"))
            .count();
        assert_eq!(
            killed + refused,
            r.failed.len(),
            "seed {seed}: {:?}",
            r.failed
        );
        assert!(
            (5..=40).contains(&killed) && (5..=40).contains(&refused),
            "seed {seed}: {killed} {refused}"
        );
        assert_eq!(r.exited_at, None, "seed {seed}: the relay lives on");
    }
}

#[test]
fn spawns_past_the_waiting_bound_are_refused_at_once() {
    let s = RelayScenario {
        spawns: WAITING_SPAWNS_MAX + 100,
        max_connecting: 1,
        hang_percent: 100,
        fail_percent: 0,
        connect_timeout: Duration::from_secs(3),
        run_for: Duration::from_millis(100),
        ..BASE
    };
    let r = check(1, s);
    // One connects, the bound's worth waits, the rest are told why.
    assert_eq!(
        r.failed.len(),
        99,
        "{:?}",
        &r.failed[..r.failed.len().min(3)]
    );
    assert!(r
        .failed
        .iter()
        .all(|m| m.contains("children already wait to connect")));
    assert_eq!(r.unanswered, WAITING_SPAWNS_MAX + 1);
}

#[test]
fn a_partition_longer_than_the_keepalive_ends_the_relay() {
    for seed in seeds() {
        let keepalive = Duration::from_secs(6);
        let from = Duration::from_secs(5);
        let s = RelayScenario {
            keepalive,
            partition: Some((from, Duration::from_secs(30))),
            run_for: Duration::from_secs(60),
            ..BASE
        };
        let r = check(seed, s);
        let at = r.exited_at.expect("the relay ends");
        // The last ping came at most a third of the keepalive before the
        // partition, and it ends the moment the keepalive has passed.
        assert!(
            at > from + keepalive - keepalive / 3
                && at <= from + keepalive + Duration::from_millis(50),
            "seed {seed}: ended at {at:?}"
        );
    }
}

#[test]
fn a_partition_shorter_than_the_keepalive_is_ridden_out() {
    for seed in seeds() {
        let s = RelayScenario {
            keepalive: Duration::from_secs(6),
            partition: Some((Duration::from_secs(5), Duration::from_secs(3))),
            ..BASE
        };
        let r = check(seed, s);
        assert_eq!(r.exited_at, None, "seed {seed}");
        assert_eq!(r.unanswered, 0, "seed {seed}");
    }
}
