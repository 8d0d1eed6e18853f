//! Leader election among control plane replicas, on a
//! `coordination.k8s.io/v1` Lease in the control plane's namespace, as
//! client-go's `leaderelection` does it: every replica serves xDS and the
//! CA, but only the holder of the Lease runs the singleton writers (the
//! waypoint deployer with its Gateway status, the root-cert ConfigMap
//! publisher), so several replicas never fight over the same objects.
//!
//! - Every [`ElectionOptions::retry_period`] a replica reads the Lease. The
//!   holder renews it (`renewTime`); another replica takes it over only when
//!   it has seen the same record (holder, `renewTime`) unchanged for the
//!   record's `leaseDurationSeconds` by its own monotonic clock (so clock
//!   skew between nodes does not matter), or when the holder is empty (a
//!   released Lease). Every write is a `replace` carrying the
//!   `resourceVersion` read, so of two replicas racing for an expired Lease
//!   exactly one wins (the other gets 409 Conflict).
//! - A leader that cannot renew for [`ElectionOptions::renew_deadline`]
//!   (shorter than the lease duration) stops leading before anyone else may
//!   start.
//! - [`Election::release`] (on SIGTERM) stops the singleton writers and
//!   empties the holder, so another replica takes over at its next retry
//!   instead of waiting for the lease to expire.
//! - [`while_leading`] runs a task only while this replica leads.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

/// What leader election needs from RBAC, in the control plane's own
/// namespace (a Role, not a ClusterRole): (apiGroup, resource, verbs).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];
/// Default name of the Lease.
pub const DEFAULT_LEASE_NAME: &str = "mesh-control";

/// Where the Lease is and how it is timed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionOptions {
    /// Namespace of the Lease (the control plane's).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity in `holderIdentity` (its pod name).
    pub identity: String,
    /// How long a record unchanged means its holder is gone
    /// (`leaseDurationSeconds`, whole seconds on the wire).
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the Lease is read and renewed or tried.
    pub retry_period: Duration,
}

