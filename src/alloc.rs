//! The process allocator: the system's, refusing any single allocation over
//! 1 GiB.
//!
//! Hostile updates declare huge element counts in a few bytes, and yrs
//! reserves for them with `try_reserve` (found by the fuzzer: a 18-byte frame
//! asking for 88 GB). Under Linux overcommit a large-but-possible reservation
//! succeeds and touches memory before decoding fails; refusing it here makes
//! `try_reserve` fail at once, so the frame is rejected (1002) at no cost.
//! Nothing legitimate needs one allocation this large: messages are at most
//! 16 MiB and documents are held as many small blocks.

use std::alloc::{GlobalAlloc, Layout, System};

pub const MAX_ALLOCATION: usize = 1 << 30;

pub struct CappedAllocator;

// SAFETY: defers to `System` for every allocation it accepts; refusing one by
// returning null is what the `GlobalAlloc` contract prescribes for failure.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}
