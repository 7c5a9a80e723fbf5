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

#[test]
fn only_a_joined_child_relay_is_moved_to_quic_and_only_a_relays_requests_name_a_subject() {
    use arbor_core::relay::{Action, Relay, PARENT};
    use arbor_wire::control::{self, QuicOffer, Reply, Request};
    use arbor_wire::{msg, Frame, Kind, NodeId, StreamId};
    let t = std::time::Instant::now();
    let mut relay = Relay::new(t, NodeId(1));
    let ask = |relay: &mut Relay, dst: u32, req: &Request, stream: u32| {
        let f = Frame::new(
            Kind::Request,
            NodeId(dst),
            NodeId::CONTROLLER,
            StreamId(stream),
            control::encode(req),
        );
        relay.handle_frame(t, PARENT, f);
    };
    let offer = QuicOffer {
        ip: Some("10.0.0.2".into()),
        port: 4433,
        cert_sha256: [1; 32],
        secret: [2; 32],
    };
    let connect = |node: u32| Request::QuicConnect {
        node: NodeId(node),
        offer: offer.clone(),
        timeout_ms: 3000,
        idle_ms: 30_000,
    };
    // n10 a relay, n11 an agent, both started by this relay.
    let mut links = Vec::new();
    for node in [10, 11] {
        ask(
            &mut relay,
            1,
            &Request::Spawn(arbor_sim::spawn_of(NodeId(node), 10_000, 0)),
            node,
        );
        match relay.poll_action() {
            Some(Action::Spawn { link, .. }) => links.push(link),
            other => panic!("{other:?}"),
        }
    }
    // Not yet joined: refused.
    ask(&mut relay, 1, &connect(10), 20);
    let hellos: [&[u8]; 2] = [
        br#"{"pid":7,"relay":"0.1.0"}"#,
        br#"{"pid":8,"home":"/\"relay\":"}"#,
    ];
    for ((node, link), hello) in [10, 11].into_iter().zip(&links).zip(hellos) {
        relay.child_started(*link, node);
        let up = Frame::new(
            Kind::RouteAdd,
            NodeId::CONTROLLER,
            NodeId(node),
            StreamId(0),
            msg::encode(hello, b""),
        );
        relay.handle_frame(t, *link, up);
    }
    while relay.poll_action().is_some() {}
    for (node, stream) in [(10, 21), (11, 22), (99, 23)] {
        ask(&mut relay, 1, &connect(node), stream);
    }
    match relay.poll_action() {
        Some(Action::QuicConnect {
            link,
            src,
            stream,
            offer: o,
            ..
        }) => {
            assert_eq!(
                (link, src, stream),
                (links[0], NodeId::CONTROLLER, StreamId(21))
            );
            assert_eq!(*o, offer);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(relay.poll_action(), None);
    let mut errors: Vec<u32> = std::iter::from_fn(|| relay.poll_transmit())
        .filter(|(_, f)| f.kind == Kind::Reply)
        .filter(|(_, f)| {
            matches!(
                control::decode::<Reply>(&f.payload),
                Ok(Reply::Error { .. })
            )
        })
        .map(|(_, f)| f.stream.0)
        .collect();
    errors.sort();
    assert_eq!(errors, [20, 22, 23]);
    // An inject to the relay n10 is about its destination; the same bytes
    // to the agent n11 are its own business.
    let inject = control::encode(&Request::Inject {
        dst: NodeId(12),
        stream: StreamId(5),
        keys: vec!["k".into()],
    });
    let to = |dst: u32| {
        Frame::new(
            Kind::Request,
            NodeId(dst),
            NodeId::CONTROLLER,
            StreamId(5),
            inject.clone(),
        )
    };
    assert_eq!(relay.subject(&to(10)), Some(NodeId(12)));
    assert_eq!(relay.subject(&to(11)), None);
}

#[test]
fn a_forward_that_overtakes_its_pin_waits_for_it_and_holds_the_frames_behind_it() {
    use arbor_core::relay::{Action, Relay, PARENT};
    use arbor_wire::control::{self, Request};
    use arbor_wire::{msg, Frame, Kind, NodeId, StreamId};
    let t = std::time::Instant::now();
    let mut relay = Relay::new(t, NodeId(1));
    let to = |dst: u32, req: &Request| {
        Frame::new(
            Kind::Request,
            NodeId(dst),
            NodeId::CONTROLLER,
            StreamId(7),
            control::encode(req),
        )
    };
    relay.handle_frame(
        t,
        PARENT,
        to(
            1,
            &Request::Spawn(arbor_sim::spawn_of(NodeId(10), 10_000, 0)),
        ),
    );
    let link = match relay.poll_action() {
        Some(Action::Spawn { link, .. }) => link,
        other => panic!("{other:?}"),
    };
    relay.child_started(link, 10);
    let hello = msg::encode(br#"{"pid":7,"relay":"0.1.0"}"#, b"");
    relay.handle_frame(
        t,
        link,
        Frame::new(
            Kind::RouteAdd,
            NodeId::CONTROLLER,
            NodeId(10),
            StreamId(0),
            hello,
        ),
    );
    while relay.poll_transmit().is_some() {}
    let key = "pin:agent:00".to_string();
    // The forward (the lane of n10) overtook the pin (this relay's lane);
    // the spawn to n10 that names the pin came behind the forward.
    let forward = Request::Forward {
        dst: NodeId(10),
        keys: vec![key.clone()],
        max_bytes: 0,
    };
    relay.handle_frame(t, PARENT, to(1, &forward));
    let spawn = to(
        10,
        &Request::Spawn(arbor_sim::spawn_of(NodeId(11), 10_000, 0)),
    );
    relay.handle_frame(t, PARENT, spawn.clone());
    assert!(
        relay.poll_transmit().is_none(),
        "nothing goes to n10 before the pin"
    );
    relay.handle_frame(
        t,
        PARENT,
        to(
            1,
            &Request::Pin {
                key: key.clone(),
                data: vec![1, 2],
            },
        ),
    );
    let sent: Vec<(arbor_core::LinkId, Frame)> =
        std::iter::from_fn(|| relay.poll_transmit()).collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].0, link);
    assert_eq!(
        control::decode::<Request>(&sent[0].1.payload),
        Ok(Request::Pin {
            key,
            data: vec![1, 2]
        })
    );
    assert_eq!(sent[1], (link, spawn));
}
