//! Process signals, each heard in one place: SIGINT or SIGTERM cancel one `CancellationToken`,
//! from which every subsystem learns that herald is stopping (a second one exits at once); SIGHUP
//! is counted in [`Hangups`], which the certificate watcher and the config reload both follow.
//! Streams read the drain through `Flag`, a lock-free view of the same event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
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

/// SIGHUPs received so far, as a watch: every subscriber sees each new one (or, if it was busy,
/// at least the latest), however many follow.
#[derive(Debug, Clone)]
pub struct Hangups(watch::Receiver<u64>);

impl Hangups {
    /// Take SIGHUP from now on (the handler is in place when this returns, so a SIGHUP can no
    /// longer kill the process) until `cancel`. Without a handler (not Unix, or refused), no
    /// hangup ever arrives.
    pub fn listen(cancel: CancellationToken) -> Hangups {
        let (tx, rx) = watch::channel(0u64);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::hangup()) {
                Ok(mut hup) => {
                    tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                r = hup.recv() => match r {
                                    Some(()) => tx.send_modify(|n| *n += 1),
                                    None => return,
                                },
                            }
                        }
                    });
                }
                Err(e) => warn!(error = %e, "cannot listen for SIGHUP; reload with POST /reload"),
            }
        }
        #[cfg(not(unix))]
        drop((tx, cancel));
        Hangups(rx)
    }

    /// Hangups that never come (tests, embedders that reload otherwise).
    pub fn none() -> Hangups {
        let (_tx, rx) = watch::channel(0u64);
        Hangups(rx)
    }

    /// Resolves at the next SIGHUP; never, when there is no signal listener.
    pub async fn next(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
