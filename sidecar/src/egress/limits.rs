//! Concurrency and rate limits per upstream, with a bounded queue: a call
//! waits for a slot at most `queue_timeout`, and when `queue` calls are
//! already waiting it is shed at once — load is turned away at the sidecar
//! with a `Retry-After`, rather than piled up in front of an upstream that
//! is already full. The concurrency slot is held until the response body
//! has been read (a stream counts for as long as it flows).
//!
//! Model tokens a minute (`tokensPerMinute`, for upstreams that report
//! usage): a call is admitted while the upstream's balance is positive,
//! and what its answer reports it used is taken off when the answer ends
//! ([`super::usage`]) — the cost is known only then, so one large answer
//! can put the balance in debt and hold the next calls until it is repaid.
//!
//! Written here rather than taken from tower's limit layers: those wait
//! without bound (or refuse without waiting), and this path needs both a
//! bounded wait and a bounded number of waiters, with the time to the next
//! slot to put in `Retry-After`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::future::Future;

use http_body_util::BodyExt;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::body::Holding;
use super::errors::EgressError;
use super::metrics::EgressMetrics;
use super::routes::Route;
use super::stack::{
    Answer, Call, CallNext, CallStep, PerUpstream, Result as StepResult, call_next,
};

/// The limits of one upstream, resolved from its LimitPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitSettings {
    pub max_concurrency: Option<u32>,
    pub requests_per_second: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub queue: u32,
    pub queue_timeout: Duration,
}

/// Why a call was turned away, and when trying again makes sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shed {
    /// All slots busy and the queue full (or the wait too long): 503.
    Busy { retry_after: Duration },
    /// Over the request rate: 429.
    Rate { retry_after: Duration },
}

#[derive(Debug)]
pub(super) struct Limiter {
    settings: LimitSettings,
    slots: Option<Arc<Semaphore>>,
    bucket: Option<Mutex<Bucket>>,
    tokens: Option<std::sync::Mutex<TokenBalance>>,
    waiting: AtomicU32,
}

/// Model tokens: refilled at `per_second` up to `capacity` (a minute's
/// worth); spent after the fact, so it may go below zero.
#[derive(Debug)]
struct TokenBalance {
    per_second: f64,
    capacity: f64,
    balance: f64,
    at: Instant,
}

impl TokenBalance {
    fn new(per_minute: u64) -> Self {
        #[allow(clippy::cast_precision_loss)] // a rate, not an account
        let capacity = per_minute as f64;
        Self {
            per_second: capacity / 60.0,
            capacity,
            balance: capacity,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.balance = (self.balance + now.duration_since(self.at).as_secs_f64() * self.per_second)
            .min(self.capacity);
        self.at = now;
    }

    /// `None` while the balance is positive, else how long until it is.
    fn wait(&mut self) -> Option<Duration> {
        self.refill();
        (self.balance <= 0.0)
            .then(|| Duration::from_secs_f64((1.0 - self.balance) / self.per_second))
    }

    fn spend(&mut self, tokens: u64) {
        self.refill();
        #[allow(clippy::cast_precision_loss)]
        let tokens = tokens as f64;
        self.balance -= tokens;
    }
}

/// Tokens for the request rate: `rate` a second, at most `rate` banked.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

impl Limiter {
    pub(super) fn new(settings: LimitSettings) -> Self {
        Self {
            settings,
            slots: settings
                .max_concurrency
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            bucket: settings.requests_per_second.map(|rate| {
                Mutex::new(Bucket {
                    rate: f64::from(rate),
                    tokens: f64::from(rate),
                    at: Instant::now(),
                })
            }),
            tokens: settings
                .tokens_per_minute
                .map(|n| std::sync::Mutex::new(TokenBalance::new(n))),
            waiting: AtomicU32::new(0),
        }
    }

    pub(super) fn settings(&self) -> LimitSettings {
        self.settings
    }

    /// Admits a call (holding a slot until the permit is dropped) or sheds
    /// it.
    pub(super) async fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, Shed> {
        let deadline = Instant::now() + self.settings.queue_timeout;
        let mut queued = None;
        while let Some(wait) = self.rate_wait().await {
            if Instant::now() + wait > deadline {
                return Err(Shed::Rate { retry_after: wait });
            }
            if queued.is_none() {
                queued = Some(self.enqueue().ok_or(Shed::Rate { retry_after: wait })?);
            }
            tokio::time::sleep(wait).await;
        }
        let Some(slots) = &self.slots else {
            return Ok(None);
        };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        let busy = Shed::Busy {
            retry_after: Duration::from_secs(1),
        };
        if queued.is_none() {
            queued = Some(self.enqueue().ok_or(busy)?);
        }
        let permit = tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await;
        drop(queued);
        match permit {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(busy),
        }
    }

    /// `None`: within the token balance and the request rate (a request
    /// token taken); else how long until that may be so.
    async fn rate_wait(&self) -> Option<Duration> {
        if let Some(tokens) = &self.tokens
            && let Some(wait) = lock(tokens).wait()
        {
            return Some(wait);
        }
        match &self.bucket {
            Some(bucket) => bucket.lock().await.take().err(),
            None => None,
        }
    }

    /// Takes the tokens an answer reported off the balance.
    pub(super) fn spend_tokens(&self, tokens: u64) {
        if let Some(balance) = &self.tokens {
            lock(balance).spend(tokens);
        }
    }

