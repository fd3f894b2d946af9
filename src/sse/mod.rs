//! Server-Sent Events: framing (`encode`) and the per-client response body (`stream`) that turns a
//! topic subscription into bytes on the wire, the multiplexed body that carries several topics
//! (`mux`), and their gzip coding (`gzip`, compressed once per event for all watchers).

pub mod encode;
pub mod gzip;
pub mod mux;
pub mod stream;

pub use gzip::GzipStream;
pub use mux::MuxStream;
pub use stream::SseStream;
