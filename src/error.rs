//! The crate's error type and its one mapping to gRPC status codes.
//!
//! | error | gRPC code | details | when |
//! | --- | --- | --- | --- |
//! | `InvalidArgument` | `INVALID_ARGUMENT` | `BadRequest` (the field) | a request field is malformed |
//! | `NotFound` | `NOT_FOUND` | | the named subscription does not exist |
//! | `AlreadyExists` | `ALREADY_EXISTS` | | an id is taken |
//! | `FailedPrecondition` | `FAILED_PRECONDITION` | | the call names a state that moved on (a partition head) |
//! | `Aborted` | `ABORTED` | `RetryInfo` 100 ms | lost optimistic-concurrency races; nothing written |
//! | `ResourceExhausted` | `RESOURCE_EXHAUSTED` | `RetryInfo` 5 s | the disk is full, or the embedded store's write queue stayed full |
//! | `QuotaReached` | `RESOURCE_EXHAUSTED` | none | a configured limit (subscriptions) is reached |
//! | `Unavailable` | `UNAVAILABLE` | `RetryInfo` 1 s | the store cannot be reached, or the outcome is unknown |
//! | `DataLoss` | `DATA_LOSS` | | stored data cannot be decoded (detail in the log only) |
//! | `Internal` | `INTERNAL` | | a bug (detail in the log only) |

use std::time::Duration;

use tonic_types::{ErrorDetails, StatusExt};

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
    /// The state the call expects is not the current one (a partition's head moved).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Concurrent writers won the race too often; nothing was written. Retry later.
    #[error("{0}")]
    Aborted(String),
    /// A resource ran out (the disk). Retry once it is freed.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A configured quota is used up; retrying helps only once something is removed.
    #[error("{0}")]
    QuotaReached(String),
    /// The store cannot be reached or written now, or the outcome of the call is unknown (the
    /// message says which). Retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data is damaged. Logged with detail; clients see a generic message.
    #[error("data loss: {0}")]
    DataLoss(String),
    /// A bug. Logged with detail; clients see a generic message.
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
            StoreError::FailedPrecondition(message) => Error::FailedPrecondition(message),
            // The only argument a store interprets.
            StoreError::InvalidArgument(message) => Error::invalid("page_token", message),
            StoreError::Contention(message) => Error::Aborted(message),
            StoreError::LimitReached(message) => Error::QuotaReached(message),
            StoreError::StorageFull(message) | StoreError::Overloaded(message) => {
                Error::ResourceExhausted(message)
            }
            StoreError::Unavailable(message) => {
                Error::Unavailable(format!("store unavailable, nothing was written: {message}"))
            }
            StoreError::Partial(message) => Error::Unavailable(message),
            StoreError::Uncertain(message) => Error::Unavailable(format!(
                "the store failed while committing, so this call may or may not have taken \
                 effect ({message}); retry it (Publish with the same idempotency key)"
            )),
            StoreError::Corrupt(message) => Error::DataLoss(message),
            // Only delivery workers make fenced writes; reaching a caller is a bug.
            StoreError::LeaseLost(message) | StoreError::Internal(message) => {
                Error::Internal(message)
            }
        }
    }
}

/// A status whose details say when to try again.
fn retry_later(code: tonic::Code, message: String, delay: Duration) -> tonic::Status {
    tonic::Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(delay)))
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument {
                field,
                message: description,
            } => tonic::Status::with_error_details(
                tonic::Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::AlreadyExists(_) => tonic::Status::already_exists(message),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            Error::Aborted(_) => {
                retry_later(tonic::Code::Aborted, message, Duration::from_millis(100))
            }
            Error::QuotaReached(_) => tonic::Status::resource_exhausted(message),
            Error::ResourceExhausted(_) => retry_later(
                tonic::Code::ResourceExhausted,
                message,
                Duration::from_secs(5),
            ),
            Error::Unavailable(_) => {
                retry_later(tonic::Code::Unavailable, message, Duration::from_secs(1))
            }
            Error::DataLoss(detail) => {
                tracing::error!(%detail, "stored data cannot be decoded");
                tonic::Status::data_loss("stored data is damaged; see the server log")
            }
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
    fn each_error_maps_to_its_code_and_details() {
        let cases = [
            (Error::invalid("topic", "bad"), tonic::Code::InvalidArgument),
            (Error::NotFound("x".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("x".into()), tonic::Code::AlreadyExists),
            (Error::Aborted("x".into()), tonic::Code::Aborted),
            (
                Error::ResourceExhausted("x".into()),
                tonic::Code::ResourceExhausted,
            ),
            (Error::Unavailable("x".into()), tonic::Code::Unavailable),
            (
                Error::DataLoss("secret detail".into()),
                tonic::Code::DataLoss,
            ),
            (
                Error::Internal("secret detail".into()),
                tonic::Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret detail"));
            let retry = status.get_error_details().retry_info().cloned();
            let retryable = matches!(
                code,
                tonic::Code::Aborted | tonic::Code::ResourceExhausted | tonic::Code::Unavailable
            );
            assert_eq!(retry.is_some(), retryable, "{code:?}");
        }
        let status = tonic::Status::from(Error::invalid("topic", "too long"));
        assert_eq!(status.message(), "topic: too long");
        let violations = status
            .get_details_bad_request()
            .expect("BadRequest details")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "topic");
        assert_eq!(violations[0].description, "too long");
    }

    #[test]
    fn store_errors_keep_their_meaning() {
        let status = |error: StoreError| tonic::Status::from(Error::from(error)).code();
        assert_eq!(
            status(StoreError::Contention("x".into())),
            tonic::Code::Aborted
        );
        assert_eq!(
            status(StoreError::StorageFull("x".into())),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            status(StoreError::Overloaded("x".into())),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            status(StoreError::Corrupt("x".into())),
            tonic::Code::DataLoss
        );
        let page_token = tonic::Status::from(Error::from(StoreError::InvalidArgument(
            "not a token this server issued".into(),
        )));
        assert_eq!(
            page_token.message(),
            "page_token: not a token this server issued"
        );
    }
}
