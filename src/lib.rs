//! The `pagoda` binary's library half: configuration loading and the commands' logic, so
//! integration tests can reach them.

pub mod bench;
pub mod client;
pub mod config;
pub mod gateway;
pub mod intake;
pub mod metrics;
pub mod nats;
pub mod placement;
pub mod request;
