//! Reaching and creating the table.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};

use super::errors::sdk_error;
use super::schema;
use super::subscriptions::DEFAULT_CACHE_VALIDITY;
use crate::store::StoreError;

/// How to reach the table.
#[derive(Debug, Clone, Default)]
pub struct DynamoConfig {
    /// Table name.
    pub table: String,
    /// Region; the standard AWS chain decides if `None`.
    pub region: Option<String>,
    /// Endpoint override (a local DynamoDB-compatible server); `AWS_ENDPOINT_URL_DYNAMODB` and
    /// `AWS_ENDPOINT_URL` are honoured too.
    pub endpoint: Option<String>,
}

/// Builds a client from the standard AWS configuration chain (environment, profile, web
/// identity, ECS, EC2), with throttling retried (exponential backoff with jitter, 8 attempts).
pub async fn client_from_env(config: &DynamoConfig) -> Client {
    // Bounded attempts: a request that hangs (a half-open connection) must not hold a worker
    // past its lease, nor a publish forever.
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(
            aws_config::retry::RetryConfig::standard()
                .with_max_attempts(8)
                .with_initial_backoff(Duration::from_millis(25)),
        )
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(3))
                .operation_timeout(Duration::from_secs(20))
                .build(),
        );
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    Client::new(&loader.load().await)
}

/// Creates the table (PAY_PER_REQUEST, `pk`/`sk` string keys, TTL on idempotency keys) and
/// waits until it is active. `Conflict` if it exists already.
pub async fn create_table(client: &Client, table: &str) -> Result<(), StoreError> {
    create_table_with_cache_validity(client, table, DEFAULT_CACHE_VALIDITY).await
}

/// [`create_table`], with the time a copy of the subscription set may be used to fan out
/// publishes (Subscribe and Unsubscribe wait slightly longer than this before they return).
/// Fixed for the life of the table, since every instance must use the same value.
pub async fn create_table_with_cache_validity(
    client: &Client,
    table: &str,
    cache_validity: Duration,
) -> Result<(), StoreError> {
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("complete attribute definition")
    };
    let key = |name: &str, key_type: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(key_type)
            .build()
            .expect("complete key schema")
    };
    let created = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(schema::PK))
        .attribute_definitions(attribute(schema::SK))
        .key_schema(key(schema::PK, KeyType::Hash))
        .key_schema(key(schema::SK, KeyType::Range))
        .send()
        .await;
    if let Err(error) = created {
        if error
            .as_service_error()
            .is_some_and(|error| error.is_resource_in_use_exception())
        {
            return Err(StoreError::Conflict(format!(
                "table {table} already exists"
            )));
        }
        return Err(sdk_error(error));
    }
    for _ in 0..600 {
        let description = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(sdk_error)?;
        let active = description
            .table()
            .and_then(|table| table.table_status())
            .is_some_and(|status| status.as_str() == "ACTIVE");
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name(schema::TTL)
                .build()
                .expect("complete TTL specification"),
        )
        .send()
        .await
        .map_err(sdk_error)?;
    let mut meta = schema::meta_key();
    meta.insert(
        "cache_validity_ms".into(),
        schema::n(cache_validity.as_millis().max(1)),
    );
    client
        .put_item()
        .table_name(table)
        .set_item(Some(meta))
        .send()
        .await
        .map_err(sdk_error)?;
    Ok(())
}
