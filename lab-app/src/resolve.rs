//! Name resolution for outgoing connections, as a pod sees it.
//!
//! The lab has no DNS server: it writes every Service's names to a hosts file
//! (`IP name [name...]`). Names are looked up there as given and then with the
//! Kubernetes search path (`<namespace>.svc.cluster.local`,
//! `svc.cluster.local`, `cluster.local`), so `details` finds
//! `details.default.svc.cluster.local`. Anything not in the file goes to the
//! system resolver. The file is re-read when its modification time changes,
//! checked at most once per [`RELOAD_INTERVAL`], so the lab can edit it live.

use std::{
    collections::HashMap,
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use thiserror::Error;
use tracing::{debug, info, warn};

/// How often, at most, the hosts file's modification time is checked.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why a name could not be resolved.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// The hosts file could not be read when the resolver was created.
    #[error("reading hosts file {}", path.display())]
    HostsFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// Neither the hosts file nor the system resolver knows the name.
    #[error("resolve {host}")]
    Lookup {
        /// The name looked up.
        host: String,
        /// The system resolver's answer.
        #[source]
        source: io::Error,
    },
}

/// Resolves host names for outgoing connections: IP literals, then the hosts
/// file with the search path, then the system resolver.
#[derive(Debug)]
pub struct Resolver {
    hosts: Option<HostsFile>,
    search: Vec<String>,
}

/// Command-line flags of the clients that resolve names as pods do.
#[derive(clap::Args, Debug)]
pub struct ResolveArgs {
    /// Hosts file to resolve names with (Kubernetes search path applies).
    #[arg(long, value_name = "FILE")]
    pub hosts: Option<PathBuf>,
    /// Namespace whose search path short names use.
    #[arg(long, default_value = "default")]
    pub namespace: String,
}

impl ResolveArgs {
    /// The resolver these flags describe.
    pub fn resolver(&self) -> Result<Resolver, ResolveError> {
        Resolver::new(self.hosts.as_deref(), &self.namespace)
    }
}

impl Resolver {
    /// A resolver for a pod in `namespace`, reading `hosts` if given.
    pub fn new(hosts: Option<&Path>, namespace: &str) -> Result<Self, ResolveError> {
        let hosts = hosts
            .map(|path| HostsFile::open(path, RELOAD_INTERVAL))
            .transpose()?;
        Ok(Self {
            hosts,
            search: search_path(namespace),
        })
    }

    /// The socket addresses for `host` (a name, an IP, or a bracketed IPv6
    /// literal) and `port`, best first.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Some(ip) = parse_ip(host) {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(hosts) = &self.hosts
            && let Some(ips) = hosts.lookup(host, &self.search)
        {
            debug!(host, ?ips, "resolved from hosts file");
            return Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect());
        }
        let lookup_error = |source| ResolveError::Lookup {
            host: host.to_owned(),
            source,
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(lookup_error)?
            .collect();
        if addrs.is_empty() {
            return Err(lookup_error(io::Error::new(
                io::ErrorKind::NotFound,
                "no addresses",
            )));
        }
        Ok(addrs)
    }
}

/// The Kubernetes DNS search path of a pod in `namespace`.
pub fn search_path(namespace: &str) -> Vec<String> {
    let mut search = Vec::with_capacity(3);
    if !namespace.is_empty() {
        search.push(format!("{namespace}.svc.cluster.local"));
    }
    search.extend(["svc.cluster.local".to_owned(), "cluster.local".to_owned()]);
    search
}

/// The names to try for `name`, in order: itself, then with each search
/// suffix. A trailing dot marks a fully qualified name, tried only as is.
pub fn candidates(name: &str, search: &[String]) -> Vec<String> {
    let name = name.to_ascii_lowercase();
    if let Some(absolute) = name.strip_suffix('.') {
        return vec![absolute.to_owned()];
    }
    let suffixed = search.iter().map(|suffix| format!("{name}.{suffix}"));
    std::iter::once(name.clone()).chain(suffixed).collect()
}

/// `host` as an IP address, accepting `[v6]` as URLs write it.
fn parse_ip(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// A parsed hosts file: lowercase name to addresses, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostsTable {
    names: HashMap<String, Vec<IpAddr>>,
}

