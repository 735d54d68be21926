//! Readiness state shared by the parts that can make the server unready:
//! draining at shutdown and a store that stopped answering.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Health {
    draining: AtomicBool,
    store_error: Mutex<Option<String>>,
}

impl Health {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn set_store_error(&self, error: Option<String>) {
        *self.store_error.lock().expect("health lock") = error;
    }

    pub fn store_error(&self) -> Option<String> {
        self.store_error.lock().expect("health lock").clone()
    }
}
