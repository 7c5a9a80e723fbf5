//! The router core in a simulated tree: 1 controller, relays, leaves.
//! `ARBOR_SIM_SEEDS=N` runs more seeds; a failing seed is printed and can be
//! replayed with `ARBOR_SIM_SEED=S`.

use arbor_sim::{Outcome, Scenario, Sim};

fn seeds() -> Vec<u64> {
    arbor_sim::seeds(64)
}

fn check(seed: u64, s: Scenario) -> arbor_sim::Report {
    let r = Sim::run(seed, s);
    assert!(
        r.violations.is_empty(),
        "seed {seed} (replay: ARBOR_SIM_SEED={seed}): {:#?}",
        r.violations
    );
    assert_eq!(r.outcomes.len(), r.calls, "seed {seed}");
    r
}

#[test]
fn every_call_is_answered_in_a_healthy_tree() {
    let s = Scenario {
        relays: 2,
        leaves: 20,
        calls_per_leaf: 5,
        relay_crashes: 0,
        calls_to_strangers: 3,
        ..Scenario::default()
    };
    for seed in seeds() {
        let r = check(seed, s);
        assert_eq!(r.calls, 103);
        assert_eq!(r.replies, 100, "seed {seed}: every leaf answers");
        assert_eq!(r.errors, 3, "seed {seed}: strangers are undeliverable");
        assert!(r.frames_delivered >= 200);
    }
}

#[test]
fn a_crashed_relay_fails_only_its_own_leaves() {
    let s = Scenario {
        relays: 2,
        leaves: 20,
        calls_per_leaf: 3,
        relay_crashes: 1,
        calls_to_strangers: 0,
        ..Scenario::default()
    };
    for seed in seeds() {
        let r = check(seed, s);
        // Leaves are assigned round-robin: relay 1 has odd-indexed leaves.
        let crashed = r.crashed[0].0 as usize;
        for (stream, outcome) in &r.outcomes {
            let leaf = 3 + ((stream.0 as usize - 1) / 3);
            let under_crashed = 1 + (leaf - 3) % 2 == crashed;
            if !under_crashed {
                assert_eq!(
                    *outcome,
                    Outcome::Reply,
                    "seed {seed}: leaf {leaf} of a live relay failed"
                );
            } else if let Outcome::Error(why) = outcome {
                assert!(
                    why.contains("not in the tree") || why.contains("left the tree"),
                    "{why}"
                );
            }
        }
    }
}

#[test]
fn larger_tree_with_crashes_holds_its_invariants() {
    let s = Scenario {
        relays: 12,
        leaves: 240,
        calls_per_leaf: 2,
        relay_crashes: 3,
        calls_to_strangers: 5,
        ..Scenario::default()
    };
    for seed in seeds().into_iter().take(16) {
        let r = check(seed, s);
        assert!(r.max_queue < arbor_sim::QUEUE_BOUND);
    }
}

#[test]
fn crashes_partitions_delays_and_impostors_in_a_large_tree() {
    let s = Scenario {
        relays: 16,
        leaves: 240,
        calls_per_leaf: 2,
        relay_crashes: 2,
        calls_to_strangers: 5,
        leaf_crashes: 12,
        partitions: 4,
        jitter_ms: 50,
        impostors: 6,
    };
    let mut errors = 0;
    let seeds = seeds();
    for &seed in &seeds {
        let r = check(seed, s);
        assert!(r.max_queue < arbor_sim::QUEUE_BOUND);
        errors += r.errors;
    }
    // The faults did bite: calls to crashed or cut-off leaves failed.
    assert!(errors > seeds.len() * 5, "{errors}");
}
