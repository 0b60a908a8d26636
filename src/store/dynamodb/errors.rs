//! DynamoDB errors by meaning, and the pause after losing an optimistic race.

use std::time::Duration;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;

use crate::store::StoreError;

/// Maps an SDK error: anything that is not a bug of ours means the table cannot be used now.
pub(super) fn sdk_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    error: SdkError<E>,
) -> StoreError {
    if let Some(service_error) = error.as_service_error() {
        let code = service_error.code().unwrap_or("unknown error");
        let text = format!("{code}: {}", service_error.message().unwrap_or(""));
        return match code {
            // Too large an item or transaction: the data, not the table, is the problem, and
            // no retry helps.
            "ValidationException" if is_size_error(service_error.message().unwrap_or("")) => {
                StoreError::InvalidArgument(format!("DynamoDB refuses the data: {text}"))
            }
            "ValidationException" | "SerializationException" => {
                StoreError::Internal(format!("DynamoDB rejected a request: {text}"))
            }
            _ => StoreError::Unavailable(format!("DynamoDB: {text}")),
        };
    }
    let text = match &error {
        SdkError::DispatchFailure(_) => "cannot reach DynamoDB".to_string(),
        SdkError::TimeoutError(_) => "DynamoDB did not answer in time".to_string(),
        other => DisplayErrorContext(other).to_string(),
    };
    StoreError::Unavailable(text)
}

/// True if a validation message is about the size of an item or request.
fn is_size_error(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("size") || message.contains("too large") || message.contains("exceed")
}

/// The permanent error a transaction's cancellation reasons carry, if any: an item refused
/// as invalid (too large, say) or an item collection over its size limit. Retrying cannot
/// help, so these must not be taken for contention.
pub(super) fn refused(reasons: &[String]) -> Option<StoreError> {
    reasons.iter().find_map(|reason| match reason.as_str() {
        "ValidationError" => Some(StoreError::InvalidArgument(
            "DynamoDB refuses an item of this write as invalid (larger than 400 KB, or a \
             malformed attribute)"
                .into(),
        )),
        "ItemCollectionSizeLimitExceeded" => Some(StoreError::InvalidArgument(
            "DynamoDB refuses this write: an item collection is over its size limit".into(),
        )),
        _ => None,
    })
}

/// True if the error is a failed condition of a single-item write.
pub(super) fn is_condition_failure<E: ProvideErrorMetadata>(error: &SdkError<E>) -> bool {
    error
        .as_service_error()
        .and_then(|error| error.code())
        .is_some_and(|code| code == "ConditionalCheckFailedException")
}

/// Why a transaction was cancelled, per item; an empty list for a conflict with another
/// transaction; `None` if the error is not a cancellation.
pub(super) fn cancellation_reasons(
    error: &SdkError<TransactWriteItemsError>,
) -> Option<Vec<String>> {
    let service_error = error.as_service_error()?;
    if let TransactWriteItemsError::TransactionCanceledException(cancelled) = service_error {
        return Some(
            cancelled
                .cancellation_reasons()
                .iter()
                .map(|reason| reason.code().unwrap_or("None").to_string())
                .collect(),
        );
    }
    // (TransactionInProgressException is not one: that transaction may still commit;
    // `transact` resends it until it has an answer.)
    match service_error.code() {
        Some("TransactionConflictException") => Some(Vec::new()),
        _ => None,
    }
}

/// True if a transaction was cancelled for a conflict with another transaction.
pub(super) fn is_conflict(error: &SdkError<TransactWriteItemsError>) -> bool {
    match error.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => cancelled
            .cancellation_reasons()
            .iter()
            .any(|reason| reason.code() == Some("TransactionConflict")),
        Some(other) => other.code() == Some("TransactionConflictException"),
        None => false,
    }
}

/// True if DynamoDB says the same transaction (same client request token) is still running.
pub(super) fn is_in_progress(error: &SdkError<TransactWriteItemsError>) -> bool {
    error
        .as_service_error()
        .and_then(|error| error.code())
        .is_some_and(|code| code == "TransactionInProgressException")
}

/// A short random pause after losing a race.
pub(super) async fn conflict_pause(attempt: u32) {
    let cap = 2u64 << attempt.min(6);
    let micros = rand::random_range(0..=cap * 1000);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}
