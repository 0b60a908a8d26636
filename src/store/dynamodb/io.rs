//! The table reads and writes every part of the store builds on: consistent gets, queries and
//! batch gets, and transactions fenced by a partition lease.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{KeysAndAttributes, TransactWriteItem};

use super::errors::{
    cancellation_reasons, conflict_pause, is_conflict, is_in_progress, refused, sdk_error,
};
use super::schema::{self, Item, s};
use super::{BATCH_GET_LIMIT, Inner};
use crate::model::{Event, PartitionKey};
use crate::store::{LeaseToken, StoreError};

/// Times an in-progress transaction is sent again (100 ms apart) before giving up.
const IN_PROGRESS_RESENDS: u32 = 100;
/// The resolution of the lease ends in the table.
const MILLISECOND: std::time::Duration = std::time::Duration::from_millis(1);

impl Inner {
    pub(super) async fn get_item(&self, key: Item) -> Result<Option<Item>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(output.item)
    }

    /// Queries one partition key for sort keys strictly after `after` (all if `None`), in
    /// order, at most `limit` items.
    pub(super) async fn query_after(
        &self,
        pk: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start: Option<Item> = after.map(|sk| schema::key(pk, sk));
        while items.len() < limit {
            let output = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(pk))
                .consistent_read(true)
                .limit((limit - items.len()).min(1000) as i32)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(sdk_error)?;
            items.extend(output.items.unwrap_or_default());
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        Ok(items)
    }

    /// Runs a transaction under one client request token: when DynamoDB answers that the same
    /// transaction is still in progress (a retry of the SDK overtook the first attempt), the
    /// same request is sent again until it has a definite answer, so a transaction that did
    /// commit is never taken for one that did not.
    pub(super) async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
    ) -> Result<(), SdkError<TransactWriteItemsError>> {
        let token = crate::ids::new_id("tx");
        let mut attempt = 0;
        loop {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .client_request_token(&token)
                .send()
                .await
                .map(|_| ());
            match &result {
                Err(error) if is_in_progress(error) && attempt < IN_PROGRESS_RESENDS => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
                Err(error) if is_conflict(error) => self.counts.conflict(),
                _ => {}
            }
            return result;
        }
    }

    /// Reads events by sequence, keyed by sequence: from the event cache, the rest from the
    /// table (and into the cache).
    pub(super) async fn batch_get_events(
        &self,
        topic: &str,
        sequences: &[u64],
    ) -> Result<HashMap<u64, Event>, StoreError> {
        let mut events = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.events.lock().expect("event cache lock");
            for sequence in sequences {
                match cache.get(topic, *sequence) {
                    Some(event) => {
                        events.insert(*sequence, event);
                    }
                    None => missing.push(schema::event_key(topic, *sequence)),
                }
            }
        }
        if missing.is_empty() {
            return Ok(events);
        }
        let mut read = Vec::new();
        for item in self.batch_get(missing).await? {
            read.push((
                schema::event_from_item(topic, &item)?,
                schema::get_n(&item, "pending")?,
            ));
        }
        let mut cache = self.events.lock().expect("event cache lock");
        for (event, pending) in read {
            cache.insert(event.clone(), pending);
            events.insert(event.sequence, event);
        }
        Ok(events)
    }

    /// Reads items by key (consistently), in batches of 100, retrying what DynamoDB leaves
    /// unprocessed. Missing items are left out.
    pub(super) async fn batch_get(&self, keys: Vec<Item>) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        for chunk in keys.chunks(BATCH_GET_LIMIT) {
            let mut keys = chunk.to_vec();
            let mut attempt = 0;
            while !keys.is_empty() {
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(
                        &self.table,
                        KeysAndAttributes::builder()
                            .set_keys(Some(keys))
                            .consistent_read(true)
                            .build()
                            .expect("complete keys"),
                    )
                    .send()
                    .await
                    .map_err(sdk_error)?;
                items.extend(
                    output
                        .responses
                        .and_then(|mut responses| responses.remove(&self.table))
                        .unwrap_or_default(),
                );
                keys = output
                    .unprocessed_keys
                    .and_then(|mut unprocessed| unprocessed.remove(&self.table))
                    .map(|keys| keys.keys)
                    .unwrap_or_default();
                if !keys.is_empty() {
                    attempt += 1;
                    if attempt > 10 {
                        return Err(StoreError::Unavailable(
                            "DynamoDB keeps leaving batch reads unprocessed".into(),
                        ));
                    }
                    conflict_pause(attempt).await;
                }
            }
        }
        Ok(items)
    }

    /// Runs a transaction whose last item is `fence`'s lease check, if given. Returns the
    /// cancellation reasons of the other items if it was cancelled for them; `LeaseLost` if it
    /// was cancelled by the lease check.
    pub(super) async fn transact_fenced(
        &self,
        mut items: Vec<TransactWriteItem>,
        fence: Option<(&PartitionKey, &LeaseToken)>,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let checked = items.len();
        // Taken before the lease's new end is computed, less the millisecond that end is
        // truncated to: the worker never counts past what the table says.
        let sent = std::time::Instant::now();
        let sent = sent.checked_sub(MILLISECOND).unwrap_or(sent);
        if let Some((partition, token)) = fence {
            items.push(self.lease_fence(partition, token));
        }
        let Err(error) = self.transact(items).await else {
            if let Some((_, token)) = fence {
                self.extended(token, sent);
            }
            return Ok(None);
        };
        let Some(reasons) = cancellation_reasons(&error) else {
            return Err(sdk_error(error));
        };
        if let Some(refused) = refused(&reasons) {
            return Err(refused);
        }
        let failed =
            |index: usize| reasons.get(index).map(String::as_str) == Some("ConditionalCheckFailed");
        let own_failure = (0..checked).any(failed);
        if let Some((partition, token)) = fence
            && failed(checked)
            && !own_failure
        {
            self.forget_lease(token);
            return Err(StoreError::LeaseLost(format!(
                "another worker holds the lease of {partition}"
            )));
        }
        if own_failure {
            return Ok(Some(reasons));
        }
        // A conflict with another transaction: nothing was written.
        Err(StoreError::Unavailable(format!(
            "transaction conflict: {}",
            DisplayErrorContext(&error)
        )))
    }
}
