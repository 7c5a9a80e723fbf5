//! `arbor`: the controller. A daemon per Ansible run owns the tree (relays
//! in RAM on intermediaries, agents on targets) and serves the Ansible glue
//! on a private UNIX socket; a small CLI speaks to people.
//!
//! # Layout
//! - `main.rs`: the daemon's start and end (socket, peer check, teardown).
//! - `life.rs`: a run's daemon or a persistent one (idle bound, stop).
//! - `cli.rs`: the command line (clap).
//! - `relays.rs`: the relays carried, one per machine.
//! - `tree.rs`: the tree task (router node 0, ssh links, hop states).
//! - `api.rs`: the glue's requests (exec, put, fetch).
//! - `ansiballz.rs`: the zip inside an AnsiballZ script (key, members).
//! - `hops.rs`: which hop is which node; connect failures and resets.
//! - `becomes.rs`: the become agents of each login agent (LRU bound).
//! - `ssh.rs`: ssh command lines, known_hosts, key files.
//! - `sshconfig.rs`: what the controller's ssh config makes of a hop.
//! - `sshagent.rs`: the ssh-agent socket the tree's ssh use and forward.
//!
//! Exit codes: 0 success; 1 runtime error; 64 usage error.

mod ansiballz;
mod api;
mod becomes;
mod cli;
mod hops;
mod life;
mod methods;
mod relays;
mod shell;
mod ssh;
mod sshagent;
mod sshconfig;
mod tree;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches};
use tokio::net::UnixListener;

/// How often the daemon checks that its Ansible run is still alive.
const PARENT_POLL: Duration = Duration::from_millis(100);

