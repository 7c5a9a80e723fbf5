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

/// Pins: what every spawn uses (the agent's code, known_hosts) is kept
/// once per relay, named by each spawn, bounded, and refused by name
/// when it is not held.
#[test]
fn pinned_code_goes_into_each_spawn_and_pins_are_bounded() {
    use arbor_core::relay::{Action, Relay, PARENT};
    use arbor_wire::control::{self, Reply, Request, PINS_MAX};
    use arbor_wire::{Frame, Kind, NodeId, StreamId};
    let t = std::time::Instant::now();
    let mut relay = Relay::new(t, NodeId(1));
    let ask = |relay: &mut Relay, req: &Request, stream: u32| {
        let f = Frame::new(
            Kind::Request,
            NodeId(1),
            NodeId::CONTROLLER,
            StreamId(stream),
            control::encode(req),
        );
        relay.handle_frame(t, PARENT, f);
    };
    for i in 0..PINS_MAX + 1 {
        ask(
            &mut relay,
            &Request::Pin {
                key: format!("p{i}"),
                data: vec![i as u8; 3],
            },
            0,
        );
    }
    let spawn = |relay: &mut Relay, node: u32, pin: &str| {
        let mut s = arbor_sim::spawn_of(NodeId(node), 10_000, 0);
        s.preamble = b"code:".to_vec();
        s.preamble_pinned = Some(pin.to_string());
        ask(relay, &Request::Spawn(s), node);
    };
    spawn(&mut relay, 10, "p0");
    match relay.poll_action() {
        Some(Action::Spawn { preamble, .. }) => assert_eq!(preamble, b"code:\0\0\0"),
        other => panic!("{other:?}"),
    }
    // The pin past the bound was not kept; one never sent is not held.
    for (node, pin) in [(11, format!("p{PINS_MAX}")), (12, "nosuch".to_string())] {
        spawn(&mut relay, node, &pin);
        assert_eq!(relay.poll_action(), None, "n{node} is not started");
        let reply = std::iter::from_fn(|| relay.poll_transmit())
            .find(|(_, f)| f.kind == Kind::Reply && f.stream == StreamId(node))
            .map(|(_, f)| control::decode::<Reply>(&f.payload).expect("a reply"));
        match reply {
            Some(Reply::Failed { node: n, message }) => {
                assert_eq!(n, NodeId(node));
                assert!(
                    message.contains(&format!("this relay does not hold {pin}")),
                    "{message}"
                );
            }
            other => panic!("n{node}: {other:?}"),
        }
    }
}
