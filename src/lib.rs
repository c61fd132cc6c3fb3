//! Pull-through caching proxy for container registries.
pub mod config;
pub mod registry;
