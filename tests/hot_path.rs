//! The hot paths allocate nothing and are ready on the first poll: a fresh-token read (owned,
//! or borrowed with `with_token`) and a connection config for a fresh token. (That they take no lock is a unit
//! test in the cache: it reads with the refresh lock held elsewhere.) This binary counts every
//! allocation of the thread that reads.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use futures_util::FutureExt as _;
use pg_entra::testing::{FakeCredential, Principal};
use pg_entra::{Connector, Environment, TokenCache};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Allocations made by `calls` calls of `read`, each of which must be ready on its first poll.
fn allocations_of<F: std::future::Future>(calls: usize, read: impl Fn() -> F) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    for _ in 0..calls {
        // Ready on the first poll: no `.await` parks on the fresh path.
        let value = read().now_or_never().expect("ready on the first poll");
        std::hint::black_box(value);
    }
    ALLOCATIONS.with(Cell::get) - before
}

fn cache() -> TokenCache {
    TokenCache::builder(Arc::new(FakeCredential::new(Principal::system_assigned(
        "hot-path-vm",
    ))))
    .build()
    .unwrap()
}

#[tokio::test]
async fn reading_a_fresh_token_allocates_nothing() {
    let cache = cache();
    cache.token().await.unwrap();
    // Warm this thread's arc-swap slot.
    cache.token().now_or_never().unwrap().unwrap();
    let allocations = allocations_of(10_000, || cache.token());
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in 10,000 fresh reads"
    );
    // The first borrowed read on a thread takes its reference to the entry (one slot).
    cache
        .with_token(|token| token.secret().len())
        .await
        .unwrap();
    let allocations = allocations_of(10_000, || cache.with_token(|token| token.secret().len()));
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in 10,000 borrowed reads"
    );
}

#[tokio::test]
async fn a_config_for_a_fresh_token_allocates_nothing() {
    let connector = Connector::builder()
        .environment(Environment::empty())
        .host("srv.postgres.database.azure.com")
        .user("orders-api")
        .token_cache(cache())
        .build()
        .unwrap();
    // The first call fetches the token and builds its config; the second gives this thread
    // its reference to the token; later ones share both.
    let first = connector.config().await.unwrap();
    connector.config().await.unwrap();
    let token = connector.token_cache().cached().expect("a cached token");
    assert!(
        first.get_password() == Some(token.secret().as_bytes()),
        "the config carries the token"
    );
    let allocations = allocations_of(10_000, || connector.config());
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in 10,000 configs"
    );
    let again = connector.config().now_or_never().unwrap().unwrap();
    assert!(Arc::ptr_eq(&first, &again), "one config per token");
}
