//! Election on a Kubernetes Lease (`coordination.k8s.io/v1`), fenced in
//! Postgres.
//!
//! The Lease decides who leads, the way client-go's leader election does:
//! the holder renews `renewTime`; a candidate takes the Lease once it has
//! seen the same record unchanged for longer than `leaseDurationSeconds` on
//! its own monotonic clock (so clock skew between replicas does not
//! matter), and every write carries the `resourceVersion` it read, so two
//! candidates cannot both win. `kubectl get lease` shows the holder.
//!
//! The fence stays where the writes are. Holding the Lease is not enough to
//! act: the holder then takes the Postgres lease row of the same name
//! ([`PgElector`]), which raises the epoch that every leader write checks
//! with `statefabric_check_epoch`. A former leader that was paused past its
//! lease wakes up with an epoch Postgres no longer accepts — exactly as
//! with the Postgres backend.
//!
//! Hand-written rather than `kube-lease-manager`: the election must hand
//! its term to the Postgres fence in the same step, which that crate's
//! own renewal loop leaves no place for; the Lease logic is 100 lines.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

use crate::pg::PgElector;
use crate::{Elector, LeaderError};

/// A Lease in one namespace, fenced by the Postgres lease row of the same
/// name and holder.
#[derive(Debug)]
pub struct KubeElector {
    leases: Api<Lease>,
    name: String,
    holder: String,
    fence: PgElector,
    /// The Lease record last seen (its resourceVersion) and when it was
    /// first seen: it is expired once unchanged for its duration.
    observed: Mutex<Option<(String, Instant)>>,
}

impl KubeElector {
    /// `fence` must elect the same name with the same holder.
    pub fn new(client: Client, namespace: &str, fence: PgElector) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
            name: fence.name().to_owned(),
            holder: fence.holder().to_owned(),
            fence,
            observed: Mutex::new(None),
        }
    }

    /// Takes or renews the Lease; true when this instance holds it.
    async fn hold_lease(&self, ttl: Duration) -> Result<bool, LeaderError> {
        let now = MicroTime(Timestamp::now());
        // Whole seconds, rounded up: the Lease never claims less than the ttl.
        let seconds = i32::try_from(ttl.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
        let Some(current) = self.leases.get_opt(&self.name).await.map_err(unavailable)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return written(self.leases.create(&PostParams::default(), &lease).await);
        };
        let version = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(self.holder.as_str());
        if !held_by_me && !self.lapsed(&version, &spec) {
            return Ok(false);
        }
        let mut next = current;
        let mut spec = spec;
        if !held_by_me {
            spec.holder_identity = Some(self.holder.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        next.spec = Some(spec);
        written(
            self.leases
                .replace(&self.name, &PostParams::default(), &next)
                .await,
        )
    }

    /// Whether a Lease held by another is free: nobody holds it, or its
    /// record has not changed for its duration on this instance's clock.
    fn lapsed(&self, version: &str, spec: &LeaseSpec) -> bool {
        if spec.holder_identity.as_deref().is_none_or(str::is_empty) {
            return true;
        }
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
        );
        let mut observed = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match observed.as_ref() {
            Some((seen, since)) if seen == version => since.elapsed() > duration,
            _ => {
                *observed = Some((version.to_owned(), Instant::now()));
                false
            }
        }
    }
}

/// A write that lost the race (409) means another instance holds it.
fn written<T>(result: Result<T, kube::Error>) -> Result<bool, LeaderError> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(unavailable(err)),
    }
}

fn unavailable(err: kube::Error) -> LeaderError {
    LeaderError::Unavailable(format!("Kubernetes: {err}"))
}

#[async_trait]
impl Elector for KubeElector {
    async fn acquire(&self, ttl: Duration) -> Result<Option<u64>, LeaderError> {
        if !self.hold_lease(ttl).await? {
            return Ok(None);
        }
        // Leader by the Lease; act only once the fence has a term for us
        // (a former holder's Postgres row may still be valid for a moment).
        self.fence.acquire(ttl).await
    }

    async fn release(&self, epoch: u64) -> Result<(), LeaderError> {
        self.fence.release(epoch).await?;
        let Some(mut current) = self.leases.get_opt(&self.name).await.map_err(unavailable)? else {
            return Ok(());
        };
        let Some(spec) = current.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        // Nobody holds it: a successor takes it at once.
        spec.holder_identity = None;
        written(
            self.leases
                .replace(&self.name, &PostParams::default(), &current)
                .await,
        )
        .map(|_| ())
    }
}
