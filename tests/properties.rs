//! Property tests (proptest) of everything that parses or matches hostile input: request
//! validation, topic patterns and the topic index, subscription filters, page tokens, stored-record decoding, webhook
//! signatures and the endpoint address policy. `make test` runs the default number of cases;
//! `make fuzz` runs 100,000 each (PROPTEST_CASES; clean at that budget on 2026-11-28). A failure found here becomes a regression
//! case below.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use herald::delivery::endpoint_policy::{AddressRules, EndpointPolicy};
use herald::model::{OnExhausted, RetryPolicy, Subscription, pattern_matches};
use herald::store::pages;
use herald::store::records::{self, DeliveryRecord, PartitionRecord};
use herald::store::topic_index::TopicIndex;
use herald::{signing, validate};
use proptest::prelude::*;

/// Topic-like text, mostly valid, sometimes not.
fn topic_text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9][a-z0-9_.:-]{0,20}", "[a-z:]{1,6}", any::<String>(),]
}

fn pattern_text() -> impl Strategy<Value = String> {
    prop_oneof![
        topic_text(),
        "[a-z:]{0,6}".prop_map(|prefix| format!("{prefix}*")),
        Just("*".to_string()),
    ]
}

/// Topics, and subscriptions whose patterns are mostly derived from them (a topic itself, a
/// prefix of one followed by `*`, or `*`), so that most cases have matches to get right; a few
/// are arbitrary.
fn topics_and_patterns() -> impl Strategy<Value = (Vec<String>, Vec<Vec<String>>)> {
    proptest::collection::vec(topic_text(), 1..8).prop_flat_map(|topics| {
        let count = topics.len();
        let derived = (0..count, 0..=24usize, 0..4u8).prop_map({
            let topics = topics.clone();
            move |(index, cut, kind)| {
                let topic = &topics[index];
                let mut end = cut.min(topic.len());
                while !topic.is_char_boundary(end) {
                    end -= 1;
                }
                match kind {
                    0 | 1 => topic.clone(),
                    2 => format!("{}*", &topic[..end]),
                    _ => "*".to_string(),
                }
            }
        });
        let pattern = prop_oneof![4 => derived, 1 => pattern_text()];
        let subscriptions =
            proptest::collection::vec(proptest::collection::vec(pattern, 1..4), 0..12);
        (Just(topics), subscriptions)
    })
}

fn subscription(id: usize, topics: Vec<String>) -> Subscription {
    Subscription {
        id: format!("sub_{id}"),
        endpoint: "http://127.0.0.1:9/".into(),
        topics,
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        retry_policy: RetryPolicy::default(),
        on_exhausted: OnExhausted::DeadLetter,
        created_at: 0,
        control: Default::default(),
        previous_secret: None,
        pacing: Default::default(),
        filter: None,
    }
}

