//! The tree's reconnect rule (`arbor_core::hops`) under a run of tasks over
//! a fleet whose hosts go down and come back, whose links are lost and
//! whose hops are reset: every caller is answered once, a failure is
//! answered at once only to the task that met it, the next task connects
//! again, and a hop never connects twice at a time. `ARBOR_SIM_SEEDS=N`
//! runs more seeds; a failing seed replays with `ARBOR_SIM_SEED=S`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use arbor_core::hops::{Hops, NodeInfo, Outcome};
use arbor_sim::Rng;
use arbor_wire::NodeId;

/// Every answer given: (caller, outcome).
type Answers = Rc<RefCell<Vec<(u64, Outcome)>>>;
/// A caller: its number, and where its answer goes.
type Waiter = (u64, Answers);
type Key = u8;

const HOSTS: u8 = 6;
const TASKS: u32 = 40;
const STEPS_PER_TASK: u32 = 60;

fn table() -> Hops<Key, Waiter> {
    Hops::new(|(caller, answers), outcome| answers.borrow_mut().push((caller, outcome)))
}

struct Run {
    rng: Rng,
    hops: Hops<Key, Waiter>,
    answers: Answers,
    next_caller: u64,
    next_node: u32,
    /// Hosts that refuse connections now.
    down: [bool; HOSTS as usize],
    /// Connects under way: (node, due step, the task that started it).
    connecting: Vec<(NodeId, u32, String)>,
    /// The task each key last failed for (connect failure, or lost while up).
    failed_for: HashMap<Key, Option<String>>,
    /// The node each key is up as, as the test saw it.
    up: HashMap<Key, NodeId>,
    asked: u64,
    violations: Vec<String>,
}

impl Run {
    fn ask(&mut self, task: &str, key: Key, step: u32) {
        let caller = self.next_caller;
        self.next_caller += 1;
        self.asked += 1;
        let before = self.answers.borrow().len();
        let back = self
            .hops
            .lookup(&key, Some(task), (caller, self.answers.clone()));
        let now: Vec<(u64, Outcome)> = self.answers.borrow()[before..].to_vec();
        for (c, outcome) in now {
            match outcome {
                Err(why) if self.failed_for.get(&key) != Some(&Some(task.to_string())) => {
                    self.violations.push(format!(
                        "step {step}: {task} got {key}'s failure at once ({why}) but it failed for {:?}",
                        self.failed_for.get(&key)
                    ));
                }
                Ok(node) if self.up.get(&key) != Some(&node) => self.violations.push(format!(
                    "step {step}: caller {c} told {key} is up as {node}"
                )),
                _ => {}
            }
        }
        if let Some(waiter) = back {
            let node = NodeId(self.next_node);
            self.next_node += 1;
            let info = NodeInfo {
                key,
                label: format!("h{key} (agent)"),
                host: format!("h{key}"),
            };
            self.hops.connecting(node, info, Some(task), waiter);
            self.up.remove(&key);
            let due = step + 1 + self.rng.below(8) as u32;
            self.connecting.push((node, due, task.to_string()));
        }
    }

    /// Settles the connects due by `step`; a failure is the failure of the
    /// task that started the connect.
    fn settle_due(&mut self, step: u32) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.connecting)
            .into_iter()
            .partition(|(_, at, _)| *at <= step);
        self.connecting = later;
        for (node, _, task) in due {
            let Some(key) = self.hops.of(node).map(|i| i.key) else {
                continue; // reset while it connected
            };
            if self.down[key as usize] {
                self.hops.settle(node, Err("refused".into()));
                self.failed_for.insert(key, Some(task));
            } else {
                self.hops.settle(node, Ok(()));
                self.up.insert(key, node);
            }
        }
    }
}

fn run(seed: u64) -> Run {
    let mut r = Run {
        rng: Rng::new(seed),
        hops: table(),
        answers: Rc::new(RefCell::new(Vec::new())),
        next_caller: 0,
        next_node: 10,
        down: [false; HOSTS as usize],
        connecting: Vec::new(),
        failed_for: HashMap::new(),
        up: HashMap::new(),
        asked: 0,
        violations: Vec::new(),
    };
    let mut step = 0;
    for t in 0..TASKS {
        let task = format!("task-{t}");
        // Between tasks a host may go down or come back.
        let h = r.rng.below(HOSTS as u64) as usize;
        r.down[h] = r.rng.below(3) == 0;
        for _ in 0..STEPS_PER_TASK {
            step += 1;
            match r.rng.below(10) {
                0..=5 => {
                    let key = r.rng.below(HOSTS as u64) as Key;
                    r.ask(&task, key, step);
                }
                6 => {
                    // A link is lost (an up hop, or one still connecting).
                    let key = r.rng.below(HOSTS as u64) as Key;
                    if let Some(node) = r.up.remove(&key) {
                        r.hops.lost(node, "ssh exited");
                        r.failed_for.insert(key, Some(task.clone()));
                    }
                }
                7 if r.rng.below(4) == 0 => {
                    let key = r.rng.below(HOSTS as u64) as Key;
                    r.hops.forget(&key);
                    r.up.remove(&key);
                    r.failed_for.remove(&key);
                }
                _ => {}
            }
            r.settle_due(step);
        }
    }
    // The run ends: every connect settles.
    r.settle_due(u32::MAX);
    r
}

#[test]
fn every_caller_is_answered_once_and_a_failure_only_to_its_own_task() {
    for seed in arbor_sim::seeds(32) {
        let r = run(seed);
        assert!(
            r.violations.is_empty(),
            "seed {seed} (replay: ARBOR_SIM_SEED={seed}): {:#?}",
            &r.violations[..r.violations.len().min(5)]
        );
        let answers = r.answers.borrow();
        let mut count: HashMap<u64, usize> = HashMap::new();
        for (c, _) in answers.iter() {
            *count.entry(*c).or_default() += 1;
        }
        assert_eq!(
            count.len() as u64,
            r.asked,
            "seed {seed}: every caller answered"
        );
        assert!(count.values().all(|n| *n == 1), "seed {seed}: once each");
        let failed = answers.iter().filter(|(_, o)| o.is_err()).count();
        let ok = answers.len() - failed;
        // The run exercises both: hosts down, and hosts reached.
        assert!(
            failed > 20 && ok > 200,
            "seed {seed}: {failed} failed, {ok} ok"
        );
        assert!(!r.hops.any_connecting(), "seed {seed}");
    }
}
