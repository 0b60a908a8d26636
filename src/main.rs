//! The `herald` binary: parses the command line and runs it.

#![forbid(unsafe_code)]

use clap::Parser;

// glibc malloc cost a fifth of the CPU of a delivery-heavy profile; mimalloc's thread-local
// caches suit tokio's many short allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use herald::cli::{Cli, Command};

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(config) => {
                config.validate().map_err(anyhow::Error::msg)?;
                let listener =
                    tokio::net::TcpListener::bind(config.listen)
                        .await
                        .map_err(|error| {
                            anyhow::anyhow!("cannot listen on {}: {error}", config.listen)
                        })?;
                // Tests and scripts read this line to find the port.
                println!("herald listening on {}", listener.local_addr()?);
                herald::app::run(config, listener, herald::shutdown::signal()).await?;
                Ok(())
            }
            command => herald::cli::run(command).await,
        }
    })
}
