//! In-memory index from topics to the subscriptions whose patterns match them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::filter::{Bindings, Filter};
use crate::model::Subscription;

/// Which subscriptions each topic fans out to: exact names and prefix patterns (`*` is the
/// empty prefix). A lookup costs one probe per prefix of the topic, never a pass over all
/// subscriptions.
#[derive(Default, Clone)]
pub struct TopicIndex {
    exact: HashMap<String, BTreeSet<String>>,
    prefixes: BTreeMap<String, BTreeSet<String>>,
    /// The compiled filters of the subscriptions that have one.
    filters: HashMap<String, Filter>,
}

impl TopicIndex {
    /// Adds a subscription under each of its patterns.
    pub fn add(&mut self, subscription: &Subscription) {
        for pattern in &subscription.topics {
            let bucket = match pattern.strip_suffix('*') {
                Some(prefix) => self.prefixes.entry(prefix.to_string()).or_default(),
                None => self.exact.entry(pattern.clone()).or_default(),
            };
            bucket.insert(subscription.id.clone());
        }
        if let Some(source) = &subscription.filter {
            match Filter::compile(source) {
                Ok(filter) => {
                    self.filters.insert(subscription.id.clone(), filter);
                }
                // Checked when it was set; a filter this build cannot compile matches
                // everything rather than losing events.
                Err(error) => tracing::error!(
                    subscription = %subscription.id,
                    %error,
                    "stored filter does not compile; it is ignored"
                ),
            }
        }
    }

    /// Removes a subscription from each of its patterns.
    pub fn remove(&mut self, subscription: &Subscription) {
        self.filters.remove(&subscription.id);
        for pattern in &subscription.topics {
            let (key, map_is_prefix) = match pattern.strip_suffix('*') {
                Some(prefix) => (prefix, true),
                None => (pattern.as_str(), false),
            };
            let bucket = if map_is_prefix {
                self.prefixes.get_mut(key)
            } else {
                self.exact.get_mut(key)
            };
            if let Some(bucket) = bucket {
                bucket.remove(&subscription.id);
                if bucket.is_empty() {
                    if map_is_prefix {
                        self.prefixes.remove(key);
                    } else {
                        self.exact.remove(key);
                    }
                }
            }
        }
    }

    /// How many subscriptions hold `pattern` itself.
    pub fn with_pattern(&self, pattern: &str) -> usize {
        match pattern.strip_suffix('*') {
            Some(prefix) => self.prefixes.get(prefix).map_or(0, BTreeSet::len),
            None => self.exact.get(pattern).map_or(0, BTreeSet::len),
        }
    }

    /// Subscription ids matching `topic`, sorted and without duplicates.
    pub fn matching(&self, topic: &str) -> BTreeSet<String> {
        let mut matched = BTreeSet::new();
        if let Some(ids) = self.exact.get(topic) {
            matched.extend(ids.iter().cloned());
        }
        if !self.prefixes.is_empty() {
            for end in (0..=topic.len()).filter(|end| topic.is_char_boundary(*end)) {
                if let Some(ids) = self.prefixes.get(&topic[..end]) {
                    matched.extend(ids.iter().cloned());
                }
            }
        }
        matched
    }

    /// Subscription ids matching `topic` whose filter (if any) matches the event with these
    /// attributes, sorted and without duplicates.
    pub fn matching_event(
        &self,
        topic: &str,
        attributes: &BTreeMap<String, String>,
    ) -> BTreeSet<String> {
        let mut matched = self.matching(topic);
        if !self.filters.is_empty() {
            let mut bindings = None;
            matched.retain(|id| match self.filters.get(id) {
                Some(filter) => {
                    filter.matches(bindings.get_or_insert_with(|| Bindings::new(topic, attributes)))
                }
                None => true,
            });
        }
        matched
    }

    /// Whether the subscription has a filter.
    pub fn has_filter(&self, id: &str) -> bool {
        self.filters.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{OnExhausted, RetryPolicy};

    fn subscription(id: &str, topics: &[&str]) -> Subscription {
        Subscription {
            id: id.into(),
            endpoint: "http://127.0.0.1:1/".into(),
            topics: topics.iter().map(|topic| topic.to_string()).collect(),
            secret: "whsec_x".into(),
            retry_policy: RetryPolicy::default(),
            on_exhausted: OnExhausted::DeadLetter,
            created_at: 0,
            control: Default::default(),
            previous_secret: None,
            pacing: Default::default(),
            filter: None,
        }
    }

    #[test]
    fn topic_index_matches_exact_prefix_and_wildcard_once_each() {
        let mut index = TopicIndex::default();
        index.add(&subscription("a", &["user:new"]));
        index.add(&subscription("b", &["user:*", "user:new"]));
        index.add(&subscription("c", &["*"]));
        index.add(&subscription("d", &["fin:*"]));
        let matched: Vec<_> = index.matching("user:new").into_iter().collect();
        assert_eq!(matched, ["a", "b", "c"]);
        index.remove(&subscription("b", &["user:*", "user:new"]));
        let matched: Vec<_> = index.matching("user:new").into_iter().collect();
        assert_eq!(matched, ["a", "c"]);
        assert!(!index.prefixes.contains_key("user:"));
    }
}
