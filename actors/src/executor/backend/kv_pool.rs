//! The unified paged KV pool: one K and one V buffer per layer (one buffer in all for
//! models whose values are their keys, as DeepSeek's latent attention), allocated once at
//! start-up and shared by every sequence through block tables. Layout per layer:
//! `[num_blocks][block_size][num_kv_heads][head_dim]`, in f16 (the default: half the
//! memory, and half the bytes every decode step reads) or f32 (`cache.kv_cache_dtype`).

use half::f16;
use pagoda_kernels::attention::{
    paged_attention_ext, write_kv, write_rows, AttnSeq, KvElem, KvShape,
};
use pagoda_kernels::KernelError;

use crate::config::KvCacheDtype;

/// Per layer, the K buffer and — unless values are the keys — the V buffer.
struct Buffers<E> {
    k: Vec<Vec<E>>,
    v: Option<Vec<Vec<E>>>,
}

impl<E: KvElem> Buffers<E> {
    fn new(num_layers: usize, len: usize, values_are_keys: bool) -> Self {
        let alloc = || (0..num_layers).map(|_| vec![E::default(); len]).collect();
        Self {
            k: alloc(),
            v: (!values_are_keys).then(alloc),
        }
    }

    /// Copies whole blocks, `(src, dst)`, in every layer's buffers.
    fn copy_blocks(&mut self, shape: &KvShape, pairs: &[(u32, u32)]) -> Result<(), KernelError> {
        let block_len = shape.block_size * shape.num_kv_heads * shape.head_dim;
        for &(src, dst) in pairs {
            for (what, b) in [("source", src), ("destination", dst)] {
                if b as usize >= shape.num_blocks {
                    return Err(KernelError::OutOfRange {
                        what: if what == "source" {
                            "KV block copy source"
                        } else {
                            "KV block copy destination"
                        },
                        index: b as usize,
                        bound: shape.num_blocks,
                    });
                }
            }
            if src == dst {
                continue;
            }
            let (from, to) = (src as usize * block_len, dst as usize * block_len);
            let buffers = self.k.iter_mut().chain(self.v.iter_mut().flatten());
            for buf in buffers {
                buf.copy_within(from..from + block_len, to);
            }
        }
        Ok(())
    }

