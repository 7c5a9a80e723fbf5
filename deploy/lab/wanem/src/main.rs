//! `arbor-wan`: a userspace WAN emulator for arbor's lab.
//!
//! The kernel here has no `tc netem`, so the lab's WAN link is this program:
//! an Ethernet bridge between two interfaces (AF_PACKET raw sockets) that
//! holds each frame for the one-way delay, paces it to the link rate, and
//! drops it at random for loss. Every protocol (ARP, TCP, UDP) crosses the
//! same path, so congestion control reacts to real delay and loss.
//!
//! Directions: `up` is from interface A (the controller's side) to B (the
//! bastions' side); `down` is B to A.
//!
//! # Usage
//! ```text
//! arbor-wan run --a IF --b IF --control SOCK [--stats-file PATH]
//!               [--delay-ms D] [--delay-up-ms D] [--delay-down-ms D]
//!               [--rate-mbit R] [--loss-pct L] [--queue-ms Q] [--seed S]
//! arbor-wan ctl --control SOCK stats|reset
//! arbor-wan ctl --control SOCK set [--delay-ms D] [--delay-up-ms D]
//!               [--delay-down-ms D] [--rate-mbit R] [--loss-pct L] [--queue-ms Q]
//! ```
//! `ctl reset` prints the counters it zeroed, so a reader loses nothing.

mod link;

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use link::{Counters, Drop, Link, LinkSettings};

/// Largest frame read from an interface; lab interfaces have offloads off,
/// so frames are at most MTU + header, far below this.
const FRAME_BYTES_MAX: usize = 65_536;
/// Longest a forwarding thread sleeps before it re-reads its settings.
const POLL_INTERVAL_MAX: Duration = Duration::from_millis(20);
/// Frames read in one go before due frames are sent again.
const RECV_BATCH_MAX: usize = 256;
/// How often the stats file is rewritten.
const STATS_FILE_INTERVAL: Duration = Duration::from_millis(250);
/// Socket buffers, so bursts at high rates are not dropped by the kernel.
const SOCKET_BUFFER_BYTES: libc::c_int = 8 * 1024 * 1024;
/// Longest control request line accepted.
const CONTROL_LINE_BYTES_MAX: u64 = 4096;

const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Settings {
    delay_up: Duration,
    delay_down: Duration,
    rate_bps: u64,
    loss_ppm: u32,
    /// Explicit queue bound; `None` derives it from the delay.
    queue: Option<Duration>,
}

impl Settings {
    fn link(&self, dir: Dir) -> LinkSettings {
        let delay = match dir {
            Dir::Up => self.delay_up,
            Dir::Down => self.delay_down,
        };
        LinkSettings {
            delay,
            rate_bps: self.rate_bps,
            loss_ppm: self.loss_ppm,
            queue_max: self
                .queue
                .unwrap_or_else(|| LinkSettings::default_queue(delay)),
        }
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "delay_up_ms": self.delay_up.as_secs_f64() * 1e3,
            "delay_down_ms": self.delay_down.as_secs_f64() * 1e3,
            "rate_bps": self.rate_bps,
            "loss_pct": f64::from(self.loss_ppm) / 1e4,
            "queue_up_ms": self.link(Dir::Up).queue_max.as_secs_f64() * 1e3,
            "queue_down_ms": self.link(Dir::Down).queue_max.as_secs_f64() * 1e3,
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Dir {
    Up,
    Down,
}

struct DirState {
    counters: Counters,
    queued_bytes: u64,
}

struct Shared {
    settings: Mutex<Settings>,
    generation: AtomicU64,
    dirs: [Mutex<DirState>; 2],
    reset_at: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code holding these locks can panic; recover from poisoning anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn dir(&self, dir: Dir) -> &Mutex<DirState> {
        &self.dirs[dir as usize]
    }

    fn stats(&self) -> serde_json::Value {
        let dir_json = |d: Dir| {
            let s = lock(self.dir(d));
            let mut v = serde_json::to_value(s.counters).unwrap_or_default();
            v["queued_bytes"] = s.queued_bytes.into();
            v
        };
        serde_json::json!({
            "up": dir_json(Dir::Up),
            "down": dir_json(Dir::Down),
            "settings": lock(&self.settings).to_json(),
            "seconds_since_reset": lock(&self.reset_at).elapsed().as_secs_f64(),
        })
    }

    fn reset(&self) -> serde_json::Value {
        let before = self.stats();
        for d in [Dir::Up, Dir::Down] {
            lock(self.dir(d)).counters = Counters::default();
        }
        *lock(&self.reset_at) = Instant::now();
        before
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("ctl") => ctl(&args[1..]),
        _ => Err(usage()),
    };
    if let Err(e) = result {
        eprintln!("arbor-wan: {e}");
        std::process::exit(2);
    }
}

fn usage() -> String {
    "usage: arbor-wan run --a IF --b IF --control SOCK [--stats-file PATH] [--delay-ms D] \
     [--delay-up-ms D] [--delay-down-ms D] [--rate-mbit R] [--loss-pct L] [--queue-ms Q] [--seed S]\n\
     \x20      arbor-wan ctl --control SOCK stats|reset|set [--delay-ms D] [--delay-up-ms D] \
     [--delay-down-ms D] [--rate-mbit R] [--loss-pct L] [--queue-ms Q]"
        .to_string()
}

/// Flags as `--name value` pairs, plus bare words.
struct Flags {
    pairs: Vec<(String, String)>,
    words: Vec<String>,
}

impl Flags {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        let mut words = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                let value = it
                    .next()
                    .ok_or_else(|| format!("flag --{name} needs a value"))?;
                pairs.push((name.to_string(), value.clone()));
            } else {
                words.push(a.clone());
            }
        }
        Ok(Self { pairs, words })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn num(&self, name: &str) -> Result<Option<f64>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
                _ => Err(format!("--{name} wants a non-negative number, got {v:?}")),
            },
        }
    }

    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        match self
            .pairs
            .iter()
            .find(|(n, _)| !known.contains(&n.as_str()))
        {
            Some((n, _)) => Err(format!("unknown flag --{n}\n{}", usage())),
            None => Ok(()),
        }
    }

    /// Applies the link-setting flags on top of `s`.
    fn apply(&self, mut s: Settings) -> Result<Settings, String> {
        let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
        if let Some(d) = self.num("delay-ms")? {
            s.delay_up = ms(d);
            s.delay_down = ms(d);
        }
        if let Some(d) = self.num("delay-up-ms")? {
            s.delay_up = ms(d);
        }
        if let Some(d) = self.num("delay-down-ms")? {
            s.delay_down = ms(d);
        }
        if let Some(r) = self.num("rate-mbit")? {
            s.rate_bps = (r * 1e6) as u64;
        }
        if let Some(l) = self.num("loss-pct")? {
            if l > 100.0 {
                return Err("--loss-pct is at most 100".into());
            }
            s.loss_ppm = (l * 1e4).round() as u32;
        }
        if let Some(q) = self.num("queue-ms")? {
            s.queue = if q == 0.0 { None } else { Some(ms(q)) };
        }
        Ok(s)
    }
}

