use std::net::Ipv4Addr;

use arbor_wire::{Kind, NodeId, StreamId};

use super::*;

const IDLE: Duration = Duration::from_secs(10);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn addr(offer: &QuicOffer) -> SocketAddr {
    SocketAddr::new(LOOPBACK, offer.port)
}

fn frame(dst: u32, src: u32, n: u32, len: usize) -> Frame {
    Frame::new(
        Kind::Data,
        NodeId(dst),
        NodeId(src),
        StreamId(n),
        vec![(n % 251) as u8; len],
    )
}

async fn next_frame(inbox: &mut mpsc::Receiver<LinkEvent>) -> Frame {
    match tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await {
        Ok(Some(LinkEvent::Frame(_, f))) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// A parent's connection to a relay's endpoint, and the relay's side.
async fn connected() -> ((Endpoint, Connection), (Endpoint, Connection)) {
    let (listener, offer) = listen(LOOPBACK, IDLE).expect("listen");
    let accepting = tokio::spawn(listener.accept(Duration::from_secs(10)));
    let parent = connect(addr(&offer), &offer, Duration::from_secs(5), IDLE)
        .await
        .expect("connect");
    (parent, accepting.await.expect("join").expect("accept"))
}

/// A relay's endpoint and its parent's connection, linked both ways.
async fn pair() -> (
    (LinkTx, mpsc::Receiver<LinkEvent>),
    (LinkTx, mpsc::Receiver<LinkEvent>),
) {
    let ((cep, cconn), (sep, sconn)) = connected().await;
    let (ptx, prx) = mpsc::channel(64);
    let (rtx, rrx) = mpsc::channel(64);
    let parent = spawn_lanes(cep, cconn, true, Toward::Child, 8 << 20, ptx, LinkId(1));
    let relay = spawn_lanes(sep, sconn, true, Toward::Parent, 8 << 20, rtx, LinkId(0));
    ((parent, prx), (relay, rrx))
}

#[tokio::test]
async fn frames_cross_both_ways_in_order_within_a_lane() {
    let ((parent, mut from_relay), (relay, mut from_parent)) = pair().await;
    for n in 0..200 {
        parent
            .send(frame(5 + n % 3, 0, n, if n % 7 == 0 { 70_000 } else { 10 }))
            .await
            .expect("send");
    }
    let mut seen: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for _ in 0..200 {
        let f = next_frame(&mut from_parent).await;
        assert_eq!(
            f.payload.len(),
            if f.stream.0 % 7 == 0 { 70_000 } else { 10 }
        );
        assert!(f.payload.iter().all(|&b| b == (f.stream.0 % 251) as u8));
        seen.entry(f.dst.0).or_default().push(f.stream.0);
    }
    for (dst, streams) in &seen {
        let want: Vec<u32> = (0..200).filter(|n| 5 + n % 3 == *dst).collect();
        assert_eq!(streams, &want, "lane of node {dst} kept its order");
    }
    relay.send(frame(0, 9, 1, 3)).await.expect("send up");
    let up = next_frame(&mut from_relay).await;
    assert_eq!((up.src, up.stream), (NodeId(9), StreamId(1)));
}

#[tokio::test]
async fn a_lane_chosen_by_the_node_keeps_order_across_destinations() {
    let ((parent, _from_relay), (_relay, mut from_parent)) = pair().await;
    for n in 0..100 {
        parent
            .send_lane(frame(10 + n, 0, n, 100), Some(7))
            .await
            .expect("send");
    }
    for n in 0..100 {
        assert_eq!(next_frame(&mut from_parent).await.stream, StreamId(n));
    }
}

#[tokio::test]
async fn a_client_without_the_secret_is_refused_and_the_parent_still_gets_in() {
    let (listener, offer) = listen(LOOPBACK, IDLE).expect("listen");
    let accepting = tokio::spawn(listener.accept(Duration::from_secs(10)));
    let mut impostor = offer.clone();
    impostor.secret[0] ^= 1;
    let err = connect(addr(&offer), &impostor, Duration::from_secs(5), IDLE)
        .await
        .expect_err("an impostor must be refused");
    assert!(err.contains("refused"), "{err}");
    let (ep, _conn) = connect(addr(&offer), &offer, Duration::from_secs(5), IDLE)
        .await
        .expect("the parent connects");
    let (_sep, sconn) = accepting.await.expect("join").expect("accept");
    // The one taken is the parent's, not the impostor's.
    let parent_port = ep.local_addr().expect("addr").port();
    assert_eq!(sconn.remote_address().port(), parent_port);
    // Taken: nothing else gets in, even with the secret.
    let late = connect(addr(&offer), &offer, Duration::from_secs(2), IDLE).await;
    assert!(late.is_err(), "the endpoint takes one connection");
}

#[tokio::test]
async fn a_stranger_trusting_any_certificate_is_refused_for_its_secret() {
    let (listener, offer) = listen(LOOPBACK, IDLE).expect("listen");
    let _accepting = tokio::spawn(listener.accept(Duration::from_secs(10)));
    let err = probe(addr(&offer), Duration::from_secs(5))
        .await
        .expect_err("a stranger must be refused");
    assert!(err.contains("refused"), "{err}");
}

#[tokio::test]
async fn another_certificate_is_not_trusted() {
    let (listener, offer) = listen(LOOPBACK, IDLE).expect("listen");
    let _accepting = tokio::spawn(listener.accept(Duration::from_secs(10)));
    let mut pinned = offer.clone();
    pinned.cert_sha256[0] ^= 1;
    let err = connect(addr(&offer), &pinned, Duration::from_secs(5), IDLE)
        .await
        .expect_err("a certificate other than the pinned one");
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test]
async fn nothing_answering_is_an_error_within_the_timeout() {
    // A UDP port nobody reads: the attempt gives up at its bound.
    let sock = std::net::UdpSocket::bind((LOOPBACK, 0)).expect("bind");
    let mut offer = listen(LOOPBACK, IDLE).expect("listen").1;
    offer.port = sock.local_addr().expect("addr").port();
    let t0 = std::time::Instant::now();
    let err = connect(addr(&offer), &offer, Duration::from_millis(800), IDLE)
        .await
        .expect_err("no answer");
    assert!(err.contains("no answer"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn the_peer_going_closes_the_link_once() {
    let ((parent, mut from_relay), (relay, mut from_parent)) = pair().await;
    drop(relay);
    match tokio::time::timeout(Duration::from_secs(10), from_relay.recv()).await {
        Ok(Some(LinkEvent::Closed(link, why))) => {
            assert_eq!(link, LinkId(1));
            assert!(why.starts_with("QUIC"), "{why}");
        }
        other => panic!("expected the link closed, got {other:?}"),
    }
    drop(parent);
    match tokio::time::timeout(Duration::from_secs(10), from_parent.recv()).await {
        Ok(Some(LinkEvent::Closed(..))) | Ok(None) => {}
        other => panic!("expected the relay's side closed, got {other:?}"),
    }
}

#[tokio::test]
async fn the_endpoint_closes_when_no_parent_comes() {
    let (listener, offer) = listen(LOOPBACK, IDLE).expect("listen");
    let err = listener
        .accept(Duration::from_millis(300))
        .await
        .expect_err("nobody came");
    assert!(err.contains("no QUIC connection"), "{err}");
    let late = connect(addr(&offer), &offer, Duration::from_millis(800), IDLE).await;
    assert!(late.is_err());
}

/// A relay's side as lanes, its parent's as the bare connection.
async fn bare_parent() -> (Connection, Endpoint, mpsc::Receiver<LinkEvent>, LinkTx) {
    let ((cep, cconn), (sep, sconn)) = connected().await;
    let (rtx, rrx) = mpsc::channel(64);
    let relay = spawn_lanes(sep, sconn, true, Toward::Parent, 8 << 20, rtx, LinkId(0));
    (cconn, cep, rrx, relay)
}

fn encoded(frames: &[Frame]) -> Vec<u8> {
    let enc = Encoder::new(false);
    let mut out = Vec::new();
    for f in frames {
        enc.encode(f, &mut out);
    }
    out
}

async fn nothing_more(inbox: &mut mpsc::Receiver<LinkEvent>) {
    let more = tokio::time::timeout(Duration::from_millis(300), inbox.recv()).await;
    assert!(more.is_err(), "a frame handed on twice: {more:?}");
}

/// Frames as a lane's writes: each write's frames deflated and flushed,
/// one deflate stream across them.
fn writes(groups: &[&[Frame]]) -> Vec<Vec<u8>> {
    let mut z = flate2::Compress::new(flate2::Compression::new(DEFLATE_LEVEL), false);
    groups
        .iter()
        .map(|g| {
            let mut packed = Vec::new();
            deflate(&mut z, &encoded(g), &mut packed).expect("deflate");
            packed
        })
        .collect()
}

#[tokio::test]
async fn a_copy_that_comes_first_is_taken_and_the_streams_bytes_once() {
    let (conn, _ep, mut inbox, _relay) = bare_parent().await;
    let f: Vec<Frame> = (0..5).map(|n| frame(5, 0, n, 20)).collect();
    let w = writes(&[&f[..2], &f[2..4], &f[4..]]);
    let max = conn.max_datagram_size();
    let mut send = conn.open_uni().await.expect("stream");
    let index = send.id().index();
    // The first write comes as a copy, before any byte of its stream.
    let first = dup::copy(index, 0, &w[0], max).expect("fits");
    conn.send_datagram(first.into()).expect("datagram");
    for n in 0..2 {
        assert_eq!(next_frame(&mut inbox).await.stream, StreamId(n));
    }
    // A copy of the third while the second is missing is not taken.
    let third_at = (w[0].len() + w[1].len()) as u64;
    let ahead = dup::copy(index, third_at, &w[2], max).expect("fits");
    conn.send_datagram(ahead.into()).expect("datagram");
    nothing_more(&mut inbox).await;
    // The stream brings all three: only frames 2, 3 and 4 are new.
    send.write_all(&w.concat()).await.expect("write");
    for n in 2..5 {
        assert_eq!(next_frame(&mut inbox).await.stream, StreamId(n));
    }
    // A late copy of bytes the stream brought is dropped.
    let late = dup::copy(index, w[0].len() as u64, &w[1], max).expect("fits");
    conn.send_datagram(late.into()).expect("datagram");
    nothing_more(&mut inbox).await;
}

#[tokio::test]
async fn small_writes_cross_once_though_sent_twice() {
    let ((parent, _from_relay), (_relay, mut from_parent)) = pair().await;
    for n in 0..50 {
        parent.send(frame(5 + n % 2, 0, n, 30)).await.expect("send");
        if n % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut got: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for _ in 0..50 {
        let f = next_frame(&mut from_parent).await;
        got.entry(f.dst.0).or_default().push(f.stream.0);
    }
    for (dst, streams) in &got {
        let want: Vec<u32> = (0..50).filter(|n| 5 + n % 2 == *dst).collect();
        assert_eq!(streams, &want);
    }
    nothing_more(&mut from_parent).await;
}

#[tokio::test]
async fn a_malformed_copy_closes_the_link() {
    let (conn, _ep, mut inbox, _relay) = bare_parent().await;
    let bad = dup::copy(0, 0, b"not deflate at all", conn.max_datagram_size()).expect("fits");
    conn.send_datagram(bad.into()).expect("datagram");
    match tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await {
        Ok(Some(LinkEvent::Closed(_, why))) => assert!(why.contains("deflate"), "{why}"),
        other => panic!("expected the link closed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_small_write_is_also_sent_as_a_copy_of_its_stream_bytes() {
    let (conn, _ep, _inbox, relay) = bare_parent().await;
    relay.send(frame(0, 9, 1, 30)).await.expect("send up");
    let d = tokio::time::timeout(Duration::from_secs(5), conn.read_datagram())
        .await
        .expect("a copy in time")
        .expect("a datagram");
    let (index, at, bytes) = dup::parse(&d).expect("a copy");
    assert_eq!(at, 0, "the lane's first write");
    // The copy is the write's bytes as its stream carries them.
    let mut recv = conn.accept_uni().await.expect("the lane's stream");
    assert_eq!(recv.id().index(), index);
    let mut on_stream = vec![0u8; bytes.len()];
    recv.read_exact(&mut on_stream).await.expect("stream bytes");
    assert_eq!(on_stream, bytes);
    assert_eq!(bytes, writes(&[&[frame(0, 9, 1, 30)]])[0]);
}
