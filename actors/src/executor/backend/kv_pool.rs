//! The unified paged KV pool: one K and one V buffer per layer, allocated once at start-up
//! and shared by every sequence through block tables. Layout per layer:
//! `[num_blocks][block_size][num_kv_heads][head_dim]`, in f16 (the default: half the
//! memory, and half the bytes every decode step reads) or f32 (`cache.kv_cache_dtype`).

use half::f16;
use pagoda_kernels::attention::{paged_attention_ext, write_kv, AttnSeq, KvElem, KvShape};
use pagoda_kernels::KernelError;

use crate::config::KvCacheDtype;

enum Layers {
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
}

pub struct KvPool {
    shape: KvShape,
    layers: Layers,
}

fn alloc<E: KvElem>(num_layers: usize, len: usize) -> Vec<Vec<E>> {
    (0..num_layers).map(|_| vec![E::default(); len]).collect()
}

/// The index of layer `i`, or an error naming it.
fn check_layer(num_layers: usize, i: usize) -> Result<usize, KernelError> {
    if i < num_layers {
        Ok(i)
    } else {
        Err(KernelError::OutOfRange {
            what: "KV layer",
            index: i,
            bound: num_layers,
        })
    }
}

impl KvPool {
    pub fn new(num_layers: usize, shape: KvShape, dtype: KvCacheDtype) -> Self {
        let len = shape.layer_len();
        let layers = match dtype {
            KvCacheDtype::F16 | KvCacheDtype::Auto => Layers::F16 {
                k: alloc(num_layers, len),
                v: alloc(num_layers, len),
            },
            KvCacheDtype::F32 => Layers::F32 {
                k: alloc(num_layers, len),
                v: alloc(num_layers, len),
            },
        };
        Self { shape, layers }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn num_blocks(&self) -> usize {
        self.shape.num_blocks
    }

    /// Store `n` tokens' keys and values (`n × num_kv_heads × head_dim` each) of layer
    /// `li` at `slots`.
    pub fn write(
        &mut self,
        li: usize,
        k: &[f32],
        v: &[f32],
        slots: &[usize],
    ) -> Result<(), KernelError> {
        let shape = self.shape;
        match &mut self.layers {
            Layers::F16 { k: kc, v: vc } => {
                let i = check_layer(kc.len(), li)?;
                write_kv(&shape, &mut kc[i], &mut vc[i], k, v, slots)
            }
            Layers::F32 { k: kc, v: vc } => {
                let i = check_layer(kc.len(), li)?;
                write_kv(&shape, &mut kc[i], &mut vc[i], k, v, slots)
            }
        }
    }

    /// Paged attention of `q` over layer `li` (see
    /// `pagoda_kernels::attention::paged_attention_ext`).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        li: usize,
        q: &[f32],
        num_heads: usize,
        seqs: &[AttnSeq<'_>],
        scale: Option<f32>,
        window: Option<usize>,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let shape = self.shape;
        match &self.layers {
            Layers::F16 { k, v } => {
                let i = check_layer(k.len(), li)?;
                paged_attention_ext(&shape, &k[i], &v[i], q, num_heads, seqs, scale, window, out)
            }
            Layers::F32 { k, v } => {
                let i = check_layer(k.len(), li)?;
                paged_attention_ext(&shape, &k[i], &v[i], q, num_heads, seqs, scale, window, out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f16 and f32 pools attend alike (up to f16 rounding); a bad layer is an error.
    #[test]
    fn f16_and_f32_pools_agree_and_check_layers() {
        let shape = KvShape {
            num_blocks: 4,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let n = 6;
        let k: Vec<f32> = (0..n * 16)
            .map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0)
            .collect();
        let v: Vec<f32> = (0..n * 16)
            .map(|i| ((i * 17) % 19) as f32 / 9.0 - 1.0)
            .collect();
        let q: Vec<f32> = (0..n * 4 * 8)
            .map(|i| ((i * 7) % 13) as f32 / 6.0 - 1.0)
            .collect();
        let table = [2u32, 0];
        let slots: Vec<usize> = (0..n).map(|p| table[p / 4] as usize * 4 + p % 4).collect();
        let seqs = [AttnSeq {
            query_start: 0,
            query_len: n,
            context_len: n,
            block_table: &table,
        }];
        let mut outs = Vec::new();
        for dtype in [KvCacheDtype::F16, KvCacheDtype::F32] {
            let mut pool = KvPool::new(2, shape, dtype);
            pool.write(1, &k, &v, &slots).unwrap();
            let mut out = vec![0f32; q.len()];
            pool.attend(1, &q, 4, &seqs, None, None, &mut out).unwrap();
            assert!(pool.write(2, &k, &v, &slots).is_err());
            assert!(pool.attend(2, &q, 4, &seqs, None, None, &mut out).is_err());
            outs.push(out);
        }
        for (a, b) in outs[0].iter().zip(&outs[1]) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
        let layout = crate::executor::models::KvLayout {
            num_layers: 30,
            heads: 3,
            head_dim: 64,
        };
        assert_eq!(
            crate::executor::backend::kv_bytes_per_block(layout, 16, KvCacheDtype::F32),
            2 * crate::executor::backend::kv_bytes_per_block(layout, 16, KvCacheDtype::F16)
        );
        assert_eq!(KvCacheDtype::Auto.resolve(true), KvCacheDtype::F32);
        assert_eq!(KvCacheDtype::Auto.resolve(false), KvCacheDtype::F16);
        assert_eq!(KvCacheDtype::F32.resolve(false), KvCacheDtype::F32);
    }
}
