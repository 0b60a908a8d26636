//! The admin listener (`--admin-listen`, off by default): a read-only status page at `/` and
//! the Prometheus metrics at `/metrics`, over plain HTTP/1.1.
//!
//! The page lists every subscription the caller may see (at most [`MAX_SUBSCRIPTIONS`]), the
//! ones that need attention first (disabled, then those with a blocked partition, then paused,
//! then retrying), each with its partitions: state, backlog, dead letters, oldest pending age,
//! head and last error. It is server-rendered HTML with no script, and reloads itself every
//! [`REFRESH_SECONDS`]. When the server has API keys, both paths need one with the `read` role
//! (or more), as `Authorization: Bearer <key>` or as the password of HTTP Basic auth, which
//! is what a browser's login prompt sends.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::auth::{Caller, Keys, Role};
use crate::broker::{Broker, PartitionState, http_status, partition_state};
use crate::metrics::Metrics;
use crate::model::{PartitionStatus, Subscription, SubscriptionState, now_millis};
use crate::shutdown::Shutdown;

/// Subscriptions shown at most; the page says when there are more.
pub const MAX_SUBSCRIPTIONS: usize = 500;
/// Partitions shown per subscription at most.
const MAX_PARTITIONS: i32 = 100;
/// How often the page reloads itself.
pub const REFRESH_SECONDS: u32 = 5;

/// What the admin listener serves from.
pub struct Admin {
    /// The operations the page reads through.
    pub broker: Arc<Broker>,
    /// The metrics `/metrics` renders.
    pub metrics: Arc<Metrics>,
    /// The API keys, when the server has some.
    pub keys: Arc<Keys>,
}

/// Serves the admin listener until shutdown.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin listener cannot accept");
                    continue;
                }
            },
            _ = shutdown.fired() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(respond(&admin, request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(admin: &Admin, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let header = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let caller = match admin.keys.authenticate_http(header) {
        Ok(caller) => caller,
        Err(message) => {
            let mut response = text(StatusCode::UNAUTHORIZED, &message);
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static(
                    "Basic realm=\"herald\", charset=\"UTF-8\"",
                ),
            );
            return response;
        }
    };
    if let Err(status) = caller.require(Role::Read, "the admin pages") {
        return text(StatusCode::FORBIDDEN, status.message());
    }
    match request.uri().path() {
        "/" => match status_page(&admin.broker, &caller).await {
            Ok(page) => {
                let mut response = Response::new(Full::new(Bytes::from(page)));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
                );
                response
            }
            Err(error) => {
                tracing::warn!(%error, "cannot build the status page");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cannot read the status now: {error}"),
                )
            }
        },
        "/metrics" => crate::metrics::page(&admin.metrics),
        _ => text(StatusCode::NOT_FOUND, "see / (status) or /metrics"),
    }
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response
}

/// One subscription as the page shows it.
struct Row {
    subscription: Subscription,
    partitions: Vec<(PartitionStatus, PartitionState)>,
    more_partitions: bool,
}

impl Row {
    /// Higher needs attention sooner.
    fn urgency(&self) -> u8 {
        let has =
            |wanted: PartitionState| self.partitions.iter().any(|(_, state)| *state == wanted);
        match self.subscription.control.state {
            SubscriptionState::Disabled => 5,
            _ if has(PartitionState::Blocked) => 4,
            SubscriptionState::Paused => 3,
            _ if has(PartitionState::Paused) => 3,
            _ if has(PartitionState::Retrying) => 2,
            _ if has(PartitionState::Delivering) => 1,
            _ => 0,
        }
    }
}

fn partition_urgency(state: PartitionState) -> u8 {
    match state {
        PartitionState::Blocked => 4,
        PartitionState::Paused => 3,
        PartitionState::Retrying => 2,
        PartitionState::Delivering => 1,
        PartitionState::Idle => 0,
    }
}

/// Reads every visible subscription's status and renders the page.
async fn status_page(broker: &Broker, caller: &Caller) -> Result<String, crate::error::Error> {
    let mut subscriptions = Vec::new();
    let mut token = String::new();
    let mut truncated = false;
    loop {
        let page = broker.list_subscriptions(1000, &token).await?;
        subscriptions.extend(
            page.items
                .into_iter()
                .filter(|subscription| caller.may_see(subscription)),
        );
        if subscriptions.len() > MAX_SUBSCRIPTIONS {
            subscriptions.truncate(MAX_SUBSCRIPTIONS);
            truncated = true;
            break;
        }
        match page.next_token {
            Some(next) => token = next,
            None => break,
        }
    }
    let mut rows = Vec::with_capacity(subscriptions.len());
    for subscription in subscriptions {
        let (subscription, page) = match broker
            .subscription_status(&subscription.id, MAX_PARTITIONS, "")
            .await
        {
            Ok(found) => found,
            // Deleted since it was listed.
            Err(crate::error::Error::NotFound(_)) => continue,
            Err(error) => return Err(error),
        };
        let mut partitions: Vec<_> = page
            .items
            .into_iter()
            .map(|status| {
                let state = partition_state(&subscription, &status);
                (status, state)
            })
            .collect();
        partitions.sort_by(|(a, a_state), (b, b_state)| {
            partition_urgency(*b_state)
                .cmp(&partition_urgency(*a_state))
                .then(a.partition.topic.cmp(&b.partition.topic))
        });
        rows.push(Row {
            subscription,
            partitions,
            more_partitions: page.next_token.is_some(),
        });
    }
    rows.sort_by(|a, b| {
        b.urgency()
            .cmp(&a.urgency())
            .then(a.subscription.id.cmp(&b.subscription.id))
    });
    Ok(render(&rows, truncated))
}

