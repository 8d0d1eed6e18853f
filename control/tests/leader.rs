//! Leader election of control plane replicas against an in-process fake
//! API server: of two electors exactly one leads, and the singleton task
//! runs only there; when the leader stops without a word the other takes
//! over once the lease has expired, and when it releases the lease (as on
//! SIGTERM) the other takes over at once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_control::leader::{Election, ElectionOptions, while_leading};
use mesh_fake_apiserver::{FakeApiServer, Kind};
use tokio::time::Instant;

const NAMESPACE: &str = "istio-system";
const LEASE: Duration = Duration::from_secs(2);

fn options(identity: &str) -> ElectionOptions {
    ElectionOptions {
        lease_duration: LEASE,
        renew_deadline: Duration::from_millis(1000),
        retry_period: Duration::from_millis(100),
        ..ElectionOptions::new(NAMESPACE, identity)
    }
}

/// Counts, per replica, how many copies of the singleton task run now.
fn singleton(election: &Election, running: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(while_leading(election.leadership(), "test", move || {
        let running = running.clone();
        async move {
            struct Running(Arc<AtomicUsize>);
            impl Drop for Running {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            running.fetch_add(1, Ordering::SeqCst);
            let _guard = Running(running);
            std::future::pending::<()>().await;
        }
    }))
}

async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn holder(server: &FakeApiServer) -> Option<String> {
    let lease = server.get("coordination.k8s.io/v1", "Lease", NAMESPACE, "mesh-control")?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

struct Replica {
    election: Election,
    running: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Replica {
    fn start(server: &FakeApiServer, identity: &str) -> Self {
        let election = Election::spawn(server.client(), options(identity)).expect("valid options");
        let running = Arc::new(AtomicUsize::new(0));
        let task = singleton(&election, running.clone());
        Self {
            election,
            running,
            _task: task,
        }
    }

    fn leads(&self) -> bool {
        *self.election.leadership().borrow()
    }

    fn runs(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

/// Watches both replicas for `time`: never both leading, never the task
/// running outside the leader.
async fn exactly_one_leads(a: &Replica, b: &Replica, time: Duration) {
    let start = Instant::now();
    while start.elapsed() < time {
        assert!(!(a.leads() && b.leads()), "both replicas lead");
        assert!(a.runs() + b.runs() <= 1, "the singleton task runs twice");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(a.leads() ^ b.leads(), "one replica leads");
}

#[tokio::test]
async fn one_of_two_leads_and_the_other_takes_over_when_it_stops() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::lease());
    let a = Replica::start(&server, "mesh-control-a");
    until("a leader", Duration::from_secs(5), || a.leads()).await;
    let b = Replica::start(&server, "mesh-control-b");
    exactly_one_leads(&a, &b, Duration::from_secs(2)).await;
    assert!(a.leads(), "the first replica keeps the lease it renews");
    until("the task on the leader", Duration::from_secs(1), || {
        a.runs() == 1
    })
    .await;
    assert_eq!(b.runs(), 0);
    assert_eq!(holder(&server).as_deref(), Some("mesh-control-a"));

    // The leader dies without releasing: b waits for the lease to expire.
    drop(a);
    let took = until("b to take over", Duration::from_secs(5), || b.leads()).await;
    assert!(
        took >= LEASE - Duration::from_millis(200),
        "took over after {took:?}, before the lease of {LEASE:?} expired"
    );
    until("the task on the new leader", Duration::from_secs(1), || {
        b.runs() == 1
    })
    .await;
    assert_eq!(holder(&server).as_deref(), Some("mesh-control-b"));
    let lease = server
        .get("coordination.k8s.io/v1", "Lease", NAMESPACE, "mesh-control")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 2);
}

#[tokio::test]
async fn a_released_lease_is_taken_over_at_once() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::lease());
    let a = Replica::start(&server, "mesh-control-a");
    until("a leader", Duration::from_secs(5), || a.leads()).await;
    let b = Replica::start(&server, "mesh-control-b");
    exactly_one_leads(&a, &b, Duration::from_millis(500)).await;

    let Replica {
        election, running, ..
    } = a;
    let released = Instant::now();
    election.release().await;
    assert_eq!(running.load(Ordering::SeqCst), 0, "the task stopped first");
    let took = until("b to take over", Duration::from_secs(5), || b.leads()).await;
    assert!(
        released.elapsed() < LEASE,
        "took over after {took:?}: the release was not seen"
    );
    assert_eq!(holder(&server).as_deref(), Some("mesh-control-b"));
}
