//! tetherd: the identity broker. Thin: parse flags, load config, open the CA, serve.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tether_broker::ca::Ca;
use tether_broker::config::MetricsListen;
use tether_broker::env::ProcessEnv;
use tether_broker::reload::{self, ConfigSource};
use tether_broker::server::{self, Broker, ServerOptions};
use tether_broker::upstream::Upstream;
use tether_broker::{init_logging, metrics, LogFormat};

/// The tether identity broker: attests local processes and issues them X.509-SVIDs.
#[derive(Debug, Parser)]
#[command(name = "tetherd", version)]
struct Args {
    /// TOML config file; without it the embedded demo default is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Socket path (overrides the config).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// State directory holding the generated CA (overrides the config).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve Prometheus metrics at IP:PORT or unix:/PATH (overrides the config's `metrics`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<MetricsListen>,
    /// Validate the config and exit.
    #[arg(long)]
    check_config: bool,
    /// Per-frame client deadline in milliseconds (tests).
    #[arg(long, hide = true, default_value_t = 5000)]
    client_timeout_ms: u64,
    /// Live connection cap.
    #[arg(long, hide = true, default_value_t = 4096)]
    max_connections: usize,
    /// Live connections per uid (root and tetherd's own uid: only the global cap).
    #[arg(long, hide = true, default_value_t = 256)]
    max_connections_per_uid: usize,
    /// Issue a fresh SVID for every request (benchmarks only).
    #[arg(long, hide = true)]
    no_cache: bool,
    /// Cache sweep interval in milliseconds (tests).
    #[arg(long, hide = true, default_value_t = 10_000)]
    sweep_interval_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let source = ConfigSource {
        path: args.config.clone(),
        socket: args.socket.clone(),
        state_dir: args.state_dir.clone(),
        metrics: args.metrics.clone(),
    };
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tetherd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        for w in config.warnings() {
            println!("warning: {w}");
        }
        println!(
            "config OK: trust domain {}, {} entries, key custody {}, svid_ttl {}s",
            config.trust_domain,
            config.entries.len(),
            config.key_custody.as_str(),
            config.svid_ttl.as_secs()
        );
        return ExitCode::SUCCESS;
    }
    // Before anything can be signalled: SIGHUP reloads, it must never kill tetherd.
    let sighup = match reload::catch_sighup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tetherd: cannot install the SIGHUP handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(args.log_format, &ProcessEnv);
    let ca = match Ca::open(&config) {
        Ok(ca) => ca,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the CA");
            eprintln!("tetherd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match server::bind(&config.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tetherd: cannot listen on {}: {e}", config.socket.display());
            return ExitCode::FAILURE;
        }
    };
    let metrics_listener = match config.metrics.as_ref().map(metrics::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            let at = config.metrics.as_ref().map(ToString::to_string).unwrap_or_default();
            eprintln!("tetherd: cannot serve metrics on {at}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    tracing::info!(
        socket = %config.socket.display(),
        trust_domain = %config.trust_domain,
        entries = config.entries.len(),
        svid_ttl_secs = config.svid_ttl.as_secs(),
        "tetherd listening"
    );
    // One descriptor per live connection, plus the CA, logs and pidfds in flight; and, as far
    // as the hard limit allows, per process with held keys its pidfd and, under impersonation
    // checks, its /proc status (without one, issuance to a new process is refused).
    let want = args.max_connections as u64 * 2 + 64;
    let held = tether_broker::custody::MAX_OWNERS as u64 * 2;
    match tether_broker::sys::raise_fd_limit(want + held) {
        Ok(n) if n < want => tracing::warn!(limit = n, want, "open-file limit is below what the connection cap needs"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
    let opts = ServerOptions {
        client_timeout: Duration::from_millis(args.client_timeout_ms.max(1)),
        max_connections: args.max_connections.max(1),
        max_connections_per_uid: args.max_connections_per_uid.max(1),
        max_in_flight_per_uid: ServerOptions::default().max_in_flight_per_uid,
        cache: !args.no_cache,
        sweep_interval: Duration::from_millis(args.sweep_interval_ms.max(10)),
    };
    let upstream = match config.upstream.as_ref().map(|u| Upstream::start(u, config.trust_domain.clone())).transpose() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("tetherd: cannot start the SPIRE upstream client: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(u) = &upstream {
        tracing::info!(admin_socket = %u.socket().display(), "SVIDs come from the SPIRE agent ([upstream] kind = \"spire\")");
    }
    let mut broker = Broker::new(config, ca, opts).with_source(source);
    if let Some(u) = upstream {
        broker = broker.with_upstream(u);
    }
    let broker = Arc::new(broker);
    if let Err(e) = reload::spawn_sighup_reloader(Arc::clone(&broker), sighup) {
        eprintln!("tetherd: cannot start the SIGHUP thread: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(l) = metrics_listener {
        let b = Arc::clone(&broker);
        if let Err(e) = metrics::spawn(l, Arc::new(move || b.render_metrics())) {
            eprintln!("tetherd: cannot start the metrics thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    match server::serve(broker, listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tetherd: {e}");
            ExitCode::FAILURE
        }
    }
}
