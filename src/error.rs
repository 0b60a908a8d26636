//! The crate's error type and its one mapping to gRPC status codes.

use crate::store::StoreError;

/// An error the broker reports to its callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the offending request field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The resource exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The store cannot be reached or written now; nothing was stored. Retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt data. Logged with detail; clients see a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => Error::NotFound(what),
            StoreError::Conflict(message) => Error::AlreadyExists(message),
            StoreError::InvalidArgument(message) => Error::invalid("page_token", message),
            StoreError::Unavailable(message) => {
                Error::Unavailable(format!("store unavailable, nothing was written: {message}"))
            }
            StoreError::Partial(message) => Error::Unavailable(message),
            StoreError::Uncertain(message) => Error::Unavailable(format!(
                "the store failed while committing, so this call may or may not have taken \
                 effect ({message}); retry it (Publish with the same idempotency key)"
            )),
            // Only delivery workers make fenced writes; reaching a caller is a bug.
            StoreError::LeaseLost(message) | StoreError::Internal(message) => {
                Error::Internal(message)
            }
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(error.to_string()),
            Error::NotFound(_) => tonic::Status::not_found(error.to_string()),
            Error::AlreadyExists(_) => tonic::Status::already_exists(error.to_string()),
            Error::Unavailable(_) => tonic::Status::unavailable(error.to_string()),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                tonic::Status::internal("internal error; see the server log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_code() {
        let cases = [
            (Error::invalid("topic", "bad"), tonic::Code::InvalidArgument),
            (Error::NotFound("x".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("x".into()), tonic::Code::AlreadyExists),
            (Error::Unavailable("x".into()), tonic::Code::Unavailable),
            (
                Error::Internal("secret detail".into()),
                tonic::Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret detail"));
        }
        let status = tonic::Status::from(Error::invalid("topic", "too long"));
        assert_eq!(status.message(), "topic: too long");
    }
}
