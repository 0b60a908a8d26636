//! Shutdown: the OS signal future, and the handle passed to background tasks.

use tokio::sync::watch;

/// Fires shutdown for every [`Shutdown`] handle made from it.
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

impl ShutdownTrigger {
    /// A new handle.
    pub fn handle(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }

    /// Tells every handle to stop. Idempotent.
    pub fn fire(&self) {
        self.sender.send_replace(true);
    }
}

/// A cloneable handle that tells a task when to stop taking new work.
#[derive(Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

impl Shutdown {
    /// True once shutdown has been fired.
    pub fn is_fired(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Completes once shutdown has been fired (at once if it already was).
    pub async fn fired(&mut self) {
        // An error means the trigger is gone, which also means: stop.
        let _ = self.receiver.wait_for(|fired| *fired).await;
    }
}

/// A new trigger and its first handle.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (ShutdownTrigger { sender }, Shutdown { receiver })
}

/// Completes on the first SIGINT or SIGTERM. A second one exits the process at once.
pub fn signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    // Installed now, not when first polled: a signal that comes before the server starts
    // waiting is still a graceful shutdown, not the default action (exit).
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .expect("SIGINT handler installs");
    async move {
        #[cfg(unix)]
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing in-flight deliveries (signal again to exit now)");
        tokio::spawn(async {
            wait_for_signal().await;
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
    }
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler installs");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
