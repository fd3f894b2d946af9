//! Shutdown signals: SIGINT or SIGTERM cancel one `CancellationToken`, from which every subsystem
//! learns that herald is stopping. A second signal exits at once.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
