//! Claims: who owns which device. The lock-free map the device path reads, claim codes, tenant
//! input validation, and the service through which every change goes (the nouns themselves
//! are [`crate::model`]'s).

pub mod cache;
pub mod codes;
pub mod error;
pub mod events;
pub mod service;
pub mod tenant_input;
