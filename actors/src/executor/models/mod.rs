//! Model families. Each file: config → layers with `load` and `forward` → model. The KV
//! cache is not inside a model: `forward` receives the batch's slots and block tables and
//! the executor's KV pool.

pub mod llama;
