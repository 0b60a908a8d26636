//! Composition root: opens the store, starts the delivery engine, serves gRPC, and drains on
//! shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::api::BrokerApi;
use crate::auth::Keys;
use crate::broker::{Broker, Limits};
use crate::config::{ServeConfig, StoreKind};
use crate::delivery::{Engine, EngineConfig};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::proto::broker_service_server::BrokerServiceServer;
use crate::rate::RateLimits;
use crate::store::dynamodb::{self, RequestCounts};
use crate::store::{DynamoStore, EmbeddedStore, Store, StoreError, SubscriptionLimits};

/// How often the DynamoDB request counters are logged.
const REQUEST_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How often the API key file is checked for changes.
const KEY_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The authentication layer of the Broker service (health and reflection stay open): checks
/// the API key and hands the caller to the handlers, which check its roles and topics.
#[derive(Clone)]
struct Authenticate(Arc<Keys>);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let caller = self.0.authenticate(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Gap between the payload limit and the gRPC message limit, for the other request fields.
const MESSAGE_OVERHEAD: usize = 1024 * 1024;

/// Runs the server on `listener` with the store the configuration names, until `shutdown`
/// completes; then stops taking requests, lets in-flight deliveries finish (up to the
/// configured grace) and returns.
pub async fn run(
    config: ServeConfig,
    listener: impl Into<Listeners>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config
        .validate()
        .map_err(|message| Error::invalid("config", message))?;
    if config.store == StoreKind::Embedded {
        let store = open_store(&config).await?;
        return run_with_store(config, store, listener, shutdown).await;
    }
    let store = open_dynamodb(&config).await?;
    let counts = store.request_counters();
    let reporter = tokio::spawn(report_requests(counts.clone()));
    let result = run_with_store(config, store, listener, shutdown).await;
    reporter.abort();
    log_requests(&counts);
    result
}

/// Opens the configured store: the embedded one, or the DynamoDB table (created first with
/// `--create-table`), checked to answer.
pub async fn open_store(config: &ServeConfig) -> Result<Arc<dyn Store>, Error> {
    match config.store {
        StoreKind::Embedded => {
            let store = EmbeddedStore::open_with(
                &config.data_dir,
                config.store_cache_mib * 1024 * 1024,
                config.store_readers(),
            )?;
            store.set_retention(config.retention);
            Ok(Arc::new(store))
        }
        StoreKind::Dynamodb => Ok(open_dynamodb(config).await?),
    }
}

/// Opens the DynamoDB table (created first with `--create-table`) and checks that it answers.
async fn open_dynamodb(config: &ServeConfig) -> Result<Arc<DynamoStore>, Error> {
    let dynamo = config.dynamodb.to_config();
    let client = dynamodb::client_from_env(&dynamo).await;
    if config.create_table {
        match dynamodb::create_table(&client, &dynamo.table).await {
            Ok(()) => tracing::info!(table = %dynamo.table, "created DynamoDB table"),
            Err(StoreError::Conflict(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let store = DynamoStore::new(client, &dynamo.table)
        .with_repair_after(config.fanout_repair_after)
        .with_retention(config.retention);
    store.check().await?;
    Ok(Arc::new(store))
}

/// Logs the DynamoDB request counters every minute (and [`run`] once more at shutdown).
async fn report_requests(counts: Arc<RequestCounts>) {
    loop {
        tokio::time::sleep(REQUEST_REPORT_INTERVAL).await;
        log_requests(&counts);
    }
}

fn log_requests(counts: &RequestCounts) {
    let total = counts.total();
    let counts = counts.snapshot();
    tracing::info!(total, ?counts, "DynamoDB requests sent since start");
}

/// Reports the broker `NOT_SERVING` while the store cannot write, `SERVING` again once it
/// can, until shutdown (which reports `NOT_SERVING` itself).
async fn follow_store_health(
    mut store_health: tokio::sync::watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
    metrics: Arc<Metrics>,
    mut shutdown: crate::shutdown::Shutdown,
) {
    loop {
        let healthy = *store_health.borrow_and_update();
        metrics.store_healthy.set(i64::from(healthy));
        if healthy {
            reporter
                .set_serving::<BrokerServiceServer<BrokerApi>>()
                .await;
        } else {
            tracing::warn!("the store cannot write: reporting NOT_SERVING");
            reporter
                .set_not_serving::<BrokerServiceServer<BrokerApi>>()
                .await;
        }
        tokio::select! {
            changed = store_health.changed() => if changed.is_err() { return },
            _ = shutdown.fired() => return,
        }
    }
}

/// [`run`] on a store the caller opened.
pub async fn run_with_store(
    config: ServeConfig,
    store: Arc<dyn Store>,
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
        admin: admin_listener,
    } = listeners.into();
    // Bad keys or TLS files fail the start before anything else does.
    let keys = Arc::new(
        Keys::load(config.key_source()).map_err(|message| Error::invalid("api_keys", message))?,
    );
    keys.watch(KEY_RELOAD_INTERVAL);
    let listener = match config.tls_files() {
        Some(files) => Listener::Tls(
            crate::tls::incoming(listener, files)
                .map_err(|message| Error::invalid("tls", message))?,
        ),
        None => Listener::Plain(listener),
    };
    let (trigger, shutdown_handle) = crate::shutdown::channel();
    let endpoint_rules = Arc::new(config.endpoint_rules());
    let metrics = Arc::new(Metrics::new(store.request_counts()));
    let store: Arc<dyn Store> = Arc::new(crate::store::instrumented::Instrumented::new(
        store,
        metrics.clone(),
    ));
    let serves_metrics = metrics_listener.is_some() || admin_listener.is_some();
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            trigger.handle(),
        ));
    }
    let engine = Engine::new(
        store.clone(),
        EngineConfig {
            concurrency: config.delivery_concurrency,
            lease: config.partition_lease,
            rescan: (config.store == StoreKind::Dynamodb).then_some(config.rescan_interval),
            endpoint_rules: endpoint_rules.clone(),
            metrics: metrics.clone(),
            auto_disable_after: Some(config.auto_disable_after).filter(|after| !after.is_zero()),
        },
        shutdown_handle,
    );
    let resumed = engine.resume().await?;
    tracing::info!(partitions = resumed, "resumed pending deliveries");
    let store_health = store.health();
    let broker = broker(&config, store, engine.clone(), endpoint_rules);
    if serves_metrics {
        tokio::spawn(crate::backlog::refresh_loop(
            broker.clone(),
            metrics.backlog.clone(),
            config.metrics_backlog_interval,
            config.metrics_max_subscriptions,
            trigger.handle(),
        ));
    }
    if let Some(listener) = admin_listener {
        let admin = crate::admin::Admin {
            broker: broker.clone(),
            metrics: metrics.clone(),
            keys: keys.clone(),
        };
        tokio::spawn(crate::admin::serve(
            listener,
            Arc::new(admin),
            trigger.handle(),
        ));
    }
    let broker_service = broker_service(&config, broker, keys);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BrokerServiceServer<BrokerApi>>()
        .await;
    if let Some(store_health) = store_health {
        tokio::spawn(follow_store_health(
            store_health,
            health_reporter.clone(),
            metrics.clone(),
            trigger.handle(),
        ));
    }
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker_service);
    let stopped = async move {
        shutdown.await;
        health_reporter
            .set_not_serving::<BrokerServiceServer<BrokerApi>>()
            .await;
    };
    let served = match listener {
        Listener::Tls(connections) => {
            router
                .serve_with_incoming_shutdown(ReceiverStream::new(connections), stopped)
                .await
        }
        Listener::Plain(listener) => {
            // Without TCP_NODELAY a response that leaves in more than one write waits for the
            // client's delayed ACK: ~40 ms at the tail.
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, stopped).await
        }
    };
    trigger.fire();
    if !engine.drain(config.shutdown_grace).await {
        tracing::warn!("shutdown grace elapsed; unfinished deliveries stay pending");
    }
    served.map_err(|error| Error::Internal(format!("gRPC server: {error}")))
}

