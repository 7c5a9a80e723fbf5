//! The daemon's life: one Ansible run's (it ends with the run), or a
//! persistent tree's, which outlives the run and ends after an idle time
//! with no glue connected (`ARBOR_PERSIST`), or when `arbor stop` asks.
//! `arbor status` and `arbor stop` find the user's persistent daemons in
//! their private directories (`$TMPDIR/arbor-UID/persist-*`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long the daemon serves, and who is connected.
pub struct Life {
    started: Instant,
    /// A persistent daemon's idle bound; None: it lives as long as its run.
    idle: Option<Duration>,
    open: AtomicUsize,
    last: Mutex<Instant>,
    stop: Notify,
}

/// A glue connection being served: while any is open the daemon is not
/// idle, and one that asked for work (not `arbor status` or `stop`)
/// starts the idle time afresh when it closes.
pub struct Open {
    life: Arc<Life>,
    worked: bool,
}

impl Open {
    /// The connection asked for work.
    pub fn worked(&mut self) {
        self.worked = true;
    }

    pub fn life(&self) -> &Life {
        &self.life
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.worked {
            self.life.touch();
        }
        self.life.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Life {
    pub fn new(idle: Option<Duration>) -> Arc<Life> {
        let now = Instant::now();
        Arc::new(Life {
            started: now,
            idle,
            open: AtomicUsize::new(0),
            last: Mutex::new(now),
            stop: Notify::new(),
        })
    }

    /// A connection was accepted: not idle until the guard drops.
    pub fn opened(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::SeqCst);
        Open {
            life: self.clone(),
            worked: false,
        }
    }

    fn touch(&self) {
        if let Ok(mut l) = self.last.lock() {
            *l = Instant::now();
        }
    }

    /// How long nobody has been connected (zero while somebody is),
    /// `asking` connections aside (`arbor status` asking counts itself).
    pub fn idle_for(&self, asking: usize) -> Duration {
        if self.open.load(Ordering::SeqCst) > asking {
            return Duration::ZERO;
        }
        self.last.lock().map(|l| l.elapsed()).unwrap_or_default()
    }

    /// Whether a persistent daemon has been idle for its bound.
    pub fn idle_over(&self) -> bool {
        self.idle.is_some_and(|bound| self.idle_for(0) >= bound)
    }

    pub fn idle_bound(&self) -> Option<Duration> {
        self.idle
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Connections open (`arbor status` counts its own).
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Asks the daemon to take its tree down (`arbor stop`).
    pub fn stop(&self) {
        self.stop.notify_one();
    }

    /// Resolves once [`Life::stop`] was called.
    pub async fn stopped(&self) {
        self.stop.notified().await
    }
}

/// The user's persistent daemons' directories.
pub fn persistent_dirs() -> Vec<PathBuf> {
    let tmp = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    // SAFETY: getuid cannot fail.
    let base = tmp.join(format!("arbor-{}", unsafe { libc::getuid() }));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("persist-"))
        .map(|e| e.path())
        .filter(|p| p.join("sock").exists())
        .collect();
    dirs.sort();
    dirs
}

/// How long `arbor stop` waits for a daemon to take its tree down.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// One request to the daemon at `dir`, and its answer.
async fn ask(dir: &std::path::Path, op: &str) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let sock = dir.join("sock");
    let mut conn = tokio::net::UnixStream::connect(&sock)
        .await
        .with_context(|| format!("connecting to {}", sock.display()))?;
    crate::api::write_message(&mut conn, &serde_json::json!({ "op": op }), b"").await?;
    let (v, _) = crate::api::read_message(&mut conn)
        .await?
        .with_context(|| format!("{} closed without answering", sock.display()))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{}: {e}", dir.display());
    }
    Ok(v)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `arbor status`: each persistent tree that is up.
