//! The daemons' own process: what they inherit and what they may use.
//!
//! `rustci dev`, `server` and `agent` start by marking every descriptor
//! they inherited (above stdio) close-on-exec, so that nothing of whoever
//! started them (a shell's pipes, a supervisor's sockets) leaks into jobs,
//! and by raising their soft limit of open files to the hard limit, so that
//! many running jobs (each holds a few pipes and files) do not run the
//! daemon out of descriptors. The per-attempt shim does the first too.

use std::io;

/// Marks every open descriptor from 3 up close-on-exec; returns how many
/// were not already.
pub fn cloexec_inherited_fds() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    // Collected first: reading the directory holds a descriptor of its own.
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    let mut marked = 0;
    for fd in fds {
        // SAFETY: fcntl on a number; EBADF for one already closed (the
        // directory's own) is harmless.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                marked += 1;
            }
        }
    }
    marked
}

/// Raises the soft limit of open files to the hard limit; returns
/// `(before, after)`.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok((before, limit.rlim_cur))
    }
}
