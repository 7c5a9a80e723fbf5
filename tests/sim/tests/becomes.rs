//! The bound on a target's interpreters (`arbor_core::becomes`) under tasks
//! that become many users on a few targets, with starts that fail and login
//! agents that are lost: every caller is answered once, a become agent
//! starts once at a time, and a target at its bound with a become agent up
//! makes room by ending the least recently used (one still starting is
//! never ended). A failing seed replays with `ARBOR_SIM_SEED=S`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use arbor_core::becomes::{BecomeSlot, Becomes, Decision, Outcome};
use arbor_sim::Rng;
use arbor_wire::NodeId;

type Answers = Rc<RefCell<Vec<(u64, Outcome)>>>;
type Waiter = (u64, Answers);

const PARENTS: u32 = 3;
const USERS: u64 = 9;
const INTERPRETERS_MAX: usize = 4;
const STEPS: u32 = 3000;

/// The test's own view of one become agent.
struct Agent {
    parent: NodeId,
    key: String,
    up: bool,
    last_used: u64,
}

#[test]
fn the_least_recently_used_makes_room_and_every_caller_is_answered_once() {
    for seed in arbor_sim::seeds(32) {
        let mut rng = Rng::new(seed);
        let answers: Answers = Rc::new(RefCell::new(Vec::new()));
        let mut b: Becomes<Waiter> =
            Becomes::new(INTERPRETERS_MAX, |(c, a), o| a.borrow_mut().push((c, o)));
        let mut agents: HashMap<NodeId, Agent> = HashMap::new();
        let mut starting: Vec<(NodeId, u32)> = Vec::new();
        let (mut clock, mut callers, mut next_node, mut evictions) = (0u64, 0u64, 100u32, 0);
        let fail = |msg: String| panic!("seed {seed} (replay: ARBOR_SIM_SEED={seed}): {msg}");
        for step in 0..STEPS {
            match rng.below(10) {
                0..=7 => {
                    let parent = NodeId(1 + rng.below(PARENTS as u64) as u32);
                    let key = format!("user{}", rng.below(USERS));
                    let start = rng.below(4) != 0;
                    clock += 1;
                    callers += 1;
                    let live: Vec<NodeId> = agents
                        .iter()
                        .filter(|(_, a)| a.parent == parent)
                        .map(|(n, _)| *n)
                        .collect();
                    let mine = agents
                        .iter()
                        .find(|(_, a)| a.parent == parent && a.key == key)
                        .map(|(n, _)| *n);
                    let before = answers.borrow().len();
                    let node = NodeId(next_node);
                    let d = b.slot(
                        parent,
                        key.clone(),
                        key.clone(),
                        start,
                        || node,
                        (callers, answers.clone()),
                    );
                    match d {
                        Decision::Start { node: n, evict } => {
                            next_node += 1;
                            if mine.is_some() {
                                fail(format!("step {step}: {key} on {parent} started again"));
                            }
                            let lru = live
                                .iter()
                                .filter(|n| agents[*n].up)
                                .min_by_key(|n| agents[*n].last_used)
                                .copied();
                            let want = if live.len() + 2 > INTERPRETERS_MAX {
                                lru
                            } else {
                                None
                            };
                            if evict != want {
                                fail(format!("step {step}: evicted {evict:?}, the least recently used is {want:?}"));
                            }
                            if let Some(old) = evict {
                                agents.remove(&old);
                                evictions += 1;
                            }
                            agents.insert(
                                n,
                                Agent {
                                    parent,
                                    key,
                                    up: false,
                                    last_used: clock,
                                },
                            );
                            starting.push((n, step + 1 + rng.below(5) as u32));
                        }
                        Decision::Answered => {
                            let got = answers.borrow()[before..].to_vec();
                            match (got.as_slice(), mine) {
                                ([(_, Ok(Some(BecomeSlot::Ready(n))))], Some(m))
                                    if *n == m && agents[&m].up =>
                                {
                                    if let Some(a) = agents.get_mut(&m) {
                                        a.last_used = clock;
                                    }
                                }
                                ([(_, Ok(None))], m)
                                    if !start && m.is_none_or(|m| !agents[&m].up) => {}
                                ([], Some(m)) if start && !agents[&m].up => {} // waits for the start
                                other => fail(format!(
                                    "step {step}: {key} on {parent} answered {other:?}"
                                )),
                            }
                        }
                    }
                }
                8 => {
                    // A login agent is lost: its become agents go with it.
                    let parent = NodeId(1 + rng.below(PARENTS as u64) as u32);
                    if rng.below(10) == 0 {
                        b.lost(parent, "gone");
                        agents.retain(|_, a| a.parent != parent);
                    }
                }
                _ => {}
            }
            let (due, later): (Vec<_>, Vec<_>) =
                starting.drain(..).partition(|(_, at)| *at <= step);
            starting = later;
            for (n, _) in due {
                let ok = rng.below(5) != 0;
                let known = b.settle(
                    n,
                    if ok {
                        Ok(())
                    } else {
                        Err("Incorrect sudo password".into())
                    },
                );
                match agents.get_mut(&n) {
                    Some(a) if ok => a.up = true,
                    Some(_) => {
                        agents.remove(&n);
                    }
                    None if known => fail(format!("step {step}: {n} settled but it was gone")),
                    None => {}
                }
            }
        }
        for (n, _) in starting {
            b.settle(n, Ok(()));
        }
        let answers = answers.borrow();
        let mut count: HashMap<u64, usize> = HashMap::new();
        for (c, _) in answers.iter() {
            *count.entry(*c).or_default() += 1;
        }
        assert_eq!(
            count.len() as u64,
            callers,
            "seed {seed}: every caller answered"
        );
        assert!(count.values().all(|n| *n == 1), "seed {seed}: once each");
        assert!(
            evictions > 50,
            "seed {seed}: the bound is reached ({evictions} evictions)"
        );
    }
}
