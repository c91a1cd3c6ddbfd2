//! Output capture: the job's one pipe (stdout and stderr interleaved)
//! appended to its log file, capped with a truncation marker.

use super::*;

pub(super) async fn open_log(path: &Path) -> io::Result<tokio::fs::File> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

pub(super) async fn write_and_flush(log: &mut tokio::fs::File, bytes: &[u8]) -> io::Result<()> {
    log.write_all(bytes).await?;
    log.flush().await
}

/// Waits for the pump to see end-of-file; if a process that escaped the
/// group keeps the pipe open past [`DRAIN_AFTER_EXIT_MS`], stops it.
pub(super) async fn finish_output(
    mut pump: tokio::task::JoinHandle<()>,
    stop: oneshot::Sender<()>,
) {
    let drain = Duration::from_millis(DRAIN_AFTER_EXIT_MS);
    if tokio::time::timeout(drain, &mut pump).await.is_ok() {
        return;
    }
    warn!("output pipe still open after the job's group died; dropping the rest");
    let _ = stop.send(());
    if let Err(e) = pump.await {
        warn!(error = %e, "output pump failed");
    }
}

/// Copies the job's output into its log until end-of-file (or `stop`),
/// honouring the cap, and flushes before returning.
/// While the log's file system has no more than `reserve` bytes free, no
/// output is written: the rest is dropped after one
/// [`OUTPUT_INCOMPLETE_MARKER`] line, as after a failed write.
pub(super) async fn pump_output(
    mut output: pipe::Receiver,
    mut log: tokio::fs::File,
    log_path: PathBuf,
    log_cap_bytes: u64,
    reserve: u64,
    mut stop: oneshot::Receiver<()>,
) {
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let mut cap = LogCap::new(log_cap_bytes);
    let mut log_ok = true;
    let log_dir = log_path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    loop {
        let read = tokio::select! {
            biased;
            _ = &mut stop => break,
            read = output.read(&mut buffer) => read,
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "cannot read job output");
                break;
            }
        };
        if log_ok && !room_for_output(&log_dir, reserve) {
            warn!(
                reserve,
                "the disk is nearly full: discarding further output"
            );
            let _ = log.flush().await;
            mark_incomplete(&log_path);
            log_ok = false;
        }
        if log_ok {
            if let Err(e) = write_capped(&mut log, &mut cap, &buffer[..n]).await {
                warn!(error = %e, "cannot write log; discarding further output");
                // Within the reserve there is room for the line that says
                // so; on a disk full of something else, an empty file says it.
                let _ = log.flush().await;
                mark_incomplete(&log_path);
                log_ok = false;
            }
        }
    }
    if let Err(e) = log.flush().await {
        warn!(error = %e, "cannot flush log");
    }
}

pub(super) async fn write_capped(
    log: &mut tokio::fs::File,
    cap: &mut LogCap,
    chunk: &[u8],
) -> io::Result<()> {
    let admitted = cap.admit(chunk.len());
    log.write_all(&chunk[..admitted.keep]).await?;
    if admitted.truncated_now {
        let marker = truncation_marker(cap.cap_bytes);
        log.write_all(marker.as_bytes()).await?;
    }
    Ok(())
}

/// The line written once when an attempt's output reaches the cap.
pub fn truncation_marker(cap_bytes: u64) -> String {
    format!("\n[rustci: output truncated at {cap_bytes} bytes]\n")
}

/// Counts an attempt's output against its cap. Pure, so it is unit tested.
#[derive(Debug)]
pub(super) struct LogCap {
    cap_bytes: u64,
    written_bytes: u64,
    truncated: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Admitted {
    /// Leading bytes of the chunk to write.
    keep: usize,
    /// True exactly once: when this chunk crossed the cap.
    truncated_now: bool,
}

impl LogCap {
    fn new(cap_bytes: u64) -> Self {
        Self {
            cap_bytes,
            written_bytes: 0,
            truncated: false,
        }
    }

    fn admit(&mut self, chunk_bytes: usize) -> Admitted {
        assert!(self.written_bytes <= self.cap_bytes);
        if self.truncated {
            return Admitted {
                keep: 0,
                truncated_now: false,
            };
        }
        let room = self.cap_bytes - self.written_bytes;
        let keep = (chunk_bytes as u64).min(room);
        self.written_bytes += keep;
        self.truncated = keep < chunk_bytes as u64;
        assert!(self.written_bytes <= self.cap_bytes);
        Admitted {
            keep: keep as usize,
            truncated_now: self.truncated,
        }
    }
}

/// Marks the output at `log_path` as cut short: the marker line at its
/// end, or, when not even that can be written (the disk is full of
/// something else), the empty file beside it that says so.
fn mark_incomplete(log_path: &Path) {
    let appended = std::fs::OpenOptions::new()
        .append(true)
        .open(log_path)
        .and_then(|mut f| {
            f.write_all(OUTPUT_INCOMPLETE_MARKER.as_bytes())?;
            f.sync_data()
        });
    if let Err(e) = appended {
        let beside = rustci_net::disk::incomplete_path(log_path);
        if let Err(e2) = std::fs::File::create(&beside) {
            warn!(error = %e, error2 = %e2, "cannot mark the output as incomplete");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_cap_keeps_everything_up_to_the_cap_exactly() {
        let mut cap = LogCap::new(10);
        assert_eq!(
            cap.admit(4),
            Admitted {
                keep: 4,
                truncated_now: false
            }
        );
        assert_eq!(
            cap.admit(6),
            Admitted {
                keep: 6,
                truncated_now: false
            }
        );
        assert!(!cap.truncated);
    }

    #[test]
    fn log_cap_truncates_once_then_discards_everything() {
        let mut cap = LogCap::new(10);
        assert_eq!(
            cap.admit(7),
            Admitted {
                keep: 7,
                truncated_now: false
            }
        );
        assert_eq!(
            cap.admit(7),
            Admitted {
                keep: 3,
                truncated_now: true
            }
        );
        assert_eq!(
            cap.admit(7),
            Admitted {
                keep: 0,
                truncated_now: false
            }
        );
        assert_eq!(
            cap.admit(0),
            Admitted {
                keep: 0,
                truncated_now: false
            }
        );
    }
}
