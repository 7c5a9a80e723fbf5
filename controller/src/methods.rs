//! Command lines that enter a container (or jail) from the host before it:
//! the relay there (or the controller, for a first hop) runs them as given,
//! with the hop's start command (a shell command line: the agent's or the
//! relay's stage 0) inside. Like Mitogen's methods of the same names.

use arbor_bootstrap::sh_quote;
use arbor_topology::Hop;

/// The program a method runs, unless the hop names another.
fn default_exe(method: &str) -> &'static str {
    match method {
        "docker" => "docker",
        "podman" => "podman",
        "buildah" => "buildah",
        "lxc" => "lxc-attach",
        "lxd" => "lxc",
        "incus" => "incus",
        "kubectl" => "kubectl",
        "machinectl" => "machinectl",
        "jail" => "jexec",
        "sudo" => "sudo",
        "su" => "su",
        "doas" => "doas",
        _ => "nsenter",
    }
}

/// The argv that runs `cmd` (one shell command line) in `hop`.
pub fn argv(hop: &Hop, cmd: &str) -> Vec<String> {
    let exe = hop
        .exe
        .clone()
        .unwrap_or_else(|| default_exe(&hop.method).to_string());
    let name = hop.host.clone();
    let user = hop.user.clone().filter(|u| !u.is_empty());
    let sh = |c: &str| vec!["/bin/sh".to_string(), "-c".to_string(), c.to_string()];
    let mut a = vec![exe.clone()];
    match hop.method.as_str() {
        "docker" | "podman" => {
            a.extend(["exec".into(), "-i".into()]);
            if let Some(u) = user {
                a.extend(["-u".into(), u]);
            }
            a.extend(hop.extra_args.iter().cloned());
            a.push(name);
            a.extend(sh(cmd));
        }
        "buildah" => {
            a.push("run".into());
            if let Some(u) = user {
                a.extend(["--user".into(), u]);
            }
            a.extend(hop.extra_args.iter().cloned());
            a.extend([name, "--".into()]);
            a.extend(sh(cmd));
        }
        "lxc" => {
            a.extend(["--clear-env".into(), "-n".into(), name]);
            a.extend(hop.extra_args.iter().cloned());
            a.push("--".into());
            a.extend(with_user(user, cmd));
        }
        "lxd" | "incus" => {
            a.extend(["exec".into(), "--mode=non-interactive".into()]);
            a.extend(hop.extra_args.iter().cloned());
            a.extend([name, "--".into()]);
            a.extend(with_user(user, cmd));
        }
        "kubectl" => {
            a.extend(["exec".into(), "-i".into()]);
            a.extend(hop.extra_args.iter().cloned());
            a.extend([name, "--".into()]);
            a.extend(sh(cmd));
        }
        "jail" => {
            if let Some(u) = user {
                a.extend(["-U".into(), u]);
            }
            a.push(name);
            a.extend(sh(cmd));
        }
        // Become tools as hops: the password, if any, is the first line of
        // the child's stdin (`stdin_prefix`), read by sudo alone.
        "sudo" => {
            let reads = if hop.password.is_some() { "-S" } else { "-n" };
            a.extend(["-H".into(), reads.into(), "-p".into(), String::new()]);
            a.extend(["-u".into(), user.unwrap_or_else(|| "root".into())]);
            a.extend(hop.extra_args.iter().cloned());
            a.push("--".into());
            a.extend(sh(cmd));
        }
        "su" => {
            a.extend(hop.extra_args.iter().cloned());
            a.extend(["-s".into(), "/bin/sh".into()]);
            a.push(user.unwrap_or_else(|| "root".into()));
            a.extend(["-c".into(), cmd.into()]);
        }
        "doas" => {
            a.extend([
                "-n".into(),
                "-u".into(),
                user.unwrap_or_else(|| "root".into()),
            ]);
            a.extend(sh(cmd));
        }
        // setns and machinectl: find the container's first process, then
        // enter all its namespaces and its root and cwd.
        _ => return setns(hop, &exe, user, cmd),
    }
    a
}