fn render(rows: &[Row], truncated: bool) -> String {
    let now = now_millis();
    let mut html = String::with_capacity(4096 + rows.len() * 512);
    let count = |wanted: PartitionState| {
        rows.iter()
            .flat_map(|row| row.partitions.iter())
            .filter(|(_, state)| *state == wanted)
            .count()
    };
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>Herald status</title><style>{STYLE}</style></head><body>\
         <h1>Herald status</h1>\
         <p id=\"summary\">{} subscriptions; partitions: <span class=\"BLOCKED\">{} blocked</span>, \
         <span class=\"RETRYING\">{} retrying</span>, <span class=\"PAUSED\">{} paused</span>, \
         {} delivering, {} idle. Reloads every {REFRESH_SECONDS} s.</p>",
        rows.len(),
        count(PartitionState::Blocked),
        count(PartitionState::Retrying),
        count(PartitionState::Paused),
        count(PartitionState::Delivering),
        count(PartitionState::Idle),
    );
    if truncated {
        let _ = write!(
            html,
            "<p class=\"note\">Showing the first {MAX_SUBSCRIPTIONS} subscriptions only.</p>"
        );
    }
    html.push_str(
        "<table><thead><tr><th>Subscription</th><th>Topic</th><th>State</th>\
         <th>Pending</th><th>Dead letters</th><th>Oldest pending</th><th>Head</th>\
         <th>Attempts</th><th>Next attempt</th><th>Failures</th><th>Last error</th>\
         </tr></thead><tbody>",
    );
    for row in rows {
        let subscription = &row.subscription;
        let state = match subscription.control.state {
            SubscriptionState::Active => "ACTIVE",
            SubscriptionState::Paused => "PAUSED",
            SubscriptionState::Disabled => "DISABLED",
        };
        let _ = write!(
            html,
            "<tr class=\"subscription {state}\" data-subscription=\"{id}\" data-state=\"{state}\">\
             <th colspan=\"11\"><span class=\"id\">{id}</span> {state} &rarr; {endpoint} \
             <span class=\"topics\">[{topics}]</span>{reason}</th></tr>",
            id = escape(&subscription.id),
            endpoint = escape(&subscription.endpoint),
            topics = escape(&subscription.topics.join(", ")),
            reason = if subscription.control.reason.is_empty() {
                String::new()
            } else {
                format!(" &mdash; {}", escape(&subscription.control.reason))
            },
        );
        if row.partitions.is_empty() {
            html.push_str(
                "<tr><td></td><td colspan=\"10\" class=\"note\">no partitions yet</td></tr>",
            );
        }
        for (status, partition_state) in &row.partitions {
            let name = state_name(*partition_state);
            let head = status.head.as_ref();
            let error = head
                .and_then(|head| head.last_error.as_deref())
                .unwrap_or("");
            let _ = write!(
                html,
                "<tr class=\"partition {name}\" data-subscription=\"{id}\" data-topic=\"{topic}\" \
                 data-state=\"{name}\"><td></td><td>{topic}</td><td class=\"state\">{name}</td>\
                 <td>{pending}</td><td>{dead}</td><td>{oldest}</td><td>{head}</td>\
                 <td>{attempts}</td><td>{next}</td><td>{failures}</td>\
                 <td class=\"error\" data-http-status=\"{http}\">{error}</td></tr>",
                id = escape(&subscription.id),
                topic = escape(&status.partition.topic),
                pending = status.pending,
                dead = status.dead_letters,
                oldest = head.map_or_else(
                    || "-".to_string(),
                    |head| human_age(now.saturating_sub(head.published_at))
                ),
                head = head.map_or_else(|| "-".to_string(), |head| head.sequence.to_string()),
                attempts = head.map_or(0, |head| head.state.attempts),
                next = head.map_or_else(
                    || "-".to_string(),
                    |head| match head.state.next_attempt_at.checked_sub(now) {
                        Some(ahead) if ahead > 0 => format!("in {}", human_age(ahead)),
                        _ => "now".to_string(),
                    }
                ),
                failures = status.consecutive_failures,
                http = http_status(error).map_or(0, u32::from),
                error = escape(error),
            );
        }
        if row.more_partitions {
            let _ = write!(
                html,
                "<tr><td></td><td colspan=\"10\" class=\"note\">more partitions: \
                 herald status {}</td></tr>",
                escape(&subscription.id)
            );
        }
    }
    html.push_str("</tbody></table></body></html>\n");
    html
}

fn state_name(state: PartitionState) -> &'static str {
    match state {
        PartitionState::Idle => "IDLE",
        PartitionState::Delivering => "DELIVERING",
        PartitionState::Retrying => "RETRYING",
        PartitionState::Blocked => "BLOCKED",
        PartitionState::Paused => "PAUSED",
    }
}

/// A duration in milliseconds, for people: `42s`, `3m12s`, `5h3m`, `2d4h`.
pub fn human_age(millis: u64) -> String {
    let seconds = millis / 1000;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

/// Escapes text for HTML content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;width:100%;font-size:14px}\
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}\
tr.subscription th{background:#f3f3f3;padding-top:10px}\
.BLOCKED,.DISABLED{color:#b00020;font-weight:600}.RETRYING{color:#b36b00}\
.PAUSED{color:#555;font-style:italic}.error{font-family:monospace;max-width:40em}\
.note{color:#777}.id{font-family:monospace}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn ages_read_like_people_write_them() {
        assert_eq!(human_age(42_500), "42s");
        assert_eq!(human_age(192_000), "3m12s");
        assert_eq!(human_age(5 * 3_600_000 + 180_000), "5h3m");
        assert_eq!(human_age(2 * 86_400_000 + 4 * 3_600_000), "2d4h");
    }
}
