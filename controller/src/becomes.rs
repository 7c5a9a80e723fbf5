//! The daemon's become agents: [`arbor_core::becomes::Becomes`] (which are
//! up, which are starting, the least recently used ending first) with
//! oneshot senders as its waiters.

use tokio::sync::oneshot;

pub use arbor_core::becomes::{BecomeSlot, Decision};

use crate::tree::TreeError;

/// Who waits for a become agent: its slot, or why it failed.
pub type SlotWaiter = oneshot::Sender<Result<Option<BecomeSlot>, TreeError>>;

/// The daemon's table of become agents.
pub type Becomes = arbor_core::becomes::Becomes<SlotWaiter>;

/// An empty table, at most `interpreters_max` interpreters per target.
pub fn table(interpreters_max: usize) -> Becomes {
    Becomes::new(interpreters_max, |w, outcome| {
        let _ = w.send(outcome.map_err(TreeError::Become));
    })
}
