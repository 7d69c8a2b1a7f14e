//! A fresh-token read allocates nothing. (That it takes no lock is a unit test in the cache:
//! it reads with the refresh lock held elsewhere.) This binary counts every allocation of the
//! thread that reads.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use pg_entra::{AccessToken, TokenCache, TokenCredential, TokenRequestOptions};

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

#[derive(Debug)]
struct HourLongTokens;

#[async_trait::async_trait]
impl TokenCredential for HourLongTokens {
    async fn get_token(
        &self,
        _: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            "header.payload.signature",
            azure_core::time::OffsetDateTime::now_utc() + Duration::from_secs(3600),
        ))
    }
}

#[tokio::test]
async fn reading_a_fresh_token_allocates_nothing() {
    let cache = TokenCache::builder(Arc::new(HourLongTokens))
        .build()
        .unwrap();
    cache.token().await.unwrap();
    // Warm this thread's arc-swap slot.
    cache.token().now_or_never().unwrap().unwrap();

    let before = ALLOCATIONS.with(Cell::get);
    for _ in 0..10_000 {
        // Ready on the first poll: no `.await` parks on the fresh path.
        let token = cache.token().now_or_never().expect("ready").unwrap();
        std::hint::black_box(token);
    }
    let allocations = ALLOCATIONS.with(Cell::get) - before;
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in 10,000 fresh reads"
    );
}
