//! The daemon's ssh-agent socket: the one its ssh processes use and forward
//! to relays, so hops behind the first can authenticate while every key
//! stays on the controller.
//!
//! It is a small proxy (the agent protocol's list and sign requests) in
//! front of two agents: a private `ssh-agent` holding the key files the
//! hops name or the user's ssh config gives them (`~/.ssh/id_*` by
//! default), and the user's own agent (`SSH_AUTH_SOCK` when the run began),
//! so keys held only there keep working. It refuses everything else (adding
//! or removing keys, locking), and while no hop is connecting it is locked:
//! it lists no key and signs nothing, so the socket forwarded to a bastion
//! is of no use to anyone there between connects.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

/// Largest agent message (OpenSSH's own bound).
const MESSAGE_BYTES_MAX: usize = 256 * 1024;
/// Connections served at once.
const CONNECTIONS_MAX: usize = 64;
/// Longest an upstream agent may take to answer (a hardware key may wait
/// for a touch).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

const FAILURE: u8 = 5;
const REQUEST_IDENTITIES: u8 = 11;
const IDENTITIES_ANSWER: u8 = 12;
const SIGN_REQUEST: u8 = 13;

struct Shared {
    locked: AtomicBool,
    /// The private agent's socket, then the user's.
    upstreams: Vec<PathBuf>,
}

/// The daemon's agent: the proxy's socket and the private ssh-agent.
pub struct SshAgent {
    shared: Arc<Shared>,
    socket: PathBuf,
    private: PathBuf,
    child: Option<Child>,
    loaded: Vec<PathBuf>,
    /// Key files that need a passphrase and that no agent holds.
    locked_files: Vec<PathBuf>,
}

impl SshAgent {
    /// Listens on `run_dir/agent.sock` (the run dir is private to the
    /// user), in front of the user's own agent `user` if there is one.
    pub fn start(run_dir: &Path, user: Option<PathBuf>) -> std::io::Result<SshAgent> {
        let socket = run_dir.join("agent.sock");
        let private = run_dir.join("keys.sock");
        let user = user.filter(|p| p != &socket && p.exists());
        let shared = Arc::new(Shared {
            locked: AtomicBool::new(true),
            upstreams: std::iter::once(private.clone()).chain(user).collect(),
        });
        let listener = UnixListener::bind(&socket)?;
        tokio::spawn(serve(listener, shared.clone()));
        Ok(SshAgent {
            shared,
            socket,
            private,
            child: None,
            loaded: Vec::new(),
            locked_files: Vec::new(),
        })
    }

    /// The socket to hand ssh (`SSH_AUTH_SOCK`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Locked: lists nothing and signs nothing.
    pub fn set_locked(&self, locked: bool) {
        self.shared.locked.store(locked, Ordering::SeqCst);
    }

    /// Key files among `files` that need a passphrase no agent can supply:
    /// the reason a hop may be refused.
    pub fn locked_files(&self, files: &[PathBuf]) -> Vec<PathBuf> {
        files
            .iter()
            .filter(|f| self.locked_files.contains(f))
            .cloned()
            .collect()
    }

