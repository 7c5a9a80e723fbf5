//! ssh command lines for each hop, and the known_hosts a remote hop checks.
//!
//! The first hop runs on the controller and uses the user's ssh settings as
//! they are. Hops run by a relay get no option that names a controller file
//! (keys, configs, known_hosts paths, control sockets): they authenticate
//! with the forwarded agent, and check host keys against the controller's
//! known_hosts, which the relay holds in an in-RAM file for them.

use std::path::{Path, PathBuf};

use arbor_topology::Hop;

use crate::sshconfig::{self, Resolved};

/// Bytes of known_hosts sent with one spawn, at most.
pub const KNOWN_HOSTS_BYTES_MAX: usize = 4 << 20;
/// Connect timeout when the inventory sets none (Ansible's default).
pub const CONNECT_TIMEOUT_S_DEFAULT: u32 = 10;
/// Default of `ARBOR_KEEPALIVE_SECS`: a hop that answers nothing for this
/// long is declared dead (ssh's ServerAlive probes, a third of it apart,
/// two unanswered). Long enough to ride out a minute's outage of a
/// cellular or satellite link: TCP's own retransmissions, backing off,
/// may resend the first time after the link is back up to about a minute
/// later (102 s after a 60 s stall began, at a 200 ms timeout; 127 s at
/// 500 ms), and the hop must still be alive then. Mitogen's is 300 s.
pub const KEEPALIVE_S_DEFAULT: u32 = 180;

/// The dead-hop bound of this run: `ARBOR_KEEPALIVE_SECS`, at least 3.
pub fn keepalive_secs() -> u32 {
    static SECS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SECS.get_or_init(|| {
        std::env::var("ARBOR_KEEPALIVE_SECS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(KEEPALIVE_S_DEFAULT)
            .max(3)
    })
}

/// ssh's options for a dead-hop bound of `secs`: it gives up after
/// `ServerAliveCountMax + 1` silent intervals.
fn keepalive_options(secs: u32) -> [String; 2] {
    [
        format!("ServerAliveInterval={}", (secs / 3).max(1)),
        "ServerAliveCountMax=2".to_string(),
    ]
}

/// Options whose value is a controller path or a multiplexing setting.
const CONTROLLER_ONLY: [&str; 11] = [
    "identityfile",
    "userknownhostsfile",
    "globalknownhostsfile",
    "controlpath",
    "controlmaster",
    "controlpersist",
    "proxyjump",
    "proxycommand",
    "identityagent",
    "certificatefile",
    "knownhostscommand",
];
/// Multiplexing options arbor never wants, even on the first hop.
const NEVER: [&str; 3] = ["controlpath", "controlmaster", "controlpersist"];

/// One ssh option or flag from the user's arguments.
#[derive(Debug, PartialEq, Eq)]
enum Arg {
    /// `-o Key=Value` (key lower-cased), with its original words.
    Opt(String, String, Vec<String>),
    /// A flag that takes a file (`-i`, `-F`, `-J`, `-E`, `-S`): dropped remotely.
    FileFlag(Vec<String>),
    Other(String),
}

fn parse_args(words: &[String]) -> Vec<Arg> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        let (opt, used) = if w == "-o" && i + 1 < words.len() {
            (Some(words[i + 1].clone()), 2)
        } else if let Some(rest) = w.strip_prefix("-o").filter(|r| !r.is_empty()) {
            (Some(rest.to_string()), 1)
        } else {
            (None, 1)
        };
        if let Some(o) = opt {
            let (k, v) = match o.split_once(['=', ' ']) {
                Some((k, v)) => (k.trim().to_ascii_lowercase(), v.trim().to_string()),
                None => (o.trim().to_ascii_lowercase(), String::new()),
            };
            out.push(Arg::Opt(k, v, words[i..i + used].to_vec()));
            i += used;
            continue;
        }
        if ["-i", "-F", "-J", "-E", "-S"].contains(&w.as_str()) && i + 1 < words.len() {
            out.push(Arg::FileFlag(words[i..i + 2].to_vec()));
            i += 2;
            continue;
        }
        out.push(Arg::Other(w.clone()));
        i += 1;
    }
    out
}

