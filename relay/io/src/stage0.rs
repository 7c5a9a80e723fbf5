//! A relay child's first bytes, both ways: the relay binary its stage-0
//! loads (bootstrap/stage0.sh), for the machine the parent guessed; and,
//! if the host is another machine, the stage-0's ask for its own
//! (`ARBOR-STAGE0 MACHINE m` on stdout, before any frame), answered with
//! `SIZE\n` and that machine's relay. No round trip when the guess is
//! right.

use std::borrow::Cow;

use arbor_core::LinkId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::{read_frames, write_frames, LinkEvent, LinkRx};

/// What a stage-0 that asks for `machine`'s relay is sent: the bytes, or
/// why there are none (the link then closes with that reason).
pub type RelayFor = Box<dyn FnOnce(&str) -> Result<Cow<'static, [u8]>, String> + Send>;

/// The start of the line a stage-0 prints to ask for its machine's relay.
pub const ASK: &[u8] = b"ARBOR-STAGE0 MACHINE ";
/// The longest such line.
const ASK_LINE_MAX: usize = 64;

/// Reads the start of a relay child's stdout: the machine its stage-0
/// asks for (None: frames start at once), and the bytes read after it.
pub async fn read_ask<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Option<String>, Vec<u8>), String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        if head.first().is_some_and(|&b| b != ASK[0]) {
            return Ok((None, head));
        }
        if let Some(i) = head.iter().position(|&b| b == b'\n') {
            let line = &head[..i];
            let machine = line
                .strip_prefix(ASK)
                .and_then(|m| std::str::from_utf8(m).ok())
                .filter(|m| {
                    !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                })
                .map(str::to_string)
                .ok_or_else(|| {
                    format!("its stage-0 printed {:?}", String::from_utf8_lossy(line))
                })?;
            return Ok((Some(machine), head[i + 1..].to_vec()));
        }
        if head.len() > ASK_LINE_MAX {
            return Err(format!(
                "its stage-0 printed {:?}",
                String::from_utf8_lossy(&head[..ASK_LINE_MAX])
            ));
        }
        match r.read(&mut buf).await {
            Ok(0) => return Err("connection closed".into()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read error: {e}")),
        }
    }
}

/// The reader of a relay child: its stage-0's ask (told to the writer),
/// then frames.
pub async fn read_ask_then_frames<R: AsyncRead + Unpin>(
    mut r: R,
    ask: oneshot::Sender<Option<String>>,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) {
    match read_ask(&mut r).await {
        Ok((machine, head)) => {
            let _ = ask.send(machine);
            read_frames(r, head, inbox, link).await;
        }
        Err(why) => {
            let _ = inbox.send(LinkEvent::Closed(link, why)).await;
        }
    }
}

/// The writer of a relay child: the relay guessed, then (once the child
/// has asked for another or started) its own machine's if asked, then
/// frames. Nothing else is written before the child has spoken.
pub async fn write_relay_then_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    preamble: Vec<u8>,
    (ask, relay_for): (oneshot::Receiver<Option<String>>, RelayFor),
    rx: LinkRx,
    compress: bool,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) {
    if w.write_all(&preamble).await.is_err() || w.flush().await.is_err() {
        return;
    }
    drop(preamble);
    match ask.await {
        Ok(None) => {}
        Ok(Some(machine)) => match relay_for(&machine) {
            Ok(bin) => {
                let head = format!("{}\n", bin.len());
                if w.write_all(head.as_bytes()).await.is_err() || w.write_all(&bin).await.is_err() {
                    return;
                }
            }
            Err(why) => {
                let _ = inbox.send(LinkEvent::Closed(link, why)).await;
                return;
            }
        },
        Err(_) => return,
    }
    write_frames(w, Vec::new(), rx, compress, inbox, link).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ask_of(bytes: &[u8]) -> Result<(Option<String>, Vec<u8>), String> {
        let mut r = bytes;
        read_ask(&mut r).await
    }

    #[tokio::test]
    async fn frames_start_at_once_without_an_ask() {
        let (m, head) = ask_of(&[0xA7, 1, 2]).await.expect("frames");
        assert_eq!((m, head), (None, vec![0xA7, 1, 2]));
    }

    #[tokio::test]
    async fn an_ask_names_the_machine_and_keeps_what_follows() {
        let (m, head) = ask_of(b"ARBOR-STAGE0 MACHINE aarch64\n\xA7\x01")
            .await
            .expect("an ask");
        assert_eq!(m.as_deref(), Some("aarch64"));
        assert_eq!(head, b"\xA7\x01");
    }

    #[tokio::test]
    async fn other_output_is_refused_with_what_it_said() {
        let e = ask_of(b"ARBOR-STAGE0 MACHINE a b\n")
            .await
            .expect_err("refused");
        assert!(e.contains("a b"), "{e}");
        let e = ask_of(&[b'A'; 100]).await.expect_err("refused");
        assert!(e.contains("AAAA"), "{e}");
        assert_eq!(
            ask_of(b"ARBOR").await.expect_err("refused"),
            "connection closed"
        );
    }
}
