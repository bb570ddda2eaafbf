//! Per-uid counters: live broker connections and requests in flight. One local user must
//! never be able to starve another, so each uid gets its own share of what tetherd serves.
//! Admin uids (root, tetherd's own) are bounded only by the global connection cap.

use std::collections::HashMap;
use std::sync::Mutex;

/// How many of something each uid may hold at once.
#[derive(Debug)]
pub struct PerUid {
    limit: usize,
    held: Mutex<HashMap<u32, usize>>,
}

impl PerUid {
    pub fn new(limit: usize) -> Self {
        Self { limit, held: Mutex::new(HashMap::new()) }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Take one for `uid`; `None` when it already holds its limit. Released on drop.
    pub fn acquire(&self, uid: u32, exempt: bool) -> Option<Slot<'_>> {
        // `then`, not `then_some`: a Slot built eagerly would give back on drop what was never taken.
        self.try_take(uid, exempt).then(|| Slot { counter: self, uid })
    }

    /// Take one for `uid` unless it holds its limit (`exempt` ignores the limit). Each `true`
    /// must be matched by one [`PerUid::give_back`]; prefer [`PerUid::acquire`].
    pub fn try_take(&self, uid: u32, exempt: bool) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(uid).or_insert(0);
        if *n >= self.limit && !exempt {
            return false;
        }
        *n += 1;
        true
    }

    /// How many `uid` holds now.
    pub fn held(&self, uid: u32) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(&uid).copied().unwrap_or(0)
    }

    /// Give back one taken with [`PerUid::try_take`].
    pub fn give_back(&self, uid: u32) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                held.remove(&uid);
            }
        }
    }
}

/// One unit held by a uid; given back on drop.
#[derive(Debug)]
pub struct Slot<'a> {
    counter: &'a PerUid,
    uid: u32,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.counter.give_back(self.uid);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn each_uid_has_its_own_share() {
        let q = PerUid::new(2);
        let a1 = q.acquire(1000, false).unwrap();
        let _a2 = q.acquire(1000, false).unwrap();
        assert!(q.acquire(1000, false).is_none());
        let _b = q.acquire(1001, false).unwrap();
        let _root = q.acquire(0, true).unwrap();
        let _root2 = q.acquire(0, true).unwrap();
        let _root3 = q.acquire(0, true).unwrap();
        drop(a1);
        assert_eq!(q.held(1000), 1);
        let _a3 = q.acquire(1000, false).unwrap();
        assert!(q.held(4242) == 0 && q.acquire(4242, false).is_some());
    }
}
