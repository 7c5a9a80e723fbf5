//! Relay caches and the daemon's mirror of them under load, with entries
//! evicted all the time. `ARBOR_SIM_SEEDS=N` runs more seeds; a failing
//! seed replays with `ARBOR_SIM_SEED=S`.

use arbor_sim::cache::{run, CacheScenario};

fn seeds() -> Vec<u64> {
    arbor_sim::seeds(16)
}

#[test]
fn the_mirror_holds_what_each_relay_holds_while_entries_are_evicted() {
    let s = CacheScenario {
        agents: 5,
        keys: 40,
        requests: 400,
        cache_bytes: 64 << 10,
        entry_max: 24 << 10,
    };
    for seed in seeds() {
        let r = run(seed, s);
        assert!(
            r.violations.is_empty(),
            "seed {seed} (replay: ARBOR_SIM_SEED={seed}): {:#?}",
            &r.violations[..r.violations.len().min(5)]
        );
        assert_eq!(r.injected, 400, "seed {seed}");
        assert!(
            r.evictions_seen > 50,
            "seed {seed}: the load evicts ({} times)",
            r.evictions_seen
        );
        // An entry is put at most once per request, forwarded at most once.
        assert!(
            r.puts <= 400 && r.forwards <= 400 && r.puts > 40,
            "seed {seed}: {r:?}"
        );
    }
}

#[test]
fn an_inject_that_overtakes_its_entry_waits_for_it_and_keeps_the_order() {
    let v = arbor_sim::cache::overtaken_inject(false);
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn an_entry_that_never_comes_releases_the_agent_at_the_bound() {
    let v = arbor_sim::cache::overtaken_inject(true);
    assert!(v.is_empty(), "{v:#?}");
}
