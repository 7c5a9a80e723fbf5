//! `arbor`'s command line (clap): what each subcommand takes, with its
//! `--help`; `arbor --version` names the relays carried.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

const ABOUT: &str = "arbor: makes Ansible fast through bastions, container hosts and slow links";

const LONG_ABOUT: &str = "\
arbor: makes Ansible fast through bastions, container hosts and slow links

Turn it on with one line in ansible.cfg:
    [defaults]
    connection_plugins = <the directory `arbor plugin-path` prints>
(or ANSIBLE_CONNECTION_PLUGINS=...), and reach hosts through a bastion with
the inventory variable mitogen_via=<host> (or arbor_via=<host>). The glue
starts `arbor daemon` for each ansible-playbook run; it exits with the run,
unless ARBOR_PERSIST (e.g. 10m) keeps its tree for the next run: `arbor
status` shows it, `arbor stop` takes it down.";

const EXIT_CODES: &str = "\
Exit codes: 0 success, 1 error (the message says which host and hop), 64 usage error";

#[derive(Parser, Debug)]
#[command(name = "arbor", about = ABOUT, long_about = LONG_ABOUT, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Serve one Ansible run on DIR/sock (started by the glue)
    ///
    /// DIR is made 0700. The daemon exits, tearing the tree down and
    /// removing DIR, when PID exits (or, with --idle-secs, after that long
    /// with no run connected), on SIGTERM/SIGINT, `arbor stop`, or when
    /// DIR/sock is removed.
    Daemon {
        /// The run's private directory (its socket is DIR/sock)
        #[arg(long, value_name = "DIR")]
        run_dir: PathBuf,
        /// The ansible-playbook process served
        #[arg(long, value_name = "PID", conflicts_with = "idle_secs")]
        parent_pid: Option<i32>,
        /// Outlive the run: serve runs until nobody has been connected for
        /// SECS (ARBOR_PERSIST), or until `arbor stop`
        #[arg(long, value_name = "SECS")]
        idle_secs: Option<u64>,
    },
    /// Show the persistent trees that are up (ARBOR_PERSIST): hosts, hops, age, cache use
    Status {
        /// As JSON
        #[arg(long)]
        json: bool,
    },
    /// Take the persistent trees down, leaving nothing on any host
    Stop,
    /// Open a shell, or run COMMAND, on an inventory host through the tree
    ///
    /// `arbor ssh [-i INVENTORY] [-u USER] [-b [--become-user U]] [-K] [-k]
    /// [-e VARS] [-t|-T] [-v] HOST [COMMAND...]`: HOST is reached as a task
    /// would reach it (its vias, users, keys, become settings), reusing a
    /// tree kept by ARBOR_PERSIST. A shell or -t gets a pty. The exit status
    /// is COMMAND's, 255 if HOST cannot be reached. `arbor ssh --help` says
    /// more. Runs the Python that runs Ansible (ARBOR_PYTHON, else the one
    /// beside arbor, else ansible's).
    #[command(disable_help_flag = true)]
    Ssh {
        /// Options, HOST and COMMAND, as `arbor ssh --help` shows
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Print the tree a run would build
    ///
    /// Each host under the host it is reached through (its
    /// arbor_via/mitogen_via, else the CIDR rules of arbor_via_rules), each
    /// relay once. Reads the inventory with ansible-inventory (from PATH,
    /// or ARBOR_ANSIBLE_INVENTORY). Via cycles and via hosts missing from
    /// the inventory are errors.
    Plan {
        /// An inventory, as for ansible-playbook (repeatable)
        #[arg(
            short = 'i',
            long = "inventory",
            value_name = "INVENTORY",
            required = true
        )]
        inventories: Vec<String>,
        /// The plan as JSON
        #[arg(long)]
        json: bool,
    },
    /// Print the connection_plugins directory of arbor's Ansible glue
    PluginPath,
    /// Print the relays carried (machine, bytes, build) as JSON
    RelayInfo,
    /// Try a relay's QUIC endpoint as a stranger would (any certificate,
    /// a made-up secret): exits 0 if it is refused, 1 if it lets in
    QuicProbe {
        /// IP:PORT of the endpoint
        addr: std::net::SocketAddr,
    },
    /// Write the relay carried for MACHINE to PATH (for inspection)
    RelayWrite {
        /// Where to write it
        path: PathBuf,
        /// x86_64 or aarch64
        #[arg(default_value = "x86_64")]
        machine: String,
        /// The relay built with QUIC (for `arbor_transport: quic`)
        #[arg(long)]
        quic: bool,
    },
    /// Print arbor's version and the relays it carries
    Version,
    /// Print the agent's code as sent to a target (one Python source)
    AgentCode,
}

/// `arbor --version`'s line: the version and each relay carried.
pub fn version_line() -> String {
    let carried: Vec<String> = crate::relays::all()
        .iter()
        .map(|r| {
            let name = if r.quic {
                format!("{} with QUIC", r.machine)
            } else {
                r.machine.to_string()
            };
            match r.bytes.len() {
                0 => format!("{name}: {}", r.build),
                n => format!("{name}: {n} bytes, {}", r.build),
            }
        })
        .collect();
    format!(
        "{} (relays: {})",
        env!("CARGO_PKG_VERSION"),
        carried.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_has_help() {
        for sub in Cli::command().get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no help", sub.get_name());
        }
    }
}
