#![doc = include_str!("../README.md")]

pub mod cdc;
pub mod chunk;
pub mod crypto;
pub mod hashing;
pub mod ident;
pub mod insert_id;
pub mod location;
pub mod mapping;
pub mod model;
pub mod names;
pub mod org_id;
pub mod payload;
pub mod proto;
pub mod retry;
pub mod wire;

pub use model::{Capture, Mode, TableSpec, Tenant, TenantStatus, WriteApi};
pub use payload::Payload;