/// The operations over `store`.
fn broker(
    config: &ServeConfig,
    store: Arc<dyn Store>,
    engine: Engine,
    endpoint_rules: Arc<crate::delivery::endpoint_policy::AddressRules>,
) -> Arc<Broker> {
    Arc::new(Broker::new(
        store,
        engine,
        Limits {
            max_payload_bytes: config.max_payload_bytes,
            idempotency_window: config.idempotency_window,
            default_retry_policy: config.default_retry_policy(),
            endpoint_rules,
            subscriptions: SubscriptionLimits {
                total: config.max_subscriptions,
                per_pattern: config.max_subscriptions_per_pattern,
            },
        },
    ))
}

/// The Broker service: `broker` behind authentication and rate limits.
fn broker_service(
    config: &ServeConfig,
    broker: Arc<Broker>,
    keys: Arc<Keys>,
) -> InterceptedService<BrokerServiceServer<BrokerApi>, Authenticate> {
    let rates = RateLimits::new(config.rate_limit_publish, config.rate_limit_manage);
    // Large enough that an oversized payload reaches our own check and its precise message.
    let max_message = (config.max_payload_bytes + MESSAGE_OVERHEAD).max(4 * 1024 * 1024);
    InterceptedService::new(
        BrokerServiceServer::new(BrokerApi::new(broker, rates))
            .max_decoding_message_size(max_message),
        Authenticate(keys),
    )
}

/// The sockets a server listens on: gRPC, and optionally the metrics page.
pub struct Listeners {
    /// The gRPC API (and health, reflection).
    pub grpc: TcpListener,
    /// `/metrics`, if served.
    pub metrics: Option<TcpListener>,
    /// The admin listener (status page and metrics), if served.
    pub admin: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Listeners {
            grpc,
            metrics: None,
            admin: None,
        }
    }
}

/// Where gRPC connections come from.
enum Listener {
    /// Plaintext TCP.
    Plain(TcpListener),
    /// TLS connections, handshakes done (see [`crate::tls::incoming`]).
    Tls(tokio::sync::mpsc::Receiver<std::io::Result<crate::tls::TlsConnection>>),
}

/// Server reflection, v1 and v1alpha, for the API and health.
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| Error::Internal(format!("reflection: {error}")))?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|error| Error::Internal(format!("reflection: {error}")))?;
    Ok((v1, v1alpha))
}
