//! Shutdown signals: SIGINT or SIGTERM cancel one `CancellationToken`, from which every subsystem
//! learns that herald is stopping. A second signal exits at once. Streams read the drain through
//! `Flag`, which the server sets when that token fires (a lock-free view of the same event).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// "Streams are ending": set once when the drain begins, read by every stream on every poll. A
/// `CancellationToken` answers `is_cancelled` under its mutex, which every stream on every worker
/// thread would contend on (2% of a 5,000-watcher fan-out in perf); this is one atomic load.
/// Streams learn of it when the hub wakes them (`Hub::wake_all`), so it needs no waiters.
#[derive(Clone, Debug, Default)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Cancel `token` on the first SIGINT/SIGTERM; exit the process on the second.
pub fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received; draining (send it again to exit now)");
        token.cancel();
        wait_for_signal().await;
        warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