const SETTING_FLAGS: [&str; 6] = [
    "delay-ms",
    "delay-up-ms",
    "delay-down-ms",
    "rate-mbit",
    "loss-pct",
    "queue-ms",
];

fn run(args: &[String]) -> Result<(), String> {
    let flags = Flags::parse(args)?;
    let mut known = vec!["a", "b", "control", "stats-file", "seed"];
    known.extend(SETTING_FLAGS);
    flags.check_known(&known)?;
    let a = flags.get("a").ok_or("run needs --a IF")?;
    let b = flags.get("b").ok_or("run needs --b IF")?;
    let control = PathBuf::from(flags.get("control").ok_or("run needs --control SOCK")?);
    let stats_file = flags.get("stats-file").map(PathBuf::from);
    let seed = flags.num("seed")?.unwrap_or(1.0) as u64;
    let settings = flags.apply(Settings {
        delay_up: Duration::ZERO,
        delay_down: Duration::ZERO,
        rate_bps: 0,
        loss_ppm: 0,
        queue: None,
    })?;

    let sock_a = open_packet_socket(a).map_err(|e| format!("interface {a}: {e}"))?;
    let sock_b = open_packet_socket(b).map_err(|e| format!("interface {b}: {e}"))?;
    let _ = std::fs::remove_file(&control);
    let listener =
        UnixListener::bind(&control).map_err(|e| format!("control socket {control:?}: {e}"))?;
    set_mode(&control, 0o600)?;

    let shared = Arc::new(Shared {
        settings: Mutex::new(settings),
        generation: AtomicU64::new(0),
        dirs: [
            Mutex::new(DirState {
                counters: Counters::default(),
                queued_bytes: 0,
            }),
            Mutex::new(DirState {
                counters: Counters::default(),
                queued_bytes: 0,
            }),
        ],
        reset_at: Mutex::new(Instant::now()),
    });

    let (fa, fb) = (sock_a.as_raw_fd(), sock_b.as_raw_fd());
    for (dir, input, output, seed) in [(Dir::Up, fa, fb, seed), (Dir::Down, fb, fa, seed + 1)] {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("wan-{dir:?}"))
            .spawn(move || forward(dir, input, output, seed, &shared))
            .map_err(|e| format!("spawn: {e}"))?;
    }
    if let Some(path) = stats_file {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("wan-stats".into())
            .spawn(move || loop {
                let _ = write_atomic(&path, shared.stats().to_string().as_bytes());
                std::thread::sleep(STATS_FILE_INTERVAL);
            })
            .map_err(|e| format!("spawn: {e}"))?;
    }
    eprintln!(
        "arbor-wan: bridging {a} <-> {b}, {}",
        lock(&shared.settings).to_json()
    );
    // Keep the sockets alive for the forwarding threads.
    let _sockets = (sock_a, sock_b);
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = serve_control(stream, &shared) {
                    eprintln!("arbor-wan: control: {e}");
                }
            }
            Err(e) => eprintln!("arbor-wan: control accept: {e}"),
        }
    }
    Ok(())
}

