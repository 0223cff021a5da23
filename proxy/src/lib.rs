//! The injected sidecar and the per-node router.
//!
//! The sidecar is configured by the environment the webhook writes ([`config`]) and gives each
//! imported service a local address ([`alloc`]). Names and defaults of the contract come from
//! `servicekeel-api`.

pub mod alloc;
pub mod config;