impl HostsTable {
    /// Parses `/etc/hosts` syntax: `IP name [name...]`, `#` starts a comment.
    /// Lines whose first field is not an IP address are skipped.
    pub fn parse(text: &str) -> Self {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split_once('#').map_or(line, |(content, _)| content);
            let mut fields = line.split_whitespace();
            let Some(first) = fields.next() else { continue };
            let Ok(ip) = first.parse::<IpAddr>() else {
                debug!(
                    line = number + 1,
                    field = first,
                    "hosts: not an IP address, line skipped"
                );
                continue;
            };
            for name in fields {
                let ips = names.entry(name.to_ascii_lowercase()).or_default();
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        Self { names }
    }

    /// The addresses of exactly `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&[IpAddr]> {
        self.names
            .get(&name.to_ascii_lowercase())
            .map(Vec::as_slice)
    }

    /// The addresses of the first of `name`'s [`candidates`] that is listed.
    pub fn lookup(&self, name: &str, search: &[String]) -> Option<Vec<IpAddr>> {
        candidates(name, search)
            .iter()
            .find_map(|candidate| self.get(candidate))
            .map(<[IpAddr]>::to_vec)
    }
}

/// A hosts file that re-reads itself when it changes on disk.
#[derive(Debug)]
pub struct HostsFile {
    path: PathBuf,
    interval: Duration,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    table: HostsTable,
    stamp: Stamp,
    checked: Instant,
}

/// What identifies a version of the file: modification time and length
/// (the length catches two writes within one timestamp tick).
type Stamp = (SystemTime, u64);