/// How a hop's ssh is made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mode {
    /// Run by the controller (else by a relay, which reads none of the
    /// controller's files).
    pub local: bool,
    /// The hop will start children that authenticate with the agent.
    pub forward_agent: bool,
    /// A password answers ssh's prompt (through SSH_ASKPASS).
    pub password: bool,
}

/// Log levels at which ssh says too little to name why it failed.
const QUIET_LEVELS: [&str; 3] = ["quiet", "fatal", "error"];

/// The ssh command that reaches `hop` and runs `remote_cmd` there.
/// `resolved`: what the controller's ssh config makes of the hop, for a
/// hop a relay runs.
pub fn argv(hop: &Hop, remote_cmd: &str, mode: Mode, resolved: Option<&Resolved>) -> Vec<String> {
    let program = if mode.local {
        sshconfig::program(hop)
    } else {
        "ssh"
    };
    let mut a: Vec<String> = vec![program.into()];
    let mut o = |s: String| {
        a.push("-o".into());
        a.push(s);
    };
    let carried = resolved.filter(|_| !mode.local);
    if let Some(r) = carried {
        // A relay's ssh may be older than the controller's.
        let keys: Vec<&str> = r.options.iter().map(|(k, _)| k.as_str()).collect();
        if !keys.is_empty() {
            o(format!("IgnoreUnknown={}", keys.join(",")));
        }
    }
    if mode.password {
        o("BatchMode=no".into());
        o("NumberOfPasswordPrompts=1".into());
    } else {
        o("BatchMode=yes".into());
    }
    o(format!(
        "ConnectTimeout={}",
        hop.timeout_s.unwrap_or(CONNECT_TIMEOUT_S_DEFAULT)
    ));
    // The user's own ServerAlive options win (ssh takes an option's first
    // value, and theirs come later, or from their config).
    let parsed = parse_args(&hop.ssh_args);
    let theirs = parsed.iter().any(|a| {
        matches!(a, Arg::Opt(k, _, _) if k == "serveraliveinterval" || k == "serveralivecountmax")
    }) || resolved.is_some_and(|r| r.sets("serveraliveinterval") || r.sets("serveralivecountmax"));
    if !theirs {
        for opt in keepalive_options(keepalive_secs()) {
            o(opt);
        }
    }
    // ssh must say why it failed, whatever the user's config or arguments
    // quiet it to (its stderr is only ever read by arbor, for messages).
    let their_level = parsed.iter().find_map(|a| match a {
        Arg::Opt(k, v, _) if k == "loglevel" => Some(v.to_ascii_lowercase()),
        _ => None,
    });
    let ours_level = their_level
        .as_deref()
        .is_none_or(|l| QUIET_LEVELS.contains(&l));
    if ours_level {
        o("LogLevel=INFO".into());
    }
    o(format!(
        "StrictHostKeyChecking={}",
        if hop.host_key_checking { "yes" } else { "no" }
    ));
    if mode.forward_agent {
        o("ForwardAgent=yes".into());
    }
    if !mode.local {
        o(format!(
            "UserKnownHostsFile={}",
            arbor_wire::control::KNOWN_HOSTS_TOKEN
        ));
        o("GlobalKnownHostsFile=/dev/null".into());
    } else if let Some(key) = &hop.key_file {
        a.push("-i".into());
        a.push(key.clone());
    }
    if let Some(r) = carried {
        for (k, v) in &r.options {
            a.push("-o".into());
            a.push(format!("{k}={v}"));
        }
    }
    for arg in parsed {
        match arg {
            Arg::Opt(k, _, _) if NEVER.contains(&k.as_str()) => {}
            Arg::Opt(k, _, _) if k == "loglevel" && ours_level => {}
            Arg::Opt(k, _, _) if !mode.local && CONTROLLER_ONLY.contains(&k.as_str()) => {}
            Arg::Opt(_, _, words) => a.extend(words),
            Arg::FileFlag(_) if !mode.local => {}
            Arg::FileFlag(words) => a.extend(words),
            Arg::Other(w) if w == "-q" => {}
            Arg::Other(w) => a.push(w),
        }
    }
    let (host, port, user) = match carried {
        Some(r) => (
            r.hostname.clone(),
            Some(r.port),
            Some(r.user.clone()).filter(|u| !u.is_empty()),
        ),
        None => (hop.host.clone(), hop.port, hop.user.clone()),
    };
    if let Some(port) = port {
        a.push("-p".into());
        a.push(port.to_string());
    }
    if let Some(user) = user {
        a.push("-l".into());
        a.push(user);
    }
    a.push("-T".into());
    a.push("--".into());
    a.push(host);
    a.push(remote_cmd.into());
    a
}

