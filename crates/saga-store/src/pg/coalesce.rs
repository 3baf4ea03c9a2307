//! Coalesces concurrent calls into one statement (group commit). A caller
//! queues its item; whoever finds no write running takes everything queued
//! and writes it in one statement, one transaction, while the next callers
//! queue behind it. Under load the batches grow by themselves; alone, a
//! call is written at once, with no timer to wait out.
//!
//! Written here rather than taken from a crate: the batching crates we
//! looked at run a worker per batcher with a fixed wait window, which adds
//! latency when idle and needs a task to own; this needs neither.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::{Result, StoreError};

type Waiter<O> = oneshot::Sender<Result<O>>;

#[derive(Debug)]
pub(super) struct Coalescer<I, O> {
    queue: Mutex<Vec<(I, Waiter<O>)>>,
    writing: tokio::sync::Mutex<()>,
    max: usize,
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    /// At most `max` items per write.
    pub(super) fn new(max: usize) -> Self {
        Self {
            queue: Mutex::default(),
            writing: tokio::sync::Mutex::new(()),
            max: max.max(1),
        }
    }

    fn take(&self) -> Vec<(I, Waiter<O>)> {
        let mut queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = queue.len().min(self.max);
        queue.drain(..n).collect()
    }

    /// `item`'s outcome, written by `write` (which returns one outcome per
    /// item, in order) together with whatever else is queued.
    pub(super) async fn call<F, Fut>(&self, item: I, write: F) -> Result<O>
    where
        F: Fn(Vec<I>) -> Fut,
        Fut: Future<Output = Result<Vec<O>>> + Send + 'static,
    {
        let (tx, mut rx) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((item, tx));
        loop {
            tokio::select! {
                biased;
                outcome = &mut rx => return outcome.unwrap_or_else(|_| lost()),
                turn = self.writing.lock() => {
                    let batch = self.take();
                    if batch.is_empty() {
                        // An earlier write took this item.
                        drop(turn);
                        return rx.await.unwrap_or_else(|_| lost());
                    }
                    let (items, waiters): (Vec<I>, Vec<Waiter<O>>) = batch.into_iter().unzip();
                    let written = write(items);
                    // Its own task: a caller that goes away mid-write does
                    // not take the other callers' answers with it.
                    let delivered = tokio::spawn(async move {
                        deliver(written.await, waiters);
                    });
                    let _ = delivered.await;
                    drop(turn);
                }
            }
        }
    }
}

fn deliver<O>(written: Result<Vec<O>>, waiters: Vec<Waiter<O>>) {
    match written {
        Ok(outcomes) if outcomes.len() == waiters.len() => {
            for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
                let _ = waiter.send(Ok(outcome));
            }
        }
        Ok(outcomes) => {
            let message = format!("{} outcomes for {} calls", outcomes.len(), waiters.len());
            for waiter in waiters {
                let _ = waiter.send(Err(StoreError::Backend(message.clone())));
            }
        }
        Err(err) => {
            for waiter in waiters {
                let _ = waiter.send(Err(err.clone()));
            }
        }
    }
}

fn lost<O>() -> Result<O> {
    Err(StoreError::Unavailable(
        "the write carrying this call was lost; retry".into(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_writes_and_each_gets_its_own_outcome() {
        let coalescer = Arc::new(Coalescer::<u32, u32>::new(16));
        let writes = Arc::new(AtomicUsize::new(0));
        let calls = (0..64u32).map(|i| {
            let coalescer = coalescer.clone();
            let writes = writes.clone();
            tokio::spawn(async move {
                coalescer
                    .call(i, |items| {
                        writes.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok(items.into_iter().map(|x| x * 10).collect())
                        }
                    })
                    .await
            })
        });
        let outcomes = futures::future::join_all(calls).await;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let got = outcome.expect("joined").expect("written");
            assert_eq!(got, u32::try_from(i).expect("small") * 10);
        }
        let writes = writes.load(Ordering::SeqCst);
        assert!(
            (4..64).contains(&writes),
            "64 calls in batches of at most 16 took {writes} writes"
        );
    }

    #[tokio::test]
    async fn a_failed_write_fails_every_call_in_it() {
        let coalescer = Coalescer::<u32, u32>::new(4);
        let outcome = coalescer
            .call(1, |_| async { Err(StoreError::Unavailable("down".into())) })
            .await;
        assert!(matches!(outcome, Err(StoreError::Unavailable(m)) if m == "down"));
        let short = coalescer.call(2, |_| async { Ok(Vec::new()) }).await;
        assert!(matches!(short, Err(StoreError::Backend(_))), "{short:?}");
    }
}
