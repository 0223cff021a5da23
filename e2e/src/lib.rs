//! ServiceKeel end to end: a real Kubernetes control plane on this machine, built from the
//! Kubernetes Go modules ([`kubernetes`]) with etcd from the `etcd-bin-vendored` crate
//! ([`control_plane`]), certificates made here ([`pki`]), and the real webhook binary
//! registered with the configuration from `manifests/` ([`webhook`]). [`cluster`] ties them
//! together for the tests and for the `servicekeel-e2e` command; [`process`] makes sure no
//! child outlives its owner unless asked to.

pub mod bench;
pub mod cluster;
pub mod control_plane;
pub mod demo;
pub mod harness;
pub mod images;
pub mod kubernetes;
pub mod node;
pub mod paths;
pub mod pki;
pub mod process;
pub mod webhook;
