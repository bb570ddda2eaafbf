//! The relay on real loopback TCP, with an in-process rustls server as the peer. Nothing is
//! interposed in the unit-test binary, so the test's `TcpStream` plays the unmodified program.
#![allow(clippy::unwrap_used)] // reason: tests fail by panicking

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
    StreamOwned,
};

use super::{
    adopt, atfork_child, atfork_parent, atfork_prepare, before_exec, internal_fds, is_internal, Link,
};

/// Register the fork handlers as the lead's init does (nothing else registers them in tests).
fn register_atfork() {
    extern "C" fn prepare() {
        atfork_prepare();
    }
    extern "C" fn parent() {
        atfork_parent();
    }
    extern "C" fn child() {
        atfork_child();
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: plain extern "C" fns that live for the whole process.
    ONCE.call_once(|| unsafe {
        libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
    });
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// fd counts and internal-fd checks need the fallback tests to run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Configs {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

/// Mutual TLS 1.3 with one self-signed certificate on both sides (it is its own trust anchor).
fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = issued.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .unwrap();
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .unwrap();
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .unwrap();
        Configs {
            client: Arc::new(client),
            server: Arc::new(server),
        }
    })
}

/// A finished handshake over loopback: the client side not yet adopted.
struct Handshaken {
    program: TcpStream,
    client: ClientConnection,
    server: StreamOwned<ServerConnection, TcpStream>,
}

fn handshake() -> Handshaken {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(TIMEOUT)).unwrap();
        let mut conn = ServerConnection::new(configs().server.clone()).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).unwrap();
        }
        StreamOwned::new(conn, sock)
    });
    let mut program = TcpStream::connect(addr).unwrap();
    program.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut client =
        ClientConnection::new(configs().client.clone(), "localhost".try_into().unwrap()).unwrap();
    while client.is_handshaking() {
        client.complete_io(&mut program).unwrap();
    }
    while client.wants_write() {
        client.write_tls(&mut program).unwrap();
    }
    program.set_read_timeout(None).unwrap();
    Handshaken {
        program,
        client,
        server: server.join().unwrap(),
    }
}

