//! Cancel routing: the keys the proxy gave each session, and the server's keys and host they
//! stand for.
//!
//! A client's `CancelRequest` comes to the proxy on a new connection with the keys from the
//! proxy's `BackendKeyData`; the proxy sends the server's own keys to the server that session
//! is on, over verified TLS. The server's keys never reach the client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Where a session's cancel requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    /// The index of the server among the proxy's targets.
    pub(crate) target: usize,
    /// The server's keys for the session.
    pub(crate) process_id: u32,
    pub(crate) secret_key: u32,
}

/// The open sessions' keys. Cloned cheaply; clones share the table.
#[derive(Debug, Clone, Default)]
pub(crate) struct CancelKeys {
    routes: Arc<Mutex<HashMap<(u32, u32), Route>>>,
}

impl CancelKeys {
    /// Gives a session its keys: the server's process ID (what `pg_backend_pid()` shows) and
    /// a fresh random secret. The keys stop working when the registration is dropped.
    pub(crate) fn register(&self, route: Route) -> Registration {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let keys = loop {
            let keys = (route.process_id, rand::random::<u32>());
            if !routes.contains_key(&keys) {
                break keys;
            }
        };
        routes.insert(keys, route);
        Registration {
            keys,
            table: self.clone(),
        }
    }

    /// The session `process_id` and `secret_key` were given to, if it is open.
    pub(crate) fn route(&self, process_id: u32, secret_key: &[u8]) -> Option<Route> {
        let secret_key = u32::from_be_bytes(secret_key.try_into().ok()?);
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.get(&(process_id, secret_key)).copied()
    }

    fn remove(&self, keys: (u32, u32)) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.remove(&keys);
    }
}

/// A session's place in [`CancelKeys`], given up on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    keys: (u32, u32),
    table: CancelKeys,
}

impl Registration {
    /// The process ID and secret key to send the client.
    pub(crate) fn keys(&self) -> (u32, u32) {
        self.keys
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.remove(self.keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_route_while_registered_and_only_exactly() {
        let table = CancelKeys::default();
        let route = Route {
            target: 1,
            process_id: 4242,
            secret_key: 99,
        };
        let registration = table.register(route);
        let (pid, key) = registration.keys();
        assert_eq!(pid, 4242);
        assert_eq!(table.route(pid, &key.to_be_bytes()), Some(route));
        assert_eq!(table.route(pid, &key.wrapping_add(1).to_be_bytes()), None);
        assert_eq!(table.route(pid, &[0; 8]), None, "a longer key is not ours");
        // The server's own key is not a key of the proxy's (unless chance makes it so).
        if key != 99 {
            assert_eq!(table.route(pid, &99u32.to_be_bytes()), None);
        }
        drop(registration);
        assert_eq!(table.route(pid, &key.to_be_bytes()), None);
    }
}
