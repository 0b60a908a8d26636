//! The operator's calls: a subscription's status, pause and resume, retry-now and skip,
//! dead letters (redrive, purge) and replay.

use std::sync::Arc;

use super::{Broker, require_id};
use crate::error::Error;
use crate::model::{
    OnExhausted, Page, PartitionKey, PartitionStatus, ReplayRange, Replayed, Subscription,
    SubscriptionState, UnixMillis, now_millis,
};
use crate::store::SubscriptionUpdate;
use crate::validate;

/// Longest reason an operator may give for a pause.
const MAX_REASON_LEN: usize = 256;

/// What a partition is doing, as the status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionState {
    /// Nothing pending.
    Idle,
    /// Sending; the head has not failed yet.
    Delivering,
    /// The head failed and waits for its next attempt.
    Retrying,
    /// The head used up its attempts under the BLOCK policy.
    Blocked,
    /// The partition or its subscription is paused or disabled.
    Paused,
}

/// The state of one partition of `subscription`.
pub fn partition_state(subscription: &Subscription, status: &PartitionStatus) -> PartitionState {
    if !subscription.control.sends(&status.partition.topic) {
        return PartitionState::Paused;
    }
    match &status.head {
        None => PartitionState::Idle,
        Some(head) if head.state.attempts == 0 => PartitionState::Delivering,
        Some(head)
            if subscription.on_exhausted == OnExhausted::Block
                && head.state.attempts >= subscription.retry_policy.max_attempts =>
        {
            PartitionState::Blocked
        }
        Some(_) => PartitionState::Retrying,
    }
}

/// The HTTP status at the start of a recorded error (`HTTP 503 Service Unavailable: ...`).
pub fn http_status(error: &str) -> Option<u16> {
    let code = error.strip_prefix("HTTP ")?.get(..3)?;
    code.parse().ok().filter(|code| (100..600).contains(code))
}

impl Broker {
    /// A subscription and a page of its partitions' status.
    pub async fn subscription_status(
        &self,
        id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Subscription, Page<PartitionStatus>), Error> {
        require_id("subscription_id", id)?;
        let page_size = validate::page_size(page_size)?;
        let token = Some(page_token).filter(|token| !token.is_empty());
        let subscription = self.subscriptions.get_subscription(id).await?;
        let page = self.log.partition_status(id, page_size, token).await?;
        Ok((subscription, page))
    }

    /// Pauses a subscription, or its partition of `topic`.
    pub async fn pause(&self, id: &str, topic: &str, reason: &str) -> Result<Subscription, Error> {
        require_id("subscription_id", id)?;
        if reason.chars().count() > MAX_REASON_LEN {
            return Err(Error::invalid(
                "reason",
                format!("at most {MAX_REASON_LEN} characters"),
            ));
        }
        let topic = self.received_topic(id, topic, false).await?;
        let reason = if reason.is_empty() {
            "paused by an operator".to_string()
        } else {
            reason.to_string()
        };
        let update: SubscriptionUpdate = Arc::new(move |subscription| {
            let control = &mut subscription.control;
            match &topic {
                Some(topic) => {
                    control.paused_topics.insert(topic.clone());
                }
                None => {
                    if control.state != SubscriptionState::Paused {
                        control.state = SubscriptionState::Paused;
                        control.reason = reason.clone();
                        control.since = now_millis();
                    }
                }
            }
            Ok(())
        });
        self.change_control(id, update).await
    }

    /// Resumes a subscription (and each of its partitions paused on its own), or only its
    /// partition of `topic`.
    pub async fn resume(&self, id: &str, topic: &str) -> Result<Subscription, Error> {
        require_id("subscription_id", id)?;
        let topic = self.received_topic(id, topic, true).await?;
        let update: SubscriptionUpdate = Arc::new(move |subscription| {
            let control = &mut subscription.control;
            match &topic {
                Some(topic) => {
                    control.paused_topics.remove(topic);
                }
                None => {
                    control.paused_topics.clear();
                    if control.state != SubscriptionState::Active {
                        control.state = SubscriptionState::Active;
                        control.reason.clear();
                        control.since = now_millis();
                    }
                }
            }
            Ok(())
        });
        self.change_control(id, update).await
    }