    /// A place in the queue, or `None` when it is full.
    fn enqueue(&self) -> Option<Waiting<'_>> {
        let queue = self.settings.queue;
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < queue).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiting(&self.waiting))
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A call's place in the queue, given back when it stops waiting.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every upstream's limiter, shared by the limit and the usage steps.
#[derive(Default)]
pub(super) struct Limiters(PerUpstream<Arc<Limiter>>);

impl Limiters {
    /// The upstream's limiter with these settings (new limits for new
    /// calls; calls in flight keep their slots).
    pub(super) fn get(&self, upstream: &str, settings: LimitSettings) -> Arc<Limiter> {
        self.0.get(
            upstream,
            || Arc::new(Limiter::new(settings)),
            |limiter| {
                if limiter.settings() != settings {
                    *limiter = Arc::new(Limiter::new(settings));
                }
            },
        )
    }
}

/// Past the route's limits (with the upstream's concurrency slot, when it
/// has a concurrency limit), or shed with when to come back.
pub(super) async fn admit(
    limiters: &Limiters,
    metrics: &EgressMetrics,
    route: &Route,
) -> StepResult<Option<OwnedSemaphorePermit>> {
    let Some(settings) = route.policy.limit else {
        return Ok(None);
    };
    let limiter = limiters.get(&route.name, settings);
    let queued = metrics.queued(&route.name);
    queued.inc();
    let admitted = limiter.admit().await;
    queued.dec();
    admitted.map_err(|shed| {
        metrics.shed(&route.name);
        let (rate, what, retry_after) = match shed {
            Shed::Rate { retry_after } => {
                (true, "over its request or model-token rate", retry_after)
            }
            Shed::Busy { retry_after } => (
                false,
                "every slot is busy and the queue is full",
                retry_after,
            ),
        };
        EgressError::Shed {
            upstream: route.name.clone(),
            rate,
            what,
            retry_after,
        }
    })
}

/// The stack's limit step: past the upstream's limits (holding a slot for
/// as long as the response body flows), or shed with when to come back.
#[derive(Clone)]
pub(super) struct Limiting {
    limiters: Arc<Limiters>,
    metrics: EgressMetrics,
}

impl Limiting {
    pub(super) fn new(limiters: Arc<Limiters>, metrics: EgressMetrics) -> Self {
        Self { limiters, metrics }
    }
}

impl CallStep for Limiting {
    fn call<S: CallNext>(
        &self,
        call: Call,
        next: S,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let this = self.clone();
        async move {
            let slot = admit(&this.limiters, &this.metrics, &call.route).await?;
            let response = call_next(next, call).await?;
            Ok(match slot {
                Some(slot) => response.map(|body| Holding::new(body, slot).boxed()),
                None => response,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(concurrency: Option<u32>, rate: Option<u32>, queue: u32) -> Limiter {
        Limiter::new(LimitSettings {
            max_concurrency: concurrency,
            requests_per_second: rate,
            tokens_per_minute: None,
            queue,
            queue_timeout: Duration::from_millis(500),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn slots_then_a_bounded_queue_then_shedding() {
        let limits = Arc::new(limiter(Some(2), None, 1));
        let a = limits.admit().await.expect("slot 1");
        let _b = limits.admit().await.expect("slot 2");
        // One may wait; it gets the slot a finished call gives back.
        let waiter = tokio::spawn({
            let limits = limits.clone();
            async move { limits.admit().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(limits.waiting.load(Ordering::Acquire), 1);
        // The queue is full: shed at once.
        assert!(matches!(limits.admit().await, Err(Shed::Busy { .. })));
        drop(a);
        let _c = waiter.await.expect("joined").expect("the freed slot");
        // A waiter that gets no slot in time is shed too.
        let late = limits.admit().await;
        assert!(matches!(late, Err(Shed::Busy { .. })), "{late:?}");
        assert_eq!(limits.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_a_bucket_and_the_shed_says_when_to_come_back() {
        let limits = limiter(None, Some(2), 0);
        assert!(limits.admit().await.is_ok());
        assert!(limits.admit().await.is_ok());
        match limits.admit().await {
            Err(Shed::Rate { retry_after }) => {
                assert!(retry_after <= Duration::from_millis(500), "{retry_after:?}");
            }
            other => panic!("expected a rate shed, got {other:?}"),
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limits.admit().await.is_ok(), "a token came back");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_spent_after_the_answer_and_a_debt_holds_calls_back() {
        let limits = Limiter::new(LimitSettings {
            max_concurrency: None,
            requests_per_second: None,
            tokens_per_minute: Some(600), // 10 a second
            queue: 0,
            queue_timeout: Duration::from_millis(500),
        });
        assert!(limits.admit().await.is_ok());
        // One answer used 650: 50 in debt, five seconds to repay and one more token.
        limits.spend_tokens(650);
        match limits.admit().await {
            Err(Shed::Rate { retry_after }) => {
                assert!(
                    (Duration::from_millis(5000)..=Duration::from_millis(5200))
                        .contains(&retry_after),
                    "{retry_after:?}"
                );
            }
            other => panic!("expected a token shed, got {other:?}"),
        }
        tokio::time::advance(Duration::from_millis(5200)).await;
        assert!(limits.admit().await.is_ok(), "repaid");
        // The balance never grows past a minute's worth.
        tokio::time::advance(Duration::from_secs(600)).await;
        limits.spend_tokens(600);
        assert!(
            limits.admit().await.is_err(),
            "600 banked at most, all spent"
        );
    }
}