/// Handshake, then adopt the client side: the returned stream is the program's fd.
fn adopted() -> (TcpStream, Arc<Link>, StreamOwned<ServerConnection, TcpStream>) {
    let hs = handshake();
    let link = adopt(hs.program.as_raw_fd(), Connection::Client(hs.client), None, None).unwrap();
    hs.program.set_read_timeout(Some(TIMEOUT)).unwrap();
    hs.program.set_write_timeout(Some(TIMEOUT)).unwrap();
    (hs.program, link, hs.server)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

/// Read until EOF. For the rustls server stream, `Ok(0)` means close_notify was received (a bare
/// TCP EOF is an `UnexpectedEof` error there).
fn read_to_end(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok(out)
}

fn send_close_notify(server: &mut StreamOwned<ServerConnection, TcpStream>) {
    server.conn.send_close_notify();
    while server.conn.wants_write() {
        server.conn.write_tls(&mut server.sock).unwrap();
    }
}

/// Wait for the relay to let go of everything but its epoll and eventfd.
fn wait_until_idle() {
    let deadline = Instant::now() + TIMEOUT;
    while internal_fds().len() > 2 {
        assert!(Instant::now() < deadline, "relay still holds {:?}", internal_fds());
        thread::sleep(Duration::from_millis(5));
    }
}

fn fd_flags(fd: RawFd) -> (bool, bool) {
    // SAFETY: F_GETFL/F_GETFD take no argument.
    let (fl, fdfl) = unsafe { (libc::fcntl(fd, libc::F_GETFL), libc::fcntl(fd, libc::F_GETFD)) };
    assert!(fl >= 0 && fdfl >= 0);
    (fl & libc::O_NONBLOCK != 0, fdfl & libc::FD_CLOEXEC != 0)
}

fn socket_family(fd: RawFd) -> libc::c_int {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `domain` and `len` are valid for writes and `len` holds the buffer size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            std::ptr::from_mut(&mut domain).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    domain
}

fn inode(fd: RawFd) -> u64 {
    File::open(format!("/proc/self/fd/{fd}")).map_or_else(
        |_| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino(),
        |f| f.metadata().unwrap().ino(),
    )
}

/// Inodes of every open fd of this process.
fn open_inodes() -> Vec<u64> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .map(|m| m.ino())
        .collect()
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn eight_mib_each_way_byte_exact_with_close_notify_both_ways() {
    let _serial = serial();
    let (program, link, mut server) = adopted();
    assert_eq!(socket_family(program.as_raw_fd()), libc::AF_UNIX);
    let up = pattern(8 << 20, 1);
    let down = pattern(8 << 20, 2);

    let mut writer = program.try_clone().unwrap();
    let sent = up.clone();
    let upload = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        // The program's half-close must reach the peer as close_notify.
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let got = read_to_end(&mut server).expect("server must see close_notify, not a bare EOF");
    upload.join().unwrap();
    assert!(got == up, "upload corrupted");

    let mut reader = program.try_clone().unwrap();
    let download = thread::spawn(move || read_to_end(&mut reader).unwrap());
    server.write_all(&down).unwrap();
    server.flush().unwrap();
    send_close_notify(&mut server);
    let got = download.join().unwrap();
    assert!(got == down, "download corrupted");
    assert_eq!(link.bytes(), (8 << 20, 8 << 20));
    assert!(!link.ended_without_close_notify());
    drop(program);
    drop(link);
    wait_until_idle();
}

#[test]
fn nonblocking_and_cloexec_are_preserved_and_poll_works() {
    let _serial = serial();
    // Non-blocking + close-on-exec (std's default for sockets).
    let hs = handshake();
    hs.program.set_nonblocking(true).unwrap();
    let fd = hs.program.as_raw_fd();
    let link = adopt(fd, Connection::Client(hs.client), None, None).unwrap();
    let (mut program, mut server) = (hs.program, hs.server);
    assert_eq!(fd_flags(fd), (true, true));
    assert_eq!(socket_family(fd), libc::AF_UNIX);
    assert!(!is_internal(fd));
    assert!(is_internal(link.tcp_fd()));
    assert!(fd_flags(link.tcp_fd()).1, "internal TCP fd must be close-on-exec");
    let mut buf = [0u8; 16];
    assert_eq!(program.read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    server.write_all(b"ping").unwrap();
    server.flush().unwrap();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(ready, 1);
    assert_eq!(program.read(&mut buf).unwrap(), 4);
    assert_eq!(&buf[..4], b"ping");
    drop(program);
    assert!(read_to_end(&mut server).unwrap().is_empty());
    send_close_notify(&mut server);
    drop(link);
    wait_until_idle();

    // Blocking, without close-on-exec.
    let hs = handshake();
    let fd = hs.program.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on an fd we own.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let link = adopt(fd, Connection::Client(hs.client), None, None).unwrap();
    assert_eq!(fd_flags(fd), (false, false));
    assert!(fd_flags(link.tcp_fd()).1);
    let (program, mut server) = (hs.program, hs.server);
    drop(program);
    assert!(read_to_end(&mut server).unwrap().is_empty());
    send_close_notify(&mut server);
    drop(link);
    wait_until_idle();
}

#[test]
fn sendfile_to_the_adopted_fd_arrives_intact() {
    let _serial = serial();
    let (program, link, mut server) = adopted();
    let data = pattern(3 << 20, 7);
    let path = std::env::temp_dir().join(format!("tether-sendfile-{}", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    let file = File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let fd = program.as_raw_fd();
    let sender = thread::spawn(move || {
        let mut left = data.len();
        while left > 0 {
            // SAFETY: plain fds; a null offset uses and advances the file position.
            let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), std::ptr::null_mut(), left) };
            assert!(n > 0, "sendfile: {}", io::Error::last_os_error());
            left -= n as usize;
        }
        program.shutdown(Shutdown::Write).unwrap();
        program
    });
    let got = read_to_end(&mut server).unwrap();
    let program = sender.join().unwrap();
    assert!(got == pattern(3 << 20, 7), "sendfile data corrupted");
    send_close_notify(&mut server);
    drop(program);
    drop(link);
    wait_until_idle();
}

#[test]
fn no_fds_leak_after_the_connection_ends() {
    let _serial = serial();
    // Warm up: the relay's epoll and eventfd persist for the life of the process.
    {
        let (program, link, mut server) = adopted();
        drop(program);
        let _ = read_to_end(&mut server);
        send_close_notify(&mut server);
        drop(link);
        wait_until_idle();
    }
    let baseline = internal_fds();
    assert_eq!(baseline.len(), 2);
    let count_before = fd_count();

    let (mut program, link, mut server) = adopted();
    let ours: Vec<u64> = internal_fds()
        .into_iter()
        .filter(|fd| !baseline.contains(fd))
        .map(inode)
        .collect();
    assert_eq!(ours.len(), 2, "a TCP fd and a relay end");
    program.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).unwrap();
    server.write_all(b"world").unwrap();
    server.flush().unwrap();
    program.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
    drop(program); // the program closes without shutdown: close_notify must still go out
    assert!(read_to_end(&mut server).unwrap().is_empty());
    send_close_notify(&mut server);
    drop(server);
    drop(link);
    wait_until_idle();
    assert_eq!(internal_fds(), baseline);
    let open = open_inodes();
    assert!(ours.iter().all(|ino| !open.contains(ino)), "an internal socket is still open");
    assert_eq!(fd_count(), count_before);
}

