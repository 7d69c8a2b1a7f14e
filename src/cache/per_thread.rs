//! Each thread keeps its own reference to each cache's current entry, so that a fresh read
//! writes no memory that another core reads: it costs one load of the cache's generation (a
//! cache line every core only reads) and thread-local data. A thread takes a new reference
//! only when the cache has stored a new token. The cost: a thread that stops reading keeps
//! its reference, and so a superseded token, in memory until it reads again or ends.

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use super::{Entry, Inner};
use crate::token::Token;

/// This thread's reference to one cache's entry, valid while the cache's generation is the
/// same.
struct Slot {
    /// The cache: while the slot holds it, its address cannot be reused by another cache,
    /// so the address tells caches apart; and a dropped cache's slot can be forgotten.
    owner: Weak<Inner>,
    generation: u64,
    entry: Arc<Entry>,
}

thread_local! {
    static SLOTS: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// Runs `read` on this thread's reference to the entry of `cache` if it is from `generation`
/// and still fresh at `now`; otherwise gives `read` back.
#[inline]
pub(super) fn read_fresh<R, F: FnOnce(&Token) -> R>(
    cache: &Arc<Inner>,
    generation: u64,
    now: SystemTime,
    read: F,
) -> Result<R, F> {
    let mut read = Some(read);
    let result = SLOTS.try_with(|slots| {
        // Borrowed already only if `read` itself reads a cache: then take the shared path.
        let slots = slots.try_borrow().ok()?;
        let slot = slots
            .iter()
            .find(|slot| slot.generation == generation && is(slot, cache))?;
        if now < slot.entry.refresh_at {
            read.take().map(|read| read(&slot.entry.token))
        } else {
            None
        }
    });
    match (result, read) {
        (Ok(Some(value)), _) => Ok(value),
        (_, Some(read)) => Err(read),
        // `read` ran only if it returned a value.
        (_, None) => unreachable!("the reader ran but returned nothing"),
    }
}

/// Keeps `entry` as this thread's reference for `cache` at `generation`, and forgets the
/// references of caches that have been dropped.
pub(super) fn remember(cache: &Arc<Inner>, generation: u64, entry: Arc<Entry>) {
    let _ = SLOTS.try_with(|slots| {
        let Ok(mut slots) = slots.try_borrow_mut() else {
            return;
        };
        slots.retain(|slot| !is(slot, cache) && slot.owner.strong_count() > 0);
        slots.push(Slot {
            owner: Arc::downgrade(cache),
            generation,
            entry,
        });
    });
}

fn is(slot: &Slot, cache: &Arc<Inner>) -> bool {
    std::ptr::eq(slot.owner.as_ptr(), Arc::as_ptr(cache))
}

/// How many slots this thread holds (for tests).
#[cfg(test)]
pub(super) fn slots_on_this_thread() -> usize {
    SLOTS.with(|slots| slots.borrow().len())
}