    fn write(
        &mut self,
        shape: &KvShape,
        li: usize,
        k: &[f32],
        v: Option<&[f32]>,
        slots: &[usize],
    ) -> Result<(), KernelError> {
        let i = check_layer(self.k.len(), li)?;
        match (&mut self.v, v) {
            (Some(vc), Some(v)) => write_kv(shape, &mut self.k[i], &mut vc[i], k, v, slots),
            (None, None) => write_rows(shape, &mut self.k[i], k, slots),
            (Some(_), None) => Err(values_mismatch("values are missing")),
            (None, Some(_)) => Err(values_mismatch(
                "values given to a pool whose values are its keys",
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        shape: &KvShape,
        li: usize,
        q: &[f32],
        num_heads: usize,
        seqs: &[AttnSeq<'_>],
        scale: Option<f32>,
        window: Option<usize>,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let i = check_layer(self.k.len(), li)?;
        let k = &self.k[i];
        let v = self.v.as_ref().map_or(k, |v| &v[i]);
        paged_attention_ext(shape, k, v, q, num_heads, seqs, scale, window, out)
    }
}

enum Layers {
    F16(Buffers<f16>),
    F32(Buffers<f32>),
}

pub struct KvPool {
    shape: KvShape,
    layers: Layers,
}

fn values_mismatch(reason: &str) -> KernelError {
    KernelError::InvalidShape {
        what: "KV write",
        reason: reason.into(),
    }
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
    /// A pool of `num_layers` layers; with `values_are_keys` each layer keeps one buffer,
    /// which attention reads as keys and as values.
    pub fn new(
        num_layers: usize,
        shape: KvShape,
        dtype: KvCacheDtype,
        values_are_keys: bool,
    ) -> Self {
        let len = shape.layer_len();
        let layers = match dtype {
            KvCacheDtype::F16 | KvCacheDtype::Auto => {
                Layers::F16(Buffers::new(num_layers, len, values_are_keys))
            }
            KvCacheDtype::F32 => Layers::F32(Buffers::new(num_layers, len, values_are_keys)),
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
    /// `li` at `slots`; `v` is `None` exactly when the pool's values are its keys.
    pub fn write(
        &mut self,
        li: usize,
        k: &[f32],
        v: Option<&[f32]>,
        slots: &[usize],
    ) -> Result<(), KernelError> {
        let shape = self.shape;
        match &mut self.layers {
            Layers::F16(b) => b.write(&shape, li, k, v, slots),
            Layers::F32(b) => b.write(&shape, li, k, v, slots),
        }
    }

    /// Copies whole blocks `(src, dst)` in every layer (copy on write of a shared block).
    pub fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<(), KernelError> {
        let shape = self.shape;
        match &mut self.layers {
            Layers::F16(b) => b.copy_blocks(&shape, pairs),
            Layers::F32(b) => b.copy_blocks(&shape, pairs),
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
            Layers::F16(b) => b.attend(&shape, li, q, num_heads, seqs, scale, window, out),
            Layers::F32(b) => b.attend(&shape, li, q, num_heads, seqs, scale, window, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1): `(i·mul mod m) / div − 1`.
    fn pattern(len: usize, mul: usize, m: usize, div: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * mul) % m) as f32 / div - 1.0)
            .collect()
    }

    /// The slots of positions `0..n` through `table` (blocks of 4).
    fn slots(table: &[u32], n: usize) -> Vec<usize> {
        (0..n).map(|p| table[p / 4] as usize * 4 + p % 4).collect()
    }

    /// One sequence of `n` tokens, all queries, over `table`.
    fn one_seq(table: &[u32], n: usize) -> [AttnSeq<'_>; 1] {
        [AttnSeq {
            query_start: 0,
            query_len: n,
            context_len: n,
            block_table: table,
        }]
    }

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
        let k = pattern(n * 16, 37, 23, 11.0);
        let v = pattern(n * 16, 17, 19, 9.0);
        let q = pattern(n * 4 * 8, 7, 13, 6.0);
        let table = [2u32, 0];
        let slots = slots(&table, n);
        let seqs = one_seq(&table, n);
        let mut outs = Vec::new();
        for dtype in [KvCacheDtype::F16, KvCacheDtype::F32] {
            let mut pool = KvPool::new(2, shape, dtype, false);
            pool.write(1, &k, Some(&v), &slots).unwrap();
            let mut out = vec![0f32; q.len()];
            pool.attend(1, &q, 4, &seqs, None, None, &mut out).unwrap();
            assert!(pool.write(2, &k, Some(&v), &slots).is_err());
            assert!(pool.write(1, &k, None, &slots).is_err());
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
            values_are_keys: false,
        };
        assert_eq!(
            crate::executor::backend::kv_bytes_per_block(layout, 16, KvCacheDtype::F32),
            2 * crate::executor::backend::kv_bytes_per_block(layout, 16, KvCacheDtype::F16)
        );
        assert_eq!(KvCacheDtype::Auto.resolve(true), KvCacheDtype::F32);
        assert_eq!(KvCacheDtype::Auto.resolve(false), KvCacheDtype::F16);
        assert_eq!(KvCacheDtype::F32.resolve(false), KvCacheDtype::F32);
    }

    /// A copied block attends exactly like its source, in every layer and both buffers;
    /// the source is untouched by writes to the copy; bad block ids are errors.
    #[test]
    fn copied_blocks_attend_like_their_source() {
        let shape = KvShape {
            num_blocks: 5,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let n = 7;
        let k = pattern(n * 16, 37, 23, 11.0);
        let v = pattern(n * 16, 17, 19, 9.0);
        let q = pattern(n * 4 * 8, 7, 13, 6.0);
        for dtype in [KvCacheDtype::F16, KvCacheDtype::F32] {
            for values_are_keys in [false, true] {
                let v = (!values_are_keys).then_some(v.as_slice());
                let mut pool = KvPool::new(2, shape, dtype, values_are_keys);
                let (src, dst) = ([0u32, 3], [0u32, 4]);
                for layer in 0..2 {
                    pool.write(layer, &k, v, &slots(&src, n)).unwrap();
                }
                let attend = |pool: &KvPool, table: &[u32], layer| {
                    let mut out = vec![0f32; q.len()];
                    pool.attend(layer, &q, 4, &one_seq(table, n), None, None, &mut out)
                        .unwrap();
                    out
                };
                pool.copy_blocks(&[(3, 4)]).unwrap();
                for layer in 0..2 {
                    assert_eq!(attend(&pool, &src, layer), attend(&pool, &dst, layer));
                }
                // Writing the copy's last position leaves the source as it was.
                let before = attend(&pool, &src, 1);
                let row = pattern(16, 3, 5, 2.0);
                let vrow = v.map(|_| row.as_slice());
                pool.write(1, &row, vrow, &[4 * 4 + 2]).unwrap();
                assert_eq!(attend(&pool, &src, 1), before);
                assert_ne!(attend(&pool, &dst, 1), before);
                assert!(pool.copy_blocks(&[(5, 1)]).is_err());
                assert!(pool.copy_blocks(&[(1, 5)]).is_err());
            }
        }
    }

    /// A pool whose values are its keys keeps one buffer per layer (half the bytes) and
    /// attends exactly as a two-buffer pool given the same rows as K and V.
    #[test]
    fn values_are_keys_pool_attends_like_k_equals_v() {
        let shape = KvShape {
            num_blocks: 3,
            block_size: 4,
            num_kv_heads: 1,
            head_dim: 12,
        };
        let n = 7;
        let rows = pattern(n * 12, 29, 31, 15.0);
        let q = pattern(n * 3 * 12, 11, 17, 8.0);
        let table = [1u32, 2];
        let slots = slots(&table, n);
        let seqs = one_seq(&table, n);
        let mut two = KvPool::new(1, shape, KvCacheDtype::F32, false);
        two.write(0, &rows, Some(&rows), &slots).unwrap();
        let mut one = KvPool::new(1, shape, KvCacheDtype::F32, true);
        assert!(one.write(0, &rows, Some(&rows), &slots).is_err());
        one.write(0, &rows, None, &slots).unwrap();
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        two.attend(0, &q, 3, &seqs, Some(0.3), None, &mut a)
            .unwrap();
        one.attend(0, &q, 3, &seqs, Some(0.3), None, &mut b)
            .unwrap();
        assert_eq!(a, b);
        let layout = |values_are_keys| crate::executor::models::KvLayout {
            num_layers: 27,
            heads: 1,
            head_dim: 576,
            values_are_keys,
        };
        let bytes = |l| crate::executor::backend::kv_bytes_per_block(l, 16, KvCacheDtype::F16);
        assert_eq!(2 * bytes(layout(true)), bytes(layout(false)));
        assert_eq!(bytes(layout(true)), 27 * 16 * 576 * 2);
    }
}
