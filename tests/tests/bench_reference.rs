//! The bench's reference-ztunnel variant without the reference binary: the
//! NAT redirect it installs in the client pod's namespace sends the app's
//! TCP to 15001 with the original destination readable, spares the proxy's
//! own (marked) sockets and the CA, and leaves no rule behind.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use mesh_lab::{bench::reference::Redirect, netns};
use socket2::{Domain, Socket, Type};

const NETNS: &str = "trefzt-redirect";

/// Runs `f` on a thread inside network namespace `name`.
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = File::open(format!("{}/{name}", netns::NETNS_DIR)).expect("open netns");
    thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// Starts a non-blocking connect to `to` (optionally with `mark`); the
/// socket is returned so the attempt stays alive.
fn dial(to: SocketAddr, mark: Option<u32>) -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(mark) = mark {
        socket.set_mark(mark).unwrap();
    }
    socket.set_nonblocking(true).unwrap();
    let _ = socket.connect(&to.into());
    socket
}

/// The original destination of the next connection `listener` accepts
/// within 500 ms, if any.
fn accepted(listener: &TcpListener) -> Option<SocketAddr> {
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Ok((stream, _)) = listener.accept() {
            let socket = Socket::from(stream);
            return socket.original_dst_v4().ok()?.as_socket();
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Lines of `iptables-save` and `nft list ruleset` in the namespace that
/// hold a rule or chain.
fn rules() -> Vec<String> {
    let mut found = Vec::new();
    for (tool, args) in [
        ("iptables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let output = Command::new("ip")
            .args(["netns", "exec", NETNS, tool])
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("{tool}: {err}"));
        assert!(output.status.success(), "{tool} failed");
        found.extend(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| l.starts_with("-A ") || l.trim_start().starts_with("chain "))
                .map(str::to_owned),
        );
    }
    found
}

#[test]
fn the_reference_redirect_takes_only_the_apps_tcp_and_leaves_nothing() {
    let _ = netns::delete(NETNS);
    netns::create(NETNS).unwrap();
    let _cleanup = Cleanup;
    // A link whose far end never answers: only a redirected connect is
    // ever accepted.
    netns::ip_in(
        NETNS,
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
    )
    .unwrap();
    netns::ip_in(NETNS, &["addr", "add", "10.99.0.1/24", "dev", "v0"]).unwrap();
    netns::ip_in(NETNS, &["link", "set", "v0", "up"]).unwrap();
    netns::ip_in(NETNS, &["link", "set", "v1", "up"]).unwrap();
    let ca: SocketAddr = "10.99.0.3:15012".parse().unwrap();
    let app_target: SocketAddr = "10.99.0.2:7".parse().unwrap();

    let redirect = Redirect::apply(NETNS, ca).unwrap();
    assert!(!rules().is_empty(), "no redirect installed");
    let (app, marked, to_ca) = in_netns(NETNS, move || {
        let listener = TcpListener::bind("0.0.0.0:15001").unwrap();
        listener.set_nonblocking(true).unwrap();
        let _app = dial(app_target, None);
        let app = accepted(&listener);
        let _marked = dial(app_target, Some(1337));
        let marked = accepted(&listener);
        let _ca = dial(ca, None);
        let to_ca = accepted(&listener);
        (app, marked, to_ca)
    });
    assert_eq!(
        app,
        Some(app_target),
        "the app's connect is redirected, original destination kept"
    );
    assert_eq!(marked, None, "the proxy's marked socket is not redirected");
    assert_eq!(to_ca, None, "the CA's address is not redirected");

    redirect.remove().unwrap();
    assert_eq!(rules(), Vec::<String>::new(), "rules left after removal");
    let after = in_netns(NETNS, move || {
        let listener = TcpListener::bind("0.0.0.0:15001").unwrap();
        listener.set_nonblocking(true).unwrap();
        let _app = dial(app_target, None);
        accepted(&listener)
    });
    assert_eq!(after, None, "still redirected after removal");

    // Dropping an applied redirect removes it too.
    drop(Redirect::apply(NETNS, ca).unwrap());
    assert_eq!(rules(), Vec::<String>::new(), "rules left after drop");
}

/// Deletes the test's namespace, also when an assertion fails.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = netns::delete(NETNS);
    }
}
