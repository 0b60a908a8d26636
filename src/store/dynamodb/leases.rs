//! Partition leases on DynamoDB: one item per partition, spread over a few shard keys so the
//! rescan can list expired ones with a query per shard.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{ConditionCheck, TransactWriteItem};

use super::errors::{is_condition_failure, sdk_error};
use super::schema::{self, n, s};
use super::{DynamoStore, Inner};
use crate::model::{PartitionKey, now_millis};
use crate::store::{LeaseToken, PartitionLeases, StoreError};

impl Inner {
    /// A transaction item that fails unless `token` holds the partition's lease.
    pub(super) fn lease_check(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
    ) -> TransactWriteItem {
        TransactWriteItem::builder()
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
            .build()
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
            Ok(_) => Ok(Some(token)),
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
            Err(error) if is_condition_failure(&error) => Ok(false),
            Err(error) => Err(sdk_error(error)),
        }
    }

    async fn release(
        &self,
        partition: &PartitionKey,
        token: &LeaseToken,
        handover: bool,
    ) -> Result<(), StoreError> {
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