/// What the child's stdin carries before its own preamble: `sudo`'s
/// password line. `su` and `doas` read a password only from a terminal, so
/// as hops they work without one.
pub fn stdin_prefix(hop: &Hop) -> Result<Vec<u8>, String> {
    match (&hop.password, hop.method.as_str()) {
        (Some(p), "sudo") => Ok(format!("{}\n", p.0).into_bytes()),
        (Some(_), m @ ("su" | "doas")) => Err(format!(
            "{}: {m} as a hop reads its password from a terminal only; give the account a rule without one, or use sudo",
            hop.name
        )),
        _ => Ok(Vec::new()),
    }
}

/// `cmd` as `user` (with su) or as whoever enters (root: these tools need it).
fn with_user(user: Option<String>, cmd: &str) -> Vec<String> {
    match user.filter(|u| u != "root" && u != "0") {
        Some(u) => vec![
            "su".into(),
            "-s".into(),
            "/bin/sh".into(),
            u,
            "-c".into(),
            cmd.into(),
        ],
        None => vec!["/bin/sh".into(), "-c".into(), cmd.into()],
    }
}

fn setns(hop: &Hop, exe: &str, user: Option<String>, cmd: &str) -> Vec<String> {
    let name = sh_quote(&hop.host);
    let kind = if hop.method == "machinectl" {
        "machinectl"
    } else {
        hop.kind.as_deref().unwrap_or("pid")
    };
    // machinectl's own path, as a method; setns's is nsenter's.
    let machinectl = if hop.method == "machinectl" {
        sh_quote(exe)
    } else {
        "machinectl".to_string()
    };
    let find = match kind {
        "docker" | "podman" => format!(
            "{} inspect --format '{{{{.State.Pid}}}}' {name}",
            sh_quote(kind)
        ),
        "lxc" => format!("lxc-info -n {name} -p -H"),
        "lxd" => format!("lxc info {name} | sed -n 's/^P[Ii][Dd]: *//p'"),
        "machinectl" => format!("{machinectl} show {name} -p Leader --value"),
        _ => format!("echo {name}"),
    };
    let nsenter = if hop.method == "setns" {
        sh_quote(exe)
    } else {
        "nsenter".to_string()
    };
    let inner = with_user(user, cmd)
        .iter()
        .map(|w| sh_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!(
        "pid=$({find}) && [ -n \"$pid\" ] && [ \"$pid\" != 0 ] || {{ echo \"arbor: no running container {name} ({kind})\" >&2; exit 1; }}; \
         exec {nsenter} -t \"$pid\" -a -r -w -- {inner}"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(method: &str) -> Hop {
        Hop {
            name: "app1".into(),
            method: method.into(),
            host: "app1".into(),
            ..Hop::default()
        }
    }

    #[test]
    fn docker_runs_the_command_in_the_container() {
        let mut h = hop("docker");
        h.user = Some("app".into());
        h.exe = Some("/usr/bin/docker".into());
        h.extra_args = vec!["-e".into(), "A=1".into()];
        assert_eq!(
            argv(&h, "python3 -c x"),
            [
                "/usr/bin/docker",
                "exec",
                "-i",
                "-u",
                "app",
                "-e",
                "A=1",
                "app1",
                "/bin/sh",
                "-c",
                "python3 -c x"
            ]
        );
    }

    #[test]
    fn setns_finds_the_pid_and_enters_everything() {
        let mut h = hop("setns");
        h.kind = Some("docker".into());
        let a = argv(&h, "python3 -c 'x'");
        assert_eq!(a[..2], ["/bin/sh", "-c"]);
        assert!(a[2].contains("pid=$(docker inspect --format '{{.State.Pid}}' app1)"));
        assert!(a[2].contains("exec nsenter -t \"$pid\" -a -r -w -- /bin/sh -c"));
        h.kind = Some("pid".into());
        h.host = "4242".into();
        assert!(argv(&h, "true")[2].starts_with("pid=$(echo 4242)"));
    }

    #[test]
    fn lxc_and_lxd_run_as_the_user_with_su() {
        let mut h = hop("lxc");
        h.user = Some("app".into());
        let a = argv(&h, "true");
        assert_eq!(
            a,
            [
                "lxc-attach",
                "--clear-env",
                "-n",
                "app1",
                "--",
                "su",
                "-s",
                "/bin/sh",
                "app",
                "-c",
                "true"
            ]
        );
        let a = argv(&hop("incus"), "true");
        assert_eq!(a[..3], ["incus", "exec", "--mode=non-interactive"]);
    }
}
