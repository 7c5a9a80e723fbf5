//! The glue's side of the API, typed: each request is parsed once into a
//! [`Request`], the messages that continue it into a [`Follow`], and what
//! the daemon says of its own (not an agent's reply passed on) is one of
//! the reply types below. The framing is in `api.rs`; the Python side is
//! `ansible-glue/arbor_glue/wire.py`.
//!
//! Requests that run on a target carry a [`Target`]: the hop chain, the
//! task asking, and for a become interpreter its key. A request or reply
//! larger than one message continues in `{"op":"data"}` messages (blob: the
//! next part) and, where its size is not known first, ends with
//! `{"op":"end"}`. A failure is [`super::ApiError`]'s form.

use arbor_topology::Hop;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ApiError;

/// Where a request runs.
#[derive(Clone, Deserialize)]
pub struct Target {
    pub chain: Vec<Hop>,
    /// The Ansible task asking (its uuid): a hop that failed during it
    /// fails again at once; for another task it is connected again.
    #[serde(default)]
    pub task: Option<String>,
    /// The become interpreter the request is for (else the login one).
    #[serde(default, rename = "become")]
    pub become_as: Option<BecomeAs>,
}

impl Target {
    /// The target's inventory name, for logs and messages.
    pub fn host(&self) -> &str {
        self.chain.last().map(|h| h.name.as_str()).unwrap_or("")
    }
}

/// A become interpreter: the glue's key (plugin, user, exe, flags) and the
/// task's become password, if any. No `Debug`: it is never logged.
#[derive(Clone, Deserialize)]
pub struct BecomeAs {
    pub key: String,
    #[serde(default)]
    pub pass: Option<String>,
}

/// How a module or command runs on the agent.
#[derive(Deserialize)]
pub struct RunIn {
    /// `"fork"` (the task's arbor_task_isolation), else the agent's default.
    #[serde(default)]
    pub isolation: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
}

/// One of `choose`'s two commands; its stdin is part of the body.
#[derive(Deserialize)]
pub struct Branch {
    pub cmd: String,
    pub size: u64,
}

/// A request from the glue.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// -> [`Pong`].
    Ping,
    /// The tree that is up: the daemon's life, every hop's hello with its
    /// age, each relay's cache use (`arbor status`).
    Status,
    /// Takes the tree down and ends the daemon (`arbor stop`) -> [`Stopping`].
    Stop,
    /// The command that starts an agent with `python` -> [`AgentCommand`].
    AgentCommand {
        #[serde(default = "python3")]
        python: String,
    },
    /// `meta: reset_connection`: the host's interpreters end -> [`Reset`].
    Reset { host: String },
    /// A command, its stdin the body (`stdin_size` bytes, the first part
    /// with the request) -> `{"rc", "stdout_len"}`, blob: stdout + stderr.
    Exec {
        #[serde(flatten)]
        to: Target,
        cmd: String,
        #[serde(default)]
        stdin_size: Option<u64>,
        #[serde(flatten)]
        run: RunIn,
    },
    /// Copy in one round trip: the agent stats `path` and runs `same` if
    /// its checksum is `checksum`, else `differs` (nothing if a directory).
    /// The body is both stdins -> `{"stat", "branch"?, "rc"?, "stdout_len"?}`.
    Choose {
        #[serde(flatten)]
        to: Target,
        path: String,
        #[serde(default)]
        checksum: Option<String>,
        #[serde(flatten)]
        run: RunIn,
        same: Branch,
        differs: Branch,
    },
    /// A file of `size` bytes (the body) -> `{"size"}`, or nothing at all
    /// if `noreply`.
    Put(Put),
    /// A file from the target -> [`FetchHead`], then data messages and end
    /// if `streamed`.
    Fetch {
        #[serde(flatten)]
        to: Target,
        path: String,
    },
    /// The agent's hello with `"hops"`: every hop's hello.
    Info {
        #[serde(flatten)]
        to: Target,
    },
    /// One of the agent's own operations ([`CALL_OPS`]) -> the agent's
    /// reply, or nothing if `noreply`.
    Call {
        #[serde(flatten)]
        to: Target,
        #[serde(rename = "req")]
        call: AgentCall,
        #[serde(default)]
        noreply: bool,
    },
    /// Starts the interpreter `to.become_as` names with the plugin's `cmd`
    /// around `agent_command`'s. Until it is up, each output of that command
    /// comes as [`Event::Output`] and is answered by [`Follow::Answer`]
    /// -> [`BecomeUp`].
    Become {
        #[serde(flatten)]
        to: Target,
        #[serde(default)]
        label: Option<String>,
        cmd: String,
        #[serde(default)]
        success: Option<String>,
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// Ends the become interpreter that runs as process `pid` -> [`Released`].
    Release {
        #[serde(flatten)]
        to: Target,
        pid: u64,
    },
    /// A command whose stdin ([`Follow::Data`], [`Follow::End`]) and output
    /// ([`Event::Data`], then [`Event::Exit`]) stream both ways.
    /// With `pty`, on a new pty of that size (output all `fd` 1), resized
    /// by [`Follow::Resize`]; with an empty `cmd`, the account's login shell.
    Pipe {
        #[serde(flatten)]
        to: Target,
        #[serde(default)]
        cmd: String,
        #[serde(default)]
        pty: Option<Pty>,
    },
    /// The target's agent listens on `listen` (`PORT`, `HOST:PORT` with a
    /// loopback HOST, or a UNIX socket `/PATH`, made 0600), and carries each
    /// connection to `connect` on the controller (`PORT`, `HOST:PORT`,
    /// `/PATH`) -> `{"listening", "connect"}` once it listens; it lasts until
    /// this connection ends.
    Forward {
        #[serde(flatten)]
        to: Target,
        listen: String,
        connect: String,
    },
}

