//! The capture programs on a real kernel, in the lab: the test holds the
//! in-pod listeners that ztunnel will hold, and checks what the kernel steers
//! to them. (ztunnel itself is tested end to end elsewhere once it proxies.)

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use mesh_ebpf_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, ListenerKind, OUTBOUND_PORT};
use mesh_ebpf_loader::capture::{Capture, PodTarget, netns_cookie};
use mesh_lab::{LabState, PodPlan};
use mesh_tests::Lab;
use nix::sched::CloneFlags;

/// Binds `addr` inside the network namespace of `pod`, as ztunnel does.
fn listen_in_pod(pod: &PodPlan, addr: SocketAddrV4) -> TcpListener {
    let netns = std::fs::File::open(format!("/var/run/netns/{}", pod.netns)).expect("open netns");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
                TcpListener::bind(addr).expect("bind in pod")
            })
            .join()
            .expect("listener thread")
    })
}

fn tcp_client(state: &LabState, from: &PodPlan, addr: &str, send: &str) -> Child {
    state
        .app_client(from, &["tcp", addr, "--send", send, "--timeout-ms", "3000"])
        .expect("client command")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client")
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().expect("client output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Accepts one connection within a few seconds (a connection that was not
/// steered here fails the test instead of hanging it), reads what the client
/// sent, answers `reply`.
fn serve_once(listener: &TcpListener, reply: &str) -> (TcpStream, SocketAddr, String) {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(err) if err.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("no connection reached {:?}: {err}", listener.local_addr()),
        }
    };
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut got = String::new();
    stream
        .read_to_string(&mut got)
        .expect("read until the client's half-close");
    stream.write_all(reply.as_bytes()).expect("reply");
    (stream, peer, got)
}

#[test]
fn capture_steers_enrolled_pods_only_and_fails_closed() {
    let mut lab = Lab::bookinfo("tcap");
    // The test stands in for the node's ztunnel; the real one would release
    // the pod it does not know as enrolled from the shared pinned maps.
    let node = lab.state.pod("productpage").expect("productpage").node;
    lab.state
        .stop_ztunnel(node)
        .expect("stop the node's ztunnel");
    let state = &lab.state;
    let productpage = state.pod("productpage").expect("productpage");
    let details = state.pod("details").expect("details");
    let ratings = state.pod("ratings").expect("ratings");
    let pin_dir = state.node_pin_dir(node);
    let target = PodTarget {
        ip: productpage.ip,
        cgroup: state.pod_cgroup(productpage),
        netns: PathBuf::from("/var/run/netns").join(&productpage.netns),
    };

    let mut capture =
        Capture::install(&state.node_cgroup(node), &pin_dir, false).expect("install capture");
    capture.enroll(&target).expect("enroll productpage");
    let outbound = listen_in_pod(
        productpage,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT),
    );
    let inbound = listen_in_pod(
        productpage,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT),
    );
    let hbone = listen_in_pod(
        productpage,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, HBONE_PORT),
    );
    capture
        .register_listener(productpage.ip, ListenerKind::InboundPlaintext, &inbound)
        .expect("register 15006");
    capture
        .register_listener(productpage.ip, ListenerKind::Hbone, &hbone)
        .expect("register 15008");

    // Outbound from the enrolled pod, to a pod IP and to a Service VIP: both
    // land on 15001 and the original destination (the VIP, not a backend) is
    // recoverable from what ztunnel sees of its peer.
    let details_vip = state
        .plan
        .services
        .iter()
        .find(|s| s.name == "details")
        .expect("details svc")
        .vip;
    for target_addr in [format!("{}:7", ratings.ip), format!("{details_vip}:9080")] {
        let client = tcp_client(state, productpage, &target_addr, "to-mesh");
        let (stream, peer, got) = serve_once(&outbound, "via-ztunnel");
        assert_eq!(got, "to-mesh");
        let original = capture
            .take_original_destination(netns_cookie(&stream).expect("SO_NETNS_COOKIE"), peer.port())
            .expect("read orig dst");
        assert_eq!(original.map(|a| a.to_string()), Some(target_addr.clone()));
        drop(stream);
        let (ok, stdout, stderr) = finish(client);
        assert!(ok, "{stderr}");
        assert_eq!(
            stdout, "via-ztunnel",
            "the client talked to ztunnel's socket"
        );
    }

    // Inbound to the enrolled pod from a pod that is not enrolled: any port
    // goes to 15006, with the original destination as the local address;
    // HBONE's port goes to 15008.
    let client = tcp_client(state, details, &format!("{}:7", productpage.ip), "inbound");
    let (stream, _, got) = serve_once(&inbound, "inbound-captured");
    assert_eq!(got, "inbound");
    assert_eq!(
        stream.local_addr().expect("local").to_string(),
        format!("{}:7", productpage.ip)
    );
    drop(stream);
    assert_eq!(finish(client).1, "inbound-captured");
    let client = tcp_client(
        state,
        details,
        &format!("{}:{HBONE_PORT}", productpage.ip),
        "hbone",
    );
    let (stream, _, _) = serve_once(&hbone, "hbone-captured");
    drop(stream);
    assert_eq!(finish(client).1, "hbone-captured");

    // Pods that are not enrolled are never touched: details <-> ratings echo.
    let (ok, stdout, stderr) = finish(tcp_client(
        state,
        details,
        &format!("{}:7", ratings.ip),
        "plain",
    ));
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "plain");

    // With ztunnel's listeners gone, the enrolled pod fails closed both ways.
    drop((outbound, inbound, hbone));
    let (ok, _, stderr) = finish(tcp_client(
        state,
        productpage,
        &format!("{}:7", ratings.ip),
        "x",
    ));
    assert!(
        !ok && stderr.contains("refused"),
        "outbound must be refused: {stderr}"
    );
    let (ok, _, stderr) = finish(tcp_client(
        state,
        details,
        &format!("{}:7", productpage.ip),
        "x",
    ));
    assert!(
        !ok && stderr.contains("refused"),
        "inbound must be refused: {stderr}"
    );

    // A restarted agent adopts pins: installing again neither fails nor
    // double-attaches, and the pod is still enrolled (still fails closed).
    drop(capture);
    let mut capture = Capture::install(&state.node_cgroup(node), &pin_dir, false)
        .expect("re-install adopts pins");
    let (ok, _, _) = finish(tcp_client(
        state,
        productpage,
        &format!("{}:7", ratings.ip),
        "x",
    ));
    assert!(!ok, "still captured after the agent restarted");

    // Released, the pod talks directly again, both ways.
    capture.release(&target).expect("release");
    let (ok, stdout, stderr) = finish(tcp_client(
        state,
        productpage,
        &format!("{}:7", ratings.ip),
        "direct",
    ));
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "direct");
    let (ok, stdout, stderr) = finish(tcp_client(
        state,
        details,
        &format!("{}:7", productpage.ip),
        "direct-in",
    ));
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "direct-in");

    let stats = capture.stats().expect("stats");
    // Two proxied, one refused while the listeners were gone, one after the restart.
    assert_eq!(stats.outbound_captured, 4, "{stats:?}");
    assert_eq!(stats.inbound_captured, 2, "{stats:?}");
    assert!(stats.inbound_refused >= 1, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
}
