//! Concord: a collaborative document editing backend.
//!
//! Data flows one way: socket ([`http`]) → [`connection`] → document [`room`]
//! → local broadcast, [`fanout`] to other replicas, and the [`store`].

pub mod alloc;
pub mod auth;
pub mod config;
pub mod connection;
pub mod fanout;
pub mod guard;
pub mod health;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod room;
pub mod server;
pub mod store;