impl ElectionOptions {
    /// client-go's defaults (15 s lease, 10 s renew deadline, 2 s retry)
    /// for `identity` and the Lease `namespace`/[`DEFAULT_LEASE_NAME`].
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            lease_name: DEFAULT_LEASE_NAME.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Checks `retry_period < renew_deadline < lease_duration`, a lease of
    /// at least one second and a non-empty identity.
    pub fn validate(&self) -> Result<(), ElectionError> {
        let invalid = |why: String| Err(ElectionError::Options(why));
        if self.identity.is_empty() {
            return invalid("the identity is empty".into());
        }
        if self.lease_duration < Duration::from_secs(1) {
            return invalid(format!(
                "the lease duration {:?} is under one second",
                self.lease_duration
            ));
        }
        if self.renew_deadline >= self.lease_duration {
            return invalid(format!(
                "the renew deadline {:?} must be shorter than the lease duration {:?}",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return invalid(format!(
                "the retry period {:?} must be positive and shorter than the renew deadline {:?}",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// Why a step of leader election failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The options do not make a safe election.
    #[error("leader election options: {0}")]
    Options(String),
    /// The API server refused a read or write of the Lease.
    #[error("{action} Lease {namespace}/{name}: {source}")]
    Api {
        /// `reading`, `creating`, `renewing`, `taking over` or `releasing`.
        action: &'static str,
        /// Namespace of the Lease.
        namespace: String,
        /// Name of the Lease.
        name: String,
        /// What the API server said.
        #[source]
        source: Box<kube::Error>,
    },
}

/// A running election; dropping it stops it without releasing the Lease.
pub struct Election {
    leading: watch::Receiver<bool>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Election {
    /// Starts electing with `options` (checked first).
    pub fn spawn(client: Client, options: ElectionOptions) -> Result<Self, ElectionError> {
        options.validate()?;
        let (leading_tx, leading) = watch::channel(false);
        let (shutdown, shutdown_rx) = oneshot::channel();
        let elector = Elector {
            api: Api::namespaced(client, &options.namespace),
            options,
            observed: None,
            leading: leading_tx,
            last_renewal: None,
        };
        let task = tokio::spawn(elector.run(shutdown_rx));
        Ok(Self {
            leading,
            shutdown: Some(shutdown),
            task,
        })
    }

    /// Whether this replica leads now, and its changes.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops electing: tasks under [`while_leading`] are stopped first, then
    /// the Lease is released if this replica holds it.
    pub async fn release(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Lease record last seen, and when (by this replica's clock) it was
/// first seen as it is.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    lease_duration: Duration,
    since: Instant,
}

struct Elector {
    api: Api<Lease>,
    options: ElectionOptions,
    observed: Option<Observed>,
    leading: watch::Sender<bool>,
    last_renewal: Option<Instant>,
}

impl Elector {
    async fn run(mut self, mut shutdown: oneshot::Receiver<()>) {
        let lease = format!("{}/{}", self.options.namespace, self.options.lease_name);
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    self.last_renewal = Some(Instant::now());
                    self.set_leading(true, &lease);
                }
                Ok(false) => self.set_leading(false, &lease),
                Err(error) => {
                    tracing::warn!(error = %error, "leader election");
                    let overdue = self
                        .last_renewal
                        .is_none_or(|at| at.elapsed() >= self.options.renew_deadline);
                    if overdue {
                        self.set_leading(false, &lease);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.options.retry_period) => {}
                _ = &mut shutdown => break,
            }
        }
        let was_leading = *self.leading.borrow();
        // Singleton writers stop before another replica may start.
        self.set_leading(false, &lease);
        if was_leading {
            match self.release().await {
                Ok(()) => {
                    tracing::info!(%lease, identity = %self.options.identity, "leadership released")
                }
                Err(error) => tracing::warn!(error = %error, "releasing leadership"),
            }
        }
    }

    fn set_leading(&self, leading: bool, lease: &str) {
        let changed = self.leading.send_if_modified(|now| {
            let changed = *now != leading;
            *now = leading;
            changed
        });
        if changed {
            let identity = &self.options.identity;
            if leading {
                tracing::info!(%lease, %identity, "leading: running the singleton writers");
            } else {
                tracing::info!(%lease, %identity, "not leading");
            }
        }
    }

    fn api_error(&self, action: &'static str) -> impl Fn(kube::Error) -> ElectionError + '_ {
        move |source| ElectionError::Api {
            action,
            namespace: self.options.namespace.clone(),
            name: self.options.lease_name.clone(),
            source: Box::new(source),
        }
    }

    /// One round: whether this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, ElectionError> {
        let name = self.options.lease_name.clone();
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self
            .api
            .get_opt(&name)
            .await
            .map_err(self.api_error("reading"))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(self.options.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.options.identity.clone()),
                    lease_duration_seconds: Some(self.options.lease_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(self.api_error("creating")(error)),
            };
        };
        self.observe(&lease);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.options.identity.as_str());
        let action = if mine {
            "renewing"
        } else {
            if holder.is_some() && !self.observed_expired() {
                return Ok(false);
            }
            spec.holder_identity = Some(self.options.identity.clone());
            spec.acquire_time = Some(now.clone());
            if holder.is_some() {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            "taking over"
        };
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.options.lease_seconds());
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                if !mine {
                    tracing::info!(
                        lease = %format!("{}/{name}", self.options.namespace),
                        previous = holder.as_deref().unwrap_or("none"),
                        "took over the lease"
                    );
                }
                Ok(true)
            }
            // Another replica wrote first: read again next round.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(self.api_error(action)(error)),
        }
    }

    /// Records `lease` as seen now unless it is the record seen before.
    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.filter(|h| !h.is_empty());
        let lease_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.options.lease_duration, Duration::from_secs);
        let same = self
            .observed
            .as_ref()
            .is_some_and(|o| o.holder == holder && o.renew_time == spec.renew_time);
        if !same {
            self.observed = Some(Observed {
                holder,
                renew_time: spec.renew_time,
                lease_duration,
                since: Instant::now(),
            });
        }
    }

    fn observed_expired(&self) -> bool {
        self.observed
            .as_ref()
            .is_none_or(|o| o.since.elapsed() >= o.lease_duration)
    }

    /// Empties the holder (if it is still this replica) so another replica
    /// takes over at once.
    async fn release(&mut self) -> Result<(), ElectionError> {
        let name = self.options.lease_name.clone();
        let Some(mut lease) = self
            .api
            .get_opt(&name)
            .await
            .map_err(self.api_error("reading"))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.options.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&name, &PostParams::default(), &lease)
            .await
            .map_err(self.api_error("releasing"))?;
        Ok(())
    }
}

/// Runs `task()` each time `leading` turns true, and stops it (drops it)
/// when `leading` turns false; a task that ends by itself is not run again
/// until the next time leadership is gained. Returns when the election is
/// gone.
pub async fn while_leading<F, Fut>(mut leading: watch::Receiver<bool>, what: &str, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        tracing::debug!(task = what, "leading: starting");
        let running = tokio::spawn(task());
        let stop = running.abort_handle();
        let ended_by_itself = tokio::select! {
            changed = leading.wait_for(|l| !*l) => {
                let gone = changed.is_err();
                stop.abort();
                if gone {
                    return;
                }
                false
            }
            _ = running => true,
        };
        if ended_by_itself && leading.wait_for(|l| !*l).await.is_err() {
            return;
        }
        tracing::debug!(task = what, "not leading: stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_must_give_the_leader_time_to_step_down() {
        let good = ElectionOptions::new("istio-system", "mesh-control-0");
        assert!(good.validate().is_ok());
        let mut bad = good.clone();
        bad.renew_deadline = bad.lease_duration;
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.contains("renew deadline"), "{error}");
        let mut bad = good.clone();
        bad.retry_period = Duration::from_secs(10);
        assert!(bad.validate().is_err());
        let mut bad = good;
        bad.identity.clear();
        assert!(bad.validate().is_err());
    }
}
