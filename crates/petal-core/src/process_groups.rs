//! The worker process groups this process has started and not yet reaped,
//! so that a client told to stop can end them all at once (the kill itself
//! is `petal_client::kill_worker_groups`). A group id is listed only while
//! its leader is unreaped, so it can never name another process's group.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static GROUPS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Marks this process as stopping: the steps its killed workers fail are
/// then expected, not worth an error line.
pub fn set_stopping() {
    STOPPING.store(true, Ordering::SeqCst);
}

/// Whether [`set_stopping`] was called.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

fn groups() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    GROUPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records the group led by `pid` (a child spawned as its group's leader).
pub fn track(pid: u32) {
    groups().insert(pid);
}

/// Forgets the group led by `pid`; call before reaping the leader.
pub fn untrack(pid: u32) {
    groups().remove(&pid);
}

/// The groups tracked now.
pub fn tracked() -> Vec<u32> {
    groups().iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_tracked_until_untracked() {
        track(u32::MAX - 1);
        track(u32::MAX - 2);
        assert!(tracked().contains(&(u32::MAX - 1)));
        untrack(u32::MAX - 1);
        assert!(!tracked().contains(&(u32::MAX - 1)));
        assert!(tracked().contains(&(u32::MAX - 2)));
        untrack(u32::MAX - 2);
    }
}
