//! Input limits. Each check returns `INVALID_ARGUMENT` naming the request field.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::Error;
use crate::model::RetryPolicy;

/// Longest topic name.
pub const MAX_TOPIC_LEN: usize = 128;
/// Most topic patterns per subscription.
pub const MAX_TOPICS_PER_SUBSCRIPTION: usize = 32;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
/// Longest endpoint URL.
pub const MAX_ENDPOINT_LEN: usize = 2048;
/// Most attributes per event, and their key and value lengths.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute key.
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 128;
/// Longest attribute value.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 1024;
/// Default and largest page sizes of listings.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size of listings.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Checks a topic name: `[a-z0-9][a-z0-9_.:-]*`, at most 128 characters.
pub fn topic(field: &'static str, topic: &str) -> Result<(), Error> {
    if topic.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "must be at most {MAX_TOPIC_LEN} characters, got {}",
                topic.len()
            ),
        ));
    }
    let valid_first =
        |character: char| character.is_ascii_lowercase() || character.is_ascii_digit();
    let valid_rest = |character: char| valid_first(character) || "_.:-".contains(character);
    let mut characters = topic.chars();
    let first = characters.next().expect("not empty");
    if !valid_first(first) || !characters.all(valid_rest) {
        return Err(Error::invalid(
            field,
            format!("`{topic}` is not a valid topic: use [a-z0-9][a-z0-9_.:-]*"),
        ));
    }
    Ok(())
}

/// Checks a subscription pattern: a topic, a topic prefix followed by `*`, or `*`.
pub fn pattern(pattern: &str) -> Result<(), Error> {
    match pattern.strip_suffix('*') {
        Some("") => Ok(()),
        Some(prefix) => {
            if prefix.contains('*') {
                return Err(Error::invalid(
                    "topics",
                    format!("`{pattern}`: `*` is allowed only at the end"),
                ));
            }
            // A prefix must itself be a valid start of a topic.
            topic("topics", prefix).map_err(|_| {
                Error::invalid(
                    "topics",
                    format!("`{pattern}` is not a valid pattern: use a topic, a topic prefix followed by `*`, or `*`"),
                )
            })
        }
        None => topic("topics", pattern),
    }
}

/// Checks the pattern list of a subscription.
pub fn patterns(patterns: &[String]) -> Result<(), Error> {
    if patterns.is_empty() {
        return Err(Error::invalid(
            "topics",
            "at least one topic or pattern is required",
        ));
    }
    if patterns.len() > MAX_TOPICS_PER_SUBSCRIPTION {
        return Err(Error::invalid(
            "topics",
            format!(
                "at most {MAX_TOPICS_PER_SUBSCRIPTION} entries, got {}",
                patterns.len()
            ),
        ));
    }
    patterns.iter().try_for_each(|entry| pattern(entry))
}

