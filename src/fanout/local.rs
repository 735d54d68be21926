//! Fan-out on a single node: there is no other replica, so nothing is
//! published and nothing is ever delivered. It exists so the room's contract
//! with [`Fanout`] is the same with or without Redis.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Fanout, FanoutError, Published, Subscription};

#[derive(Debug, Default, Clone, Copy)]
pub struct LocalFanout;

#[async_trait]
impl Fanout for LocalFanout {
    async fn subscribe(&self, _doc: &Arc<str>) -> Result<Subscription, FanoutError> {
        // No queue: a channel allocates its first block of slots up front,
        // about 1.3 KiB per loaded document that would never hold anything.
        Ok(Subscription::none())
    }

    fn publish(&self, _doc: &Arc<str>, _message: Published) {}

    fn degraded(&self) -> Option<String> {
        None
    }
}
