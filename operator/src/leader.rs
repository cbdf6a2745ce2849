//! Lease-based leader election (`coordination.k8s.io/v1` Lease), so that of several operator
//! replicas exactly one reconciles.
//!
//! A candidate takes the Lease when it is free or its holder stopped renewing it for
//! `duration`; the holder renews it every `duration / 3`. Every write carries the Lease's
//! resourceVersion, so two candidates can never both win. A leader that cannot renew within
//! `duration` steps down (its `lost` token fires) before anyone else may take over; a leader
//! that stops releases the Lease, after its work has stopped, so a standby takes over at once.
//! Expiry compares the holder's renewTime with this candidate's clock, so replicas are assumed to
//! have clocks within a fraction of `duration` of each other (NTP). (client-go instead times
//! expiry from when it last saw the record change, which needs no such assumption.)

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This candidate's name (the pod name in a cluster).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    fn renew_every(&self) -> Duration {
        self.duration / 3
    }
}

/// Pure: whether `me` may take or keep the Lease as it is at `now`.
pub fn may_hold(spec: &LeaseSpec, me: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15) as i64);
    match &spec.renew_time {
        Some(MicroTime(renewed)) => renewed.checked_add(duration).map(|expiry| expiry < now).unwrap_or(true),
        None => true,
    }
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Elector { api: Api::namespaced(client, &config.namespace), config }
    }

    /// One attempt to take or renew the Lease. `Ok(true)`: this candidate holds it now.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let me = &self.config.identity;
        let secs = self.config.duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if !may_hold(spec, me, now) {
            return Ok(false);
        }
        if spec.holder_identity.as_deref() != Some(me.as_str()) {
            spec.holder_identity = Some(me.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        // `replace` carries the resourceVersion we read: a concurrent writer makes this a 409.
        conflict_is_false(self.api.replace(&self.config.name, &PostParams::default(), &lease).await)
    }

    /// Waits until this candidate holds the Lease (or `shutdown`). Returns false on shutdown.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        let retry = self.config.renew_every().min(Duration::from_secs(2));
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    info!(identity = %self.config.identity, lease = %self.config.name, "became the leader");
                    return true;
                }
                Ok(false) => debug!("another replica leads; standing by"),
                Err(e) => warn!(error = %e, "cannot read or write the leader Lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Renews the Lease until `shutdown` or until leadership is lost (then fires `lost`). On
    /// shutdown the caller stops its work first and then calls [`Elector::release`], so no
    /// standby starts while this replica may still act.
    pub async fn keep(&self, shutdown: &CancellationToken, lost: &CancellationToken) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.renew_every()) => {}
            }
            // Bounded: a hung API call must not outlive the Lease (the check below steps down).
            match tokio::time::timeout(self.config.renew_every(), self.try_hold()).await {
                Ok(Ok(true)) => last_renewal = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    warn!("another replica took the leader Lease; stepping down");
                    lost.cancel();
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, "cannot renew the leader Lease"),
                Err(_) => warn!("renewing the leader Lease timed out"),
            }
            // Step down before the Lease could expire in anyone else's eyes.
            if last_renewal.elapsed() >= self.config.duration.saturating_sub(self.config.renew_every()) {
                warn!("could not renew the leader Lease in time; stepping down");
                lost.cancel();
                return;
            }
        }
    }

    /// Gives the Lease up (if this candidate still holds it) so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => info!("released the leader Lease"),
            Err(e) => warn!(error = %e, "could not release the leader Lease; it will expire"),
        }
    }
}

fn conflict_is_false<T>(r: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: Option<i64>, duration: i32) -> LeaseSpec {
        let now = Timestamp::from_second(1_000).unwrap();
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: renewed_secs_ago.map(|s| MicroTime(now.checked_sub(SignedDuration::from_secs(s)).unwrap())),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn who_may_hold_the_lease() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(may_hold(&spec(None, None, 15), "a", now), "free");
        assert!(may_hold(&spec(Some(""), Some(1), 15), "a", now), "released");
        assert!(may_hold(&spec(Some("a"), Some(1), 15), "a", now), "mine");
        assert!(!may_hold(&spec(Some("b"), Some(5), 15), "a", now), "b renewed recently");
        assert!(may_hold(&spec(Some("b"), Some(16), 15), "a", now), "b stopped renewing");
    }
}