fn main() {
    // Started again by one of the daemon's ssh as its SSH_ASKPASS program.
    if let Some(code) = arbor_io::askpass::answer_from_env() {
        std::process::exit(code);
    }
    let version: &'static str = Box::leak(cli::version_line().into_boxed_str());
    let parsed = cli::Cli::command()
        .version(version)
        .try_get_matches()
        .and_then(|m| cli::Cli::from_arg_matches(&m));
    let args = match parsed {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 64 } else { 0 });
        }
    };
    let code = match run(args.cmd) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("arbor: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cmd: Option<cli::Cmd>) -> Result<()> {
    use cli::Cmd;
    match cmd {
        None => {
            cli::Cli::command().print_long_help()?;
            Ok(())
        }
        Some(Cmd::Version) => {
            println!("arbor {}", cli::version_line());
            Ok(())
        }
        Some(Cmd::RelayInfo) => {
            let info: Vec<serde_json::Value> = relays::all()
                .iter()
                .map(|r| {
                    serde_json::json!({"machine": r.machine, "quic": r.quic, "bytes": r.bytes.len(), "build": r.build})
                })
                .collect();
            println!("{}", serde_json::Value::Array(info));
            Ok(())
        }
        #[cfg(not(feature = "quic"))]
        Some(Cmd::QuicProbe { .. }) => bail!("this arbor is built without QUIC"),
        #[cfg(feature = "quic")]
        Some(Cmd::QuicProbe { addr }) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match rt.block_on(arbor_io::quic::probe(
                addr,
                std::time::Duration::from_secs(5),
            )) {
                Ok(()) => {
                    println!("{addr}: let in");
                    std::process::exit(1);
                }
                Err(why) => {
                    println!("{addr}: refused: {why}");
                    Ok(())
                }
            }
        }
        Some(Cmd::RelayWrite {
            path,
            machine,
            quic,
        }) => {
            let relay = relays::carried(&machine, quic)
                .filter(|r| r.quic == quic)
                .with_context(|| format!("no relay carried for machine {machine}"))?;
            std::fs::write(&path, relay.bytes)
                .with_context(|| format!("writing {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            Ok(())
        }
        Some(Cmd::AgentCode) => {
            use std::io::Write;
            let code = arbor_bootstrap::agent_source();
            match std::io::stdout().write_all(code.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Some(Cmd::PluginPath) => {
            println!("{}", plugin_path().display());
            Ok(())
        }
        Some(Cmd::Plan { inventories, json }) => plan(&inventories, json),
        Some(Cmd::Daemon {
            run_dir,
            parent_pid,
            idle_secs,
        }) => daemon(run_dir, parent_pid, idle_secs.map(Duration::from_secs)),
        Some(Cmd::Status { json }) => life::status(json),
        Some(Cmd::Ssh { args }) => shell::exec(&plugin_path(), &args),
        Some(Cmd::Stop) => life::stop(),
    }
}

/// `arbor plan`: the inventory as Ansible reads it, planned.
fn plan(inventories: &[String], json: bool) -> Result<()> {
    let exe =
        std::env::var("ARBOR_ANSIBLE_INVENTORY").unwrap_or_else(|_| "ansible-inventory".into());
    let mut cmd = std::process::Command::new(&exe);
    for i in inventories {
        cmd.arg("-i").arg(i);
    }
    let out = cmd
        .arg("--list")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| {
            format!("running {exe} (set ARBOR_ANSIBLE_INVENTORY, or put ansible-core on PATH)")
        })?;
    if !out.status.success() {
        bail!(
            "{exe} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let inv: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("reading {exe}'s output"))?;
    let empty = serde_json::Map::new();
    let hostvars = inv
        .pointer("/_meta/hostvars")
        .and_then(serde_json::Value::as_object)
        .unwrap_or(&empty);
    let mut names = std::collections::BTreeSet::new();
    collect_hosts(&inv, "all", &mut names, 0);
    names.extend(hostvars.keys().cloned());
    let null = serde_json::Value::Null;
    let hosts = names
        .iter()
        .map(|n| arbor_topology::plan::HostSpec::from_vars(n, hostvars.get(n).unwrap_or(&null)))
        .collect::<Result<Vec<_>, _>>()?;
    let p = arbor_topology::plan::plan(&hosts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", p.render());
    }
    Ok(())
}

/// Every host of `group` and its children in `ansible-inventory --list`.
fn collect_hosts(
    inv: &serde_json::Value,
    group: &str,
    out: &mut std::collections::BTreeSet<String>,
    depth: usize,
) {
    let Some(g) = inv.get(group).filter(|_| depth <= 64) else {
        return;
    };
    let names = |key: &str| {
        g.get(key)
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
    };
    out.extend(names("hosts").map(str::to_string));
    for child in names("children") {
        collect_hosts(inv, child, out, depth + 1);
    }
}

/// Where the glue's connection plugins are, next to this source tree or an
/// installed share directory.
fn plugin_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    for base in exe.ancestors().skip(1) {
        let p = base.join("ansible-glue/plugins/connection");
        if p.is_dir() {
            return p;
        }
        let p = base.join("share/arbor/ansible-glue/plugins/connection");
        if p.is_dir() {
            return p;
        }
    }
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ansible-glue/plugins/connection"
    ))
}

/// Makes the run directory private, or refuses one that is not ours.
fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || meta.uid() != uid {
        bail!("{} is not a directory owned by uid {uid}", dir.display());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Longest path a UNIX socket may have (`sun_path`, its NUL included).
const SOCKET_PATH_MAX: usize = 107;

fn daemon(run_dir: PathBuf, parent: Option<i32>, idle: Option<Duration>) -> Result<()> {
    // The longest socket the daemon makes there is its ssh-agent's.
    let longest = run_dir.join("agent.sock");
    if longest.as_os_str().len() > SOCKET_PATH_MAX {
        bail!(
            "{} is too long for a UNIX socket path ({SOCKET_PATH_MAX} bytes at most): \
             set TMPDIR to a shorter directory",
            longest.display()
        );
    }
    private_dir(&run_dir)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARBOR_LOG")
                .unwrap_or_else(|_| "arbor=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(serve(&run_dir, parent, idle));
    // The run is over: nothing of it stays behind.
    let dir = result.as_ref().unwrap_or(&run_dir);
    let _ = std::fs::remove_dir_all(dir);
    result.map(|_| ())
}

/// `ARBOR_MAX_INTERPRETERS` (or Mitogen's `MITOGEN_MAX_INTERPRETERS`):
/// most interpreters per target, at least 2.
fn interpreters_max() -> usize {
    ["ARBOR_MAX_INTERPRETERS", "MITOGEN_MAX_INTERPRETERS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(tree::INTERPRETERS_MAX_DEFAULT)
        .max(2)
}

/// `ARBOR_CONNECT_CONCURRENCY`: most children of one relay connecting at
/// once, at least 1.
fn connecting_max() -> u16 {
    std::env::var("ARBOR_CONNECT_CONCURRENCY")
        .ok()
        .and_then(|v| v.trim().parse::<u16>().ok())
        .unwrap_or(tree::CONNECTING_MAX_DEFAULT)
        .max(1)
}

/// Whether process `pid` is gone or a zombie (it ended; its parent has not
/// reaped it yet, as a profiler or a stopped shell may leave it).
fn process_ended(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Serves until the run ends (or, persistent, until idle or stopped).
/// Returns the directory to remove.
async fn serve(run_dir: &Path, parent: Option<i32>, idle: Option<Duration>) -> Result<PathBuf> {
    let sock = run_dir.join("sock");
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/".into());
    let (tree, handle) = tree::Tree::new(tree::Config {
        run_dir: run_dir.to_path_buf(),
        ssh_config: sshconfig::SshConfig::new(home.clone()),
        user_agent: std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from),
        home,
        interpreters_max: interpreters_max(),
        connecting_max: connecting_max(),
    });
    let tree_task = tokio::spawn(tree.run());
    let holdings = api::Holdings::new(handle.hellos());
    let life = life::Life::new(idle);
    tracing::info!(socket = %sock.display(), ?parent, ?idle, "arbor daemon serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut poll = tokio::time::interval(PARENT_POLL);
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (conn, _) = conn?;
                match conn.peer_cred() {
                    Ok(c) if c.uid() == uid => {
                        let open = life.opened();
                        tokio::spawn(api::serve(conn, handle.clone(), holdings.clone(), open));
                    }
                    Ok(c) => tracing::warn!(peer_uid = c.uid(), "refused a connection from another user"),
                    Err(e) => tracing::warn!(error = %e, "refused a connection without credentials"),
                }
            }
            _ = poll.tick() => {
                if let Some(pid) = parent {
                    if process_ended(pid) {
                        tracing::info!(pid, "the Ansible run ended; tearing the tree down");
                        break;
                    }
                }
                if !sock.exists() {
                    tracing::info!("socket removed; tearing the tree down");
                    break;
                }
                if life.idle_over() {
                    tracing::info!(idle = ?life.idle_for(0), "idle for its bound; tearing the tree down");
                    break;
                }
            }
            _ = life.stopped() => {
                tracing::info!("asked to stop; tearing the tree down");
                break;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // A persistent daemon's directory is the next run's to make: it is
    // moved aside first, so a run that comes while this tree goes down
    // starts a new daemon there and nothing of it is removed.
    let mut dir = run_dir.to_path_buf();
    if idle.is_some() {
        let aside = run_dir.with_file_name(format!("ending-{}", std::process::id()));
        if std::fs::rename(run_dir, &aside).is_ok() {
            dir = aside;
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(dir.join("sock"));
    handle.shutdown().await;
    let _ = tree_task.await;
    Ok(dir)
}
