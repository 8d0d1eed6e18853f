//! The request access log: one line per HTTP request, on stderr next to the
//! rest of the log, written off the request path.
//!
//! A worker formats its line straight into a buffer of its thread (no
//! `tracing` field visitors, no `Debug` escaping of every value) and
//! appends it to the pending batch; a writer thread wakes once per batch,
//! after a short window, and writes the batch in whole lines of at most
//! `PIPE_BUF` bytes per `write(2)`, so a line is never split or interleaved
//! with another writer's on a pipe. Under load that is one system call per
//! dozen lines instead of one per request; idle, the writer thread sleeps.
//!
//! The lines keep the shape of the process's `tracing` log (timestamp,
//! level, target `waypoint::access`, `key=value` fields) and obey its
//! filter: `RUST_LOG=waypoint::access=off` turns them off.

use std::{
    cell::RefCell,
    io::Write,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    thread::Thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::warn;

use crate::metrics::ResponseFlags;

/// How long the writer waits after the first line of a batch before writing
/// it: long enough to gather a busy worker's lines, short enough that a
/// line reaches the log promptly.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Lines pending beyond this many bytes (the log's reader has stalled) are
/// dropped, and counted, rather than held in memory without bound.
const MAX_PENDING: usize = 8 << 20;
/// The most one `write(2)` carries: a pipe writes up to this atomically.
const PIPE_BUF: usize = 4096;
/// Capacity the writer's buffer shrinks back to after a burst.
const KEEP_CAPACITY: usize = 256 << 10;

/// One request, as its access log line tells it.
#[derive(Debug)]
pub struct Entry<'a> {
    /// Connection id (the one the connection's `tracing` spans carry).
    pub conn: u64,
    /// The original client.
    pub source: SocketAddr,
    /// The caller's SPIFFE identity, empty when it has none.
    pub identity: &'a str,
    /// Request method.
    pub method: &'a str,
    /// Request path (without the query).
    pub path: &'a str,
    /// Status sent to the caller.
    pub status: u16,
    /// Envoy response flags.
    pub flags: ResponseFlags,
    /// Name of the route that matched, empty when none did.
    pub route: &'a str,
    /// Cluster the request was sent to, empty when none.
    pub cluster: &'a str,
    /// Endpoint of the last try, if one was picked.
    pub endpoint: Option<SocketAddr>,
    /// Tries sent upstream.
    pub attempts: u32,
    /// Time from the request head to the response head.
    pub duration: Duration,
    /// `x-request-id`.
    pub request_id: &'a str,
    /// Why the waypoint answered itself (Envoy's response code details),
    /// empty otherwise.
    pub detail: &'a str,
}

/// The access log's sink: cheap to clone, shared by the workers.
#[derive(Clone, Debug)]
pub struct AccessLog(Option<Arc<Sink>>);

#[derive(Debug)]
struct Sink {
    /// Lines not yet handed to the writer.
    pending: Mutex<Vec<u8>>,
    /// The output, and the writer's buffer; held while writing so batches
    /// stay in order whoever writes them.
    output: Mutex<Output>,
    /// The writer thread, woken by the first line of a batch.
    writer: OnceLock<Thread>,
    /// Lines dropped since the writer last reported it.
    dropped: AtomicU64,
}

struct Output {
    out: Box<dyn Write + Send>,
    batch: Vec<u8>,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("batch", &self.batch.len())
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Lines go to the process's standard error.
    pub fn stderr() -> Self {
        Self::to(std::io::stderr())
    }

    /// Lines go to `out`, written by a thread of the log's own.
    pub fn to(out: impl Write + Send + 'static) -> Self {
        let sink = Arc::new(Sink {
            pending: Mutex::new(Vec::new()),
            output: Mutex::new(Output {
                out: Box::new(out),
                batch: Vec::new(),
            }),
            writer: OnceLock::new(),
            dropped: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&sink);
        match std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(&weak))
        {
            Ok(handle) => {
                let _ = sink.writer.set(handle.thread().clone());
            }
            // Without the thread, each line is written as it comes.
            Err(err) => warn!(%err, "no access-log writer thread: writing lines inline"),
        }
        Self(Some(sink))
    }

    /// No access log.
    pub fn off() -> Self {
        Self(None)
    }

    /// Whether lines are written (a sink, and the log filter lets
    /// `waypoint::access` through): callers skip gathering an entry
    /// otherwise.
    pub fn enabled(&self) -> bool {
        self.0.is_some() && tracing::enabled!(target: "waypoint::access", tracing::Level::INFO)
    }

