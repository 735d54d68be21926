//! Concord: a collaborative document editing backend.
//!
//! Data flows one way: socket ([`http`] upgrade) → [`transport`] → protocol
//! session ([`protocol`]) → document [`room`] → local broadcast, and the
//! group commit ([`store`]) → [`fanout`] to other replicas.

pub mod alloc;
pub mod auth;
pub mod config;
pub mod doc;
pub mod fanout;
pub mod health;
pub mod history;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod room;
pub mod server;
pub mod store;
pub mod transport;
pub mod webhooks;
