//! Why the tree could not give what it was asked for. Every message names
//! the host and the hop.

use crate::hops;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// A hop could not be connected, or was lost or reset: Ansible's
    /// UNREACHABLE. The message starts with the label of the hop asked for.
    #[error("{0}")]
    Hop(String),
    /// The chain is not a path the tree can make (a cycle, too many hops).
    #[error("{0}")]
    Chain(String),
    /// A become interpreter did not start (a wrong password, a timeout).
    #[error("{0}")]
    Become(String),
    /// A frame over the wire's bound was about to be sent (a bug here).
    #[error("arbor internal error: a frame of {0} bytes was about to be sent")]
    FrameTooBig(usize),
    /// The daemon is shutting down.
    #[error("arbor controller is shutting down")]
    ShuttingDown,
}

impl TreeError {
    /// A hop's failure as a message of `label`'s (the hop asked for, when
    /// a hop before it failed).
    pub fn under(self, label: &str) -> TreeError {
        match self {
            TreeError::Hop(why) => TreeError::Hop(hops::labelled(label, &why)),
            TreeError::Chain(why) => TreeError::Chain(hops::labelled(label, &why)),
            other => other,
        }
    }
}

/// A channel to the tree task closed: it has ended.
impl<T> From<tokio::sync::mpsc::error::SendError<T>> for TreeError {
    fn from(_: tokio::sync::mpsc::error::SendError<T>) -> TreeError {
        TreeError::ShuttingDown
    }
}

impl From<tokio::sync::oneshot::error::RecvError> for TreeError {
    fn from(_: tokio::sync::oneshot::error::RecvError) -> TreeError {
        TreeError::ShuttingDown
    }
}
