//! The contracts every ServiceKeel component agrees on, with no async runtime.
//!
//! The webhook writes pods according to these contracts and the sidecar and router read them:
//! annotation and label keys ([`keys`]), the sidecar's environment ([`env`](mod@env)), well-known
//! names and default values ([`defaults`]), the service list carried by the imported and exported
//! annotations ([`services`]), the kubelet's annotations file ([`podinfo`]), address formats
//! ([`addresses`]), what flows through the tunnel ([`tunnel`]), when logs are coloured
//! ([`logs`]) and how an admin server's answer is read ([`http`]). A string of the contract is
//! spelled once, here.

pub mod addresses;
pub mod defaults;
pub mod duration;
pub mod env;
pub mod http;
pub mod keys;
pub mod logs;
pub mod names;
pub mod podinfo;
pub mod services;
pub mod tunnel;

pub use services::{
    FieldError, ParseError, Protocol, Service, ServiceKey, ServiceList, ServicePort, TargetPort,
};
