//! Sockets inside a pod's network namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread later
//! uses it. So ztunnel creates its in-pod listeners and its upstream sockets
//! on a blocking thread that enters the pod's namespace for the `socket()`
//! call only and returns to ztunnel's own namespace straight after.

use std::{fs::File, io, net::SocketAddr, os::fd::AsFd, path::Path, sync::Arc};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

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
