use tonic::{Code, Status};

/// What went wrong, classified so callers can act without parsing messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sidecar could not be reached.
    #[error("cannot reach the sidecar: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The expected version was stale (or the stream type differs): reload
    /// and decide again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The sidecar refused the request as malformed (the message names the
    /// field).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A value over the sidecar's size limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// No such stream, document, lock or session.
    #[error("not found: {0}")]
    NotFound(String),
    /// A counter increment refused because the counter would leave the
    /// signed 64-bit range; nothing was written.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// Transient: retrying later may succeed (unavailable, timed out, a
    /// duplicate still in progress).
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// Any other gRPC status.
    #[error("{0}")]
    Other(Status),
    /// A payload that does not serialize to JSON.
    #[error("cannot encode the event payload: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Error {
    /// A conflict: reload and decide again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict(_))
    }

    /// Transient: retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::FailedPrecondition => Self::Conflict(message),
            Code::InvalidArgument | Code::AlreadyExists => Self::Invalid(message),
            Code::ResourceExhausted => Self::TooLarge(message),
            Code::NotFound => Self::NotFound(message),
            Code::OutOfRange => Self::OutOfRange(message),
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted => {
                Self::Unavailable(message)
            }
            _ => Self::Other(status),
        }
    }
}
