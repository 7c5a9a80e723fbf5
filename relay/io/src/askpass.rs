//! Passwords for ssh from memory: ssh's `SSH_ASKPASS` program is the very
//! binary that spawns it (the daemon, or the relay from its in-RAM file),
//! started again in askpass mode. It reads the password from an in-RAM
//! file that only its parent holds open (`/proc/PARENT/fd/N`, readable by
//! the same user only) and prints it. So the password is never in an argv,
//! an environment, a file on disk or a log; ssh asks for it only through
//! this program (`SSH_ASKPASS_REQUIRE=force`, OpenSSH 8.4 and later).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Names the in-RAM password file in the askpass program's environment.
pub const ENV: &str = "ARBOR_ASKPASS";
/// What a password prompt contains (ssh's `user@host's password:`,
/// keyboard-interactive's `Password:`), as Ansible's own askpass checks.
/// Other prompts (a key's passphrase, a host key to confirm) are refused.
pub const PROMPT: &str = "assword";
/// Largest password read back.
const PASSWORD_BYTES_MAX: u64 = 64 * 1024;

/// An anonymous in-RAM file holding `data`, positioned at its start.
pub fn ram_file(name: &str, data: &[u8]) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: a valid C string; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    file.write_all(data)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(OwnedFd::from(file))
}

/// The path another process of this user opens `fd` of this process by.
pub fn proc_path(fd: &OwnedFd) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())
}

/// For a child ssh that must answer a password prompt with `password`:
/// the in-RAM file to hold open while it runs, and its environment.
pub fn for_ssh(password: &str) -> std::io::Result<(OwnedFd, Vec<(String, String)>)> {
    let fd = ram_file("arbor-askpass", password.as_bytes())?;
    // This very program, even when it runs from an in-RAM file.
    let program = format!("/proc/{}/exe", std::process::id());
    let env = vec![
        ("SSH_ASKPASS".to_string(), program),
        ("SSH_ASKPASS_REQUIRE".to_string(), "force".to_string()),
        (ENV.to_string(), proc_path(&fd)),
    ];
    Ok((fd, env))
}

/// If this process was started as ssh's askpass program, answers the
/// prompt and returns the exit code; else None.
pub fn answer_from_env() -> Option<i32> {
    let path = std::env::var_os(ENV)?;
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 2 {
        return None;
    }
    if !args[1].contains(PROMPT) {
        return Some(1);
    }
    let mut password = Vec::new();
    let read = std::fs::File::open(path)
        .and_then(|f| f.take(PASSWORD_BYTES_MAX).read_to_end(&mut password));
    if read.is_err() {
        return Some(1);
    }
    password.push(b'\n');
    let mut out = std::io::stdout().lock();
    Some(
        if out.write_all(&password).and_then(|_| out.flush()).is_ok() {
            0
        } else {
            1
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_read_back_through_proc() {
        let fd = ram_file("t", b"s3cret").expect("memfd");
        let got = std::fs::read(proc_path(&fd)).expect("read through /proc");
        assert_eq!(got, b"s3cret");
    }
}
