//! Partition leases on DynamoDB: one item per partition, spread over a few shard keys so the
//! rescan can list expired ones with a query per shard.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{ConditionCheck, TransactWriteItem, Update};

use super::errors::{is_condition_failure, sdk_error};
use super::schema::{self, n, s};
use super::{DynamoStore, Inner};
use crate::model::{PartitionKey, now_millis};
use crate::store::{LeaseToken, PartitionLeases, StoreError};

/// What this instance knows of a lease it holds: the duration it was claimed for, and when
/// the last fenced write that extended it was sent.
pub(super) struct LeaseTerm {
    duration: Duration,
    extended_at: Option<Instant>,
}

impl Inner {
    /// A transaction item that fails unless `token` holds the partition's lease, and extends
    /// the lease by its duration when the transaction commits (so a busy partition needs no
    /// separate renewals; `extended` records it).
    pub(super) fn lease_fence(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
    ) -> TransactWriteItem {
        let duration = self
            .lease_terms
            .lock()
            .expect("lease terms lock")
            .get(&token.0)
            .map(|term| term.duration);
        let Some(duration) = duration else {
            return TransactWriteItem::builder()
                .condition_check(
                    ConditionCheck::builder()
                        .table_name(&self.table)
                        .set_key(Some(schema::lease_key(partition)))
                        .condition_expression("#token = :token")
                        .expression_attribute_names("#token", "token")
                        .expression_attribute_values(":token", s(&token.0))
                        .build()
                        .expect("complete condition check"),
                )
                .build();
        };
        let until = now_millis() + duration.as_millis() as u64;
        TransactWriteItem::builder()
            .update(
                Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(schema::lease_key(partition)))
                    .update_expression("SET lease_until = :until")
                    .condition_expression("#token = :token")
                    .expression_attribute_names("#token", "token")
                    .expression_attribute_values(":token", s(&token.0))
                    .expression_attribute_values(":until", n(until))
                    .build()
                    .expect("complete update"),
            )
            .build()
    }

    /// Records that a fenced write sent at `sent` committed.
    pub(super) fn extended(&self, token: &LeaseToken, sent: Instant) {
        if let Some(term) = self
            .lease_terms
            .lock()
            .expect("lease terms lock")
            .get_mut(&token.0)
        {
            term.extended_at = Some(term.extended_at.map_or(sent, |at| at.max(sent)));
        }
    }

    /// Forgets a lease this instance no longer holds.
    pub(super) fn forget_lease(&self, token: &LeaseToken) {
        self.lease_terms
            .lock()
            .expect("lease terms lock")
            .remove(&token.0);
    }
}

#[async_trait]
impl PartitionLeases for DynamoStore {
    async fn claim(
        &self,
        partition: &PartitionKey,
        duration: Duration,
    ) -> Result<Option<LeaseToken>, StoreError> {
        let now = now_millis();
        let token = LeaseToken::generate();
        let mut item = schema::lease_key(partition);
        item.insert("owner".into(), s(&self.instance));
        item.insert("token".into(), s(&token.0));
        item.insert("lease_until".into(), n(now + duration.as_millis() as u64));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk) OR lease_until < :now")
            .expression_attribute_values(":now", n(now))
            .send()
            .await;
        match result {
            Ok(_) => {
                self.lease_terms.lock().expect("lease terms lock").insert(
                    token.0.clone(),
                    LeaseTerm {
                        duration,
                        extended_at: None,
                    },
                );
                Ok(Some(token))
            }
            Err(error) if is_condition_failure(&error) => Ok(None),
            Err(error) => Err(sdk_error(error)),
        }
    }

    async fn renew(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        duration: Duration,
    ) -> Result<bool, StoreError> {
        let until = now_millis() + duration.as_millis() as u64;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(schema::lease_key(partition)))
            .update_expression("SET lease_until = :until")
            .condition_expression("#token = :token")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":token", s(&token.0))
            .expression_attribute_values(":until", n(until))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) if is_condition_failure(&error) => {
                self.forget_lease(token);
                Ok(false)
            }
            Err(error) => Err(sdk_error(error)),
        }
    }

    fn extended_at(&self, token: &LeaseToken) -> Option<Instant> {
        self.lease_terms
            .lock()
            .expect("lease terms lock")
            .get(&token.0)
            .and_then(|term| term.extended_at)
    }

    async fn release(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        handover: bool,
    ) -> Result<(), StoreError> {
        self.forget_lease(token);
        let result = if handover {
            self.client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(schema::lease_key(partition)))
                .update_expression("SET lease_until = :expired")
                .condition_expression("#token = :token")
                .expression_attribute_names("#token", "token")
                .expression_attribute_values(":token", s(&token.0))
                .expression_attribute_values(":expired", n(0))
                .send()
                .await
                .map(|_| ())
                .map_err(|error| (is_condition_failure(&error), sdk_error(error)))
        } else {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(schema::lease_key(partition)))
                .condition_expression("#token = :token")
                .expression_attribute_names("#token", "token")
                .expression_attribute_values(":token", s(&token.0))
                .send()
                .await
                .map(|_| ())
                .map_err(|error| (is_condition_failure(&error), sdk_error(error)))
        };
        match result {
            Ok(()) | Err((true, _)) => Ok(()),
            Err((false, error)) => Err(error),
        }
    }
}
