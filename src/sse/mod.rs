//! Server-Sent Events responses: one lifecycle for every stream (`lifecycle`: prelude, events,
//! heartbeats, last event), the events of one topic (`single`) or of many with their control
//! (`mux`), and the gzip coding that shares each compressed event between watchers (`gzip`).

pub mod gzip;
pub mod lifecycle;
pub mod mux;
pub mod single;

pub use gzip::GzipStream;
pub use lifecycle::{Events, Item, ItemSource, Lifecycle, SseStream, StreamClosed};
pub use mux::MuxEvents;
pub use single::TopicEvents;
