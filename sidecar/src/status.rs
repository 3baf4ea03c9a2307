//! The one place store errors become gRPC statuses. Messages say what was
//! wrong; internal details are logged, not sent.

use statefabric_store::{InvalidInput, StoreError};
use tonic::Status;

pub fn from_store(err: StoreError) -> Status {
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

pub fn from_invalid(invalid: InvalidInput) -> Status {
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
