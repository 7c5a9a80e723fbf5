//! What the controller's own OpenSSH would use for a hop, from `ssh -G`:
//! the address, user and port after the user's ssh_config (aliases,
//! `User`, `Port`, `HostName`), the identity files it would try, and the
//! options the config files set.
//!
//! The first hop runs ssh on the controller, which reads all of it itself.
//! A hop that a relay runs cannot read the controller's files, so arbor
//! carries them: the resolved address, user and port, the config's options
//! (those that differ from ssh's defaults without any config file, minus
//! those naming controller files), and the identity files, loaded into the
//! daemon's private agent. So a deeper hop authenticates and behaves as
//! plain OpenSSH with ProxyJump would, from the same ssh_config.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_topology::Hop;
use tokio::process::Command;

/// Longest a `ssh -G` may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most hops remembered (each a few KB).
const CACHE_ENTRIES_MAX: usize = 16384;

/// Options a remote ssh must not get from the controller's config: arbor
/// sets them itself, they name controller files or sockets, or they only
/// make sense on the controller.
const NOT_CARRIED: &[&str] = &[
    "host",
    "hostname",
    "user",
    "port",
    "identityfile",
    "identitiesonly",
    "identityagent",
    "certificatefile",
    "controlpath",
    "controlmaster",
    "controlpersist",
    "proxyjump",
    "proxycommand",
    "proxyusefdpass",
    "userknownhostsfile",
    "globalknownhostsfile",
    "knownhostscommand",
    "revokedhostkeys",
    "stricthostkeychecking",
    "updatehostkeys",
    "hashknownhosts",
    "batchmode",
    "loglevel",
    "logverbose",
    "connecttimeout",
    "forwardagent",
    "addkeystoagent",
    "pkcs11provider",
    "securitykeyprovider",
    "xauthlocation",
    "localcommand",
    "permitlocalcommand",
    "remotecommand",
    "requesttty",
    "sessiontype",
    "stdinnull",
    "forkafterauthentication",
    "localforward",
    "remoteforward",
    "dynamicforward",
    "clearallforwardings",
    "exitonforwardfailure",
    "bindaddress",
    "bindinterface",
    "canonicalizehostname",
    "canonicaldomains",
    "canonicalizefallbacklocal",
    "canonicalizemaxdots",
    "canonicalizepermittedcnames",
    "tunnel",
    "tunneldevice",
    "include",
    "match",
    "tag",
    "escapechar",
    "numberofpasswordprompts",
    "enablesshkeysign",
];

/// A hop as the controller's ssh would make it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub hostname: String,
    pub user: String,
    pub port: u16,
    /// Identity files ssh would try, in its order, that exist.
    pub identity_files: Vec<PathBuf>,
    /// The known_hosts files ssh would read (user's, then global).
    pub known_hosts_files: Vec<PathBuf>,
    /// Options the config files set, for a remote ssh (`key value`).
    pub options: Vec<(String, String)>,
}

impl Resolved {
    /// Whether the user's config sets one of ssh's keepalive options.
    pub fn sets(&self, key: &str) -> bool {
        self.options.iter().any(|(k, _)| k == key)
    }
}

/// `ssh -G` output: each key's values, in order.
fn parse(out: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.lines() {
        if let Some((k, v)) = line.split_once(' ') {
            map.entry(k.to_ascii_lowercase())
                .or_default()
                .push(v.to_string());
        }
    }
    map
}

fn expand(p: &str, home: &Path) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => PathBuf::from(p),
    }
}