pub fn status(json: bool) -> anyhow::Result<()> {
    let rt = runtime()?;
    let mut all = Vec::new();
    for dir in persistent_dirs() {
        match rt.block_on(ask(&dir, "status")) {
            Ok(mut v) => {
                v["dir"] = serde_json::json!(dir.display().to_string());
                all.push(v);
            }
            Err(e) => eprintln!("arbor: {e:#}"),
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    if all.is_empty() {
        println!("no persistent tree is up (ARBOR_PERSIST keeps one after a run)");
    }
    for v in &all {
        print!("{}", status_text(v));
    }
    Ok(())
}

/// A status answer as people read it.
pub fn status_text(v: &serde_json::Value) -> String {
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let mut out = format!(
        "tree of daemon {} ({}): up {}, idle {} of {}, {} run(s) connected\n",
        n("pid"),
        v.get("dir").and_then(|d| d.as_str()).unwrap_or("?"),
        span(n("uptime_s")),
        span(n("idle_s")),
        span(n("idle_limit_s")),
        n("connections"),
    );
    for h in v
        .get("hops")
        .and_then(|h| h.as_array())
        .into_iter()
        .flatten()
    {
        let s = |k: &str| h.get(k).and_then(|x| x.as_str()).unwrap_or("");
        let u = |k: &str| h.get(k).and_then(|x| x.as_u64());
        out += &format!(
            "  node {:>4}  {}  up {}, {} sent, {} received{}{}\n",
            u("node").unwrap_or(0),
            s("label"),
            span(u("age_s").unwrap_or(0)),
            size(u("sent_bytes").unwrap_or(0)),
            size(u("received_bytes").unwrap_or(0)),
            u("pid").map(|p| format!(", pid {p}")).unwrap_or_default(),
            match s("python") {
                "" => String::new(),
                p => format!(", python {p}"),
            },
        );
        if let Some(c) = h.get("cache") {
            out += &format!(
                "              cache: {} in {} entries\n",
                size(c.get("bytes").and_then(|x| x.as_u64()).unwrap_or(0)),
                c.get("entries").and_then(|x| x.as_u64()).unwrap_or(0)
            );
        }
    }
    out
}

/// Bytes as `512 B`, `3.4 KiB` or `1.2 MiB`.
fn size(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    }
}

/// Seconds as `1h2m`, `3m4s` or `5s`.
fn span(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

/// `arbor stop`: each persistent tree taken down, waited for.
pub fn stop() -> anyhow::Result<()> {
    let rt = runtime()?;
    let mut failed = false;
    for dir in persistent_dirs() {
        if let Err(e) = rt.block_on(ask(&dir, "stop")) {
            eprintln!("arbor: {e:#}");
            failed = true;
            continue;
        }
        let deadline = Instant::now() + STOP_WAIT;
        while dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if dir.exists() {
            eprintln!(
                "arbor: {} did not end within {}s",
                dir.display(),
                STOP_WAIT.as_secs()
            );
            failed = true;
        } else {
            println!("stopped the tree of {}", dir.display());
        }
    }
    if failed {
        anyhow::bail!("not every persistent tree was stopped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_persistent_daemon_is_idle_only_with_nobody_connected() {
        let life = Life::new(Some(Duration::from_millis(30)));
        let mut open = life.opened();
        open.worked();
        std::thread::sleep(Duration::from_millis(40));
        assert!(!life.idle_over(), "a connection is open");
        drop(open);
        assert!(!life.idle_over(), "idle from the connection's end");
        std::thread::sleep(Duration::from_millis(40));
        assert!(life.idle_over());
        // `arbor status` does not count as use: idle at once when it ends.
        let status = life.opened();
        assert!(!life.idle_over(), "a connection is open");
        drop(status);
        assert!(life.idle_over());
        assert!(!Life::new(None).idle_over(), "a run's daemon is never idle");
    }

    #[test]
    fn status_reads_as_a_tree() {
        let v = serde_json::json!({"pid": 42, "dir": "/tmp/arbor-0/persist-ab", "uptime_s": 3725,
            "idle_s": 75, "idle_limit_s": 600, "connections": 0, "hops": [
            {"node": 1, "label": "bastion1 (relay, from the controller)", "age_s": 3700,
             "sent_bytes": 400_000, "received_bytes": 900, "cache": {"bytes": 2_500_000, "entries": 31}},
            {"node": 2, "label": "target1 (agent, via bastion1)", "age_s": 5, "pid": 77,
             "python": "3.11.2", "sent_bytes": 2048, "received_bytes": 10}]});
        let text = status_text(&v);
        assert_eq!(
            text,
            "tree of daemon 42 (/tmp/arbor-0/persist-ab): up 1h2m, idle 1m15s of 10m0s, 0 run(s) connected\n\
             \x20 node    1  bastion1 (relay, from the controller)  up 1h1m, 390.6 KiB sent, 900 B received\n\
             \x20             cache: 2.4 MiB in 31 entries\n\
             \x20 node    2  target1 (agent, via bastion1)  up 5s, 2.0 KiB sent, 10 B received, pid 77, python 3.11.2\n"
        );
    }
}