/// Checks an endpoint: an absolute http or https URL with a host and no credentials.
pub fn endpoint(endpoint: &str) -> Result<(), Error> {
    if endpoint.is_empty() {
        return Err(Error::invalid("endpoint", "must not be empty"));
    }
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(Error::invalid(
            "endpoint",
            format!("must be at most {MAX_ENDPOINT_LEN} characters"),
        ));
    }
    let url = url::Url::parse(endpoint).map_err(|error| {
        Error::invalid("endpoint", format!("`{endpoint}` is not a URL: {error}"))
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(Error::invalid(
            "endpoint",
            format!("scheme must be http or https, got `{}`", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid("endpoint", "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::invalid("endpoint", "must not contain credentials"));
    }
    // A URL the HTTP layer cannot send to (a host with characters URLs allow and HTTP does
    // not) would fail every attempt.
    crate::delivery::webhook::Target::parse(endpoint)
        .map_err(|error| Error::invalid("endpoint", error))?;
    Ok(())
}

/// Checks a caller-supplied secret.
pub fn secret(secret: &str) -> Result<(), Error> {
    crate::signing::decode_secret(secret)
        .map(|_| ())
        .map_err(|error| Error::invalid("secret", error.to_string()))
}

/// Checks a complete retry policy.
pub fn retry_policy(policy: &RetryPolicy) -> Result<(), Error> {
    let millisecond = Duration::from_millis(1);
    if policy.initial_backoff < millisecond {
        return Err(Error::invalid(
            "retry_policy.initial_backoff",
            "must be at least 1ms",
        ));
    }
    if policy.max_backoff < policy.initial_backoff {
        return Err(Error::invalid(
            "retry_policy.max_backoff",
            "must be at least initial_backoff",
        ));
    }
    if policy.max_backoff > Duration::from_secs(24 * 3600) {
        return Err(Error::invalid(
            "retry_policy.max_backoff",
            "must be at most 24h",
        ));
    }
    if !(1..=1000).contains(&policy.max_attempts) {
        return Err(Error::invalid(
            "retry_policy.max_attempts",
            format!("must be between 1 and 1000, got {}", policy.max_attempts),
        ));
    }
    if policy.request_timeout < millisecond || policy.request_timeout > Duration::from_secs(300) {
        return Err(Error::invalid(
            "retry_policy.request_timeout",
            "must be between 1ms and 5m",
        ));
    }
    Ok(())
}

/// Checks a content type: it is sent as a header, so visible ASCII only.
pub fn content_type(content_type: &str) -> Result<(), Error> {
    if content_type.len() > 255
        || !content_type
            .bytes()
            .all(|byte| byte == b' ' || byte.is_ascii_graphic())
    {
        return Err(Error::invalid(
            "content_type",
            "must be at most 255 visible ASCII characters",
        ));
    }
    Ok(())
}

/// Checks an idempotency key.
pub fn idempotency_key(key: &str) -> Result<(), Error> {
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(Error::invalid(
            "idempotency_key",
            format!("must be at most {MAX_IDEMPOTENCY_KEY_LEN} characters"),
        ));
    }
    Ok(())
}

/// Checks event attributes.
pub fn attributes(attributes: &BTreeMap<String, String>) -> Result<(), Error> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(Error::invalid(
            "attributes",
            format!("at most {MAX_ATTRIBUTES} entries, got {}", attributes.len()),
        ));
    }
    for (key, value) in attributes {
        if key.is_empty() || key.len() > MAX_ATTRIBUTE_KEY_LEN {
            return Err(Error::invalid(
                "attributes",
                format!("keys must be 1 to {MAX_ATTRIBUTE_KEY_LEN} characters"),
            ));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE_LEN {
            return Err(Error::invalid(
                "attributes",
                format!("value of `{key}` is longer than {MAX_ATTRIBUTE_VALUE_LEN} characters"),
            ));
        }
    }
    Ok(())
}

/// Resolves a requested page size: 0 means the default; negative or too large is refused.
pub fn page_size(page_size: i32) -> Result<usize, Error> {
    match page_size {
        0 => Ok(DEFAULT_PAGE_SIZE),
        size if size < 0 => Err(Error::invalid("page_size", "must not be negative")),
        size if size as usize > MAX_PAGE_SIZE => Err(Error::invalid(
            "page_size",
            format!("must be at most {MAX_PAGE_SIZE}"),
        )),
        size => Ok(size as usize),
    }
}

/// Most requests per second, or in flight, a subscription's pacing may name.
const MAX_PACING: u32 = 10_000;

/// Checks a subscription's pacing limits (0 is no limit).
pub fn pacing(pacing: &crate::model::Pacing) -> Result<(), Error> {
    if pacing.max_requests_per_second > MAX_PACING {
        return Err(Error::invalid(
            "max_requests_per_second",
            format!("at most {MAX_PACING} (0: no limit)"),
        ));
    }
    if pacing.max_in_flight > MAX_PACING {
        return Err(Error::invalid(
            "max_in_flight",
            format!("at most {MAX_PACING} (0: no limit)"),
        ));
    }
    Ok(())
}

/// Checks a subscription filter; `None` for an empty one (no filter).
pub fn filter(source: &str) -> Result<Option<String>, Error> {
    if source.is_empty() {
        return Ok(None);
    }
    crate::filter::Filter::compile(source)
        .map_err(|error| Error::invalid("filter", error.to_string()))?;
    Ok(Some(source.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        for good in [
            "fin:purchase",
            "user:new",
            "a",
            "0-x_y.z:w",
            &"a".repeat(128),
        ] {
            assert_eq!(topic("topic", good), Ok(()), "{good}");
        }
        for bad in ["", "User", ":a", "a b", "a#b", "a*", "é", &"a".repeat(129)] {
            assert!(topic("topic", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_accept_exact_prefix_and_all() {
        for good in ["*", "user:*", "user:new", "u*"] {
            assert_eq!(pattern(good), Ok(()), "{good}");
        }
        for bad in ["**", "user:**", "*user", "", "User:*", ":*"] {
            assert!(pattern(bad).is_err(), "{bad}");
        }
        assert!(patterns(&[]).is_err());
    }

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("http://127.0.0.1:8080/hook"), Ok(()));
        assert_eq!(endpoint("https://example.com"), Ok(()));
        for bad in [
            "",
            "not a url",
            "ftp://x/",
            "http://user:pw@host/",
            "/relative",
        ] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
        // A URL, but not one HTTP can send to.
        let error = endpoint("https://a{b}.example/").unwrap_err();
        assert!(
            format!("{error:?}").contains("not an HTTP URI"),
            "{error:?}"
        );
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7), Ok(7));
        assert!(page_size(-1).is_err());
        assert!(page_size(1001).is_err());
    }

    #[test]
    fn policies() {
        assert_eq!(retry_policy(&RetryPolicy::default()), Ok(()));
        let mut policy = RetryPolicy::default();
        policy.max_backoff = policy.initial_backoff / 2;
        assert!(retry_policy(&policy).is_err());
        let policy = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert!(retry_policy(&policy).is_err());
    }
}
