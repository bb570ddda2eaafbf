//! tetherd: the identity broker. Thin: parse flags, load config, open the CA, serve.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tether_broker::ca::Ca;
use tether_broker::config::{Config, EtcFiles};
use tether_broker::env::ProcessEnv;
use tether_broker::server::{self, Broker, ServerOptions};
use tether_broker::{init_logging, LogFormat};

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
    /// Validate the config and exit.
    #[arg(long)]
    check_config: bool,
    /// Per-frame client deadline in milliseconds (tests).
    #[arg(long, hide = true, default_value_t = 5000)]
    client_timeout_ms: u64,
    /// Live connection cap.
    #[arg(long, hide = true, default_value_t = 512)]
    max_connections: usize,
    /// Issue a fresh SVID for every request (benchmarks only).
    #[arg(long, hide = true)]
    no_cache: bool,
    /// Cache sweep interval in milliseconds (tests).
    #[arg(long, hide = true, default_value_t = 10_000)]
    sweep_interval_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let loaded = match &args.config {
        Some(path) => Config::load(path, &EtcFiles::default()),
        None => Config::embedded_default(),
    };
    let mut config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tetherd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("config OK: trust domain {}, {} entries", config.trust_domain, config.entries.len());
        return ExitCode::SUCCESS;
    }
    if let Some(s) = args.socket {
        config.socket = s;
    }
    if let Some(d) = args.state_dir {
        config.state_dir = d;
    }
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
    tracing::info!(
        socket = %config.socket.display(),
        trust_domain = %config.trust_domain,
        entries = config.entries.len(),
        svid_ttl_secs = config.svid_ttl.as_secs(),
        "tetherd listening"
    );
    let opts = ServerOptions {
        client_timeout: Duration::from_millis(args.client_timeout_ms.max(1)),
        max_connections: args.max_connections.max(1),
        cache: !args.no_cache,
        sweep_interval: Duration::from_millis(args.sweep_interval_ms.max(10)),
    };
    let broker = Arc::new(Broker::new(config, ca, opts));
    match server::serve(broker, listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tetherd: {e}");
            ExitCode::FAILURE
        }
    }
}