/// A pipe's pty: the client's window and terminal type.
#[derive(Clone, Deserialize, Serialize)]
pub struct Pty {
    pub rows: u16,
    pub cols: u16,
    #[serde(default)]
    pub term: Option<String>,
}

fn python3() -> String {
    "python3".into()
}

/// A file put on a target.
#[derive(Deserialize)]
pub struct Put {
    #[serde(flatten)]
    pub to: Target,
    pub path: String,
    pub size: u64,
    /// Octal mode, as Ansible gives it (a string or a number).
    #[serde(default)]
    pub mode: Option<Value>,
    /// No answer: a failure is told to the next request answered.
    #[serde(default)]
    pub noreply: bool,
    /// Kept byte for byte (keep_remote_files): never sent as a module's
    /// script without its zip.
    #[serde(default)]
    pub exact: bool,
}

/// Agent operations the glue may call directly.
pub const CALL_OPS: &[&str] = &["stat", "mkdtemp", "rmtree", "chmod", "sync", "ping"];

/// An agent request the glue may send as it is: an object whose `op` is
/// one of [`CALL_OPS`].
#[derive(Deserialize)]
#[serde(try_from = "serde_json::Map<String, Value>")]
pub struct AgentCall(pub serde_json::Map<String, Value>);

impl TryFrom<serde_json::Map<String, Value>> for AgentCall {
    type Error = String;

    fn try_from(m: serde_json::Map<String, Value>) -> Result<Self, String> {
        match m.get("op").and_then(Value::as_str) {
            Some(op) if CALL_OPS.contains(&op) => Ok(AgentCall(m)),
            other => Err(format!("call of unknown op {other:?}")),
        }
    }
}

impl Request {
    /// Parses a request. A bad one is a failure naming what was wrong.
    pub fn parse(v: Value) -> Result<Request, ApiError> {
        serde_json::from_value(v).map_err(|e| ApiError::failed(format!("bad API request: {e}")))
    }

