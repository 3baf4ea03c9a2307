//! The one place the State API's errors become gRPC statuses: the event and
//! context store's, the saga store's, the lock and session services', and
//! what the request path itself refuses. Messages say what was wrong;
//! internal details are logged, not sent.

use statefabric_store::{InvalidInput, StoreError};
use tonic::Status;

pub(crate) fn from_store(err: StoreError) -> Status {
    match err {
        StoreError::Invalid(invalid) => from_invalid(invalid),
        err @ (StoreError::Concurrency { .. }
        | StoreError::StreamTypeMismatch { .. }
        | StoreError::SnapshotAhead { .. }) => Status::failed_precondition(err.to_string()),
        err @ StoreError::UnknownTenant(_) => Status::permission_denied(err.to_string()),
        err @ (StoreError::StreamNotFound(_) | StoreError::DocumentNotFound(_)) => {
            Status::not_found(err.to_string())
        }
        err @ (StoreError::ContextConflict { .. } | StoreError::StaleFence { .. }) => {
            Status::failed_precondition(err.to_string())
        }
        err @ StoreError::IdempotencyKeyReused { .. } => Status::invalid_argument(err.to_string()),
        err @ (StoreError::IdempotencyInProgress { .. } | StoreError::WriteOrder { .. }) => {
            Status::aborted(err.to_string())
        }
        err @ StoreError::DuplicateEventId => Status::already_exists(err.to_string()),
        err @ StoreError::OutOfRange { .. } => Status::out_of_range(err.to_string()),
        err @ StoreError::Timeout(_) => Status::deadline_exceeded(err.to_string()),
        StoreError::Unavailable(source) => {
            tracing::warn!(error = %source, "storage unavailable");
            Status::unavailable("storage is unavailable; retry later")
        }
        StoreError::Backend(source) => {
            tracing::error!(error = %source, "storage failure");
            Status::internal("storage failure (details in the sidecar's log)")
        }
    }
}

/// tonic's codec rejects a request over `max_request_bytes` with OUT_OF_RANGE;
/// the State API reports every oversize payload as RESOURCE_EXHAUSTED, the
/// code clients already handle for the store's own size limits. Such a
/// rejection is a trailers-only response, so the status is in the headers.
pub(crate) fn oversize_is_resource_exhausted<B>(
    mut response: http::Response<B>,
) -> http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// What the request path's own layers refuse, as the statuses the caller
/// sees: overload (load shedding) and a passed deadline. Anything else a
/// layer fails with is a server fault, logged here.
pub(crate) fn from_stack(
    result: Result<http::Response<tonic::body::Body>, tower::BoxError>,
) -> Result<http::Response<tonic::body::Body>, tower::BoxError> {
    let err = match result {
        Ok(response) => return Ok(response),
        Err(err) => err,
    };
    let status = if err.is::<tower::load_shed::error::Overloaded>() {
        Status::resource_exhausted(
            "the sidecar is serving as many calls as it allows (sidecar.max_concurrent_calls); retry shortly",
        )
    } else if let Some(passed) = err.downcast_ref::<crate::call::DeadlinePassed>() {
        Status::deadline_exceeded(passed.to_string())
    } else {
        tracing::error!(error = %err, "request path failure");
        Status::internal("request path failure (details in the sidecar's log)")
    };
    Ok(status.into_http())
}

pub(crate) fn from_saga_store(err: statefabric_saga_store::StoreError) -> Status {
    use statefabric_saga_store::StoreError as Saga;
    match err {
        Saga::Invalid(m) => Status::invalid_argument(m),
        Saga::Unavailable(m) => Status::unavailable(m),
        other => {
            tracing::error!(error = %other, "saga store failure");
            Status::internal("saga store failure (details in the sidecar's log)")
        }
    }
}

pub(crate) fn from_lock(err: statefabric_lock::LockError) -> Status {
    use statefabric_lock::LockError;
    match err {
        LockError::Invalid { .. } => Status::invalid_argument(err.to_string()),
        LockError::NotHolder { .. } => Status::failed_precondition(err.to_string()),
        LockError::Unavailable(_) => Status::unavailable(err.to_string()),
    }
}

pub(crate) fn from_session(err: statefabric_session::SessionError) -> Status {
    use statefabric_session::SessionError;
    match err {
        SessionError::Invalid { .. } => Status::invalid_argument(err.to_string()),
        SessionError::Unavailable(_) => Status::unavailable(err.to_string()),
    }
}

pub(crate) fn from_invalid(invalid: InvalidInput) -> Status {
    match invalid {
        InvalidInput::EventTooLarge { .. }
        | InvalidInput::BatchTooLarge { .. }
        | InvalidInput::TooManyEvents { .. } => Status::resource_exhausted(invalid.to_string()),
        other => Status::invalid_argument(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statefabric_domain::{ExpectedVersion, StreamId};
    use tonic::Code;

    #[test]
    fn each_error_gets_the_right_code() {
        let stream = StreamId::new("s").expect("id");
        let cases = [
            (
                StoreError::Invalid(InvalidInput::EmptyBatch),
                Code::InvalidArgument,
            ),
            (
                StoreError::Invalid(InvalidInput::EventTooLarge {
                    index: 0,
                    bytes: 2,
                    max: 1,
                }),
                Code::ResourceExhausted,
            ),
            (
                StoreError::Concurrency {
                    stream: stream.clone(),
                    expected: ExpectedVersion::Exact(1),
                    actual: Some(2),
                },
                Code::FailedPrecondition,
            ),
            (StoreError::StreamNotFound(stream), Code::NotFound),
            (StoreError::DuplicateEventId, Code::AlreadyExists),
            (
                StoreError::IdempotencyInProgress { key: "k".into() },
                Code::Aborted,
            ),
            (
                StoreError::WriteOrder {
                    stream: StreamId::new("s").expect("id"),
                },
                Code::Aborted,
            ),
            (
                StoreError::Timeout(std::time::Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(from_store(err).code(), code);
        }
    }
}