fn serve_control(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(io::Read::take(&stream, CONTROL_LINE_BYTES_MAX)).read_line(&mut line)?;
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let reply = match words.first().map(String::as_str) {
        Some("stats") => shared.stats(),
        Some("reset") => shared.reset(),
        Some("set") => match Flags::parse(&words[1..]).and_then(|f| {
            f.check_known(&SETTING_FLAGS)?;
            let mut s = lock(&shared.settings);
            *s = f.apply(*s)?;
            Ok(s.to_json())
        }) {
            Ok(v) => {
                shared.generation.fetch_add(1, Ordering::SeqCst);
                serde_json::json!({ "settings": v })
            }
            Err(e) => serde_json::json!({ "error": e }),
        },
        _ => serde_json::json!({ "error": format!("unknown request {:?}", line.trim()) }),
    };
    let mut w = &stream;
    writeln!(w, "{reply}")
}

fn ctl(args: &[String]) -> Result<(), String> {
    let flags = Flags::parse(args)?;
    let mut known = vec!["control"];
    known.extend(SETTING_FLAGS);
    flags.check_known(&known)?;
    let control = flags.get("control").ok_or("ctl needs --control SOCK")?;
    let verb = flags.words.first().ok_or_else(usage)?;
    let request = match verb.as_str() {
        "stats" | "reset" => verb.clone(),
        "set" => {
            let mut r = String::from("set");
            for (n, v) in &flags.pairs {
                if n != "control" {
                    r.push_str(&format!(" --{n} {v}"));
                }
            }
            r
        }
        other => return Err(format!("unknown verb {other:?}\n{}", usage())),
    };
    let mut stream =
        UnixStream::connect(control).map_err(|e| format!("control socket {control}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{request}").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("control reply: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| format!("control reply {reply:?}: {e}"))?;
    if let Some(err) = value.get("error") {
        return Err(err.to_string());
    }
    println!("{value}");
    Ok(())
}

/// One direction: read frames from `input`, hold them, write them to `output`.
fn forward(dir: Dir, input: RawFd, output: RawFd, seed: u64, shared: &Shared) {
    let mut generation = shared.generation.load(Ordering::SeqCst);
    let mut link = Link::new(lock(&shared.settings).link(dir), seed);
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; FRAME_BYTES_MAX];
    loop {
        let g = shared.generation.load(Ordering::SeqCst);
        if g != generation {
            generation = g;
            link.set_settings(lock(&shared.settings).link(dir));
        }

        let now = Instant::now();
        let mut sent = Counters::default();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, frame)) = queue.pop_front() else {
                break;
            };
            link.delivered(frame.len());
            // SAFETY: `frame` is a live buffer of `frame.len()` bytes.
            let n = unsafe { libc::send(output, frame.as_ptr().cast(), frame.len(), 0) };
            if n < 0 {
                sent.send_errors += 1;
            } else {
                sent.packets += 1;
                sent.bytes += frame.len() as u64;
            }
        }

        let timeout = queue
            .front()
            .map_or(POLL_INTERVAL_MAX, |(due, _)| {
                due.saturating_duration_since(now)
            })
            .min(POLL_INTERVAL_MAX);
        wait_readable(input, timeout);

        let mut dropped = Counters::default();
        for _ in 0..RECV_BATCH_MAX {
            let Some(len) = recv_frame(input, &mut buf) else {
                break;
            };
            match link.offer(Instant::now(), len) {
                Ok(due) => queue.push_back((due, buf[..len].to_vec())),
                Err(Drop::Loss) => dropped.dropped_loss += 1,
                Err(Drop::QueueFull) => dropped.dropped_queue += 1,
            }
        }

        let mut st = lock(shared.dir(dir));
        let c = &mut st.counters;
        c.packets += sent.packets;
        c.bytes += sent.bytes;
        c.send_errors += sent.send_errors;
        c.dropped_loss += dropped.dropped_loss;
        c.dropped_queue += dropped.dropped_queue;
        st.queued_bytes = link.queued_bytes();
    }
}

fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
}

/// Reads one incoming frame without blocking; skips frames this host sent.
fn recv_frame(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut addr_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut addr as *mut libc::sockaddr_ll).cast(),
                &mut addr_len,
            )
        };
        if n < 0 {
            return None;
        }
        let n = n as usize;
        if addr.sll_pkttype == libc::PACKET_OUTGOING || n > buf.len() {
            continue;
        }
        return Some(n);
    }
}

fn open_packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"))?;
    // SAFETY: plain libc calls with checked results; the fd is owned at once.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0 receives nothing until bind, so options are set first.
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            one,
        )?;
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            SOCKET_BUFFER_BYTES,
        )?;
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            SOCKET_BUFFER_BYTES,
        )?;
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives for the call and its size is given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {path:?}: {e}"))
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}
