//! The injected sidecar and the per-node router.
//!
//! The sidecar is configured by the environment the webhook writes ([`config`]), follows its
//! pod's services in the downward-API annotations file ([`podinfo`]), gives each
//! imported service a local address ([`alloc`]), and [`dns`] decides what its DNS server
//! answers. Names and defaults of the contract come from `servicekeel-api`.

pub mod admin;
pub mod alloc;
pub mod cli;
pub mod config;
pub mod dirs;
pub mod dns;
pub mod links;
pub mod listeners;
pub mod metrics;
pub mod podinfo;
pub mod registry;
pub mod router;
pub mod scheduling;
pub mod shutdown;
pub mod sidecar;
pub mod snapshot;
pub mod tunnel;
pub mod wait;