    /// Logs one request.
    pub fn write(&self, entry: &Entry<'_>) {
        let Some(sink) = &self.0 else { return };
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            format_line(&mut line, entry, SystemTime::now());
            sink.append(&line);
        });
    }

    /// Writes every pending line now (before the process exits).
    pub fn flush(&self) {
        if let Some(sink) = &self.0 {
            sink.flush();
        }
    }
}

impl Sink {
    fn append(&self, line: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() + line.len() > MAX_PENDING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = pending.is_empty();
        pending.extend_from_slice(line);
        drop(pending);
        match self.writer.get() {
            Some(writer) if first => writer.unpark(),
            Some(_) => {}
            None => self.flush(),
        }
    }

    fn flush(&self) {
        let mut output = self.output.lock().unwrap_or_else(|p| p.into_inner());
        let Output { out, batch } = &mut *output;
        std::mem::swap(
            batch,
            &mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()),
        );
        let mut failed = None;
        for chunk in whole_lines(batch, PIPE_BUF) {
            if let Err(err) = out.write_all(chunk) {
                failed = Some(err);
                break;
            }
        }
        let _ = out.flush();
        batch.clear();
        batch.shrink_to(KEEP_CAPACITY);
        drop(output);
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            warn!(
                dropped,
                "access log lines dropped: the log is read slower than requests come"
            );
        }
        if let Some(err) = failed {
            warn!(%err, "writing the access log");
        }
    }
}

/// The writer thread: parked until a batch starts, then writes it after
/// the batch window. Ends with the sink.
fn write_batches(sink: &Weak<Sink>) {
    loop {
        std::thread::park_timeout(Duration::from_secs(1));
        let Some(sink) = sink.upgrade() else { return };
        if sink
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            continue;
        }
        std::thread::sleep(BATCH_WINDOW);
        sink.flush();
    }
}

/// `batch` in pieces of whole lines, each at most `limit` bytes unless a
/// single line is longer.
fn whole_lines(batch: &[u8], limit: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = if rest.len() <= limit {
            rest.len()
        } else {
            match rest[..limit].iter().rposition(|&b| b == b'\n') {
                Some(newline) => newline + 1,
                None => rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |newline| newline + 1),
            }
        };
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

