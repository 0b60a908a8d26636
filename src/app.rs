//! Composition root: opens the store, starts the delivery engine, serves gRPC, and drains on
//! shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::BrokerService;
use crate::broker::{Broker, Limits};
use crate::config::ServeConfig;
use crate::delivery::{Engine, EngineConfig};
use crate::error::Error;
use crate::proto::broker_server::BrokerServer;
use crate::store::{EmbeddedStore, Store};

/// Gap between the payload limit and the gRPC message limit, for the other request fields.
const MESSAGE_OVERHEAD: usize = 1024 * 1024;

/// Runs the server on `listener` until `shutdown` completes, then stops taking requests,
/// lets in-flight deliveries finish (up to the configured grace) and returns.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config
        .validate()
        .map_err(|message| Error::invalid("config", message))?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&config.data_dir)?);
    let (trigger, shutdown_handle) = crate::shutdown::channel();
    let engine = Engine::new(
        store.clone(),
        EngineConfig {
            concurrency: config.delivery_concurrency,
        },
        shutdown_handle,
    );
    let resumed = engine.resume().await?;
    tracing::info!(partitions = resumed, "resumed pending deliveries");

    let broker = Arc::new(Broker::new(
        store,
        engine.clone(),
        Limits {
            max_payload_bytes: config.max_payload_bytes,
            idempotency_window: config.idempotency_window,
            default_retry_policy: config.default_retry_policy(),
        },
    ));
    // Large enough that an oversized payload reaches our own check and its precise message.
    let max_message = (config.max_payload_bytes + MESSAGE_OVERHEAD).max(4 * 1024 * 1024);
    let broker_service =
        BrokerServer::new(BrokerService::new(broker)).max_decoding_message_size(max_message);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BrokerServer<BrokerService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| Error::Internal(format!("reflection: {error}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|error| Error::Internal(format!("reflection: {error}")))?;

    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker_service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            health_reporter
                .set_not_serving::<BrokerServer<BrokerService>>()
                .await;
        })
        .await;
    trigger.fire();
    if !engine.drain(config.shutdown_grace).await {
        tracing::warn!("shutdown grace elapsed; unfinished deliveries stay pending");
    }
    served.map_err(|error| Error::Internal(format!("gRPC server: {error}")))
}
