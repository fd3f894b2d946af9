//! The crate's top-level error: what `herald::run` can fail with before or while serving.
//! Per-connection and per-poll errors never reach this type; they are logged where they happen.

use std::path::PathBuf;

/// Errors that stop herald (startup problems and fatal listener failures).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read or is invalid; the message lists every problem.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A listener could not be bound or accepted from.
    #[error("listener {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A TLS certificate or key file is missing or unusable.
    #[error("{}: {message}", path.display())]
    Tls { path: PathBuf, message: String },
    /// The HTTP client for the upstream could not be built.
    #[error("upstream client: {0}")]
    Client(String),
    /// `[cluster] redis` cannot be reached at startup (and `on_unavailable` is not `"local"`).
    #[error("cluster: {0}")]
    Cluster(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
