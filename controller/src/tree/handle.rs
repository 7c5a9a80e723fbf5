//! The tree's handle: how the API's tasks ask the tree task for hops, streams
//! and become slots (commands over a bounded channel).

use super::*;

pub(super) enum Cmd {
    Ensure {
        chain: Vec<Hop>,
        role: HopRole,
        task: Option<String>,
        /// A relay further down the whole chain moves to QUIC: a first
        /// hop's relay is then the one built with QUIC (it connects).
        quic_below: bool,
        done: oneshot::Sender<Result<NodeId, TreeError>>,
    },
    /// Forgets the become agent under `parent` whose process (or its
    /// sweeper's, or its parent shell's) is `pid`; answers its node, for
    /// the caller to end.
    ReleasePid {
        parent: NodeId,
        pid: u64,
        done: oneshot::Sender<Option<NodeId>>,
    },
    /// Ends the interpreters of the host with this inventory name.
    Reset {
        host: String,
        done: oneshot::Sender<usize>,
    },
    Open {
        dst: NodeId,
        payload: Vec<u8>,
        replies: mpsc::Sender<Frame>,
        credit: Option<watch::Sender<u64>>,
        /// The node (below the relay `dst`) the request is for: on a QUIC
        /// link it goes in that node's lane (tree/quic.rs).
        about: Option<NodeId>,
        done: oneshot::Sender<StreamId>,
    },
    Send(Frame),
    Forget(StreamId),
    Become {
        parent: NodeId,
        key: String,
        label: String,
        start: bool,
        done: oneshot::Sender<Result<Option<BecomeSlot>, TreeError>>,
    },
    BecomeDone {
        node: NodeId,
        outcome: Result<(), String>,
    },
    /// Frame bytes to and from each node that is up.
    Traffic(oneshot::Sender<HashMap<NodeId, Traffic>>),
    Shutdown(oneshot::Sender<()>),
}

/// An open stream: its node, where its frames go, and its credit if paced.
pub(super) type OpenStream = (NodeId, mpsc::Sender<Frame>, Option<watch::Sender<u64>>);

/// A cheap handle to the tree task.
#[derive(Clone)]
pub struct TreeHandle {
    pub(super) tx: mpsc::Sender<Cmd>,
    pub(super) hellos: Hellos,
    pub(super) ssh_config: SshConfig,
}

impl TreeHandle {
    /// Makes sure every hop of `chain` is up, the last running `role`;
    /// returns the last hop's node, or a message naming the host and hop.
    /// `task` names the Ansible task asking: a hop that failed during that
    /// task fails again at once; for any other, it is connected again.
    pub async fn ensure(
        &self,
        chain: &[Hop],
        role: HopRole,
        task: Option<&str>,
    ) -> Result<NodeId, TreeError> {
        Ok(*self
            .ensure_path(chain, role, task)
            .await?
            .last()
            .unwrap_or(&NodeId::CONTROLLER))
    }

    /// As [`TreeHandle::ensure`], returning every hop's node, first first.
    /// A failure names the last hop first, whichever hop failed.
    pub async fn ensure_path(
        &self,
        chain: &[Hop],
        role: HopRole,
        task: Option<&str>,
    ) -> Result<Vec<NodeId>, TreeError> {
        arbor_topology::validate(chain).map_err(|e| TreeError::Chain(e.to_string()))?;
        let target = hops::label(chain, role);
        // The controller's ssh config, read before the tree starts a hop.
        for (i, hop) in chain.iter().enumerate() {
            if let Err(why) = self.ssh_config.resolve(hop).await {
                let r = if i + 1 == chain.len() {
                    role
                } else {
                    HopRole::Relay
                };
                let hop_label = hops::label(&chain[..=i], r);
                return Err(TreeError::Hop(hops::labelled(&hop_label, &why)).under(&target));
            }
        }
        let mut nodes = Vec::with_capacity(chain.len());
        let relays = if role == HopRole::Relay {
            chain.len()
        } else {
            chain.len() - 1
        };
        for i in 0..chain.len() {
            let r = if i + 1 == chain.len() {
                role
            } else {
                HopRole::Relay
            };
            let (done, wait) = oneshot::channel();
            self.tx
                .send(Cmd::Ensure {
                    chain: chain[..=i].to_vec(),
                    role: r,
                    task: task.map(str::to_string),
                    quic_below: chain
                        .get(i + 1..relays)
                        .is_some_and(|c| c.iter().any(Hop::quic)),
                    done,
                })
                .await?;
            let node = wait.await?.map_err(|e| e.under(&target))?;
            nodes.push(node);
        }
        Ok(nodes)
    }

