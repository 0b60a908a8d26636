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
    let mut signals = Signals::install();
    async move {
        signals.next().await;
        tracing::info!("shutting down: finishing in-flight deliveries (signal again to exit now)");
        // The same streams wait for the second signal: one that arrives before this task first
        // runs is still seen. Streams made anew here would miss it, and with the handlers
        // installed it would not exit either.
        tokio::spawn(async move {
            signals.next().await;
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
    }
}

/// SIGTERM and SIGINT, registered once for the life of the process.
#[cfg(unix)]
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            terminate: signal(SignalKind::terminate()).expect("SIGTERM handler installs"),
            interrupt: signal(SignalKind::interrupt()).expect("SIGINT handler installs"),
        }
    }

    /// Completes on the next SIGTERM or SIGINT received since the previous one.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Ctrl-C where there are no Unix signals.
#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Signals {
        Signals
    }

    /// Completes on the next Ctrl-C.
    async fn next(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
