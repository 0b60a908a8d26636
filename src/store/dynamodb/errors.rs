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
    match service_error.code() {
        Some("TransactionConflictException" | "TransactionInProgressException") => Some(Vec::new()),
        _ => None,
    }
}

/// A short random pause after losing a race.
pub(super) async fn conflict_pause(attempt: u32) {
    let cap = 2u64 << attempt.min(6);
    let micros = rand::random_range(0..=cap * 1000);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}