proptest! {
    #[test]
    fn validation_never_panics_and_accepted_topics_are_well_formed(text in any::<String>()) {
        if validate::topic("topic", &text).is_ok() {
            prop_assert!(!text.is_empty() && text.len() <= 128);
            prop_assert!(text.bytes().all(|byte| byte.is_ascii_lowercase()
                || byte.is_ascii_digit() || b"_.:-".contains(&byte)));
        }
        let _ = validate::pattern(&text);
        let _ = validate::endpoint(&text);
        let _ = validate::secret(&text);
        let _ = validate::content_type(&text);
        let _ = validate::idempotency_key(&text);
        let _ = validate::attributes(&BTreeMap::from([(text.clone(), text.clone())]));
    }

    #[test]
    fn the_topic_index_matches_exactly_what_the_patterns_match(
        (topics, subscriptions) in topics_and_patterns(),
    ) {
        let subscriptions: Vec<Subscription> = subscriptions
            .into_iter()
            .enumerate()
            .map(|(id, patterns)| subscription(id, patterns))
            .collect();
        let mut index = TopicIndex::default();
        for subscription in &subscriptions {
            index.add(subscription);
        }
        for topic in &topics {
            let expected: std::collections::BTreeSet<String> = subscriptions
                .iter()
                .filter(|subscription| subscription.topics.iter().any(|p| pattern_matches(p, topic)))
                .map(|subscription| subscription.id.clone())
                .collect();
            prop_assert_eq!(index.matching(topic), expected);
        }
        // Removing every subscription leaves an index that matches nothing.
        for subscription in &subscriptions {
            index.remove(subscription);
        }
        for topic in &topics {
            prop_assert!(index.matching(topic).is_empty());
        }
    }

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused_without_panic(
        topic in topic_text(), sequence in any::<u64>(), garbage in any::<String>()
    ) {
        let token = pages::encode_pending_token(&topic, sequence);
        if !topic.contains('#') {
            prop_assert_eq!(pages::decode_pending_token(&token).unwrap(), (topic.clone(), sequence));
        }
        prop_assert_eq!(
            pages::decode_subscription_token(&pages::encode_subscription_token(&topic)).unwrap(),
            topic
        );
        let _ = pages::decode_pending_token(&garbage);
        let _ = pages::decode_subscription_token(&garbage);
    }

    #[test]
    fn filters_compile_and_evaluate_without_panic(
        source in prop_oneof![
            any::<String>(),
            "[a-z.()\"=!&| ]{0,40}",
            "attributes\\.[a-z]{1,4} (==|!=|<|>) \"[a-z]{0,3}\"( (&&|\\|\\|) topic\\.startsWith\\(\"[a-z:]{0,4}\"\\))?",
        ],
        attributes in proptest::collection::btree_map("[a-z]{1,4}", "[a-z]{0,3}", 0..4),
        topic in topic_text(),
    ) {
        if let Ok(filter) = herald::filter::Filter::compile(&source) {
            let _ = filter.matches(&herald::filter::Bindings::new(&topic, &attributes));
        }
        let _ = validate::filter(&source);
    }

    #[test]
    fn delivery_records_round_trip(
        attempts in any::<u32>(),
        next_attempt_at in any::<u64>(),
        previous_sequence in any::<u64>(),
        dead_lettered in any::<bool>(),
        last_error in proptest::option::of(any::<String>()),
        redelivery in proptest::option::of("[a-z]{0,8}"),
    ) {
        let mut record = DeliveryRecord::new(next_attempt_at, previous_sequence);
        record.attempts = attempts;
        record.dead_lettered = dead_lettered;
        if let Some(error) = &last_error {
            record.set_error(error);
        }
        record.redelivery = redelivery;
        prop_assert_eq!(DeliveryRecord::decode(&record.encode()).unwrap(), record);
    }

    #[test]
    fn decoding_arbitrary_stored_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = DeliveryRecord::decode(&bytes);
        let _ = records::IdempotencyRecord::decode(&bytes);
        let _ = records::decode_subscription(&bytes, "subscription");
        let _ = records::decode_event("t", 1, &bytes);
        let _ = PartitionRecord::decode(&bytes);
    }

    #[test]
    fn signatures_verify_only_the_signed_message(
        id in "[a-z0-9_]{1,30}",
        timestamp in any::<u32>(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        flip in any::<usize>(),
        header in any::<String>(),
    ) {
        let key = signing::decode_secret(&signing::generate_secret()).unwrap();
        let timestamp = u64::from(timestamp);
        let signature = signing::sign(&key, &id, timestamp, &body);
        prop_assert!(signing::verify(&key, &id, timestamp, &body, &signature));
        if !body.is_empty() {
            let mut tampered = body.clone();
            tampered[flip % body.len()] ^= 1;
            prop_assert!(!signing::verify(&key, &id, timestamp, &tampered, &signature));
        }
        let _ = signing::verify(&key, &id, timestamp, &body, &header);
        let _ = signing::decode_secret(&header);
    }

    #[test]
    fn an_address_refused_as_ipv4_is_refused_in_its_ipv6_forms(octets in any::<[u8; 4]>(), public_only in any::<bool>()) {
        let rules = AddressRules {
            policy: if public_only { EndpointPolicy::PublicOnly } else { EndpointPolicy::AllowPrivate },
            allow: Vec::new(),
        };
        let v4 = Ipv4Addr::from(octets);
        if rules.check(IpAddr::V4(v4)).is_err() {
            let [a, b, c, d] = octets;
            let mapped = v4.to_ipv6_mapped();
            let nat64 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
            let six_to_four = Ipv6Addr::new(0x2002, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]), 0, 0, 0, 0, 1);
            for form in [mapped, nat64, six_to_four] {
                prop_assert!(rules.check(IpAddr::V6(form)).is_err(), "{} allowed as {}", v4, form);
            }
        }
    }
}
