//! The ServiceKeel admission webhook: injects the sidecar into pods of namespaces labelled
//! `servicekeel.io/inject=enabled`.
//!
//! [`inject`] is the pure core, shared by the HTTPS server ([`server`], [`admission`]) and the
//! offline command ([`offline`]). [`config`] is what the operator sets; the contract strings
//! come from `servicekeel-api`.

pub mod admission;
pub mod caches;
pub mod certificates;
pub mod cli;
pub mod config;
pub mod exports;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod offline;
pub mod pod;
pub mod recent;
pub mod reconcile;
pub mod server;
pub mod shape;
pub mod tls;
pub mod view;
