//! Giving memory back to the system after a burst of large answers.
//!
//! glibc's malloc keeps freed memory for reuse: after 30 clients were each
//! sent a 400 KB page of jobs, the daemon's resident memory stayed up for
//! good. Two measures, both glibc-only (other allocators differ):
//! - a fixed mmap threshold, so that large buffers (a page of JSON, a
//!   response being built) are mapped on their own and unmapped when freed;
//!   glibc otherwise raises the threshold after the first such free and
//!   later large buffers stay in the heap;
//! - `malloc_trim` on a blocking thread, at most every
//!   [`TRIM_INTERVAL`], while large answers are being built and once after
//!   the last of them, so an idle daemon never pays for it.

use std::time::Duration;

/// Allocations at or above this size are mapped on their own.
pub const MMAP_THRESHOLD_BYTES: usize = 256 * 1024;
/// Shortest time between two trims.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Sets the allocator up; call once at start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called at
    // start-up with valid constants.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as libc::c_int);
        // Heap top kept before it is given back (setting it also stops
        // glibc from raising it dynamically).
        libc::mallopt(
            libc::M_TRIM_THRESHOLD,
            (4 * MMAP_THRESHOLD_BYTES) as libc::c_int,
        );
    }
}

/// Trims the heap during and once after each burst of large answers,
/// until the runtime stops.
pub async fn trim_after_bursts() {
    let mut seen = rustci_net::server::large_answers();
    let mut burst = false;
    loop {
        tokio::time::sleep(TRIM_INTERVAL).await;
        let now = rustci_net::server::large_answers();
        let busy = now != seen;
        seen = now;
        // During a burst, and once more after it, when its buffers are free.
        if busy || burst {
            let _ = tokio::task::spawn_blocking(trim).await;
        }
        burst = busy;
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
