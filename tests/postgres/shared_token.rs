//! One token per identity per process: connectors that build their own credential chain share
//! one cache, whoever builds them and for whichever server of the same scope.

use pg_entra::{Connector, Environment};

use super::{bed, current_user};

/// 50 connectors built one after another (each dropped after its connection, as a handler
/// that builds one per request does) and connectors for three servers of the same scope: one
/// IMDS probe and one token request in all.
#[tokio::test]
async fn fifty_connectors_and_three_servers_cost_one_probe_and_one_token() {
    let bed = bed().await;
    let vars = bed.vars();
    for _ in 0..50 {
        let connector = Connector::builder()
            .environment(Environment::from_vars(vars.clone()))
            .build()
            .unwrap();
        assert_eq!(
            current_user(&connector).await.unwrap(),
            bed.principal().name()
        );
    }
    // A primary, a replica and both in one list: other names and settings of one scope (the
    // bed's certificate covers `localhost` and `127.0.0.1`).
    for host in ["localhost", "127.0.0.1", "127.0.0.1,localhost"] {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| match k.as_str() {
                "PGHOST" => (k.clone(), host.to_owned()),
                _ => (k.clone(), v.clone()),
            })
            .collect();
        let connector = Connector::builder()
            .environment(Environment::from_vars(vars))
            .build()
            .unwrap();
        assert_eq!(
            current_user(&connector).await.unwrap(),
            bed.principal().name()
        );
    }
    let recorded = bed.identity().recorded();
    let probes = recorded.iter().filter(|r| !r.metadata_header).count();
    let tokens = recorded.iter().filter(|r| r.metadata_header).count();
    assert_eq!((probes, tokens), (1, 1), "{recorded:#?}");
}
