//! Subscribe on DynamoDB, batched: concurrent Subscribe calls on one instance share one
//! transaction (the version item moves once for all of them), then each waits out the
//! subscription-set copies other instances may hold.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
use tokio::sync::oneshot;

use super::errors::{cancellation_reasons, conflict_pause, refused, sdk_error};
use super::schema::{self, n, s};
use super::subscriptions::{Tracking, check_tracked, settle_time};
use super::{Inner, MAX_CONFLICT_RETRIES, TRANSACTION_LIMIT};
use crate::model::Subscription;
use crate::store::records;
use crate::store::{StoreError, SubscriptionLimits};

/// A Subscribe call waiting for a commit.
pub(super) struct PendingCreate {
    subscription: Subscription,
    limits: SubscriptionLimits,
    /// The table's cache validity once committed.
    reply: oneshot::Sender<Result<Duration, StoreError>>,
}

/// Creates `subscription`: joins the pending creates, commits them all if no other call is
/// committing (else a committing call takes this one too), and returns once other
/// instances' copies of the set read before the commit have expired.
pub(super) async fn create(
    inner: Arc<Inner>,
    subscription: Subscription,
    limits: SubscriptionLimits,
) -> Result<(), StoreError> {
    let (reply, outcome) = oneshot::channel();
    inner
        .creates
        .lock()
        .expect("creates lock")
        .push(PendingCreate {
            subscription,
            limits,
            reply,
        });
    {
        let _one_at_a_time = inner.changes.lock().await;
        let pending = std::mem::take(&mut *inner.creates.lock().expect("creates lock"));
        for chunk in chunks(pending) {
            inner.commit_creates(chunk).await;
        }
    }
    let validity = outcome
        .await
        .map_err(|_| StoreError::Internal("the subscription commit stopped".into()))??;
    // Until every copy of the set read before this change has expired, another instance may
    // still publish without this subscription.
    tokio::time::sleep(settle_time(validity)).await;
    Ok(())
}

/// Splits creates into transactions (the version item takes one place of each).
fn chunks(mut pending: Vec<PendingCreate>) -> Vec<Vec<PendingCreate>> {
    let mut chunks = Vec::new();
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(TRANSACTION_LIMIT - 1));
        chunks.push(pending);
        pending = rest;
    }
    chunks
}

impl Inner {
    /// Commits creates in one transaction with the version bump, retrying lost races;
    /// answers each.
    async fn commit_creates(&self, mut batch: Vec<PendingCreate>) {
        for attempt in 0..MAX_CONFLICT_RETRIES {
            let accepted = match self.admit(&mut batch).await {
                Ok(accepted) => accepted,
                Err(error) => return answer_all(batch, error),
            };
            if accepted.is_empty() {
                return;
            }
            batch = accepted;
            let meta = match self.read_meta().await {
                Ok(meta) => meta,
                Err(error) => return answer_all(batch, error),
            };
            let version = meta.version;
            let mut items = vec![self.bump_version(version)];
            items.extend(
                batch
                    .iter()
                    .map(|pending| self.put_subscription(&pending.subscription, version + 1)),
            );
            let sent = Instant::now();
            match self.transact(items).await {
                Ok(()) => {
                    self.apply_own_change(version, sent, |set| {
                        for pending in &batch {
                            let subscription = &pending.subscription;
                            let tracking = subscription.filter.is_some().then(|| Tracking {
                                since: version + 1,
                                topics_before: Vec::new(),
                            });
                            set.insert(subscription, version + 1, tracking);
                        }
                    });
                    for pending in batch {
                        let _ = pending.reply.send(Ok(meta.validity));
                    }
                    return;
                }
                Err(error) => match cancellation_reasons(&error) {
                    Some(reasons) if refused(&reasons).is_some() => {
                        let error = refused(&reasons).expect("checked");
                        return answer_all(batch, error);
                    }
                    Some(reasons) => {
                        let exists = |index: usize| {
                            reasons.get(index + 1).map(String::as_str)
                                == Some("ConditionalCheckFailed")
                        };
                        if (0..batch.len()).any(exists) {
                            let mut kept = Vec::new();
                            for (index, pending) in batch.into_iter().enumerate() {
                                if exists(index) {
                                    let id = pending.subscription.id.clone();
                                    let _ = pending.reply.send(Err(StoreError::Conflict(format!(
                                        "subscription {id} already exists"
                                    ))));
                                } else {
                                    kept.push(pending);
                                }
                            }
                            batch = kept;
                        } else {
                            conflict_pause(attempt).await;
                        }
                    }
                    None => return answer_all(batch, sdk_error(error)),
                },
            }
        }
        answer_all(
            batch,
            StoreError::Contention(
                "too many concurrent subscription changes; nothing was written".into(),
            ),
        );
    }

    /// Answers the creates that break a limit (counting the ones before them in the batch)
    /// or repeat an id of the batch, and returns the rest.
    async fn admit(
        &self,
        batch: &mut Vec<PendingCreate>,
    ) -> Result<Vec<PendingCreate>, StoreError> {
        let set = self.subscription_set().await?;
        let mut index = set.index.clone();
        let mut total = set.subscriptions.len();
        let mut tracked = set.tracked.len();
        let mut ids = HashSet::new();
        let mut accepted = Vec::new();
        for pending in batch.drain(..) {
            let subscription = &pending.subscription;
            let verdict = if !ids.insert(subscription.id.clone()) {
                Err(StoreError::Conflict(format!(
                    "subscription {} already exists",
                    subscription.id
                )))
            } else {
                pending
                    .limits
                    .check(subscription, total, |pattern| index.with_pattern(pattern))
                    .and_then(|()| match subscription.filter {
                        Some(_) => check_tracked(tracked, self.tracked_limit),
                        None => Ok(()),
                    })
            };
            match verdict {
                Ok(()) => {
                    index.add(subscription);
                    total += 1;
                    tracked += usize::from(subscription.filter.is_some());
                    accepted.push(pending);
                }
                Err(error) => {
                    let _ = pending.reply.send(Err(error));
                }
            }
        }
        Ok(accepted)
    }

    fn put_subscription(&self, subscription: &Subscription, version: u64) -> TransactWriteItem {
        let mut item = schema::subscription_key(&subscription.id);
        item.insert(
            "data".into(),
            s(
                String::from_utf8(records::encode_subscription(subscription))
                    .expect("JSON is UTF-8"),
            ),
        );
        item.insert("version".into(), n(version));
        TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(pk)")
                    .build()
                    .expect("complete put"),
            )
            .build()
    }
}

fn answer_all(batch: Vec<PendingCreate>, error: StoreError) {
    for pending in batch {
        let _ = pending.reply.send(Err(error.clone()));
    }
}
