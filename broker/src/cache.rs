//! Issued SVIDs, cached per process (pid, start time) until half their lifetime.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tether_proto::wire::SvidResponse;
use tether_proto::SpiffeId;

use crate::attest;

/// A process: its pid and start time (which together never repeat).
pub type ProcessKey = (i32, u64);

/// Bound on cached SVIDs. When full, entries of exited processes are dropped, then the ones
/// closest to their refresh time.
pub const MAX_CACHED: usize = 16384;

#[derive(Debug)]
struct Cached {
    svid: SvidResponse,
    refresh: Instant,
}

#[derive(Debug, Default)]
pub struct SvidCache {
    map: Mutex<HashMap<ProcessKey, Cached>>,
}

impl SvidCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProcessKey, Cached>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached SVID for `key`, if it is for `id` and not yet at half-life.
    pub fn get(&self, key: ProcessKey, id: &SpiffeId) -> Option<SvidResponse> {
        let map = self.lock();
        let c = map.get(&key)?;
        (c.svid.spiffe_id == *id && Instant::now() < c.refresh).then(|| c.svid.clone())
    }

    /// Cache `svid`, issued now with lifetime `ttl`, until `ttl / 2` from now.
    pub fn insert(&self, key: ProcessKey, svid: SvidResponse, ttl: Duration) {
        let mut map = self.lock();
        if map.len() >= MAX_CACHED && !map.contains_key(&key) {
            map.retain(|&(pid, st), _| attest::start_time(pid).is_ok_and(|t| t == st));
            if map.len() >= MAX_CACHED {
                if let Some(oldest) = map.iter().min_by_key(|(_, c)| c.refresh).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(key, Cached { svid, refresh: Instant::now() + ttl / 2 });
    }

    /// Drop entries whose process has exited (or whose pid was reused). Returns how many.
    pub fn sweep(&self) -> usize {
        // Collect keys first so /proc is not read under the lock.
        let keys: Vec<ProcessKey> = self.lock().keys().copied().collect();
        let dead: Vec<ProcessKey> = keys
            .into_iter()
            .filter(|&(pid, st)| !attest::is_running(pid, st))
            .collect();
        let mut map = self.lock();
        for k in &dead {
            map.remove(k);
        }
        dead.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
