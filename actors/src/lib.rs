//! pagoda's engine: the five actors (tokenizer, scheduler, block manager, executor,
//! detokenizer), the messages they exchange, and the pure logic each one owns.
//!
//! The house, bottom up: `messages` (every value that crosses an actor boundary) and
//! `streams` (the clients' channels) depend on nothing else here; each actor module
//! depends on them and on pure logic, never on another actor; `engine` wires the actors
//! together.

pub mod block_manager;
pub mod config;
pub mod detokenizer;
pub mod engine;
pub mod executor;
pub mod fault;
pub mod guide;
pub mod load;
pub mod messages;
pub mod metrics;
pub mod protocol;
pub mod scheduler;
pub mod streams;
pub mod supervisor;
pub mod tokenizer;
