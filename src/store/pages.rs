//! Pages of listings and their opaque tokens (the last item a page returned).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::model::{Page, PartitionStatus, PendingDelivery, Subscription};
use crate::store::StoreError;

/// Cuts `items`, read with one more than `page_size` to learn whether another page follows,
/// to a page whose token names its last item.
fn page<T>(mut items: Vec<T>, page_size: usize, token_of: impl Fn(&T) -> String) -> Page<T> {
    let more = items.len() > page_size;
    items.truncate(page_size);
    let next_token = items.last().filter(|_| more).map(token_of);
    Page { items, next_token }
}

/// A ListSubscriptions page from up to `page_size + 1` subscriptions in id order.
pub fn subscription_page(items: Vec<Subscription>, page_size: usize) -> Page<Subscription> {
    page(items, page_size, |last| encode_subscription_token(&last.id))
}

/// A ListPending page from up to `page_size + 1` deliveries in (topic, sequence) order.
pub fn pending_page(items: Vec<PendingDelivery>, page_size: usize) -> Page<PendingDelivery> {
    page(items, page_size, |last| {
        encode_pending_token(&last.partition.topic, last.event.sequence)
    })
}

/// A partition-status page from up to `page_size + 1` partitions in topic order; the token
/// is the last topic (encoded like a subscription token).
pub fn partition_page(items: Vec<PartitionStatus>, page_size: usize) -> Page<PartitionStatus> {
    page(items, page_size, |last| {
        encode_subscription_token(&last.partition.topic)
    })
}

/// Encodes a ListPending cursor: the last (topic, sequence) returned.
pub fn encode_pending_token(topic: &str, sequence: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{topic}#{sequence}"))
}

/// Inverse of [`encode_pending_token`].
pub fn decode_pending_token(token: &str) -> Result<(String, u64), StoreError> {
    let invalid = || StoreError::InvalidArgument("not a token this server issued".into());
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let (topic, sequence) = text.split_once('#').ok_or_else(invalid)?;
    let sequence = sequence.parse().map_err(|_| invalid())?;
    Ok((topic.to_string(), sequence))
}

/// Encodes a ListSubscriptions cursor: the last id returned.
pub fn encode_subscription_token(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(id)
}

/// Inverse of [`encode_subscription_token`].
pub fn decode_subscription_token(token: &str) -> Result<String, StoreError> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| StoreError::InvalidArgument("not a token this server issued".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let token = encode_pending_token("user:new", 42);
        assert_eq!(
            decode_pending_token(&token).unwrap(),
            ("user:new".into(), 42)
        );
        assert!(decode_pending_token("!!!").is_err());
        assert!(decode_pending_token(&URL_SAFE_NO_PAD.encode("no-sequence")).is_err());
        assert_eq!(
            decode_subscription_token(&encode_subscription_token("sub_1")).unwrap(),
            "sub_1"
        );
    }
}
