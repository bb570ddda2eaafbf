//! Relay tests for bulk data: plaintext batches held back by a slow program, and throughput.

use super::*;

/// A program that reads slowly: the relay's batches back up behind a full socketpair (held in
/// the connection's outbox, TCP not read meanwhile), and the peer's end comes after all of it.
/// Byte exact, in order, and the end is delivered only after the last byte: close_notify as a
/// clean EOF, a bare TCP EOF as EOF noted as truncation.
#[test]
fn slow_reader_gets_every_byte_before_the_end() {
    for clean in [true, false] {
        let _serial = serial();
        let (mut program, link, mut server) = adopted();
        let down = pattern(6 << 20, 7);
        let peer = {
            let down = down.clone();
            thread::spawn(move || {
                server.write_all(&down).unwrap();
                server.flush().unwrap();
                if clean {
                    send_close_notify(&mut server);
                } else {
                    server.sock.shutdown(Shutdown::Write).unwrap();
                }
                server
            })
        };
        // Let the relay fill the socketpair and hold a batch back before reading anything.
        thread::sleep(Duration::from_millis(300));
        let mut got = Vec::with_capacity(down.len());
        let mut buf = vec![0u8; 3000]; // not a multiple of any record or batch size
        loop {
            let n = program.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() < (1 << 20) {
                thread::sleep(Duration::from_micros(200));
            }
        }
        assert!(
            got == down,
            "download corrupted or reordered (clean end: {clean})"
        );
        assert_eq!(link.bytes().1, down.len() as u64);
        assert_eq!(link.ended_without_close_notify(), !clean);
        drop(peer.join().unwrap());
        drop(program);
        drop(link);
        wait_until_idle();
    }
}

/// Throughput through the relay (run with `--nocapture` to see the figure): 64 MiB each way,
/// with the in-process rustls server on another thread doing the peer's half of the crypto.
#[test]
fn throughput_64_mib() {
    let _serial = serial();
    const LEN: usize = 64 << 20;
    let (program, link, mut server) = adopted();
    let chunk = pattern(1 << 20, 3);

    let mut writer = program.try_clone().unwrap();
    let data = chunk.clone();
    let start = Instant::now();
    let upload = thread::spawn(move || {
        for _ in 0..LEN / data.len() {
            writer.write_all(&data).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = server.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    upload.join().unwrap();
    let up = start.elapsed();
    assert_eq!(total, LEN);

    let mut reader = program.try_clone().unwrap();
    let start = Instant::now();
    let download = thread::spawn(move || {
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break total;
            }
            total += n;
        }
    });
    for _ in 0..LEN / chunk.len() {
        server.write_all(&chunk).unwrap();
    }
    server.flush().unwrap();
    send_close_notify(&mut server);
    assert_eq!(download.join().unwrap(), LEN);
    let down = start.elapsed();
    let mbps = |d: Duration| LEN as f64 / 1e6 / d.as_secs_f64();
    eprintln!(
        "relay throughput: program->peer {:.0} MB/s, peer->program {:.0} MB/s",
        mbps(up),
        mbps(down)
    );
    drop(program);
    drop(link);
    wait_until_idle();
}
