//! How the control plane's allocator (mimalloc) is tuned, shared by the
//! `mesh-control` binary and the simulated proxies of `mesh-control-bench`.
//!
//! A full push allocates and frees large buffers at a high rate (response
//! chunks, decode buffers, per-proxy bookkeeping). With transparent huge
//! pages, mimalloc advises its arenas as huge-page backed, so each page
//! fault after a purge zeroes 2 MiB: in the 100-proxy benchmark a quarter
//! of all CPU went to `clear_page`. Disabling THP for the process made the
//! push about 25 % faster and lowered the peak by about 40 MiB (see
//! `docs/performance.md`, control plane).

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (the Rust bindings
/// do not name it): how long freed memory stays resident before it is
/// returned to the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays resident (see [`configure`]).
const PURGE_DELAY_MS: std::ffi::c_long = 50;

/// `mi_option_allow_thp` in mimalloc 3's `mi_option_e`.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Applies the control plane's allocator settings; call first thing in
/// `main`, before anything allocates in bulk.
///
/// - Freed memory goes back to the OS after 50 ms instead of mimalloc's
///   default second: the first load of a large cluster frees far more than
///   it keeps, and a long delay lets that garbage pile up into the peak
///   (about 100 MiB more at the benchmark's size), while returning it at
///   once made a push decommit and refault the same pages over and over
///   (10-15 % slower).
/// - No transparent huge pages for this process (`PR_SET_THP_DISABLE`,
///   which also covers arenas mimalloc mapped before `main`).
///
/// `MIMALLOC_PURGE_DELAY` and `MIMALLOC_ALLOW_THP` in the environment
/// (mimalloc's own settings) win, for measuring the trade-offs.
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; called before anything else
        // reads allocator options concurrently.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and
        // changes nothing but this process's THP eligibility.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "PR_SET_THP_DISABLE failed; keeping transparent huge pages"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option numbers are positions in a C enum the bindings do not
    /// name: check them against the defaults of these options and their
    /// neighbours first (one test, as `configure` changes them).
    #[test]
    fn configure_sets_the_intended_options() {
        // SAFETY: reads integer options.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_ALLOW_THP - 1), 32);
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_ALLOW_THP), 1);
        }
        configure();
        // SAFETY: reads integer options and this process's THP flag.
        unsafe {
            assert_eq!(
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                PURGE_DELAY_MS
            );
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_ALLOW_THP), 0);
            assert_eq!(libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0), 1);
        }
    }
}
