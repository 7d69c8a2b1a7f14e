//! One way for a test to capture what the crate traces, shared by the test binaries.

/// Makes `dispatch` this thread's subscriber until the guard drops, and has every callsite
/// ask it, whichever thread registers the callsite first.
///
/// While at most one dispatcher is registered, tracing-core (0.1.36, `Rebuilder::JustOne`)
/// computes a new callsite's interest from the registering thread's subscriber alone: another
/// test's thread, with none, caches "never" for a span or event this test waits for. A second
/// dispatcher that lives as long as the process (and wants nothing) keeps two registered, so
/// that every registered one is asked.
pub(crate) fn log_to(dispatch: &tracing::Dispatch) -> tracing::dispatcher::DefaultGuard {
    use tracing_subscriber::layer::SubscriberExt as _;
    static ALWAYS_REGISTERED: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    ALWAYS_REGISTERED.get_or_init(|| {
        tracing::Dispatch::new(
            tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::OFF),
        )
    });
    tracing::dispatcher::set_default(dispatch)
}
