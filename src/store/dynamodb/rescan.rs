//! Finding partitions with work: topics that changed since the last rescan, and partitions
//! whose lease ran out.

use std::collections::{BTreeSet, HashMap, HashSet};

use aws_sdk_dynamodb::types::AttributeValue;

use super::Inner;
use super::schema::{self, get_n, get_s};
use super::subscriptions::SubscriptionSet;
use crate::model::{PartitionKey, now_millis};
use crate::store::StoreError;

/// What the rescan last saw of a topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TopicMark {
    last_sequence: u64,
    open_fanout: bool,
}

impl Inner {
    /// The last sequence of each of `topics`, and whether a fan-out of it is open.
    pub(super) async fn topic_marks(
        &self,
        topics: &[String],
    ) -> Result<HashMap<String, TopicMark>, StoreError> {
        let keys = topics
            .iter()
            .map(|topic| schema::topic_key(topic))
            .collect();
        let mut sequences = HashMap::new();
        for item in self.batch_get(keys).await? {
            let topic = get_s(&item, schema::PK)?
                .strip_prefix("TOPIC#")
                .ok_or_else(|| StoreError::Corrupt("topic item key".into()))?
                .to_string();
            let open_fanout = matches!(
                item.get("open_fanouts"),
                Some(AttributeValue::Ns(open)) if !open.is_empty()
            );
            sequences.insert(
                topic,
                TopicMark {
                    last_sequence: get_n(&item, "last_seq")?,
                    open_fanout,
                },
            );
        }
        Ok(sequences)
    }

    /// Every topic ever published, in name order.
    pub(super) async fn topics(&self) -> Result<Vec<String>, StoreError> {
        self.query_after(schema::TOPICS_PK, None, usize::MAX)
            .await?
            .iter()
            .map(|item| get_s(item, schema::SK).map(str::to_string))
            .collect()
    }

    /// Adds the partitions whose lease ran out (their holder died, froze or handed over);
    /// returns those with a live lease (their holder reads them itself: a worker reads its
    /// partition once more before it lets the lease go).
    pub(super) async fn expired_leases(
        &self,
        set: &SubscriptionSet,
        found: &mut BTreeSet<PartitionKey>,
    ) -> Result<HashSet<PartitionKey>, StoreError> {
        let now = now_millis();
        let mut live = HashSet::new();
        for shard in 0..schema::LEASE_SHARDS {
            for lease in self
                .query_after(&schema::lease_shard_pk(shard), None, usize::MAX)
                .await?
            {
                let Some(partition) = PartitionKey::decode(get_s(&lease, schema::SK)?) else {
                    continue;
                };
                if get_n(&lease, "lease_until")? >= now {
                    live.insert(partition);
                } else if set.subscriptions.contains_key(&partition.subscription_id) {
                    found.insert(partition);
                }
            }
        }
        Ok(live)
    }

    /// Adds the partitions with pending work among the topics that changed since the last
    /// successful call (all of them on the first), and remembers what it saw.
    ///
    /// Partitions in `leased` (a live lease: their holder looks at them) are not probed; their
    /// topic then keeps its previous mark, so that they are probed at a later rescan once the
    /// lease is gone (a holder can let go right after a publish it did not see).
    pub(super) async fn changed_topics(
        &self,
        set: &SubscriptionSet,
        leased: &HashSet<PartitionKey>,
        found: &mut BTreeSet<PartitionKey>,
    ) -> Result<(), StoreError> {
        let topics = self.topics().await?;
        let mut marks = self.topic_marks(&topics).await?;
        let previous = self.rescanned.lock().expect("rescan lock").clone();
        for topic in &topics {
            let mark = marks.get(topic).copied().unwrap_or_default();
            // Unchanged since the last look, and no fan-out was open then (an open fan-out's
            // remaining deliveries appear without the sequence moving: its publisher or a
            // repair writes them later).
            let unchanged = previous
                .as_ref()
                .and_then(|previous| previous.get(topic))
                .is_some_and(|last| *last == mark && !last.open_fanout);
            if unchanged {
                continue;
            }
            let mut skipped = false;
            for subscription_id in set.index.matching(topic) {
                let partition = PartitionKey::new(topic.as_str(), subscription_id);
                if leased.contains(&partition) {
                    skipped = true;
                    continue;
                }
                if !self
                    .query_after(&partition.encode(), None, 1)
                    .await?
                    .is_empty()
                {
                    found.insert(partition);
                }
            }
            if skipped {
                // Seen as changed again next time.
                match previous.as_ref().and_then(|previous| previous.get(topic)) {
                    Some(last) => marks.insert(topic.clone(), *last),
                    None => marks.remove(topic),
                };
            }
        }
        *self.rescanned.lock().expect("rescan lock") = Some(marks);
        Ok(())
    }
}