/// The resolution of `full` (the user's `ssh -G`) against `bare` (the same
/// with no config file).
fn resolve_from(full: &str, bare: &str, home: &Path) -> Result<Resolved, String> {
    let full = parse(full);
    let bare = parse(bare);
    let one = |k: &str| full.get(k).and_then(|v| v.first()).cloned();
    let hostname = one("hostname").ok_or("ssh -G printed no hostname")?;
    let user = one("user").unwrap_or_default();
    let port = one("port")
        .and_then(|p| p.parse().ok())
        .ok_or("ssh -G printed no port")?;
    let identity_files = full
        .get("identityfile")
        .into_iter()
        .flatten()
        .map(|f| expand(f, home))
        .filter(|f| f.is_file())
        .collect();
    let known_hosts_files = ["userknownhostsfile", "globalknownhostsfile"]
        .iter()
        .flat_map(|k| full.get(*k).into_iter().flatten())
        .flat_map(|v| v.split_whitespace())
        .map(|f| expand(f, home))
        .collect();
    let mut options = Vec::new();
    for (k, values) in &full {
        if NOT_CARRIED.contains(&k.as_str()) || bare.get(k) == Some(values) {
            continue;
        }
        for v in values {
            options.push((k.clone(), v.clone()));
        }
    }
    Ok(Resolved {
        hostname,
        user,
        port,
        identity_files,
        known_hosts_files,
        options,
    })
}

/// The arguments of `ssh -G` for `hop`; `bare` leaves out every config file.
fn g_args(hop: &Hop, bare: bool) -> Vec<String> {
    let mut a = vec!["-G".to_string()];
    if bare {
        a.extend(["-F".to_string(), "/dev/null".to_string()]);
    }
    let mut i = 0;
    while i < hop.ssh_args.len() {
        let w = &hop.ssh_args[i];
        if bare && w == "-F" {
            i += 2;
            continue;
        }
        a.push(w.clone());
        i += 1;
    }
    if let Some(k) = &hop.key_file {
        a.extend(["-i".to_string(), k.clone()]);
    }
    if let Some(p) = hop.port {
        a.extend(["-p".to_string(), p.to_string()]);
    }
    if let Some(u) = &hop.user {
        a.extend(["-l".to_string(), u.clone()]);
    }
    a.extend(["--".to_string(), hop.host.clone()]);
    a
}

/// The ssh program of a hop run on the controller (`ansible_ssh_executable`).
pub fn program(hop: &Hop) -> &str {
    hop.exe.as_deref().unwrap_or("ssh")
}

