//! Process setup shared by the proxy binaries (ztunnel, waypoint).

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tracing::{info, warn};

/// Logs to stderr, without colour, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(|| UnlockedStderr)
        .with_ansi(false)
        .init();
}

/// Standard error written with plain `write(2)` calls, without std's
/// process-wide `Stderr` lock. The fmt layer formats each event whole into
/// a buffer of its thread and writes it at once, so a line is one system
/// call (atomic on a pipe up to `PIPE_BUF`, 4 KiB); the lock only made
/// threads logging at the same time (a proxy's workers writing access-log
/// lines) wait for each other in futex calls.
struct UnlockedStderr;

impl std::io::Write for UnlockedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(nix::unistd::write(std::io::stderr(), buf)?)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises the limit on open files as far as the process may: to
/// `fs.nr_open` with `CAP_SYS_RESOURCE` (as the privileged node agent has),
/// else to the hard limit. A proxy holds two sockets per proxied connection
/// (ztunnel four for a same-node connection), and the usual soft limit
/// (1,024) would cap it at a few hundred. Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(err) => {
            warn!(%err, "could not read the open-file limit");
            return 0;
        }
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(hard)
        .max(hard);
    for limit in [ceiling, hard] {
        if limit <= soft {
            return soft;
        }
        if setrlimit(Resource::RLIMIT_NOFILE, limit, limit).is_ok() {
            info!(from = soft, to = limit, "raised the open-file limit");
            return limit;
        }
    }
    warn!(soft, hard, "could not raise the open-file limit");
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_at_least_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let limit = raise_fd_limit();
        assert!(limit >= hard, "{limit} < {hard}");
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap().0, limit);
    }
}
