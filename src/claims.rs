//! Claims: who owns which device. The model, the lock-free map the device path reads, claim
//! codes, tenant input validation, and the service through which every change goes.

pub mod cache;
pub mod codes;
pub mod service;
pub mod tenant_input;
