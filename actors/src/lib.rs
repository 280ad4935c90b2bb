//! pagoda's engine: the five actors (tokenizer, scheduler, block manager, executor,
//! detokenizer), the messages they exchange, and the pure logic each one owns.

pub mod block_manager;
pub mod config;
pub mod detokenizer;
pub mod engine;
pub mod executor;
pub mod messages;
pub mod metrics;
pub mod protocol;
pub mod scheduler;
pub mod tokenizer;
