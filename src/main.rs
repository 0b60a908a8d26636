//! The `herald` binary: parses the command line and runs it.

#![forbid(unsafe_code)]

use clap::Parser;

// glibc malloc cost a fifth of the CPU of a delivery-heavy profile; mimalloc's thread-local
// caches suit tokio's many short allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use herald::cli::{Cli, Command};
use herald::config::LogFormat;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Command::Serve(config) = &cli.command {
        // Checked before the runtime starts: it is built with the configured threads.
        config.validate().map_err(anyhow::Error::msg)?;
        builder.worker_threads(config.worker_threads());
    }
    let runtime = builder.build()?;
    let (format, otlp_endpoint) = match &cli.command {
        Command::Serve(config) => (config.log_format, config.otlp_endpoint.clone()),
        _ => (LogFormat::Text, None),
    };
    // The span exporter runs on the runtime; dropped last, it flushes the last spans.
    let _telemetry = {
        let _entered = runtime.enter();
        herald::telemetry::init(format, otlp_endpoint.as_deref()).map_err(anyhow::Error::msg)?
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(config) => {
                let config = *config;
                let listener =
                    tokio::net::TcpListener::bind(config.listen)
                        .await
                        .map_err(|error| {
                            anyhow::anyhow!("cannot listen on {}: {error}", config.listen)
                        })?;
                let metrics = match config.metrics_listen {
                    Some(address) => Some(
                        tokio::net::TcpListener::bind(address)
                            .await
                            .map_err(|error| {
                                anyhow::anyhow!("cannot listen on {address}: {error}")
                            })?,
                    ),
                    None => None,
                };
                let admin = match config.admin_listen {
                    Some(address) => Some(
                        tokio::net::TcpListener::bind(address)
                            .await
                            .map_err(|error| {
                                anyhow::anyhow!("cannot listen on {address}: {error}")
                            })?,
                    ),
                    None => None,
                };
                // Before the lines below: a signal right after them shuts down gracefully.
                let shutdown = herald::shutdown::signal();
                // Tests and scripts read these lines to find the ports.
                println!("herald listening on {}", listener.local_addr()?);
                if let Some(metrics) = &metrics {
                    println!("herald metrics on http://{}/metrics", metrics.local_addr()?);
                }
                if let Some(admin) = &admin {
                    println!("herald admin on http://{}/", admin.local_addr()?);
                }
                let listeners = herald::app::Listeners {
                    grpc: listener,
                    metrics,
                    admin,
                };
                herald::app::run(config, listeners, shutdown).await?;
                Ok(())
            }
            command => herald::cli::run(command).await,
        }
    })
}