impl HostsFile {
    /// Reads `path` now; afterwards checks for changes at most once per `interval`.
    pub fn open(path: &Path, interval: Duration) -> Result<Self, ResolveError> {
        let error = |source| ResolveError::HostsFile {
            path: path.to_owned(),
            source,
        };
        let stamp = stamp(path).map_err(error)?;
        let table = HostsTable::parse(&fs::read_to_string(path).map_err(error)?);
        Ok(Self {
            path: path.to_owned(),
            interval,
            state: Mutex::new(Loaded {
                table,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// Looks `name` up with the `search` suffixes, reloading the file first
    /// if it changed. The file is small, so it is read synchronously.
    pub fn lookup(&self, name: &str, search: &[String]) -> Option<Vec<IpAddr>> {
        // A poisoned lock only means another lookup panicked; the table is intact.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if state.checked.elapsed() >= self.interval {
            state.checked = Instant::now();
            self.reload_if_changed(&mut state);
        }
        state.table.lookup(name, search)
    }

    fn reload_if_changed(&self, state: &mut Loaded) {
        let path = self.path.display();
        match read_if_changed(&self.path, state.stamp) {
            Ok(None) => {}
            Ok(Some((table, stamp))) => {
                state.table = table;
                state.stamp = stamp;
                let names = state.table.names.len();
                info!(%path, names, "hosts file reloaded");
            }
            Err(err) => {
                warn!(%path, error = %err, "hosts file unreadable; keeping the last one");
            }
        }
    }
}

/// The table in `path` if its stamp differs from `last`.
fn read_if_changed(path: &Path, last: Stamp) -> io::Result<Option<(HostsTable, Stamp)>> {
    let current = stamp(path)?;
    if last == current {
        return Ok(None);
    }
    let table = HostsTable::parse(&fs::read_to_string(path)?);
    Ok(Some((table, current)))
}

fn stamp(path: &Path) -> io::Result<Stamp> {
    let meta = fs::metadata(path)?;
    Ok((meta.modified()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const HOSTS: &str = "\
# The lab's Services
127.0.0.1   localhost
10.96.0.5   details.default.svc.cluster.local details.default  # bookinfo
10.96.0.6   reviews.default.svc.cluster.local
10.96.0.7   ratings.other.svc.cluster.local
10.96.0.8   Mixed.Case.example
10.96.0.9   multi.cluster.local
10.96.0.10  multi.cluster.local
not-an-ip   ignored.example
fd00::1     v6.default.svc.cluster.local

";

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn search() -> Vec<String> {
        search_path("default")
    }

    #[test]
    fn parses_names_comments_and_skips_bad_lines() {
        let table = HostsTable::parse(HOSTS);
        assert_eq!(table.get("localhost"), Some(&[v4(127, 0, 0, 1)][..]));
        assert_eq!(table.get("details.default"), Some(&[v4(10, 96, 0, 5)][..]));
        assert_eq!(table.get("bookinfo"), None, "comments are not names");
        assert_eq!(table.get("ignored.example"), None);
        assert_eq!(table.get("not-an-ip"), None);
        assert_eq!(
            table.get("mixed.case.EXAMPLE"),
            Some(&[v4(10, 96, 0, 8)][..])
        );
        assert_eq!(
            table.get("multi.cluster.local"),
            Some(&[v4(10, 96, 0, 9), v4(10, 96, 0, 10)][..]),
            "repeated names keep file order"
        );
        assert_eq!(
            table.get("v6.default.svc.cluster.local"),
            Some(&[IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1))][..])
        );
        assert_eq!(HostsTable::parse(""), HostsTable::default());
    }

    #[test]
    fn search_path_follows_kubernetes() {
        assert_eq!(
            candidates("details", &search()),
            [
                "details",
                "details.default.svc.cluster.local",
                "details.svc.cluster.local",
                "details.cluster.local"
            ]
        );
        assert_eq!(candidates("Details.", &search()), ["details"]);
        assert_eq!(search_path(""), ["svc.cluster.local", "cluster.local"]);
    }

    #[test]
    fn short_names_resolve_through_search_suffixes() {
        let table = HostsTable::parse(HOSTS);
        let search = search();
        assert_eq!(
            table.lookup("details", &search),
            Some(vec![v4(10, 96, 0, 5)])
        );
        assert_eq!(
            table.lookup("reviews", &search),
            Some(vec![v4(10, 96, 0, 6)])
        );
        // Exact names win; a namespace-qualified name uses `svc.cluster.local`.
        assert_eq!(
            table.lookup("details.default", &search),
            Some(vec![v4(10, 96, 0, 5)])
        );
        assert_eq!(
            table.lookup("ratings.other", &search),
            Some(vec![v4(10, 96, 0, 7)])
        );
        // Another namespace's short name is not visible from `default`.
        assert_eq!(table.lookup("ratings", &search), None);
        assert_eq!(
            table.lookup("ratings", &search_path("other")),
            Some(vec![v4(10, 96, 0, 7)])
        );
        // `multi` via `cluster.local`; an absolute name skips the search path.
        assert_eq!(table.lookup("multi", &search).map(|ips| ips.len()), Some(2));
        assert_eq!(table.lookup("details.", &search), None);
    }

    #[tokio::test]
    async fn ip_literals_pass_through() {
        let resolver = Resolver::new(None, "default").expect("resolver");
        assert_eq!(
            resolver.resolve("10.1.2.3", 80).await.expect("v4"),
            ["10.1.2.3:80".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(
            resolver.resolve("[fd00::2]", 9080).await.expect("v6"),
            ["[fd00::2]:9080".parse::<SocketAddr>().expect("addr")]
        );
    }

    #[tokio::test]
    async fn resolver_uses_hosts_file_and_reloads_it() {
        let dir = std::env::temp_dir().join(format!("lab-app-resolve-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("hosts");
        fs::write(&path, HOSTS).expect("write hosts");

        let resolver = Resolver::new(Some(&path), "default").expect("resolver");
        let details = resolver.resolve("details", 9080).await.expect("details");
        assert_eq!(details, [SocketAddr::new(v4(10, 96, 0, 5), 9080)]);

        // With no interval, the next lookup sees the change.
        let hosts = HostsFile::open(&path, Duration::ZERO).expect("open");
        assert_eq!(
            hosts.lookup("details", &search()),
            Some(vec![v4(10, 96, 0, 5)])
        );
        fs::write(&path, "10.96.9.9 details.default.svc.cluster.local\n").expect("rewrite");
        let later = SystemTime::now() + Duration::from_secs(5);
        fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(later))
            .expect("touch");
        assert_eq!(
            hosts.lookup("details", &search()),
            Some(vec![v4(10, 96, 9, 9)])
        );
        assert_eq!(hosts.lookup("reviews", &search()), None);

        // A vanished file keeps the last table.
        fs::remove_file(&path).expect("remove");
        assert_eq!(
            hosts.lookup("details", &search()),
            Some(vec![v4(10, 96, 9, 9)])
        );
        let _ = fs::remove_dir_all(&dir);

        assert!(matches!(
            Resolver::new(Some(&path), "default"),
            Err(ResolveError::HostsFile { .. })
        ));
    }
}
