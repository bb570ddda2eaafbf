//! The tether CLI: talk to tetherd.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tether_broker::client::{Client, DEFAULT_TIMEOUT};
use tether_broker::env::{socket_path, ProcessEnv};
use tether_broker::files::write_atomically;
use tether_broker::pem;
use tether_broker::server::now_unix;
use tether_broker::Error;
use tether_proto::wire::SvidResponse;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// tether: mutual TLS for unmodified programs.
#[derive(Debug, Parser)]
#[command(name = "tether", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch this process's SVID and print its SPIFFE ID, serial and expiry.
    Svid {
        /// tetherd's socket (default: $TETHER_SOCKET, else /run/tether/tetherd.sock).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Also write svid.pem (chain), svid.key (PKCS#8, mode 0600) and bundle.pem here.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report whether tetherd is reachable, its version, trust domain and live identities.
    Status {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run CMD with libtether.so preloaded: its TCP connections follow tetherd's policy.
    ///
    /// Refuses statically linked and Go binaries, which LD_PRELOAD cannot reach, instead of
    /// letting them run in plaintext (override with --allow-uninterposable).
    Run {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// libtether.so to preload (default: $TETHER_LIB, next to this binary, /usr/lib/tether).
        #[arg(long, value_name = "PATH")]
        lib: Option<PathBuf>,
        /// Run CMD even if tether cannot interpose it (its connections will NOT be protected).
        #[arg(long)]
        allow_uninterposable: bool,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
        cmd: Vec<std::ffi::OsString>,
    },
    /// Check kernel TLS, tetherd, the clock, /etc/ld.so.preload, the library and glibc, and say
    /// how to fix what is wrong. Exit status 1 when a check FAILs.
    Doctor {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// libtether.so to check (default: where `tether run` looks).
        #[arg(long, value_name = "PATH")]
        lib: Option<PathBuf>,
        /// Filesystem root holding etc/ld.so.preload.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Print a JSON array of {check, status, detail, fix}.
        #[arg(long)]
        json: bool,
    },
    /// Host-wide mode: add libtether.so to /etc/ld.so.preload (--host-wide), or remove it
    /// (--uninstall). Refuses a missing or unsafe library, a too-old glibc, or a silent tetherd.
    Install {
        /// Add libtether.so to /etc/ld.so.preload: every program started afterwards loads it.
        #[arg(long, required_unless_present = "uninstall", conflicts_with = "uninstall")]
        host_wide: bool,
        /// Remove libtether from /etc/ld.so.preload, keeping other entries.
        #[arg(long)]
        uninstall: bool,
        #[command(flatten)]
        at: Placement,
        /// Install even if tetherd is not answering, and replace another libtether entry.
        #[arg(long)]
        force: bool,
    },
    /// Put systemd service NAME under tether: write /etc/systemd/system/NAME.service.d/tether.conf.
    EnableUnit {
        name: String,
        #[command(flatten)]
        at: Placement,
    },
    /// Remove the drop-in written by enable-unit.
    DisableUnit {
        name: String,
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// List the live protected connections tetherd knows of (root sees all; others their own).
    ///
    /// PID and EXE are attested by tetherd. Everything else is as the reporting process claims
    /// it: a process can report any peer ID, so PEER ID (CLAIMED) is not proof of who it
    /// talked to.
    Connections {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print a JSON array of connection objects.
        #[arg(long)]
        json: bool,
    },
    /// Make tetherd re-read its config file (root or tetherd's user only).
    Reload {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Inspect the connection policy in force.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Fleet mode without SPIRE: an offline root and per-host intermediates.
    Ca {
        #[command(subcommand)]
        command: tether_broker::fleet::cli::CaCommand,
    },
    /// Load generator: N clients fetch SVIDs for S seconds (see scripts/bench-broker).
    #[command(hide = true)]
    BenchSvid {
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Load generator: N clients ask tetherd for CertificateVerify signatures (broker custody)
    /// for S seconds (see scripts/bench-broker).
    #[command(hide = true)]
    BenchSign {
        #[command(flatten)]
        load: LoadArgs,
        /// A new connection for every signature, as the shim does (the per-handshake cost).
        #[arg(long)]
        fresh: bool,
    },
}

/// The options of both load generators (`bench-svid`, `bench-sign`).
#[derive(Debug, clap::Args)]
struct LoadArgs {
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    clients: usize,
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

impl LoadArgs {
    /// The socket, at least one client, and at least 0.1 s.
    fn resolve(self) -> (PathBuf, usize, Duration) {
        (socket_path(self.socket, &ProcessEnv), self.clients.max(1), Duration::from_secs_f64(self.seconds.max(0.1)))
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Explain which rules decide a connection from SPIFFE_ID to ADDR:PORT, and why.
    Check {
        #[arg(long, value_name = "SPIFFE_ID")]
        from: tether_proto::SpiffeId,
        #[arg(long, value_name = "ADDR:PORT")]
        to: String,
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Where `install` and `enable-unit` act.
#[derive(Debug, clap::Args)]
struct Placement {
    /// Filesystem root to act in (every path is taken inside it).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Absolute path of libtether.so (default: where `tether run` looks).
    #[arg(long, value_name = "PATH")]
    lib: Option<PathBuf>,
    /// tetherd's socket (default: $TETHER_SOCKET, else /run/tether/tetherd.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Svid { socket, out, json } => svid(&socket_path(socket, &ProcessEnv), out.as_deref(), json),
        Command::Status { socket, json } => status(&socket_path(socket, &ProcessEnv), json),
        Command::Run { socket, lib, allow_uninterposable, cmd } => {
            run(&socket_path(socket, &ProcessEnv), lib, allow_uninterposable, cmd)
        }
        Command::Doctor { socket, lib, root, json } => {
            return doctor(socket_path(socket, &ProcessEnv), lib, root, json);
        }
        Command::Install { host_wide: _, uninstall, at, force } => {
            install(uninstall, at.root, at.lib, socket_path(at.socket, &ProcessEnv), force)
        }
        Command::EnableUnit { name, at } => enable_unit(&name, &at.root, at.lib, &socket_path(at.socket, &ProcessEnv)),
        Command::DisableUnit { name, root } => disable_unit(&name, &root),
        Command::Connections { socket, json } => {
            tether_broker::connections::command(&socket_path(socket, &ProcessEnv), json).map(|s| print!("{s}"))
        }
        Command::Reload { socket } => {
            tether_broker::reload::command(&socket_path(socket, &ProcessEnv)).map(|s| print!("{s}"))
        }
        Command::Policy { command: PolicyCommand::Check { from, to, socket, json } } => {
            tether_broker::policy_check::command(&socket_path(socket, &ProcessEnv), from, &to, json)
                .map(|s| print!("{s}"))
        }
        Command::Ca { command } => tether_broker::fleet::cli::command(command).map(|s| print!("{s}")),
        Command::BenchSvid { load } => {
            let (socket, clients, dur) = load.resolve();
            bench(&socket, clients, dur)
        }
        Command::BenchSign { load, fresh } => {
            let (socket, clients, dur) = load.resolve();
            bench_sign(&socket, clients, dur, fresh)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e}");
            ExitCode::FAILURE
        }
    }
}

fn doctor(socket: PathBuf, lib: Option<PathBuf>, root: PathBuf, json: bool) -> ExitCode {
    use tether_broker::doctor;
    let findings = doctor::run(&doctor::Options { socket, root, lib, env: &ProcessEnv });
    if json {
        println!("{}", doctor::render_json(&findings));
    } else {
        print!("{}", doctor::render_text(&findings));
    }
    if doctor::passed(&findings) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn install(uninstall: bool, root: PathBuf, lib: Option<PathBuf>, socket: PathBuf, force: bool) -> Result<(), Error> {
    use tether_broker::install::{choose_lib, host_wide_command, HostWide};
    let cli = |e: tether_broker::install::Refused| Error::Cli(e.0);
    let msg = if uninstall {
        host_wide_command(None, &root)
    } else {
        let lib = choose_lib(&root, lib, &ProcessEnv).map_err(cli)?;
        host_wide_command(Some(&HostWide { root: root.clone(), lib, socket, force }), &root)
    };
    println!("{}", msg.map_err(cli)?);
    Ok(())
}

fn enable_unit(name: &str, root: &Path, lib: Option<PathBuf>, socket: &Path) -> Result<(), Error> {
    use tether_broker::install;
    let cli = |e: install::Refused| Error::Cli(e.0);
    let lib = install::choose_lib(root, lib, &ProcessEnv).map_err(cli)?;
    let (path, next) = install::enable_unit(root, name, &lib, socket).map_err(cli)?;
    println!("wrote {}
to apply it: {next}", path.display());
    Ok(())
}

fn disable_unit(name: &str, root: &Path) -> Result<(), Error> {
    use tether_broker::install;
    match install::disable_unit(root, name).map_err(|e| Error::Cli(e.0))? {
        Some((path, next)) => println!("removed {}
to apply it: {next}", path.display()),
        None => println!("no tether drop-in for {name}"),
    }
    Ok(())
}

/// Exec CMD under the shim. Returns only on failure.
fn run(socket: &Path, lib: Option<PathBuf>, allow_uninterposable: bool, cmd: Vec<std::ffi::OsString>) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    use tether_broker::run;

    let fail = |m: String| Error::Cli(m);
    let lib = run::find_library(lib, &ProcessEnv).map_err(fail)?;
    let (program, args) = cmd.split_first().ok_or_else(|| fail("no command given".into()))?;
    if run::resolve(program, &ProcessEnv).is_none() {
        return Err(fail(format!("{}: command not found", program.to_string_lossy())));
    }
    match run::check_interposable(program, &ProcessEnv) {
        Ok(path) => {
            // io_uring submissions never pass through libc: say so (the shim cannot see them).
            if tether_broker::elf::inspect(&path).is_ok_and(|i| i.links_liburing()) {
                eprintln!(
                    "tether: WARNING: {} links liburing; connects and accepts it submits through \
                     io_uring bypass tether and are NOT protected (see README, Limits)",
                    path.display()
                );
            }
        }
        Err(why) => {
            if !allow_uninterposable {
                return Err(fail(format!(
                    "refusing to run: {why}; its connections would bypass tether and stay plaintext \
                     (pass --allow-uninterposable to run it unprotected anyway)"
                )));
            }
            eprintln!("tether: WARNING: {why}; running it UNPROTECTED as asked");
        }
    }
    // Fail fast: without the broker every TCP connect in CMD would fail closed.
    Client::connect(socket, DEFAULT_TIMEOUT)
        .and_then(|mut c| c.status())
        .map_err(|e| fail(format!("tetherd is not answering at {} ({e}); CMD's TCP connections would fail closed", socket.display())))?;
    let err = std::process::Command::new(program)
        .args(args)
        .env("LD_PRELOAD", run::preload_value(&lib, std::env::var_os("LD_PRELOAD")))
        .env(tether_proto::wire::SOCKET_ENV, socket)
        .exec();
    Err(fail(format!("cannot execute {}: {err}", program.to_string_lossy())))
}

fn rfc3339(unix: u64) -> String {
    OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn svid(socket: &Path, out: Option<&Path>, json: bool) -> Result<(), Error> {
    // Writing files is an explicit export of the caller's own identity: ask for the key even
    // under broker custody (tetherd issues it for this answer only).
    let mut client = Client::connect(socket, DEFAULT_TIMEOUT)?;
    let svid = if out.is_some() { client.export_svid()? } else { client.fetch_svid()? };
    if let Some(dir) = out {
        write_svid_files(dir, &svid)?;
    }
    if json {
        let v = serde_json::json!({
            "spiffe_id": svid.spiffe_id.as_str(),
            "serial": svid.serial,
            "not_before": svid.not_before,
            "not_after": svid.not_after,
            "expires": rfc3339(svid.not_after),
            "trust_domain": svid.spiffe_id.trust_domain().as_str(),
            "out": out.map(|d| d.display().to_string()),
        });
        println!("{v}");
    } else {
        let left = svid.not_after.saturating_sub(now_unix());
        println!("spiffe_id: {}", svid.spiffe_id);
        println!("serial:    {}", svid.serial);
        println!("expires:   {} (in {}m{:02}s)", rfc3339(svid.not_after), left / 60, left % 60);
        if let Some(dir) = out {
            println!("wrote:     {0}/svid.pem {0}/svid.key {0}/bundle.pem", dir.display());
        }
    }
    Ok(())
}

fn write_svid_files(dir: &Path, svid: &SvidResponse) -> Result<(), Error> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut chain = String::new();
    for c in &svid.cert_chain {
        chain.push_str(&pem::encode(pem::CERTIFICATE, &c.0));
    }
    let mut bundle = String::new();
    for c in svid.bundle.iter().chain(svid.federated.values().flatten()) {
        bundle.push_str(&pem::encode(pem::CERTIFICATE, &c.0));
    }
    let Some(private_key) = &svid.private_key else {
        return Err(Error::Cli("tetherd sent no private key to export".to_owned()));
    };
    let key = pem::encode(pem::PRIVATE_KEY, &private_key.0);
    write_atomically(&dir.join("svid.key"), key.as_bytes(), 0o600)?;
    write_atomically(&dir.join("svid.pem"), chain.as_bytes(), 0o644)?;
    write_atomically(&dir.join("bundle.pem"), bundle.as_bytes(), 0o644)?;
    Ok(())
}

fn status(socket: &Path, json: bool) -> Result<(), Error> {
    let s = Client::connect(socket, DEFAULT_TIMEOUT)?.status()?;
    if json {
        let v = serde_json::json!({
            "reachable": true,
            "socket": socket.display().to_string(),
            "version": s.version,
            "trust_domain": s.trust_domain.as_str(),
            "live_identities": s.live_identities,
            "uptime_secs": s.uptime_secs,
        });
        println!("{v}");
    } else {
        println!("tetherd:         reachable at {}", socket.display());
        println!("version:         {}", s.version);
        println!("trust domain:    {}", s.trust_domain);
        println!("live identities: {}", s.live_identities);
        println!("uptime:          {}s", s.uptime_secs);
    }
    Ok(())
}

/// What [`load`] measured: requests that succeeded and failed, the seconds it ran, and how long
/// each successful request took (connecting included, where it connected).
struct Load {
    ok: u64,
    failed: u64,
    secs: f64,
    took: Vec<Duration>,
}

/// One thread per client until `dur` is over, each running `request(&mut client)` in a loop on
/// its own connection to tetherd: a new connection per request when `fresh`, else one kept
/// until a request fails. A failed connect counts as a failure and is retried after 10 ms.
/// `per_thread` makes each thread's request (which returns whether it succeeded).
fn load<R>(socket: &Path, clients: usize, dur: Duration, fresh: bool, per_thread: impl Fn() -> R) -> Load
where
    R: FnMut(&mut Client) -> bool + Send + 'static,
{
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let mut threads = Vec::new();
    for _ in 0..clients {
        let (ok, failed, socket, mut request) = (ok.clone(), failed.clone(), socket.to_owned(), per_thread());
        threads.push(std::thread::spawn(move || {
            let mut client = None;
            let mut took = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                if fresh {
                    client = None;
                }
                if client.is_none() {
                    client = Client::connect(&socket, DEFAULT_TIMEOUT).ok();
                }
                let Some(c) = client.as_mut() else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if request(c) {
                    ok.fetch_add(1, Ordering::Relaxed);
                    took.push(t0.elapsed());
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    client = None;
                }
            }
            took
        }));
    }
    let took = threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect();
    Load {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
        took,
    }
}

/// Signatures per second: one SVID (its key held by tetherd), then each client thread signs a
/// CertificateVerify-sized message in a loop on its own connection, each request attested.
fn bench_sign(socket: &Path, clients: usize, dur: Duration, fresh: bool) -> Result<(), Error> {
    let svid = Client::connect(socket, DEFAULT_TIMEOUT)?.fetch_svid()?;
    let key_id = svid
        .key_id
        .ok_or_else(|| Error::Cli("tetherd runs key_custody = \"process\": it holds no key to sign with".to_owned()))?;
    // What a TLS 1.3 server's CertificateVerify signs (tetherd signs nothing else).
    let message = tether_proto::wire::sign::certificate_verify_input(true, &[0x5a; 32]);
    let sign = || {
        let message = message.clone();
        move |c: &mut Client| matches!(c.sign(key_id, 0x0403, &message), Ok(Ok(_)))
    };
    let Load { ok: n, failed, secs, mut took } = load(socket, clients, dur, fresh, sign);
    took.sort_unstable();
    let pct = |p: usize| took.get(took.len() * p / 100).map_or(0, |d| d.as_micros());
    println!(
        "clients={clients} fresh_connection={fresh} seconds={secs:.2} signatures={n} errors={failed} rate={:.0}/s p50={}us p99={}us",
        n as f64 / secs,
        pct(50),
        pct(99)
    );
    Ok(())
}

/// Each client holds one connection and fetches in a loop. Whether each fetch is a fresh
/// issuance depends on tetherd: run it with `--no-cache` to measure issuance.
fn bench(socket: &Path, clients: usize, dur: Duration) -> Result<(), Error> {
    let serials_distinct = Arc::new(AtomicU64::new(0));
    let per_thread = || {
        let (distinct, mut last) = (serials_distinct.clone(), String::new());
        move |c: &mut Client| match c.fetch_svid() {
            Ok(s) => {
                if s.serial != last {
                    distinct.fetch_add(1, Ordering::Relaxed);
                    last = s.serial;
                }
                true
            }
            Err(_) => false,
        }
    };
    let Load { ok: n, failed, secs, .. } = load(socket, clients, dur, false, per_thread);
    println!(
        "clients={clients} seconds={secs:.2} svids={n} fresh_serials={} errors={failed} rate={:.0}/s",
        serials_distinct.load(Ordering::Relaxed),
        n as f64 / secs
    );
    Ok(())
}
