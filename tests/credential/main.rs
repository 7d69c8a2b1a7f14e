//! Every credential against real local endpoints, in one binary: IMDS, the other managed
//! identity sources, the developer CLIs, service principals, workload identities and the
//! `DefaultAzureCredential` chain.

mod cli_entra_chain;
mod imds;
#[path = "../common/log_to.rs"]
mod log_to;
mod managed_identity;
mod scopes;
