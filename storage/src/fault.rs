//! TEST ONLY: faults a test can plant in a running store of its own, to see
//! what its driver does when redb panics mid-append (as it may on a file
//! damaged from outside). Keyed by data dir, so tests running in parallel in
//! one process never see each other's faults. One relaxed atomic load per
//! append when nothing is armed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ARMED: AtomicBool = AtomicBool::new(false);
static PANIC_NEXT_APPEND: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The next append to the log in `data_dir` panics inside its write transaction.
pub fn panic_next_append(data_dir: &Path) {
    let mut armed = PANIC_NEXT_APPEND.lock().unwrap_or_else(|e| e.into_inner());
    armed.push(data_dir.to_path_buf());
    ARMED.store(true, Ordering::SeqCst);
}

pub(crate) fn take_append_panic(data_dir: &Path) -> bool {
    if !ARMED.load(Ordering::Relaxed) {
        return false;
    }
    let mut armed = PANIC_NEXT_APPEND.lock().unwrap_or_else(|e| e.into_inner());
    let Some(at) = armed.iter().position(|p| p == data_dir) else {
        return false;
    };
    armed.swap_remove(at);
    ARMED.store(!armed.is_empty(), Ordering::SeqCst);
    true
}