    /// The become agent under `parent` whose process or sweeper is `pid`,
    /// forgotten (its next use starts a new one): the caller ends it.
    pub async fn release_pid(&self, parent: NodeId, pid: u64) -> Result<Option<NodeId>, TreeError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Cmd::ReleasePid { parent, pid, done }).await?;
        Ok(wait.await?)
    }

    /// Ends every interpreter of the host named `host` (its login agents
    /// and their become agents); its next use connects afresh. Returns how
    /// many login agents were ended.
    pub async fn reset(&self, host: &str) -> Result<usize, TreeError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Reset {
                host: host.to_string(),
                done,
            })
            .await?;
        Ok(wait.await?)
    }

    /// Opens a stream to `dst` with a request; frames of its answer arrive
    /// on the returned receiver.
    pub async fn open(
        &self,
        dst: NodeId,
        payload: Vec<u8>,
    ) -> Result<(StreamId, mpsc::Receiver<Frame>), TreeError> {
        self.open_with(dst, payload, None, None).await
    }

    /// As [`TreeHandle::open`], for a stream whose data the receiver paces
    /// with `Credit` frames: the returned watch holds the bytes it has
    /// consumed (`arbor_core::window::DROPPED`: it dropped the stream); it closes with the stream.
    pub async fn open_credited(
        &self,
        dst: NodeId,
        payload: Vec<u8>,
    ) -> Result<(StreamId, mpsc::Receiver<Frame>, watch::Receiver<u64>), TreeError> {
        let (credit, consumed) = watch::channel(0);
        let (stream, rx) = self.open_with(dst, payload, Some(credit), None).await?;
        Ok((stream, rx, consumed))
    }

    async fn open_with(
        &self,
        dst: NodeId,
        payload: Vec<u8>,
        credit: Option<watch::Sender<u64>>,
        about: Option<NodeId>,
    ) -> Result<(StreamId, mpsc::Receiver<Frame>), TreeError> {
        fits(&payload)?;
        let (replies, rx) = mpsc::channel(REPLY_QUEUE_FRAMES);
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Open {
                dst,
                payload,
                replies,
                credit,
                about,
                done,
            })
            .await?;
        let stream = wait.await?;
        Ok((stream, rx))
    }

    /// Sends the next part (Data) or the end (End) of the controller's
    /// stream `stream` to `dst`.
    pub async fn send_part(
        &self,
        dst: NodeId,
        stream: StreamId,
        kind: Kind,
        payload: Vec<u8>,
    ) -> Result<(), TreeError> {
        fits(&payload)?;
        let frame = Frame::new(kind, dst, NodeId::CONTROLLER, stream, payload);
        Ok(self.tx.send(Cmd::Send(frame)).await?)
    }

    /// Opens a stream to `dst` with a request that gets no answer (the
    /// agent acts on it in order with the requests before and after it);
    /// its Data and End parts go on the returned stream.
    pub async fn post(&self, dst: NodeId, payload: Vec<u8>) -> Result<StreamId, TreeError> {
        let (stream, _rx) = self.open(dst, payload).await?;
        self.forget(stream).await;
        Ok(stream)
    }

    /// [`TreeHandle::post`] to the relay `dst` of a request for `about`
    /// (a node below it): kept in order with `about`'s own frames.
    pub async fn post_about(
        &self,
        dst: NodeId,
        about: NodeId,
        payload: Vec<u8>,
    ) -> Result<StreamId, TreeError> {
        let (stream, _rx) = self.open_with(dst, payload, None, Some(about)).await?;
        self.forget(stream).await;
        Ok(stream)
    }

    /// The become agent `key` under the agent `parent`. Without `start`:
    /// `Ready` if it is up, else None. With `start`: waits for one that is
    /// starting, or hands out a node for the caller to start it as.
    pub async fn become_slot(
        &self,
        parent: NodeId,
        key: &str,
        label: &str,
        start: bool,
    ) -> Result<Option<BecomeSlot>, TreeError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Become {
                parent,
                key: key.to_string(),
                label: label.to_string(),
                start,
                done,
            })
            .await?;
        wait.await?
    }

    /// How starting the become agent `node` ended.
    pub async fn become_done(&self, node: NodeId, outcome: Result<(), String>) {
        let _ = self.tx.send(Cmd::BecomeDone { node, outcome }).await;
    }

    /// Frame bytes sent to and received from each node that is up.
    pub async fn traffic(&self) -> HashMap<NodeId, Traffic> {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Cmd::Traffic(done)).await.is_err() {
            return HashMap::new();
        }
        wait.await.unwrap_or_default()
    }

    /// Every node up, with its hello.
    pub fn hellos(&self) -> Hellos {
        self.hellos.clone()
    }

    /// The hello `node` sent when it joined, if it is up.
    pub fn hello(&self, node: NodeId) -> Option<serde_json::Value> {
        self.hellos.lock().ok()?.get(&node).cloned()
    }

    pub async fn forget(&self, stream: StreamId) {
        let _ = self.tx.send(Cmd::Forget(stream)).await;
    }

    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Cmd::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// A payload one frame can carry; callers chunk larger data.
pub(super) fn fits(payload: &[u8]) -> Result<(), TreeError> {
    if payload.len() > arbor_wire::FRAME_PAYLOAD_BYTES_MAX {
        return Err(TreeError::FrameTooBig(payload.len()));
    }
    Ok(())
}