thread_local! {
    /// The line being formatted, reused by the thread's requests.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// The second the thread last formatted, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

fn format_line(out: &mut Vec<u8>, entry: &Entry<'_>, now: SystemTime) {
    timestamp(out, now);
    out.extend_from_slice(b"  INFO waypoint::access: request conn=");
    int(out, entry.conn);
    out.extend_from_slice(b" src=");
    socket_addr(out, entry.source);
    field(out, "src_identity", entry.identity);
    field(out, "method", entry.method);
    field(out, "path", entry.path);
    out.extend_from_slice(b" status=");
    int(out, entry.status);
    let _ = write!(out, " flags={}", entry.flags);
    field(out, "route", entry.route);
    field(out, "cluster", entry.cluster);
    out.extend_from_slice(b" endpoint=");
    if let Some(endpoint) = entry.endpoint {
        socket_addr(out, endpoint);
    }
    out.extend_from_slice(b" attempts=");
    int(out, entry.attempts);
    out.extend_from_slice(b" duration_ms=");
    int(out, entry.duration.as_millis() as u64);
    field(out, "request_id", entry.request_id);
    field(out, "detail", entry.detail);
    out.push(b'\n');
}

fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// ` key=value`, the value quoted (with `"`, `\` and control characters
/// escaped) when it is not one plain word, so a line parses as logfmt
/// and no value can forge a field or a line.
fn field(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' && b != b'=');
    if plain {
        out.extend_from_slice(value.as_bytes());
        return;
    }
    out.push(b'"');
    for c in value.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => {
                let mut utf8 = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out.push(b'"');
}

fn socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                int(out, octet);
            }
            out.push(b':');
            int(out, v4.port());
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds), as the `tracing`
/// log writes it; the date part is formatted once per second per thread.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != secs {
            *second = (secs, civil(secs));
        }
        out.extend_from_slice(&second.1);
    });
    let mut micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out.push(b'.');
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (the days-to-civil conversion of
/// the proleptic Gregorian calendar).
fn civil(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let of_day = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut text = [0u8; 19];
    let mut put = |at: usize, value: u64, width: usize| {
        let mut value = value;
        for i in (0..width).rev() {
            text[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year.clamp(0, 9999) as u64, 4);
    put(5, month as u64, 2);
    put(8, day as u64, 2);
    put(11, of_day / 3600, 2);
    put(14, of_day / 60 % 60, 2);
    put(17, of_day % 60, 2);
    for (at, sep) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        text[at] = sep;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            conn: 7,
            source: SocketAddr::from(([10, 0, 1, 2], 40_000)),
            identity: "spiffe://cluster.local/ns/default/sa/sleep",
            method: "GET",
            path: "/productpage",
            status: 503,
            flags: {
                let mut flags = ResponseFlags::CONNECTION_TERMINATION;
                flags.insert(ResponseFlags::RETRY_LIMIT_EXCEEDED);
                flags
            },
            route: "reviews.default.svc.cluster.local:9080",
            cluster: "outbound|9080|v1|reviews.default.svc.cluster.local",
            endpoint: Some(SocketAddr::from(([10, 0, 2, 9], 9080))),
            attempts: 3,
            duration: Duration::from_micros(12_345),
            request_id: "5c8e1f1e-1b2a-4c3d-9e8f-0a1b2c3d4e5f",
            detail: "",
        }
    }

    #[test]
    fn a_line_carries_every_field_in_order() {
        let mut line = Vec::new();
        let at = UNIX_EPOCH + Duration::from_micros(1_796_346_478_001_234);
        format_line(&mut line, &entry(), at);
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "2026-12-04T01:07:58.001234Z  INFO waypoint::access: request conn=7 \
             src=10.0.1.2:40000 src_identity=spiffe://cluster.local/ns/default/sa/sleep \
             method=GET path=/productpage status=503 flags=UC,URX \
             route=reviews.default.svc.cluster.local:9080 \
             cluster=outbound|9080|v1|reviews.default.svc.cluster.local \
             endpoint=10.0.2.9:9080 attempts=3 duration_ms=12 \
             request_id=5c8e1f1e-1b2a-4c3d-9e8f-0a1b2c3d4e5f detail=\n"
        );
    }

    #[test]
    fn values_that_could_forge_fields_or_lines_are_quoted() {
        let mut line = Vec::new();
        field(&mut line, "detail", "no route in \"x\"\nforged=1 \\");
        assert_eq!(
            String::from_utf8(line).unwrap(),
            r#" detail="no route in \"x\"\nforged=1 \\""#
        );
        let mut line = Vec::new();
        field(&mut line, "path", "/a=b");
        assert_eq!(String::from_utf8(line).unwrap(), r#" path="/a=b""#);
    }

    #[test]
    fn dates_match_the_calendar() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (1_796_346_478, "2026-12-04T01:07:58"),
            (4_102_444_800, "2100-01-01T00:00:00"),
        ] {
            assert_eq!(std::str::from_utf8(&civil(secs)).unwrap(), text, "{secs}");
        }
    }

    #[test]
    fn batches_split_only_between_lines() {
        let batch = b"aaaa\nbbbbbbbb\ncc\n";
        let chunks: Vec<&[u8]> = whole_lines(batch, 9).collect();
        assert_eq!(chunks, [&b"aaaa\n"[..], b"bbbbbbbb\n", b"cc\n"]);
        let chunks: Vec<&[u8]> = whole_lines(b"a\nb\nc\n", 4).collect();
        assert_eq!(chunks, [&b"a\nb\n"[..], b"c\n"]);
        let long = b"xxxxxxxxxx\ny\n";
        let chunks: Vec<&[u8]> = whole_lines(long, 4).collect();
        assert_eq!(chunks, [&b"xxxxxxxxxx\n"[..], b"y\n"]);
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_reach_the_output_in_batches_of_whole_lines() {
        let out = Shared::default();
        let log = AccessLog::to(out.clone());
        for _ in 0..100 {
            log.write(&entry());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let writes = loop {
            let writes = out.0.lock().unwrap().clone();
            if writes
                .iter()
                .map(|w| w.split(|&b| b == b'\n').count() - 1)
                .sum::<usize>()
                == 100
            {
                break writes;
            }
            assert!(std::time::Instant::now() < deadline, "lines not written");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(writes.len() < 100, "{} writes for 100 lines", writes.len());
        for write in &writes {
            assert!(write.len() <= PIPE_BUF, "a write of {} bytes", write.len());
            assert!(write.ends_with(b"\n"), "a write ends inside a line");
        }
        log.write(&entry());
        log.flush();
        let total: usize = out
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|w| w.split(|&b| b == b'\n').count() - 1)
            .sum();
        assert_eq!(total, 101, "flush writes what is pending");
    }
}
