//! rustls configs, built once per identity generation and `allow` list rather than per
//! connection: the verifier, the trust anchors, the certificate resolver, and the session
//! stores that make resumption possible (see [`super::resumption`]).
//!
//! An identity generation is one `Arc<Identity>`: tetherd's SVID renewal and every policy
//! reload make a new one, and the first handshake under it replaces every config (and with
//! them every ticket) of the previous one. The cache holds a `Weak` of the identity it was
//! built for, so an address reused by a later identity can never match.

use std::sync::{Arc, Weak};

use rustls::client::{ResolvesClientCert, Resumption, TicketRequest};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tether_proto::IdPattern;

use super::resumption::TetherSessions;
use super::verify::SpiffeVerifier;
use crate::identity::Identity;
use crate::sync::Lock;

/// Distinct `allow` lists kept per side (a policy has a handful); beyond it the cache starts over.
const MAX_LISTS: usize = 64;
/// Sessions a server config remembers (each is one outstanding ticket).
const SERVER_SESSIONS: usize = 4096;

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A client config and the ticket store inside it.
#[derive(Clone)]
pub(crate) struct ClientSide {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) sessions: Arc<TetherSessions>,
}

/// Client configs by (`allow` list, resumption on).
type ClientConfigs = Vec<((Vec<IdPattern>, bool), Arc<ClientConfig>)>;

struct Configs {
    ident: Weak<Identity>,
    sessions: Arc<TetherSessions>,
    clients: ClientConfigs,
    servers: Vec<(Vec<IdPattern>, Arc<ServerConfig>)>,
}

/// Fork lock order: after the relay's locks (ARCHITECTURE.md, "Fork"); nothing is called
/// while it is held but rustls's config builders.
static CONFIGS: Lock<Option<Configs>> = Lock::new(None);

fn with_configs<R>(ident: &Arc<Identity>, f: impl FnOnce(&mut Configs) -> R) -> R {
    let mut g = CONFIGS.lock();
    let stale = g.as_ref().is_none_or(|c| !Weak::ptr_eq(&c.ident, &Arc::downgrade(ident)));
    if stale {
        // The previous generation's configs (and tickets) go; a handshake still running on
        // one of them keeps its own Arc.
        *g = Some(Configs {
            ident: Arc::downgrade(ident),
            sessions: Arc::new(TetherSessions::new()),
            clients: Vec::new(),
            servers: Vec::new(),
        });
    }
    f(g.as_mut().expect("just set"))
}

/// The client config for connections under `ident` whose server must prove an ID in `allow`.
/// `resumption`: offer stored tickets and ask for new ones; otherwise ask for none.
pub(crate) fn client(
    provider: &Arc<CryptoProvider>,
    ident: &Arc<Identity>,
    allow: &[IdPattern],
    resumption: bool,
) -> Result<ClientSide, rustls::Error> {
    with_configs(ident, |c| {
        let sessions = c.sessions.clone();
        if let Some((_, cfg)) = c.clients.iter().find(|((a, r), _)| a == allow && *r == resumption) {
            return Ok(ClientSide { config: cfg.clone(), sessions });
        }
        let v = SpiffeVerifier::new(ident.creds.trust.clone(), allow.to_vec());
        let mut cfg = ClientConfig::builder_with_details(provider.clone(), Arc::new(crate::clock::RustlsTime))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(v))
            .with_client_cert_resolver(Arc::new(Fixed(ident.creds.key.clone())));
        cfg.enable_secret_extraction = true;
        cfg.enable_sni = false;
        // RFC 9149 ticket_request: a tether server sends tickets only to a client that asks
        // (the signal that the client is tether: OpenSSL and most stacks never send it).
        let want = u8::from(resumption);
        cfg.send_ticket_request = Some(TicketRequest { new_session_count: want, resumption_count: want });
        cfg.resumption = if resumption {
            Resumption::store(sessions.clone()).tls12_resumption(rustls::client::Tls12Resumption::Disabled)
        } else {
            Resumption::disabled()
        };
        let cfg = Arc::new(cfg);
        if c.clients.len() >= MAX_LISTS {
            c.clients.clear();
        }
        c.clients.push(((allow.to_vec(), resumption), cfg.clone()));
        Ok(ClientSide { config: cfg, sessions })
    })
}

/// The server config for connections under `ident` whose client must prove an ID in `allow`.
pub(crate) fn server(
    provider: &Arc<CryptoProvider>,
    ident: &Arc<Identity>,
    allow: &[IdPattern],
    resumption: bool,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    with_configs(ident, |c| {
        if let Some((_, cfg)) = c.servers.iter().find(|(a, _)| a == allow) {
            return Ok(cfg.clone());
        }
        let v = SpiffeVerifier::new(ident.creds.trust.clone(), allow.to_vec());
        let mut cfg = ServerConfig::builder_with_details(provider.clone(), Arc::new(crate::clock::RustlsTime))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(v))
            .with_cert_resolver(Arc::new(Fixed(ident.creds.key.clone())));
        cfg.enable_secret_extraction = true;
        // Tickets only to a client that asks for them with RFC 9149's ticket_request (tether
        // clients ask for one); everyone else, OpenSSL included, gets none:
        // resumption is off for peers that are not tether. Each ticket is single-use and
        // stateful (a resumed connection gets the next one).
        cfg.send_tls13_tickets = 0;
        if resumption {
            cfg.max_tls13_tickets = 1;
            cfg.session_storage = ServerSessionMemoryCache::new(SERVER_SESSIONS);
        } else {
            cfg.max_tls13_tickets = 0;
            cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        }
        let cfg = Arc::new(cfg);
        if c.servers.len() >= MAX_LISTS {
            c.servers.clear();
        }
        c.servers.push((allow.to_vec(), cfg.clone()));
        Ok(cfg)
    })
}

/// Fork: hold the cache (released by `crate::fork`).
pub(crate) fn atfork_prepare() {
    CONFIGS.hold_for_fork();
}

/// In the fork child, with no lock held: the child fetches its own identity, so the parent's
/// configs are of no use. They are forgotten, never dropped: a parent thread may have been
/// inside one of their session stores at the fork.
pub(crate) fn atfork_child() {
    if let Some(old) = CONFIGS.lock().take() {
        std::mem::forget(old);
    }
}
