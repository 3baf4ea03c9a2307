//! The breaker as a tower layer: every error of the inner service counts as
//! a fault (put a classifier in front if some do not).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{BoxError, Layer, Service};

use crate::{Breaker, Guarded};

/// A tower layer that puts a [`Breaker`] in front of a service: refused
/// at once while open, every outcome reported.
#[derive(Debug, Clone)]
pub struct BreakerLayer {
    breaker: Breaker,
}

impl BreakerLayer {
    /// The layer for `breaker` (clones share its state).
    pub fn new(breaker: Breaker) -> Self {
        Self { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// The service [`BreakerLayer`] makes.
#[derive(Debug, Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Breaker,
}

impl<S, R> Service<R> for BreakerService<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let Some(permit) = self.breaker.permit() else {
            let name = self.breaker.name();
            return Box::pin(
                async move { Err(Guarded::<std::convert::Infallible>::Open(name).into()) },
            );
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            match call.await {
                Ok(response) => {
                    permit.success();
                    Ok(response)
                }
                Err(err) => {
                    permit.failure();
                    Err(err.into())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::BreakerConfig;

    #[tokio::test]
    async fn an_open_circuit_fails_fast_without_calling_the_service() {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = calls.clone();
        let breaker = Breaker::new(
            "flaky",
            BreakerConfig {
                failure_threshold: 2,
                open_for: Duration::from_secs(60),
                ..BreakerConfig::default()
            },
        );
        let mut svc = ServiceBuilder::new()
            .layer(BreakerLayer::new(breaker))
            .service_fn(move |_: ()| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Err::<(), BoxError>("down".into()) }
            });
        for _ in 0..2 {
            assert!(svc.ready().await.expect("ready").call(()).await.is_err());
        }
        let err = svc
            .ready()
            .await
            .expect("ready")
            .call(())
            .await
            .expect_err("open");
        assert!(err.to_string().contains("circuit open"), "{err}");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
