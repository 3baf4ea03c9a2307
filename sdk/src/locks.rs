//! Locks through the sidecar, renewed in the background while held.
//!
//! A [`HeldLock`] renews its lease every third of its length. If a renewal
//! is refused (someone else holds the lock now) or the lease runs out before
//! a renewal gets through, the lock is lost: [`HeldLock::lost`] resolves at
//! once, and the holder must stop acting on it. Its [`HeldLock::token`] is
//! the fencing token to pass along with guarded writes.

use std::time::Duration;

use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::locks_client::LocksClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::error::Error;

/// Distributed locks with fencing tokens, through the sidecar.
#[derive(Debug, Clone)]
pub struct LockClient {
    inner: LocksClient<Channel>,
}

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// Who holds it.
    pub owner: String,
    /// The fencing token of the current grant.
    pub token: u64,
    /// Time left before the lease lapses unless renewed.
    pub expires_in: Duration,
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl LockClient {
    /// A client on a channel opened elsewhere (shared with other clients).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: LocksClient::new(channel),
        }
    }

    /// Takes `name` for `ttl`, waiting up to `wait`; `None` if it stayed
    /// taken. The returned lock renews itself until released or dropped.
    pub async fn acquire(
        &mut self,
        name: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<HeldLock>, Error> {
        let response = self
            .inner
            .acquire(pb::AcquireRequest {
                name: name.to_owned(),
                ttl_ms: ms(ttl),
                wait_ms: ms(wait),
            })
            .await?
            .into_inner();
        let Some(lease) = response.lease.filter(|_| response.acquired) else {
            return Ok(None);
        };
        let (lost_tx, lost) = watch::channel(false);
        let renewer = tokio::spawn(renew_until_lost(
            self.inner.clone(),
            lease.clone(),
            ttl,
            lost_tx,
        ));
        Ok(Some(HeldLock {
            client: self.inner.clone(),
            name: lease.name,
            token: lease.token,
            lost,
            renewer,
        }))
    }

    /// Who holds `name` now, if anyone.
    pub async fn inspect(&mut self, name: &str) -> Result<Option<LockHolder>, Error> {
        let r = self
            .inner
            .inspect(pb::InspectRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner();
        Ok(r.held.then(|| LockHolder {
            owner: r.owner,
            token: r.token,
            expires_in: Duration::from_millis(u64::from(r.expires_in_ms)),
        }))
    }
}

async fn renew_until_lost(
    mut client: LocksClient<Channel>,
    lease: pb::Lease,
    ttl: Duration,
    lost: watch::Sender<bool>,
) {
    let mut expires = tokio::time::Instant::now() + ttl;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let request = pb::RenewRequest {
            name: lease.name.clone(),
            token: lease.token,
            ttl_ms: ms(ttl),
        };
        let sent = tokio::time::Instant::now();
        match client.renew(request).await {
            Ok(_) => expires = sent + ttl,
            Err(status) if status.code() == tonic::Code::FailedPrecondition => break,
            // Transient: keep trying while the lease may still be ours.
            Err(_) if tokio::time::Instant::now() < expires => continue,
            Err(_) => break,
        }
    }
    let _ = lost.send(true);
}

/// A lock this process holds.
#[derive(Debug)]
pub struct HeldLock {
    client: LocksClient<Channel>,
    name: String,
    token: u64,
    lost: watch::Receiver<bool>,
    renewer: JoinHandle<()>,
}

impl HeldLock {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// True once the lease was lost (a renewal refused or too late): stop
    /// acting under it.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the lock is lost (never, while it is held).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Stops renewing and lets go.
    pub async fn release(mut self) -> Result<(), Error> {
        self.renewer.abort();
        self.client
            .release(pb::ReleaseRequest {
                name: self.name.clone(),
                token: self.token,
            })
            .await?;
        Ok(())
    }
}

impl Drop for HeldLock {
    /// Dropped without release: renewal stops and the lease runs out.
    fn drop(&mut self) {
        self.renewer.abort();
    }
}
