//! `arbor ssh`: hands over to the glue's `arbor_glue.shell`, run by the
//! Python that runs Ansible, which reads the inventory as a task would and
//! streams the shell or command through the tree.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Replaces this process with `PYTHON -m arbor_glue.shell ARGS` (the glue
/// beside `plugin_dir`, on PYTHONPATH). ARBOR_BIN is left as it is: the glue
/// finds the arbor binary as a playbook run does, so both find one kept
/// tree (its digest covers the binary and every ARBOR_* setting).
pub fn exec(plugin_dir: &Path, args: &[String]) -> Result<()> {
    let glue = plugin_dir
        .parent()
        .and_then(Path::parent)
        .context("arbor ssh: the glue's directory")?;
    let python = python();
    let mut path = OsString::from(glue);
    if let Some(old) = std::env::var_os("PYTHONPATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(old);
    }
    let mut cmd = std::process::Command::new(&python);
    cmd.arg("-m")
        .arg("arbor_glue.shell")
        .args(args)
        .env("PYTHONPATH", path);
    let err = cmd.exec();
    bail!("arbor ssh: running {}: {err}", python.display())
}

/// The Python that runs Ansible: $ARBOR_PYTHON; else the venv's that holds
/// this binary (pip's install); else the interpreter of `ansible` on PATH;
/// else `python3`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ARBOR_PYTHON").filter(|p| !p.is_empty()) {
        return p.into();
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        let venv = dir.join("python3");
        if dir.join("ansible").is_file() && venv.is_file() {
            return venv;
        }
    }
    which("ansible")
        .and_then(|a| shebang(&a))
        .unwrap_or_else(|| "python3".into())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The interpreter a script's `#!` line names (`#!/usr/bin/env python3`
/// included), if it exists.
fn shebang(script: &Path) -> Option<PathBuf> {
    let mut head = [0u8; 256];
    let n = std::io::Read::read(&mut std::fs::File::open(script).ok()?, &mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?.lines().next()?;
    let words: Vec<&str> = line.strip_prefix("#!")?.split_whitespace().collect();
    match words.as_slice() {
        [env, prog, ..] if env.ends_with("/env") => which(prog),
        [interp, ..] => Some(PathBuf::from(interp)).filter(|p| p.is_file()),
        [] => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scripts_interpreter_is_read_from_its_shebang() {
        let dir = std::env::temp_dir().join(format!("arbor-shebang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let script = dir.join("ansible");
        std::fs::write(&script, "#!/bin/sh\nexec true\n").expect("writable");
        assert_eq!(shebang(&script), Some(PathBuf::from("/bin/sh")));
        std::fs::write(&script, "#!/nonexistent/python3\n").expect("writable");
        assert_eq!(shebang(&script), None);
        std::fs::write(&script, "no shebang\n").expect("writable");
        assert_eq!(shebang(&script), None);
        std::fs::remove_dir_all(&dir).expect("writable");
    }
}
