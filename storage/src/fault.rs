//! TEST ONLY: faults a test can plant in a running store of its own, to see
//! what its driver does when redb panics mid-write (as it may on a file
//! damaged from outside), and that a write that dies before its commit
//! leaves the file as it was. Keyed by data dir, so tests running in
//! parallel in one process never see each other's faults. One relaxed
//! atomic load per write when nothing is armed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ARMED: AtomicBool = AtomicBool::new(false);
static PANIC_NEXT_APPEND: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static PANIC_NEXT_SNAPSHOT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The next append to the log in `data_dir` panics inside its write transaction.
pub fn panic_next_append(data_dir: &Path) {
    arm(&PANIC_NEXT_APPEND, data_dir);
}

/// The next compaction or snapshot install in `data_dir` panics inside its
/// write transaction, after it has written everything and before it commits.
pub fn panic_next_snapshot(data_dir: &Path) {
    arm(&PANIC_NEXT_SNAPSHOT, data_dir);
}

pub(crate) fn take_append_panic(data_dir: &Path) -> bool {
    take(&PANIC_NEXT_APPEND, data_dir)
}

pub(crate) fn take_snapshot_panic(data_dir: &Path) -> bool {
    take(&PANIC_NEXT_SNAPSHOT, data_dir)
}

fn arm(list: &Mutex<Vec<PathBuf>>, data_dir: &Path) {
    let mut armed = list.lock().unwrap_or_else(|e| e.into_inner());
    armed.push(data_dir.to_path_buf());
    ARMED.store(true, Ordering::SeqCst);
}

fn take(list: &Mutex<Vec<PathBuf>>, data_dir: &Path) -> bool {
    if !ARMED.load(Ordering::Relaxed) {
        return false;
    }
    let mut armed = list.lock().unwrap_or_else(|e| e.into_inner());
    let Some(at) = armed.iter().position(|p| p == data_dir) else {
        return false;
    };
    armed.swap_remove(at);
    // Other lists may still hold faults: ARMED only ever skips work, so it
    // stays set until the process ends once anything was armed.
    true
}