    /// Loads key files into the private agent (each once). A file that needs
    /// a passphrase is left to the user's agent; if that does not hold it
    /// either, it is remembered for the failure message.
    pub async fn load(&mut self, keys: Vec<PathBuf>) {
        let keys: Vec<PathBuf> = keys
            .into_iter()
            .filter(|k| k.is_file() && !self.loaded.contains(k))
            .collect();
        if keys.is_empty() {
            return;
        }
        if self.child.is_none() {
            match Command::new("ssh-agent")
                .arg("-D")
                .arg("-a")
                .arg(&self.private)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
            {
                Ok(child) => self.child = Some(child),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start ssh-agent; hops behind the first need one");
                    return;
                }
            }
            for _ in 0..200 {
                if self.private.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for key in keys {
            self.loaded.push(key.clone());
            if ssh_add(&key, &self.private).await {
                continue;
            }
            if !needs_passphrase(&key).await {
                tracing::warn!(key = %key.display(), "ssh-add failed");
                continue;
            }
            if !self.user_agent_holds(&key).await {
                tracing::warn!(key = %key.display(), "the key needs a passphrase and no agent holds it");
                self.locked_files.push(key);
            }
        }
    }

    /// Whether the user's agent holds the key of `file` (by its `.pub`).
    async fn user_agent_holds(&self, file: &Path) -> bool {
        let Some(user) = self.shared.upstreams.get(1) else {
            return false;
        };
        let mut pub_path = file.as_os_str().to_owned();
        pub_path.push(".pub");
        let Ok(text) = std::fs::read_to_string(&pub_path) else {
            return false;
        };
        let Some(blob) = text.split_whitespace().nth(1).and_then(base64_decode) else {
            return false;
        };
        identities(user)
            .await
            .is_some_and(|ids| ids.iter().any(|(b, _)| *b == blob))
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn ssh_add(key: &Path, agent: &Path) -> bool {
    Command::new("ssh-add")
        .arg("-q")
        .arg(key)
        .env("SSH_AUTH_SOCK", agent)
        .env_remove("SSH_ASKPASS")
        .env_remove("DISPLAY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Whether a key file is encrypted (ssh-keygen cannot read it without one).
async fn needs_passphrase(key: &Path) -> bool {
    let out = Command::new("ssh-keygen")
        .args(["-y", "-P", "", "-f"])
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await;
    match out {
        Ok(o) => !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("passphrase"),
        Err(_) => false,
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            return;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = serve_one(conn, &shared).await;
        });
    }
}

async fn read_msg(s: &mut UnixStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MESSAGE_BYTES_MAX {
        return Err(std::io::Error::other("agent message of a bad size"));
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).await?;
    Ok(Some(body))
}

async fn write_msg(s: &mut UnixStream, body: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    s.write_all(&out).await
}

async fn serve_one(mut conn: UnixStream, shared: &Shared) -> std::io::Result<()> {
    while let Some(msg) = read_msg(&mut conn).await? {
        let locked = shared.locked.load(Ordering::SeqCst);
        let answer = match msg[0] {
            REQUEST_IDENTITIES if locked => identities_answer(&[]),
            REQUEST_IDENTITIES => {
                let mut all: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                for up in &shared.upstreams {
                    for id in identities(up).await.unwrap_or_default() {
                        if !all.iter().any(|(b, _)| *b == id.0) {
                            all.push(id);
                        }
                    }
                }
                identities_answer(&all)
            }
            SIGN_REQUEST if !locked => sign(shared, &msg).await.unwrap_or_else(|| vec![FAILURE]),
            _ => vec![FAILURE],
        };
        write_msg(&mut conn, &answer).await?;
    }
    Ok(())
}

/// One request to an agent and its answer.
async fn ask(agent: &Path, msg: &[u8]) -> Option<Vec<u8>> {
    let go = async {
        let mut s = UnixStream::connect(agent).await.ok()?;
        write_msg(&mut s, msg).await.ok()?;
        read_msg(&mut s).await.ok()?
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, go).await.ok()?
}

/// An SSH string at `at`: its bytes, and where the next field starts.
fn string(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let n = u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?) as usize;
    let s = buf.get(at + 4..at + 4 + n)?;
    Some((s, at + 4 + n))
}

/// The keys an agent holds: (public key blob, comment).
async fn identities(agent: &Path) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let a = ask(agent, &[REQUEST_IDENTITIES]).await?;
    if a.first() != Some(&IDENTITIES_ANSWER) {
        return None;
    }
    let n = u32::from_be_bytes(a.get(1..5)?.try_into().ok()?) as usize;
    let mut at = 5;
    let mut out = Vec::new();
    for _ in 0..n.min(1024) {
        let (blob, next) = string(&a, at)?;
        let (comment, next) = string(&a, next)?;
        out.push((blob.to_vec(), comment.to_vec()));
        at = next;
    }
    Some(out)
}

fn identities_answer(ids: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![IDENTITIES_ANSWER];
    out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
    for (blob, comment) in ids {
        for s in [blob, comment] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s);
        }
    }
    out
}

/// A sign request, passed to the agent that holds its key.
async fn sign(shared: &Shared, msg: &[u8]) -> Option<Vec<u8>> {
    let (blob, _) = string(msg, 1)?;
    for up in &shared.upstreams {
        if identities(up)
            .await
            .is_some_and(|ids| ids.iter().any(|(b, _)| b == blob))
        {
            return ask(up, msg).await;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip() {
        let ids = vec![
            (b"blob1".to_vec(), b"c1".to_vec()),
            (b"b2".to_vec(), Vec::new()),
        ];
        let a = identities_answer(&ids);
        let n = u32::from_be_bytes(a[1..5].try_into().expect("4 bytes")) as usize;
        assert_eq!(n, 2);
        let (b, next) = string(&a, 5).expect("blob");
        assert_eq!(b, b"blob1");
        let (c, _) = string(&a, next).expect("comment");
        assert_eq!(c, b"c1");
        assert!(string(&a, a.len() - 2).is_none());
    }

    #[tokio::test]
    async fn a_locked_proxy_lists_nothing_and_refuses_what_it_does_not_carry() {
        let dir = std::env::temp_dir().join(format!("arbor-sshagent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let agent = SshAgent::start(&dir, None).expect("listen");
        let sock = agent.socket().to_path_buf();
        let ids = ask(&sock, &[REQUEST_IDENTITIES]).await.expect("answer");
        assert_eq!(ids, identities_answer(&[]));
        // Locking from a client (message 22) is refused; so is adding a key.
        assert_eq!(
            ask(&sock, &[22, 0, 0, 0, 1, b'x']).await,
            Some(vec![FAILURE])
        );
        assert_eq!(ask(&sock, &[17]).await, Some(vec![FAILURE]));
        agent.set_locked(false);
        // Unlocked with no agent behind it: nothing to list, nothing signed.
        assert_eq!(
            ask(&sock, &[REQUEST_IDENTITIES]).await,
            Some(identities_answer(&[]))
        );
        let mut sign = vec![SIGN_REQUEST, 0, 0, 0, 1, b'k', 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(ask(&sock, &sign).await, Some(vec![FAILURE]));
        sign.truncate(3);
        assert_eq!(ask(&sock, &sign).await, Some(vec![FAILURE]));
        drop(agent);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