fn expand_home(p: &str, home: &Path) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => PathBuf::from(p),
    }
}

/// The known_hosts lines a remote hop checks `hop`'s key against: the files
/// the controller's ssh would read for it (`resolved`), else those its ssh
/// arguments name, else the controller's defaults.
pub fn known_hosts(hop: &Hop, home: &Path, resolved: Option<&Resolved>) -> Vec<u8> {
    if let Some(r) = resolved {
        return read_known_hosts(&r.known_hosts_files);
    }
    let mut user = Vec::new();
    let mut global = Vec::new();
    for arg in parse_args(&hop.ssh_args) {
        if let Arg::Opt(k, v, _) = arg {
            let files = v.split_whitespace().map(|f| expand_home(f, home));
            match k.as_str() {
                "userknownhostsfile" => user.extend(files),
                "globalknownhostsfile" => global.extend(files),
                _ => {}
            }
        }
    }
    if user.is_empty() {
        user = vec![
            home.join(".ssh/known_hosts"),
            home.join(".ssh/known_hosts2"),
        ];
    }
    if global.is_empty() {
        global = vec![
            "/etc/ssh/ssh_known_hosts".into(),
            "/etc/ssh/ssh_known_hosts2".into(),
        ];
    }
    user.extend(global);
    read_known_hosts(&user)
}

/// The lines of `files` (those that can be read), up to the bound.
fn read_known_hosts(files: &[PathBuf]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in files {
        if let Ok(data) = std::fs::read(f) {
            if out.len() + data.len() > KNOWN_HOSTS_BYTES_MAX {
                break;
            }
            out.extend_from_slice(&data);
            if !out.ends_with(b"\n") {
                out.push(b'\n');
            }
        }
    }
    out
}

