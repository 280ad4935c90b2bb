//! The unified paged KV pool: one K and one V buffer per layer, allocated once at start-up
//! and shared by every sequence through block tables. Layout per layer:
//! `[num_blocks][block_size][num_kv_heads][head_dim]` f32.

use pagoda_kernels::attention::KvShape;

pub struct KvPool {
    shape: KvShape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvPool {
    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    pub fn new(num_layers: usize, shape: KvShape) -> Self {
        let len = shape.layer_len();
        Self {
            k: (0..num_layers).map(|_| vec![0f32; len]).collect(),
            v: (0..num_layers).map(|_| vec![0f32; len]).collect(),
            shape,
        }
    }

    pub fn shape(&self) -> KvShape {
        KvShape {
            num_blocks: self.shape.num_blocks,
            block_size: self.shape.block_size,
            num_kv_heads: self.shape.num_kv_heads,
            head_dim: self.shape.head_dim,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.shape.num_blocks
    }

    pub fn layer(&self, i: usize) -> (&[f32], &[f32]) {
        (&self.k[i], &self.v[i])
    }

    pub fn layer_mut(&mut self, i: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[i], &mut self.v[i])
    }
}