    /// The request's name, for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Status => "status",
            Request::Stop => "stop",
            Request::AgentCommand { .. } => "agent_command",
            Request::Reset { .. } => "reset",
            Request::Exec { .. } => "exec",
            Request::Choose { .. } => "choose",
            Request::Put(_) => "put",
            Request::Fetch { .. } => "fetch",
            Request::Info { .. } => "info",
            Request::Call { .. } => "call",
            Request::Become { .. } => "become",
            Request::Release { .. } => "release",
            Request::Pipe { .. } => "pipe",
            Request::Forward { .. } => "forward",
        }
    }

    /// Where it runs, if on a target.
    pub fn target(&self) -> Option<&Target> {
        match self {
            Request::Ping
            | Request::Status
            | Request::Stop
            | Request::AgentCommand { .. }
            | Request::Reset { .. } => None,
            Request::Put(p) => Some(&p.to),
            Request::Exec { to, .. }
            | Request::Choose { to, .. }
            | Request::Fetch { to, .. }
            | Request::Info { to }
            | Request::Call { to, .. }
            | Request::Become { to, .. }
            | Request::Release { to, .. }
            | Request::Pipe { to, .. }
            | Request::Forward { to, .. } => Some(to),
        }
    }
}

/// A message from the glue that continues a request.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Follow {
    /// The next part of a body (the message's blob).
    Data,
    /// A body of unknown size (a pipe's stdin) ends.
    End,
    /// A pipe's pty has a new window size.
    Resize { rows: u16, cols: u16 },
    /// The answer to one [`Event::Output`] of a become command: type
    /// `password`, or `abort` with the glue's verdict, or neither (wait on).
    Answer {
        #[serde(default)]
        password: Option<String>,
        #[serde(default)]
        abort: Option<String>,
    },
}

impl Follow {
    /// None if `v` is not a message that continues a request.
    pub fn parse(v: Value) -> Option<Follow> {
        serde_json::from_value(v).ok()
    }
}

/// A message from the daemon during a request, before its end.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Event {
    /// A become command's output (`become`).
    Output { output: String },
    /// The next part of a reply (the blob); for `pipe`, output of `fd`.
    Data {
        #[serde(skip_serializing_if = "Option::is_none")]
        fd: Option<u8>,
    },
    /// A streamed reply ends.
    End,
    /// A pipe's command ended.
    Exit { rc: i64 },
}

/// `ping`'s reply.
#[derive(Serialize)]
pub struct Pong {
    pub pid: u32,
    pub version: &'static str,
}

/// `stop`'s reply, before the tree goes down.
#[derive(Serialize)]
pub struct Stopping {
    pub stopping: bool,
}

/// `agent_command`'s reply.
#[derive(Serialize)]
pub struct AgentCommand {
    pub cmd: String,
}

/// `reset`'s reply: how many interpreters ended.
#[derive(Serialize)]
pub struct Reset {
    pub ended: usize,
}

/// `release`'s reply: whether the pid was one of arbor's.
#[derive(Serialize)]
pub struct Released {
    pub released: bool,
}

/// `become`'s reply: the interpreter's node, and what its start logged.
#[derive(Serialize)]
pub struct BecomeUp {
    pub node: u32,
    pub log: Value,
}

/// `fetch`'s first reply (blob: the first part).
#[derive(Serialize)]
pub struct FetchHead {
    pub size: Value,
    pub streamed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain() -> Value {
        json!([{"name": "web1", "host": "10.0.0.2"}])
    }

    #[test]
    fn an_exec_is_parsed_with_its_target_and_how_it_runs() {
        let r = Request::parse(json!({"op": "exec", "chain": chain(), "task": "t1",
            "cmd": "echo hi", "stdin_size": 3, "isolation": "fork", "cwd": null,
            "become": {"key": "sudo|root", "pass": "s3cret"}, "lane": 4}))
        .expect("an exec");
        let Request::Exec {
            to,
            cmd,
            stdin_size,
            run,
        } = r
        else {
            panic!("not an exec")
        };
        assert_eq!((to.host(), to.task.as_deref()), ("web1", Some("t1")));
        assert_eq!((cmd.as_str(), stdin_size), ("echo hi", Some(3)));
        assert_eq!((run.isolation.as_deref(), run.cwd), (Some("fork"), None));
        let b = to.become_as.expect("its become");
        assert_eq!(
            (b.key.as_str(), b.pass.as_deref()),
            ("sudo|root", Some("s3cret"))
        );
    }