    /// Makes the head of the partition of `topic` due now; returns its sequence (0 if
    /// nothing is pending).
    pub async fn retry_now(&self, id: &str, topic: &str) -> Result<u64, Error> {
        require_id("subscription_id", id)?;
        let partition = self.partition(id, topic).await?;
        let sequence = self.log.retry_now(&partition).await?;
        self.engine.notify(std::slice::from_ref(&partition));
        Ok(sequence.unwrap_or(0))
    }

    /// Dead-letters the head of the partition of `topic`, if it is the event of `sequence`.
    pub async fn skip_head(&self, id: &str, topic: &str, sequence: u64) -> Result<(), Error> {
        require_id("subscription_id", id)?;
        if sequence == 0 {
            return Err(Error::invalid(
                "sequence",
                "must be the head's sequence, as GetSubscriptionStatus shows it",
            ));
        }
        let partition = self.partition(id, topic).await?;
        self.log.skip_head(&partition, sequence).await?;
        self.engine.metrics().dead_lettered();
        self.engine.notify(std::slice::from_ref(&partition));
        Ok(())
    }

    /// Puts dead letters back in front of the partition (all of them if `sequences` is
    /// empty); returns how many.
    pub async fn redrive(&self, id: &str, topic: &str, sequences: &[u64]) -> Result<u64, Error> {
        require_id("subscription_id", id)?;
        let sequences = dead_letter_selection(sequences)?;
        let partition = self.partition(id, topic).await?;
        let count = self.log.redrive(&partition, sequences).await?;
        self.engine.notify(std::slice::from_ref(&partition));
        Ok(count)
    }

    /// Deletes dead letters (all of the partition's if `sequences` is empty); returns how
    /// many.
    pub async fn purge(&self, id: &str, topic: &str, sequences: &[u64]) -> Result<u64, Error> {
        require_id("subscription_id", id)?;
        let sequences = dead_letter_selection(sequences)?;
        let partition = self.partition(id, topic).await?;
        Ok(self.log.purge(&partition, sequences).await?)
    }

    /// Queues a partition's retained events of a range to be sent again (see
    /// [`crate::store::DeliveryLog::replay`]). `start` is required; `end` defaults to now.
    pub async fn replay(
        &self,
        id: &str,
        topic: &str,
        start: Option<ReplayBound>,
        end: Option<ReplayBound>,
        limit: i32,
    ) -> Result<Replayed, Error> {
        require_id("subscription_id", id)?;
        let limit = match limit {
            0 => DEFAULT_REPLAY_LIMIT,
            limit if limit < 0 || limit as usize > MAX_REPLAY_LIMIT => {
                return Err(Error::invalid(
                    "limit",
                    format!("must be between 1 and {MAX_REPLAY_LIMIT} (0: {DEFAULT_REPLAY_LIMIT})"),
                ));
            }
            limit => limit as usize,
        };
        let subscription = self.subscriptions.get_subscription(id).await?;
        let partition = self.partition(id, topic).await?;
        let now = now_millis();
        let mut range = ReplayRange {
            from_sequence: 0,
            to_sequence: u64::MAX,
            // Events before the subscription existed were never the partition's.
            from_time: subscription.created_at,
            to_time: now,
            limit,
            filter: subscription.filter.clone(),
        };
        match start {
            Some(ReplayBound::Sequence(sequence)) => range.from_sequence = sequence,
            Some(ReplayBound::Time(time)) => range.from_time = range.from_time.max(time),
            None => {
                return Err(Error::invalid(
                    "from_sequence",
                    "set from_sequence or from_time: where the replay starts",
                ));
            }
        }
        match end {
            Some(ReplayBound::Sequence(sequence)) => range.to_sequence = sequence,
            Some(ReplayBound::Time(time)) => range.to_time = time.min(now),
            None => {}
        }
        if range.from_sequence > range.to_sequence {
            return Err(Error::invalid(
                "to_sequence",
                "must not be below from_sequence",
            ));
        }
        if matches!((start, end), (Some(ReplayBound::Time(from)), Some(ReplayBound::Time(to))) if from > to)
        {
            return Err(Error::invalid("to_time", "must not be before from_time"));
        }
        let replayed = self.log.replay(&partition, &range).await?;
        if replayed.count > 0 {
            self.engine.notify(std::slice::from_ref(&partition));
        }
        Ok(replayed)
    }

