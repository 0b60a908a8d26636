//! `herald sink`: a webhook receiver for trying Herald out. It prints each delivery, verifies
//! its signature, and checks the `herald-previous-sequence` chain per topic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::delivery::webhook::headers;
use crate::signing;

/// `herald sink` settings.
#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The subscription's secret, to verify signatures. Without it signatures are not checked.
    #[arg(long, env = "HERALD_SINK_SECRET")]
    secret: Option<String>,
}

struct SinkState {
    key: Option<Vec<u8>>,
    /// Last sequence seen per topic.
    last: Mutex<HashMap<String, u64>>,
}

/// Serves until interrupted.
pub async fn run(args: SinkArgs) -> anyhow::Result<()> {
    let key = args
        .secret
        .as_deref()
        .map(signing::decode_secret)
        .transpose()
        .context("invalid --secret")?;
    let state = Arc::new(SinkState {
        key,
        last: Mutex::new(HashMap::new()),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("sink listening on http://{}/", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(state.clone(), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    state: Arc<SinkState>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let id = header(headers::WEBHOOK_ID);
    let timestamp = header(headers::WEBHOOK_TIMESTAMP);
    let signature = header(headers::WEBHOOK_SIGNATURE);
    let topic = header(headers::TOPIC);
    let sequence: u64 = header(headers::SEQUENCE).parse().unwrap_or(0);
    let previous: u64 = header(headers::PREVIOUS_SEQUENCE).parse().unwrap_or(0);
    let redelivery = header(headers::REDELIVERY);
    let body = request.into_body().collect().await?.to_bytes();

    let signature_check = match (&state.key, timestamp.parse::<u64>()) {
        (None, _) => "unchecked",
        (Some(key), Ok(timestamp)) if signing::verify(key, &id, timestamp, &body, &signature) => {
            "ok"
        }
        (Some(_), _) => "INVALID",
    };
    let chain_check = {
        let mut last = state.last.lock().expect("sink lock");
        let check = match last.get(&topic) {
            // Sent again by an operator, out of order: not part of the chain.
            _ if !redelivery.is_empty() => redelivery.as_str(),
            Some(seen) if sequence <= *seen => "redelivery",
            Some(seen) if *seen == previous => "ok",
            Some(_) => "GAP",
            None => "first seen",
        };
        if last.get(&topic).is_none_or(|seen| sequence > *seen) {
            last.insert(topic.clone(), sequence);
        }
        check
    };
    println!(
        "{id} topic={topic} sequence={sequence} previous={previous} signature={signature_check} chain={chain_check} body={}",
        String::from_utf8_lossy(&body)
    );
    let status = if signature_check == "INVALID" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::NO_CONTENT
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}
