//! Server-Sent Events: framing (`encode`) and the per-client response body (`stream`) that turns a
//! topic subscription into bytes on the wire, and its gzip coding (`gzip`, compressed once per
//! event for all watchers).

pub mod encode;
pub mod gzip;
pub mod stream;

pub use gzip::GzipStream;
pub use stream::SseStream;