    /// The partition of `topic` of an existing subscription that receives it
    /// (`INVALID_ARGUMENT` for a topic it does not receive: a replay there would send it
    /// events it never subscribed to).
    async fn partition(&self, id: &str, topic: &str) -> Result<PartitionKey, Error> {
        match self.received_topic(id, topic, false).await? {
            Some(topic) => Ok(PartitionKey::new(topic, id)),
            None => Err(Error::invalid("topic", "must not be empty")),
        }
    }

    /// Checks that the subscription exists and, if `topic` is given, that it receives it
    /// (with `lenient`, only that it is a well-formed topic). `None` for an empty topic.
    async fn received_topic(
        &self,
        id: &str,
        topic: &str,
        lenient: bool,
    ) -> Result<Option<String>, Error> {
        let subscription = self.subscriptions.get_subscription(id).await?;
        if topic.is_empty() {
            return Ok(None);
        }
        validate::topic("topic", topic)?;
        if !lenient && !subscription.matches(topic) {
            return Err(Error::invalid(
                "topic",
                format!(
                    "subscription {id} does not receive topic `{topic}` (its patterns: {})",
                    subscription.topics.join(", ")
                ),
            ));
        }
        Ok(Some(topic.to_string()))
    }

    /// Applies a control change and wakes the subscription's partitions on this instance
    /// (those on other instances see it at their next check).
    pub(super) async fn change_control(
        &self,
        id: &str,
        update: SubscriptionUpdate,
    ) -> Result<Subscription, Error> {
        Ok(self.change_subscription(id, update).await?.subscription)
    }

    /// Applies `update` to the subscription (see [`Broker::change_control`]); also says how
    /// many deliveries a change of topics dropped.
    pub(super) async fn change_subscription(
        &self,
        id: &str,
        update: SubscriptionUpdate,
    ) -> Result<crate::store::Updated, Error> {
        // In its own task, so that a client giving up does not stop it halfway: the local
        // partitions learn of a committed change whether or not the caller is still there.
        let subscriptions = self.subscriptions.clone();
        let engine = self.engine.clone();
        let owned = id.to_string();
        let subscription = tokio::spawn(async move {
            let result = subscriptions.update_subscription(&owned, update).await;
            engine.subscription_changed(&owned);
            result
        })
        .await
        .map_err(|error| Error::Internal(format!("update task failed: {error}")))??;
        Ok(subscription)
    }
}

/// Where a replay starts or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayBound {
    /// An event's sequence.
    Sequence(u64),
    /// A publish time.
    Time(UnixMillis),
}

/// Events one Replay call queues unless told otherwise, and at most.
const DEFAULT_REPLAY_LIMIT: usize = 1000;
const MAX_REPLAY_LIMIT: usize = 10_000;

/// Most dead letters one call names.
const MAX_SELECTED: usize = 1000;

/// The named dead letters, or `None` for all of them.
fn dead_letter_selection(sequences: &[u64]) -> Result<Option<&[u64]>, Error> {
    if sequences.len() > MAX_SELECTED {
        return Err(Error::invalid(
            "sequences",
            format!(
                "{} sequences named; at most {MAX_SELECTED} per call (or none for all)",
                sequences.len()
            ),
        ));
    }
    if sequences.contains(&0) {
        return Err(Error::invalid("sequences", "0 is not a sequence"));
    }
    Ok(Some(sequences).filter(|sequences| !sequences.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_are_read_from_recorded_errors() {
        assert_eq!(http_status("HTTP 503 Service Unavailable: busy"), Some(503));
        assert_eq!(http_status("HTTP 404 Not Found"), Some(404));
        assert_eq!(http_status("connection refused"), None);
        assert_eq!(http_status("HTTP abc"), None);
        assert_eq!(http_status("HTTP 99"), None);
    }
}