    #[test]
    fn a_bad_request_names_what_is_wrong() {
        let e = |v| match Request::parse(v) {
            Err(e) => e.to_json()["error"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            Ok(r) => panic!("{} parsed", r.op()),
        };
        assert!(e(json!({"op": "launch"})).contains("unknown variant `launch`"));
        assert!(e(json!({"op": "fetch", "chain": chain()})).contains("missing field `path`"));
        assert!(e(json!({"op": "put", "path": "/x", "size": 1})).contains("`chain`"));
        let call = json!({"op": "call", "chain": chain(), "req": {"op": "exec"}});
        assert!(e(call).contains("call of unknown op Some(\"exec\")"));
        assert!(e(json!({"op": "call", "chain": chain(), "req": 3})).contains("bad API request"));
    }

    #[test]
    fn every_request_names_itself_and_its_target() {
        let reqs = [
            json!({"op": "ping"}),
            json!({"op": "status"}),
            json!({"op": "stop"}),
            json!({"op": "agent_command"}),
            json!({"op": "reset", "host": "web1"}),
            json!({"op": "info", "chain": chain()}),
            json!({"op": "put", "chain": chain(), "path": "/x", "size": 0, "mode": "0644"}),
            json!({"op": "call", "chain": chain(), "req": {"op": "stat", "path": "/"}, "noreply": true}),
            json!({"op": "choose", "chain": chain(), "path": "/x", "checksum": "ab",
                   "same": {"cmd": "a", "size": 1}, "differs": {"cmd": "b", "size": 2}}),
            json!({"op": "become", "chain": chain(), "cmd": "sudo x", "become": {"key": "k"}}),
            json!({"op": "release", "chain": chain(), "pid": 7}),
            json!({"op": "pipe", "chain": chain(), "cmd": "rsync --server"}),
            json!({"op": "pipe", "chain": chain(), "pty": {"rows": 24, "cols": 80, "term": "xterm"}}),
            json!({"op": "forward", "chain": chain(), "listen": "3128", "connect": "127.0.0.1:3128"}),
        ];
        for v in reqs {
            let op = v["op"].as_str().unwrap_or_default().to_string();
            let r = Request::parse(v).unwrap_or_else(|e| panic!("{op}: {e}"));
            assert_eq!(r.op(), op);
            let on_target = !matches!(
                op.as_str(),
                "ping" | "status" | "stop" | "agent_command" | "reset"
            );
            assert_eq!(r.target().map(Target::host), on_target.then_some("web1"));
        }
    }

    #[test]
    fn follows_and_events_keep_the_wire_form() {
        assert!(matches!(
            Follow::parse(json!({"op": "data"})),
            Some(Follow::Data)
        ));
        assert!(matches!(
            Follow::parse(json!({"op": "end"})),
            Some(Follow::End)
        ));
        assert!(Follow::parse(json!({"op": "exec"})).is_none());
        assert!(matches!(
            Follow::parse(json!({"op": "resize", "rows": 50, "cols": 132})),
            Some(Follow::Resize {
                rows: 50,
                cols: 132
            })
        ));
        let Some(Follow::Answer { password, abort }) =
            Follow::parse(json!({"op": "answer", "password": "pw"}))
        else {
            panic!("not an answer")
        };
        assert_eq!((password.as_deref(), abort), (Some("pw"), None));
        let j = |e: Event| serde_json::to_value(e).expect("serializable");
        assert_eq!(
            j(Event::Data { fd: Some(2) }),
            json!({"op": "data", "fd": 2})
        );
        assert_eq!(j(Event::Data { fd: None }), json!({"op": "data"}));
        assert_eq!(j(Event::Exit { rc: 3 }), json!({"op": "exit", "rc": 3}));
        assert_eq!(j(Event::End), json!({"op": "end"}));
        assert_eq!(
            j(Event::Output {
                output: "Password:".into()
            }),
            json!({"op": "output", "output": "Password:"})
        );
    }
}
