//! Reads the delivery path shares between partitions: a bounded cache of event items (an
//! event is immutable, and a fan-out of 100 would otherwise read it 100 times), and topic
//! horizon reads shared by the partitions of a topic that ask at the same moment.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::Inner;
use super::fanout::Horizon;
use crate::model::Event;
use crate::store::StoreError;

/// Bytes of event payloads and attributes the cache holds at most.
const EVENT_CACHE_BYTES: usize = 32 << 20;

/// Recently published or read events, oldest evicted first, each with the number of
/// deliveries that referred to it when it was cached (they only go down: a completion that
/// finds 1 holds the last reference).
#[derive(Default)]
pub(super) struct EventCache {
    events: HashMap<(String, u64), (Event, u64)>,
    order: VecDeque<(String, u64)>,
    bytes: usize,
}

fn size(event: &Event) -> usize {
    event.payload.len()
        + event
            .attributes
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum::<usize>()
        + 256
}

impl EventCache {
    pub(super) fn insert(&mut self, event: Event, pending: u64) {
        let key = (event.topic.clone(), event.sequence);
        if self.events.contains_key(&key) {
            return;
        }
        self.bytes += size(&event);
        self.events.insert(key.clone(), (event, pending));
        self.order.push_back(key);
        while self.bytes > EVENT_CACHE_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some((evicted, _)) = self.events.remove(&oldest) {
                self.bytes -= size(&evicted);
            }
        }
    }

    pub(super) fn get(&self, topic: &str, sequence: u64) -> Option<Event> {
        self.events
            .get(&(topic.to_string(), sequence))
            .map(|(event, _)| event.clone())
    }

    /// How many deliveries referred to the event when it was cached.
    pub(super) fn pending(&self, topic: &str, sequence: u64) -> Option<u64> {
        self.events
            .get(&(topic.to_string(), sequence))
            .map(|(_, pending)| *pending)
    }
}

/// One shared read of a topic's horizon: callers join it until it starts.
#[derive(Default)]
pub(super) struct Wave {
    result: tokio::sync::OnceCell<Result<Option<Horizon>, StoreError>>,
}

/// A topic's waiting wave, and the lock that lets one of its reads run at a time.
pub(super) struct TopicReads {
    waiting: Arc<Wave>,
    reader: Arc<tokio::sync::Mutex<()>>,
}

impl Inner {
    /// The topic's delivery horizon, from a read that starts after this call does (so it
    /// sees every publish committed before the call). Concurrent callers on one topic share
    /// reads: while one read is in flight, later callers wait together for the next.
    pub(super) async fn shared_horizon(&self, topic: &str) -> Result<Option<Horizon>, StoreError> {
        let (wave, reader) = {
            let mut reads = self.horizon_reads.lock().expect("horizon lock");
            let entry = reads
                .entry(topic.to_string())
                .or_insert_with(|| TopicReads {
                    waiting: Arc::new(Wave::default()),
                    reader: Arc::new(tokio::sync::Mutex::new(())),
                });
            (entry.waiting.clone(), entry.reader.clone())
        };
        wave.result
            .get_or_init(|| async {
                let _one_read_at_a_time = reader.lock().await;
                // From here on newcomers need a read that starts after them: the next wave.
                if let Some(entry) = self
                    .horizon_reads
                    .lock()
                    .expect("horizon lock")
                    .get_mut(topic)
                    && Arc::ptr_eq(&entry.waiting, &wave)
                {
                    entry.waiting = Arc::new(Wave::default());
                }
                self.delivery_horizon(topic).await
            })
            .await
            .clone()
    }
}
