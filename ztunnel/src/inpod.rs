//! Sockets inside a pod's network namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread later
//! uses it. So ztunnel creates its in-pod listeners and its upstream sockets
//! on a blocking thread that enters the pod's namespace for the `socket()`
//! call only and returns to ztunnel's own namespace straight after.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    path::Path,
    sync::Arc,
};

use futures::TryStreamExt as _;

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Mark of ztunnel's transparent connections to a pod's app. With
/// `tcp_fwmark_accept`, the app's side of such a connection inherits it, so
/// its replies (addressed to the original client, which is not local) match
/// the pod's [`DELIVERY_TABLE`] rule and come back to ztunnel's socket.
pub const DELIVERY_MARK: u32 = 0x539;
/// Policy routing table, in each enrolled pod, that delivers everything
/// locally.
pub const DELIVERY_TABLE: u32 = 133;
/// Priority of the rule selecting [`DELIVERY_TABLE`] for marked packets.
const DELIVERY_RULE_PRIORITY: u32 = 32000;

/// A pod's network namespace, held open so it cannot vanish under us.
#[derive(Clone, Debug)]
pub struct PodNetns {
    netns: Arc<File>,
}

impl PodNetns {
    /// Opens the namespace at `path` (e.g. `/var/run/netns/<name>`).
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            netns: Arc::new(File::open(path)?),
        })
    }

    /// A listener bound to `addr` in the pod's namespace.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.socket().await?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    }

    /// Connects to `addr` from the pod's namespace (so from the pod's IP).
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.socket().await?;
        socket.set_tcp_nodelay(true)?;
        TcpSocket::from_std_stream(socket.into())
            .connect(addr)
            .await
    }

    /// Connects to the app at `destination` from inside the pod with the
    /// original client's address `source_ip` as source, so the app sees who
    /// really called. `announce` is told the exact source (with its port)
    /// before the SYN leaves, to let it through the pod's inbound capture.
    /// Needs [`prepare_delivery`](Self::prepare_delivery) once per pod.
    pub async fn connect_transparent(
        &self,
        source_ip: Ipv4Addr,
        destination: SocketAddrV4,
        announce: impl FnOnce(SocketAddrV4) -> io::Result<()>,
    ) -> io::Result<TcpStream> {
        let socket = self.socket().await?;
        socket.set_tcp_nodelay(true)?;
        socket.set_ip_transparent_v4(true)?;
        socket.set_mark(DELIVERY_MARK)?;
        socket.bind(&SocketAddr::from((source_ip, 0)).into())?;
        let bound = socket
            .local_addr()?
            .as_socket_ipv4()
            .ok_or_else(|| io::Error::other("bound address is not IPv4"))?;
        announce(bound)?;
        TcpSocket::from_std_stream(socket.into())
            .connect(destination.into())
            .await
    }

    /// Sets the pod's namespace up for transparent delivery: marked replies
    /// are routed locally (`ip rule fwmark DELIVERY_MARK lookup
    /// DELIVERY_TABLE`, `local 0.0.0.0/0 dev lo table DELIVERY_TABLE`),
    /// accepted sockets inherit their SYN's mark (`tcp_fwmark_accept`), and
    /// so do the kernel's own replies (`fwmark_reflect`): the RST refusing a
    /// SYN to a closed port comes back to ztunnel, instead of going to the
    /// original client's address and leaving the dial to time out.
    /// Idempotent.
    pub async fn prepare_delivery(&self) -> io::Result<()> {
        let netns = self.netns.clone();
        let (connection, handle) = tokio::task::spawn_blocking(move || {
            in_netns(&netns, || {
                std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
                std::fs::write("/proc/sys/net/ipv4/fwmark_reflect", "1")?;
                let (connection, handle, _) = rtnetlink::new_connection()?;
                Ok((connection, handle))
            })
        })
        .await
        .map_err(io::Error::other)??;
        let task = tokio::spawn(connection);
        let result = async {
            let lo = handle
                .link()
                .get()
                .match_name("lo")
                .execute()
                .try_next()
                .await
                .map_err(io::Error::other)?
                .ok_or_else(|| io::Error::other("the pod has no lo"))?
                .header
                .index;
            let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .table_id(DELIVERY_TABLE)
                .kind(rtnetlink::packet_route::route::RouteType::Local)
                .scope(rtnetlink::packet_route::route::RouteScope::Host)
                .output_interface(lo)
                .build();
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(io::Error::other)?;
            let rule = handle
                .rule()
                .add()
                .v4()
                .fw_mark(DELIVERY_MARK)
                .table_id(DELIVERY_TABLE)
                .priority(DELIVERY_RULE_PRIORITY)
                .action(rtnetlink::packet_route::rule::RuleAction::ToTable)
                .execute()
                .await;
            match rule {
                Ok(()) => Ok(()),
                // Already there (a restarted ztunnel re-preparing the pod).
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
                Err(e) => Err(io::Error::other(e)),
            }
        }
        .await;
        task.abort();
        result
    }

    async fn socket(&self) -> io::Result<Socket> {
        let netns = self.netns.clone();
        tokio::task::spawn_blocking(move || in_netns(&netns, new_socket))
            .await
            .map_err(io::Error::other)?
    }
}

fn new_socket() -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM.nonblocking().cloexec(), None)?;
    Ok(socket)
}

/// Runs `f` with the calling thread in `netns`, then moves it back.
fn in_netns<T>(netns: &File, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let own = File::open("/proc/thread-self/ns/net")?;
    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let result = f();
    if let Err(errno) = setns(own.as_fd(), CloneFlags::CLONE_NEWNET) {
        // A pool thread stuck in a pod's namespace would create later
        // sockets in the wrong place; nothing can be trusted after that.
        eprintln!("ztunnel: cannot return a thread to its network namespace: {errno}");
        std::process::abort();
    }
    result
}
