//! Which sagas this engine is changing right now. A pass skips a saga that
//! an operator call holds (the next pass picks it up) and holds hundreds at
//! once without waiting on any; an operator call waits until the batch
//! holding its saga has committed. A set rather than a mutex per saga (or
//! per shard of sagas): a pass taking many sagas must never block on one,
//! and two batches must never serialize on a shared shard.

use std::collections::HashSet;
use std::sync::Mutex;

use statefabric_saga::SagaId;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(super) struct Busy {
    sagas: Mutex<HashSet<SagaId>>,
    freed: Notify,
}

/// One saga held; released on drop.
#[derive(Debug)]
pub(super) struct Turn<'a> {
    busy: &'a Busy,
    saga: SagaId,
}

impl Turn<'_> {
    pub(super) fn saga(&self) -> &SagaId {
        &self.saga
    }
}

impl Busy {
    fn sagas(&self) -> std::sync::MutexGuard<'_, HashSet<SagaId>> {
        self.sagas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The saga, unless something else holds it.
    pub(super) fn try_take(&self, saga: &SagaId) -> Option<Turn<'_>> {
        self.sagas().insert(saga.clone()).then(|| Turn {
            busy: self,
            saga: saga.clone(),
        })
    }

    /// The saga, once nothing else holds it.
    pub(super) async fn take(&self, saga: &SagaId) -> Turn<'_> {
        loop {
            // Registered before the check, so a release in between wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(turn) = self.try_take(saga) {
                return turn;
            }
            freed.await;
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.busy.sagas().remove(&self.saga);
        self.busy.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn id(id: &str) -> SagaId {
        SagaId::new(id).expect("a valid saga id")
    }

    #[test]
    fn a_held_saga_cannot_be_taken_until_released() {
        let busy = Busy::default();
        let turn = busy.try_take(&id("s-1"));
        assert!(turn.is_some());
        assert!(busy.try_take(&id("s-1")).is_none());
        assert!(busy.try_take(&id("s-2")).is_some(), "other sagas are free");
        drop(turn);
        assert!(busy.try_take(&id("s-1")).is_some());
    }

    #[tokio::test]
    async fn take_waits_for_the_holder() {
        let busy = std::sync::Arc::new(Busy::default());
        let held = busy.try_take(&id("s-1"));
        let waiter = {
            let busy = busy.clone();
            tokio::spawn(async move {
                let _turn = busy.take(&id("s-1")).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "taken while held");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released saga not taken")
            .expect("waiter panicked");
    }
}