#[test]
fn program_closing_with_data_in_flight_still_delivers_it_then_close_notify() {
    let _serial = serial();
    let (program, link, mut server) = adopted();
    let data = pattern(4 << 20, 9);
    let mut writer = program;
    let sent = data.clone();
    let closer = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        drop(writer); // close at once: most of the data is still in the pair or in rustls
    });
    let got = read_to_end(&mut server).expect("close_notify after the data");
    closer.join().unwrap();
    assert!(got == data, "data lost at close");
    send_close_notify(&mut server);
    drop(link);
    wait_until_idle();
}

#[test]
fn garbage_from_the_peer_ends_the_connection_without_hanging() {
    let _serial = serial();
    let (mut program, link, server) = adopted();
    program.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut raw = server.sock;
    // An application-data record that cannot decrypt.
    let mut garbage = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    garbage.extend_from_slice(&[0x41; 0x40]);
    raw.write_all(&garbage).unwrap();
    let mut buf = [0u8; 64];
    match program.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("garbage produced {n} bytes of plaintext"),
        Err(e) => assert!(
            !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
            "program hung: {e}"
        ),
    }
    // Writes fail too (both directions are shut), and never reach TCP as plaintext.
    assert!(program.write_all(b"secret").is_err());
    // The peer gets (at most) an alert, then EOF.
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rest = read_to_end(&mut raw).unwrap();
    assert!(!rest.windows(6).any(|w| w == b"secret"));
    drop(link);
    wait_until_idle();
}

#[test]
fn plaintext_buffered_before_adoption_is_delivered_first() {
    let _serial = serial();
    let mut hs = handshake();
    hs.server.write_all(b"early").unwrap();
    hs.server.flush().unwrap();
    // The client's rustls reads and decrypts "early" before adoption (as a handshake driver
    // using complete_io could).
    hs.program.set_read_timeout(Some(TIMEOUT)).unwrap();
    while hs.client.reader().fill_buf_len() == 0 {
        hs.client.read_tls(&mut hs.program).unwrap();
        hs.client.process_new_packets().unwrap();
    }
    let link = adopt(hs.program.as_raw_fd(), Connection::Client(hs.client), None, None).unwrap();
    let (mut program, mut server) = (hs.program, hs.server);
    server.write_all(b"+late").unwrap();
    server.flush().unwrap();
    let mut buf = [0u8; 10];
    program.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"early+late");
    drop(program);
    assert!(read_to_end(&mut server).unwrap().is_empty());
    send_close_notify(&mut server);
    drop(link);
    wait_until_idle();
}

/// `reader()` has no length query; peek through `BufRead`.
trait FillBufLen {
    fn fill_buf_len(&mut self) -> usize;
}

impl FillBufLen for rustls::Reader<'_> {
    fn fill_buf_len(&mut self) -> usize {
        io::BufRead::fill_buf(self).map_or(0, <[u8]>::len)
    }
}