async fn run_g(hop: &Hop, bare: bool) -> Result<String, String> {
    let out = Command::new(program(hop))
        .args(g_args(hop, bare))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(RESOLVE_TIMEOUT, out)
        .await
        .map_err(|_| format!("{} -G took longer than {RESOLVE_TIMEOUT:?}", program(hop)))?
        .map_err(|e| format!("cannot run {}: {e}", program(hop)))?;
    if !out.status.success() {
        let err = arbor_io::tidy_tail(&out.stderr);
        return Err(format!(
            "{} -G (reading the ssh configuration): {}",
            program(hop),
            if err.is_empty() {
                out.status.to_string()
            } else {
                err
            }
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Resolutions by hop, shared by the API (which resolves before it asks the
/// tree for a hop) and the tree (which reads them when it starts one).
#[derive(Clone)]
pub struct SshConfig {
    home: PathBuf,
    cache: Arc<Mutex<HashMap<Vec<String>, Arc<Resolved>>>>,
}

impl SshConfig {
    pub fn new(home: PathBuf) -> Self {
        SshConfig {
            home,
            cache: Arc::default(),
        }
    }

    fn key(hop: &Hop) -> Vec<String> {
        let mut k = g_args(hop, false);
        k.push(program(hop).to_string());
        k
    }

    /// What was resolved for `hop`, if it was.
    pub fn get(&self, hop: &Hop) -> Option<Arc<Resolved>> {
        if hop.method != "ssh" {
            return None;
        }
        self.cache.lock().ok()?.get(&Self::key(hop)).cloned()
    }

    /// Resolves an ssh hop once (later calls are answered from memory).
    pub async fn resolve(&self, hop: &Hop) -> Result<Option<Arc<Resolved>>, String> {
        if hop.method != "ssh" {
            return Ok(None);
        }
        if let Some(r) = self.get(hop) {
            return Ok(Some(r));
        }
        let (full, bare) = tokio::join!(run_g(hop, false), run_g(hop, true));
        let r = Arc::new(resolve_from(&full?, &bare?, &self.home)?);
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_ENTRIES_MAX {
                c.clear();
            }
            c.insert(Self::key(hop), r.clone());
        }
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_sets_what_differs_from_no_config() {
        let dir = std::env::temp_dir().join(format!("arbor-sshcfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".ssh")).expect("dir");
        std::fs::write(dir.join(".ssh/id_ed25519"), "key").expect("key");
        let bare = "host b1\nhostname b1\nuser root\nport 22\nciphers a,b\nsendenv LANG\n\
                    identityfile ~/.ssh/id_rsa\nidentityfile ~/.ssh/id_ed25519\n";
        let full = "host b1\nhostname 10.0.0.1\nuser ops\nport 2222\nciphers b\nsendenv LANG\n\
                    sendenv LC_*\nidentityfile ~/.ssh/id_rsa\nidentityfile ~/.ssh/id_ed25519\n\
                    identityagent /run/user/agent\nserveraliveinterval 5\n\
                    userknownhostsfile ~/.ssh/known_hosts /lab/kh\nglobalknownhostsfile /dev/null\n";
        let r = resolve_from(full, bare, &dir).expect("resolved");
        assert_eq!(
            (r.hostname.as_str(), r.user.as_str(), r.port),
            ("10.0.0.1", "ops", 2222)
        );
        // Only the files that exist; ~ is the user's home.
        assert_eq!(r.identity_files, vec![dir.join(".ssh/id_ed25519")]);
        assert_eq!(
            r.options,
            vec![
                ("ciphers".to_string(), "b".to_string()),
                ("sendenv".to_string(), "LANG".to_string()),
                ("sendenv".to_string(), "LC_*".to_string()),
                ("serveraliveinterval".to_string(), "5".to_string()),
            ]
        );
        assert!(r.sets("serveraliveinterval"));
        assert_eq!(
            r.known_hosts_files,
            vec![
                dir.join(".ssh/known_hosts"),
                "/lab/kh".into(),
                "/dev/null".into()
            ]
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn g_args_keep_the_users_arguments_and_drop_their_config_when_bare() {
        let hop = Hop {
            name: "b1".into(),
            method: "ssh".into(),
            host: "b1".into(),
            port: Some(2222),
            user: Some("ops".into()),
            key_file: Some("/k".into()),
            ssh_args: vec!["-F".into(), "/cfg".into(), "-o".into(), "Ciphers=b".into()],
            ..Hop::default()
        };
        let full = g_args(&hop, false).join(" ");
        assert_eq!(full, "-G -F /cfg -o Ciphers=b -i /k -p 2222 -l ops -- b1");
        let bare = g_args(&hop, true).join(" ");
        assert_eq!(
            bare,
            "-G -F /dev/null -o Ciphers=b -i /k -p 2222 -l ops -- b1"
        );
    }

    #[tokio::test]
    async fn real_ssh_resolves_a_config_alias() {
        let dir = std::env::temp_dir().join(format!("arbor-sshcfg-real-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = dir.join("config");
        std::fs::write(
            &cfg,
            "Host b1\n  HostName 10.9.8.7\n  User ops\n  Port 2200\n",
        )
        .expect("cfg");
        let hop = Hop {
            name: "bastion".into(),
            method: "ssh".into(),
            host: "b1".into(),
            ssh_args: vec!["-F".into(), cfg.display().to_string()],
            ..Hop::default()
        };
        let cfgs = SshConfig::new(dir.clone());
        let r = cfgs
            .resolve(&hop)
            .await
            .expect("ssh -G")
            .expect("an ssh hop");
        assert_eq!(
            (r.hostname.as_str(), r.user.as_str(), r.port),
            ("10.9.8.7", "ops", 2200)
        );
        assert!(cfgs.get(&hop).is_some());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