/// Key files the hop would use (`ansible_ssh_private_key_file`, `-i`,
/// `IdentityFile`, and those the controller's ssh config gives it,
/// `~/.ssh/id_*` by default), for the controller's private agent.
pub fn key_files(hop: &Hop, home: &Path, resolved: Option<&Resolved>) -> Vec<PathBuf> {
    let mut keys: Vec<PathBuf> = hop.key_file.iter().map(|k| expand_home(k, home)).collect();
    keys.extend(
        resolved
            .into_iter()
            .flat_map(|r| r.identity_files.iter().cloned()),
    );
    for arg in parse_args(&hop.ssh_args) {
        match arg {
            Arg::Opt(k, v, _) if k == "identityfile" => keys.push(expand_home(&v, home)),
            Arg::FileFlag(w) if w[0] == "-i" => keys.push(expand_home(&w[1], home)),
            _ => {}
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(args: &[&str]) -> Hop {
        Hop {
            name: "bastion1".into(),
            method: "ssh".into(),
            host: "10.0.0.1".into(),
            port: Some(2222),
            user: Some("root".into()),
            key_file: Some("/keys/id".into()),
            ssh_args: args.iter().map(|s| s.to_string()).collect(),
            host_key_checking: true,
            ..Hop::default()
        }
    }

    #[test]
    fn local_hop_keeps_user_settings_but_not_multiplexing() {
        let h = hop(&[
            "-C",
            "-o",
            "ControlMaster=auto",
            "-o",
            "ControlPersist=60s",
            "-o",
            "UserKnownHostsFile=/lab/known_hosts",
            "-F",
            "/lab/cfg",
        ]);
        let mode = Mode {
            local: true,
            forward_agent: true,
            password: false,
        };
        let a = argv(&h, "run", mode, None);
        let s = a.join(" ");
        assert!(s.contains("-i /keys/id") && s.contains("UserKnownHostsFile=/lab/known_hosts"));
        assert!(s.contains("-F /lab/cfg") && s.contains("ForwardAgent=yes") && s.contains(" -C "));
        assert!(!s.contains("Control"));
        assert_eq!(&a[a.len() - 4..], ["-T", "--", "10.0.0.1", "run"]);
        assert!(s.contains("-p 2222 -l root"));
    }

    #[test]
    fn keepalive_is_ours_unless_the_user_sets_it() {
        let s = argv(&hop(&[]), "run", Mode::default(), None).join(" ");
        let [i, c] = keepalive_options(keepalive_secs());
        assert!(s.contains(&i) && s.contains(&c), "{s}");
        assert_eq!(
            keepalive_options(30),
            ["ServerAliveInterval=10", "ServerAliveCountMax=2"]
        );
        let s = argv(
            &hop(&["-o", "ServerAliveInterval=5"]),
            "run",
            Mode::default(),
            None,
        )
        .join(" ");
        assert!(s.contains("ServerAliveInterval=5") && !s.contains("ServerAliveCountMax"));
    }

    #[test]
    fn remote_hop_names_no_controller_file() {
        let h = hop(&[
            "-o",
            "UserKnownHostsFile=/lab/known_hosts",
            "-oIdentityFile=/k",
            "-i",
            "/other",
            "-F",
            "/cfg",
            "-o",
            "Ciphers=aes128-ctr",
        ]);
        let s = argv(&h, "run", Mode::default(), None).join(" ");
        assert!(
            !s.contains("/lab")
                && !s.contains("/k")
                && !s.contains("/other")
                && !s.contains("/cfg")
        );
        assert!(
            s.contains("UserKnownHostsFile=@ARBOR_KNOWN_HOSTS@")
                && s.contains("Ciphers=aes128-ctr")
        );
        assert!(!s.contains("ForwardAgent"));
    }

    #[test]
    fn known_hosts_come_from_the_named_files() {
        let dir = std::env::temp_dir().join(format!("arbor-kh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("kh");
        std::fs::write(&f, "target1 ssh-ed25519 AAAA").expect("write");
        let h = hop(&[
            "-o",
            &format!("UserKnownHostsFile={}", f.display()),
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ]);
        assert_eq!(known_hosts(&h, &dir, None), b"target1 ssh-ed25519 AAAA\n");
        assert_eq!(key_files(&h, &dir, None), vec![PathBuf::from("/keys/id")]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_password_turns_batch_mode_off_and_quiet_logs_are_raised() {
        let mode = Mode {
            local: true,
            forward_agent: false,
            password: true,
        };
        let s = argv(&hop(&["-q", "-o", "LogLevel=ERROR"]), "run", mode, None).join(" ");
        assert!(
            s.contains("BatchMode=no") && s.contains("NumberOfPasswordPrompts=1"),
            "{s}"
        );
        assert!(
            s.contains("LogLevel=INFO") && !s.contains("ERROR") && !s.contains(" -q "),
            "{s}"
        );
        let s = argv(
            &hop(&["-o", "LogLevel=DEBUG2"]),
            "run",
            Mode::default(),
            None,
        )
        .join(" ");
        assert!(
            s.contains("BatchMode=yes") && s.contains("LogLevel=DEBUG2") && !s.contains("INFO")
        );
    }

    #[test]
    fn a_remote_hop_carries_what_the_controllers_config_resolved() {
        let r = Resolved {
            hostname: "10.1.2.3".into(),
            user: "ops".into(),
            port: 2200,
            options: vec![
                ("ciphers".into(), "aes128-ctr".into()),
                ("sendenv".into(), "LANG".into()),
            ],
            ..Resolved::default()
        };
        let mut h = hop(&[]);
        h.exe = Some("/opt/ssh/bin/ssh".into());
        let a = argv(&h, "run", Mode::default(), Some(&r));
        let s = a.join(" ");
        assert_eq!(a[0], "ssh", "a relay runs its host's own ssh");
        assert!(
            s.contains("-o IgnoreUnknown=ciphers,sendenv") && s.contains("-o ciphers=aes128-ctr")
        );
        assert!(
            s.contains("-p 2200 -l ops") && s.ends_with("-- 10.1.2.3 run"),
            "{s}"
        );
        // The first hop reads the config itself, with the user's own ssh.
        let a = argv(
            &h,
            "run",
            Mode {
                local: true,
                ..Mode::default()
            },
            Some(&r),
        );
        assert_eq!(a[0], "/opt/ssh/bin/ssh");
        assert!(a.join(" ").ends_with("-p 2222 -l root -T -- 10.0.0.1 run"));
    }
}