#[test]
fn fork_child_closes_relay_fds_and_parent_keeps_working() {
    let _serial = serial();
    let (mut program, link, mut server) = adopted();
    let before = internal_fds();
    assert!(before.len() >= 4, "epoll, eventfd, TCP, relay end: {before:?}");
    register_atfork();
    // SAFETY: the child only inspects fds and calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let after = internal_fds();
        let closed: Vec<RawFd> = before.iter().copied().filter(|fd| !after.contains(fd)).collect();
        // SAFETY: F_GETFD on possibly-closed numbers only reads kernel state.
        let all_closed = closed.iter().all(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1);
        let ok = after == vec![link.tcp_fd()] && closed.len() == before.len() - 1 && all_closed;
        // SAFETY: leaves the child at once, without running the test harness's atexit state.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    assert!(pid > 0);
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child check failed");
    // The parent's connection is untouched.
    program.write_all(b"after fork").unwrap();
    let mut buf = [0u8; 10];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after fork");
    drop(program);
    assert!(read_to_end(&mut server).unwrap().is_empty());
    send_close_notify(&mut server);
    drop(link);
    wait_until_idle();
}

/// Exec would end the relay thread: `before_exec` moves the connection to a keeper process.
/// (The test process does not exec; it plays the case where exec fails, which must work too.)
#[test]
fn before_exec_hands_the_connection_to_a_keeper_process() {
    let _serial = serial();
    let (mut program, link, mut server) = adopted();
    program.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    server.read_exact(&mut buf).unwrap();
    let baseline_relay = internal_fds().len() - 2; // epoll + eventfd
    assert_eq!(baseline_relay, 2);

    register_atfork();
    before_exec();

    // This process forgot the relay end; it still holds the TCP dup through the Link.
    assert_eq!(internal_fds().len(), 3, "{:?}", internal_fds());
    assert!(is_internal(link.tcp_fd()));
    program.write_all(b"after!").unwrap();
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    server.write_all(b"reply!").unwrap();
    server.flush().unwrap();
    program.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"reply!");
    drop(program);
    assert!(read_to_end(&mut server).expect("keeper sends close_notify").is_empty());
    send_close_notify(&mut server);
    drop(link);
    wait_until_idle();
}

/// Regression: exec right after the first adopt, before the new relay thread has published
/// its state (the connection is still pending). The keeper used to find no state and leave, so
/// nobody relayed and the exec'd program's first write failed with EPIPE. A forked child (no
/// relay thread) adopts with the relay's start held back, then calls `before_exec`.
#[test]
fn before_exec_right_after_the_first_adopt_still_hands_the_connection_over() {
    let _serial = serial();
    register_atfork();
    let hs = handshake();
    let (program_fd, client) = (hs.program.as_raw_fd(), hs.client);
    let mut server = hs.server;
    // SAFETY: the child adopts, forks the keeper, does one exchange and calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let gate = super::relay::START_GATE.lock().unwrap_or_else(PoisonError::into_inner);
            let link = adopt(program_fd, Connection::Client(client), None, None).unwrap();
            assert!(super::relay::lock_state().is_none(), "relay started despite the gate");
            before_exec();
            drop(gate);
            let mut program = &hs.program;
            program.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            program.read_exact(&mut buf).unwrap();
            drop(link);
            buf == *b"pong"
        }));
        // SAFETY: leaves the child at once, without running the test harness's atexit state.
        unsafe { libc::_exit(if ok.unwrap_or(false) { 0 } else { 1 }) };
    }
    assert!(pid > 0);
    drop(client);
    drop(hs.program);
    let mut buf = [0u8; 4];
    let exchanged = server.read_exact(&mut buf).and_then(|()| {
        server.write_all(b"pong")?;
        server.flush()
    });
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed");
    exchanged.expect("the keeper relays the request and the reply");
    assert_eq!(&buf, b"ping");
    assert!(read_to_end(&mut server).expect("keeper sends close_notify").is_empty());
    send_close_notify(&mut server);
}

#[test]
fn peer_tcp_eof_without_close_notify_reads_as_eof_and_is_noted() {
    let _serial = serial();
    let (mut program, link, server) = adopted();
    server.sock.shutdown(Shutdown::Both).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(program.read(&mut buf).unwrap(), 0);
    assert!(link.ended_without_close_notify());
    drop(program);
    drop(link);
    wait_until_idle();
}

// Bulk data: batching, backpressure, throughput.
mod data;
