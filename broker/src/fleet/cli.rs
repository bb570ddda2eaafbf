//! `tether ca init` and `tether ca intermediate`.

use std::fmt::Write as _;
use std::path::PathBuf;

use tether_proto::TrustDomain;
use time::format_description::well_known::Rfc3339;

use super::offline::{self, Issued};
use super::{
    parse_lifetime, DEFAULT_INTERMEDIATE_TTL, DEFAULT_ROOT_TTL, MAX_INTERMEDIATE_TTL, MAX_ROOT_TTL,
    MIN_CA_TTL,
};
use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Make an offline root CA in DIR (root.pem, root.key with mode 0600; DIR is 0700).
    /// Never overwrites an existing root. Keep DIR offline: it signs host intermediates only.
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The fleet's trust domain, e.g. example.org.
        #[arg(long, value_name = "NAME")]
        trust_domain: TrustDomain,
        /// Lifetime, e.g. 10y (default), 365d.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Issue host NAME's intermediate CA from the root in --root: writes intermediate.pem,
    /// intermediate.key (0600) and bundle.pem into --out, replacing an earlier one (rotation).
    Intermediate {
        #[arg(long, value_name = "NAME")]
        host: String,
        /// The directory `tether ca init` wrote.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime, e.g. 7d (default), 24h; at most 90d and never past the root's expiry.
        /// A host whose intermediate is not re-issued stops being trusted when it expires.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
}

/// Run a `tether ca` subcommand; returns what to print.
pub fn command(cmd: CaCommand) -> Result<String, Error> {
    let fail = |e: super::FleetError| Error::Cli(e.to_string());
    match cmd {
        CaCommand::Init {
            out,
            trust_domain,
            ttl,
        } => {
            let ttl = match ttl {
                Some(t) => parse_lifetime(&t, MIN_CA_TTL, MAX_ROOT_TTL).map_err(fail)?,
                None => DEFAULT_ROOT_TTL,
            };
            let issued = offline::init_root(&out, &trust_domain, ttl).map_err(fail)?;
            let mut s = summary("root", &issued);
            let _ = writeln!(
                s,
                "next: tether ca intermediate --host NAME --root {} --out HOST_DIR (for each host)",
                out.display()
            );
            Ok(s)
        }
        CaCommand::Intermediate {
            host,
            root,
            out,
            ttl,
        } => {
            let ttl = match ttl {
                Some(t) => parse_lifetime(&t, MIN_CA_TTL, MAX_INTERMEDIATE_TTL).map_err(fail)?,
                None => DEFAULT_INTERMEDIATE_TTL,
            };
            let issued = offline::issue_intermediate(&root, &host, &out, ttl).map_err(fail)?;
            let mut s = summary(&format!("intermediate for {host}"), &issued);
            let _ = writeln!(
                s,
                "tetherd.toml on {host}:\n  trust_domain = \"{}\"\n  ca_cert = \"{}\"\n  ca_key = \"{}\"\n  ca_bundle = \"{}\"\n\
                 re-issue before it expires (then restart tetherd); a host not re-issued stops being trusted at expiry",
                issued.trust_domain,
                issued.cert.display(),
                issued.key.display(),
                issued.bundle.display()
            );
            Ok(s)
        }
    }
}

fn summary(what: &str, i: &Issued) -> String {
    let expires = i
        .not_after
        .format(&Rfc3339)
        .unwrap_or_else(|_| i.not_after.to_string());
    format!(
        "wrote {what}: {} (key {})\ntrust domain: {}\nserial:       {}\nexpires:      {expires}\n",
        i.cert.display(),
        i.key.display(),
        i.trust_domain,
        i.serial
    )
}
