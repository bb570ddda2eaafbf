//! The tokio side: one gRPC channel to the agent's admin socket, the bundle stream, and one
//! task per process subscription. Runs only on the "spire-upstream" thread.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, info, warn};

use super::proto::delegated_identity_client::DelegatedIdentityClient;
use super::proto::{SubscribeToX509BundlesRequest, SubscribeToX509sviDsRequest};
use super::{svid, AgentState, Shared, SubState, Subscribe, Subscription, MAX_BACKOFF};
use crate::cache::ProcessKey;

/// How long connecting to the admin socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First pause after a failed attempt; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Largest message accepted from the agent (SVIDs of every entry of one process).
const MAX_MESSAGE: usize = 4 << 20;

/// The upstream thread's body: follow the bundles, and start a task for each subscription.
pub(super) async fn run(shared: Arc<Shared>, mut rx: UnboundedReceiver<Subscribe>) {
    let channel = channel(shared.socket.clone());
    tokio::spawn(follow_bundles(Arc::clone(&shared), channel.clone()));
    while let Some(s) = rx.recv().await {
        tokio::spawn(subscription(Arc::clone(&shared), channel.clone(), s));
    }
}

/// A lazily connected channel over the Unix socket; it reconnects by itself on the next call
/// after the agent went away. The URI is a placeholder: the connector ignores it.
fn channel(socket: PathBuf) -> Channel {
    Endpoint::from_static("http://spire-agent.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
            }
        }))
}

fn client(channel: Channel) -> DelegatedIdentityClient<Channel> {
    DelegatedIdentityClient::new(channel).max_decoding_message_size(MAX_MESSAGE)
}

fn describe(s: &tonic::Status) -> String {
    let msg = s.message();
    // A connection failure arrives as Unavailable with the transport error as its source.
    let source = std::error::Error::source(s)
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    if msg.is_empty() {
        format!("{:?}{source}", s.code())
    } else {
        format!("{:?}: {msg}{source}", s.code())
    }
}

/// Follow `SubscribeToX509Bundles` for ever: reconnect with backoff, and keep the agent state
/// (up / down with the reason) that issuance checks.
async fn follow_bundles(shared: Arc<Shared>, channel: Channel) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let why = match one_bundle_stream(&shared, channel.clone(), &mut backoff).await {
            Ok(()) => "the agent ended the bundle stream".to_owned(),
            Err(why) => why,
        };
        // A copy: the lock must not be held while the state is replaced (set_agent locks it).
        let prev = super::lock(&shared.agent).clone();
        let since = match prev {
            AgentState::Up => {
                warn!(socket = %shared.socket.display(), reason = %why, "SPIRE agent lost; new SVIDs are refused until it is back");
                Instant::now()
            }
            AgentState::Down { since, .. } => since,
            AgentState::Connecting => {
                warn!(socket = %shared.socket.display(), reason = %why, "cannot reach the SPIRE agent; retrying");
                Instant::now()
            }
        };
        shared.set_agent(AgentState::Down { why, since });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn one_bundle_stream(
    shared: &Shared,
    channel: Channel,
    backoff: &mut Duration,
) -> Result<(), String> {
    let mut stream = client(channel)
        .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    loop {
        let Some(resp) = stream.message().await.map_err(|s| describe(&s))? else {
            return Ok(());
        };
        let bundles = svid::bundles(resp).map_err(|e| format!("unusable bundle: {e}"))?;
        let tds: Vec<String> = bundles.keys().map(ToString::to_string).collect();
        *super::lock(&shared.bundles) = Some(Arc::new(bundles));
        let was = std::mem::replace(&mut *super::lock(&shared.agent), AgentState::Up);
        shared.bundles_changed.notify_all();
        *backoff = FIRST_BACKOFF;
        match was {
            AgentState::Up => info!(trust_domains = ?tds, "SPIRE bundles updated"),
            _ => {
                info!(socket = %shared.socket.display(), trust_domains = ?tds, "SPIRE agent connected")
            }
        }
    }
}

/// One process's subscription: ends when the process exits (its pidfd turns readable) or
/// when the stream fails; either way it is removed, so the next FetchSvid starts afresh.
async fn subscription(shared: Arc<Shared>, channel: Channel, s: Subscribe) {
    let Subscribe { key, sub, pidfd } = s;
    let pidfd = match crate::sys::watch_pidfd(pidfd) {
        Ok(fd) => fd,
        Err(e) => {
            sub.set(SubState::Failed(format!(
                "cannot watch the process's pidfd: {e}"
            )));
            shared.remove(key, &sub);
            return;
        }
    };
    let outcome = tokio::select! {
        // Polled first: an exit seen at the same time as an answer wins.
        biased;
        r = pidfd.readable() => match r {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("pidfd: {e}")),
        },
        () = sub.cancel.notified() => Err("superseded (the process exec'd or changed ids)".to_owned()),
        r = follow(&shared, channel, key, &sub, pidfd.get_ref()) => r,
    };
    // The stream is dropped here, which cancels the RPC at the agent.
    match outcome {
        Ok(()) => {
            debug!(pid = key.0, "process exited; SPIRE subscription ended");
            sub.set(SubState::Ended);
        }
        Err(why) => {
            debug!(pid = key.0, reason = %why, "SPIRE subscription failed");
            sub.set(SubState::Failed(why));
        }
    }
    shared.remove(key, &sub);
}

/// Follow the agent's answers for `key`; Ok(()) means the process is gone.
async fn follow(
    shared: &Shared,
    channel: Channel,
    key: ProcessKey,
    sub: &Subscription,
    pidfd: &OwnedFd,
) -> Result<(), String> {
    let (pid, _) = key;
    let request = SubscribeToX509sviDsRequest {
        selectors: Vec::new(),
        pid,
    };
    let mut stream = client(channel)
        .subscribe_to_x509svi_ds(request)
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    loop {
        let Some(resp) = stream.message().await.map_err(|s| describe(&s))? else {
            return Err("the agent ended the subscription".to_owned());
        };
        // The agent attested whatever `pid` named when it looked: this answer is only ours if
        // the pidfd still names that pid, alive.
        match crate::sys::pidfd_names(pidfd, pid) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(format!("pidfd {}: {e}", pidfd.as_raw_fd())),
        }
        match svid::parse(resp, &shared.trust_domain) {
            Ok(Some(f)) => {
                debug!(pid, spiffe_id = %f.spiffe_id, serial = %f.issued.serial, "SVID from the SPIRE agent");
                sub.set(SubState::Ready(Arc::new(f)));
            }
            Ok(None) => {
                info!(pid, "the SPIRE agent grants this process no identity (now)");
                sub.set(SubState::NoIdentity);
            }
            Err(why) => {
                warn!(pid, reason = %why, "refusing the SPIRE agent's SVID");
                return Err(format!("unusable SVID from the agent: {why}"));
            }
        }
    }
}
