//! Resource ids: a prefix, then the creation time and random bits, so ids sort in creation
//! order.

/// The time part of the last id made by this process.
static LAST_ID_TIME: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A new id `{prefix}_{time:014x}{random:014x}`: unique, and ordered by creation: `time` is the
/// creation time in microseconds since the epoch, bumped past the previous id's so that two ids
/// made by one process in the same microsecond still sort in creation order.
pub fn new_id(prefix: &str) -> String {
    let now = crate::model::now_micros();
    let previous = LAST_ID_TIME
        .fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |last| Some(now.max(last + 1)),
        )
        .expect("the update always succeeds");
    let time = now.max(previous + 1);
    let random: u64 = rand::random::<u64>() & ((1 << 56) - 1);
    format!("{prefix}_{time:014x}{random:014x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sort_in_creation_order_and_start_with_the_creation_time() {
        let before = crate::model::now_micros();
        let ids: Vec<String> = (0..1000).map(|_| new_id("sub")).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "unique and already in creation order");
        for id in &ids {
            assert_eq!(id.len(), 4 + 28);
            let micros = u64::from_str_radix(&id[4..18], 16).unwrap();
            // Bumped past the previous id by at most one microsecond per id.
            assert!(micros >= before && micros <= crate::model::now_micros() + 1000);
        }
    }
}
