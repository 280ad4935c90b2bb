//! The packed (row-interleaved, int8-activation) layout: packing is lossless, and the
//! products of every level agree with each other and with a naive reference.

use super::{assert_close, naive_matmul, rand_vec, rng};
use crate::int8::{parse_setting, Int8Level};
use crate::packed::Acts;
use crate::quant::{Precision, QMatrix, QuantFormat};
use crate::simd::available_levels;

const FORMATS: [QuantFormat; 3] = [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0];

fn rows_of(m: &QMatrix) -> Vec<f32> {
    let mut w = vec![0f32; m.rows() * m.cols()];
    for (r, row) in w.chunks_exact_mut(m.cols()).enumerate() {
        m.dequantize_row(r, row);
    }
    w
}

#[test]
fn packing_keeps_every_weight_and_the_size() {
    let mut rng = rng(41);
    for format in FORMATS {
        let v = rand_vec(&mut rng, 24 * 96, 0.5);
        let m = QMatrix::from_f32(format, 24, 96, &v).unwrap();
        let bytes = m.data().len();
        let before = rows_of(&m);
        let p = m.into_packed();
        assert!(p.is_packed(), "{format:?}");
        assert_eq!(p.data().len(), bytes, "{format:?}: size changed");
        assert_eq!(rows_of(&p), before, "{format:?}: a weight changed");
        // Out-of-range rows are still an error, not a panic.
        assert!(p.try_dequantize_row(24, &mut [0.0; 96]).is_err());
    }
    // Rows not a multiple of 8 keep the ggml layout.
    let m = QMatrix::from_f32(QuantFormat::Q4_1, 5, 32, &[0.1; 160]).unwrap();
    assert!(!m.into_packed().is_packed());
}

/// Activations that are exact multiples of their block's scale quantize without loss,
/// so the int8 product must equal the f32 product up to rounding.
fn exact_activations(rng: &mut rand::rngs::StdRng, n: usize, cols: usize) -> Vec<f32> {
    use rand::Rng;
    let mut x = vec![0f32; n * cols];
    for block in x.chunks_exact_mut(32) {
        let s: f32 = rng.gen_range(0.01..4.0);
        for v in block.iter_mut() {
            *v = rng.gen_range(-127i32..=127) as f32 * s / 127.0;
        }
        block[rng.gen_range(0..32)] = if rng.gen_bool(0.5) { s } else { -s };
    }
    x
}

fn check(format: QuantFormat, rows: usize, cols: usize, n: usize, seed: u64) {
    let mut rng = rng(seed);
    let v = rand_vec(&mut rng, rows * cols, 0.1);
    let m = QMatrix::from_f32(format, rows, cols, &v).unwrap();
    let w = rows_of(&m);
    let packed = m.into_packed();
    assert!(packed.is_packed());
    let x = exact_activations(&mut rng, n, cols);
    let (want, mag) = naive_matmul(&w, rows, cols, &x, n);
    let mut results = Vec::new();
    for precision in [Precision::Precise, Precision::Fast] {
        let p = packed.clone().with_precision(precision);
        for level in available_levels() {
            let mut out = vec![f32::NAN; n * rows];
            p.matmul_with(level, &x, n, &mut out).unwrap();
            let ctx = format!("{format:?} {rows}x{cols} n={n} {level:?} {precision:?}");
            assert_close(&out, &want, &mag, 2e-5, &ctx);
            results.push(out);
        }
        // Every int8 kernel this CPU runs, the portable one included.
        for level in Int8Level::available() {
            let mut out = vec![f32::NAN; n * rows];
            p.int8_matmul_at(level, &x, n, &mut out);
            let ctx = format!("{format:?} {rows}x{cols} n={n} int8 {level} {precision:?}");
            assert_close(&out, &want, &mag, 2e-5, &ctx);
            results.push(out);
        }
    }
    for r in &results[1..] {
        for (a, b) in r.iter().zip(&results[0]) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{format:?}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn packed_matmul_matches_naive_on_exact_activations() {
    let mut seed = 100;
    for format in FORMATS {
        for &(rows, cols) in &[(8, 32), (16, 96), (64, 256), (40, 576)] {
            for n in [1, 2, 3, 5, 8, 9, 17] {
                seed += 1;
                check(format, rows, cols, n, seed);
            }
        }
    }
}

/// AVX2's precise tile width depends on the CPU's vendor (4 tokens on AMD, 2 elsewhere):
/// every width, forced, gives the portable kernel's sums, whichever CPU runs the test.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_precise_tiles_of_every_width_match() {
    if !Int8Level::available().contains(&Int8Level::Avx2) {
        // Like the other kernel tests: only the levels this CPU runs.
        return;
    }
    let mut seed = 900;
    for width in [1, 2, 3, 4, 8] {
        crate::int8::force_avx2_precise_tile(width);
        for format in FORMATS {
            for n in [1, 3, 4, 5, 9] {
                seed += 1;
                let mut rng = rng(seed);
                let (rows, cols) = (16, 96);
                let v = rand_vec(&mut rng, rows * cols, 0.1);
                let p = QMatrix::from_f32(format, rows, cols, &v)
                    .unwrap()
                    .into_packed()
                    .with_precision(Precision::Precise);
                let x = exact_activations(&mut rng, n, cols);
                let (mut want, mut got) = (vec![0f32; n * rows], vec![f32::NAN; n * rows]);
                p.int8_matmul_at(Int8Level::Portable, &x, n, &mut want);
                p.int8_matmul_at(Int8Level::Avx2, &x, n, &mut got);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{format:?} width {width} n={n}: {a} vs {b}"
                    );
                }
            }
        }
    }
    crate::int8::force_avx2_precise_tile(0);
}

#[test]
fn packed_matmul_model_shapes() {
    // SmolLM2-135M: fused qkv (960×576), o (576×576), fused gate/up (3072×576),
    // down (576×1536), and a slice of the Q8_0 output head.
    for &(rows, cols) in &[(960, 576), (576, 576), (3072, 576), (576, 1536)] {
        for n in [1, 4, 33] {
            check(QuantFormat::Q4_1, rows, cols, n, (rows + cols + n) as u64);
        }
    }
    check(QuantFormat::Q8_0, 1024, 576, 2, 7);
}

/// On ordinary activations the only extra error is the rounding of `x`: at most half a
/// step per element (`amax / 254`) with one 8-bit plane, and one fine step
/// (`amax / (127 · 256)`) with two.
#[test]
fn packed_matmul_error_is_bounded_by_activation_rounding() {
    let mut rng = rng(77);
    for (format, precision) in FORMATS
        .into_iter()
        .flat_map(|f| [(f, Precision::Fast), (f, Precision::Precise)])
    {
        let step = match precision {
            Precision::Fast => 1.0 / 254.0,
            Precision::Precise => 1.0 / (127.0 * 256.0),
        };
        let (rows, cols, n) = (32, 320, 6);
        let v = rand_vec(&mut rng, rows * cols, 0.2);
        let m = QMatrix::from_f32(format, rows, cols, &v).unwrap();
        let w = rows_of(&m);
        let p = m.into_packed().with_precision(precision);
        let x = rand_vec(&mut rng, n * cols, 3.0);
        let (want, _) = naive_matmul(&w, rows, cols, &x, n);
        let mut out = vec![0f32; n * rows];
        p.matmul(&x, n, &mut out).unwrap();
        for t in 0..n {
            for r in 0..rows {
                // Σ over blocks of Σ|w − m| · step/2 bounds the rounding error (m = 0
                // except for Q4_1, whose m is the block minimum, so |m| ≤ max |w|).
                let mut bound = 0f64;
                for b in 0..cols / 32 {
                    let xb = &x[t * cols + b * 32..t * cols + b * 32 + 32];
                    let wb = &w[r * cols + b * 32..r * cols + b * 32 + 32];
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    let wmax = wb.iter().fold(0f32, |a, &v| a.max(v.abs())) as f64;
                    let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                    bound += (wsum + 32.0 * wmax) * amax * step;
                }
                let got = out[t * rows + r] as f64;
                let want = want[t * rows + r];
                assert!(
                    (got - want).abs() <= bound * 1.01 + 1e-5,
                    "{format:?} {precision:?} t={t} r={r}: {got} vs {want} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn two_planes_round_trip_within_one_fine_step() {
    let mut rng = rng(4);
    let x = rand_vec(&mut rng, 3 * 96, 2.0);
    let mut acts = Acts::default();
    acts.quantize(&x, 3, 96, true);
    for (i, xb) in x.chunks_exact(32).enumerate() {
        let d = acts.d[i];
        let (q, q2) = (
            &acts.q[i * 32..(i + 1) * 32],
            &acts.q2[i * 32..(i + 1) * 32],
        );
        let codes: Vec<i32> = q
            .iter()
            .zip(q2)
            .map(|(&a, &b)| 256 * a as i32 + b as i32)
            .collect();
        assert_eq!(acts.sq[i], codes.iter().sum::<i32>());
        // The i16 operand of AVX2's Q8_0 kernel is the same combined code, exactly.
        acts.widen();
        let wide: Vec<i32> = acts.wide[i * 32..(i + 1) * 32]
            .iter()
            .map(|&w| i32::from(w))
            .collect();
        assert_eq!(wide, codes);
        for (&v, &c) in xb.iter().zip(&codes) {
            // Half a fine step, or one where the remainder's code is clamped at ±127.
            assert!(
                (v - d * c as f32).abs() <= d * 1.01 + 1e-7,
                "{v} vs {d}·{c}"
            );
        }
    }
}

#[test]
fn activation_quantization_round_trips_within_half_a_step() {
    let mut rng = rng(3);
    let x = rand_vec(&mut rng, 4 * 64, 5.0);
    let mut acts = Acts::default();
    acts.quantize(&x, 4, 64, false);
    for (i, (xb, qb)) in x.chunks_exact(32).zip(acts.q.chunks_exact(32)).enumerate() {
        let d = acts.d[i];
        assert_eq!(acts.sq[i], qb.iter().map(|&q| q as i32).sum::<i32>());
        assert!((acts.xs[i] - xb.iter().sum::<f32>()).abs() < 1e-4);
        for (&v, &q) in xb.iter().zip(qb) {
            assert!((v - d * q as f32).abs() <= d / 2.0 + 1e-6, "{v} vs {d}·{q}");
        }
    }
    // An all-zero block quantizes to zeros with a zero scale (no NaN).
    acts.quantize(&[0.0; 32], 1, 32, false);
    assert_eq!(acts.d[0], 0.0);
    assert!(acts.q.iter().all(|&q| q == 0));
}

#[test]
fn concat_rows_stacks_and_validates() {
    let mut rng = rng(9);
    let a = QMatrix::from_f32(QuantFormat::Q4_1, 8, 64, &rand_vec(&mut rng, 512, 1.0)).unwrap();
    let b = QMatrix::from_f32(QuantFormat::Q4_1, 16, 64, &rand_vec(&mut rng, 1024, 1.0)).unwrap();
    let c = QMatrix::concat_rows(&[&a, &b]).unwrap();
    assert_eq!((c.rows(), c.cols()), (24, 64));
    let mut want = rows_of(&a);
    want.extend(rows_of(&b));
    assert_eq!(rows_of(&c), want);
    let q8 = QMatrix::from_f32(QuantFormat::Q8_0, 8, 64, &[0.5; 512]).unwrap();
    assert!(QMatrix::concat_rows(&[&a, &q8]).is_err());
    assert!(QMatrix::concat_rows(&[]).is_err());
    assert!(QMatrix::concat_rows(&[&a.clone().into_packed()]).is_err());
}

/// The SIMD quantizer (split across threads for a prefill-sized input) gives exactly the
/// codes and scales of the portable one.
#[test]
fn simd_and_parallel_quantization_match_the_portable_one() {
    use crate::packed::{quantize_blocks, BlockOut};
    let mut rng = rng(12);
    let (n, cols) = (300, 576);
    let mut x = rand_vec(&mut rng, n * cols, 4.0);
    x[..32].fill(0.0);
    x[64] = 1e30;
    for precise in [false, true] {
        let mut acts = Acts::default();
        acts.quantize(&x, n, cols, precise);
        let blocks = n * cols / 32;
        let mut q = vec![0i8; n * cols];
        let mut q2 = vec![0i8; if precise { n * cols } else { 0 }];
        let (mut d, mut sq, mut xs) = (vec![0f32; blocks], vec![0i32; blocks], vec![0f32; blocks]);
        let out = BlockOut {
            q: &mut q,
            q2: &mut q2,
            d: &mut d,
            sq: &mut sq,
            xs: &mut xs,
        };
        quantize_blocks(&x, out, precise);
        assert_eq!(acts.q, q, "precise={precise}");
        assert_eq!(acts.q2, q2, "precise={precise}");
        assert_eq!(acts.d, d, "precise={precise}");
        assert_eq!(acts.sq, sq, "precise={precise}");
        for (a, b) in acts.xs.iter().zip(&xs) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}

/// Every level this CPU runs is tested (the portable one on every CPU), and the names
/// `PAGODA_KERNELS_INT8` takes parse; a level the CPU lacks is an error naming it.
#[test]
fn int8_levels_are_detected_and_forced() {
    let have = Int8Level::available();
    assert_eq!(have[0], Int8Level::Portable);
    #[cfg(target_arch = "x86_64")]
    {
        let cpu = |f: &str| match f {
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "avxvnni" => std::arch::is_x86_feature_detected!("avxvnni"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            _ => unreachable!(),
        };
        assert_eq!(have.contains(&Int8Level::Avx2), cpu("avx2"));
        assert_eq!(have.contains(&Int8Level::AvxVnni), cpu("avxvnni"));
        assert_eq!(have.contains(&Int8Level::Avx512Vnni), cpu("avx512vnni"));
        eprintln!("int8 levels on this CPU: {have:?}");
    }
    for level in Int8Level::ALL {
        let got = parse_setting(Some(level.name()));
        if level.supported() {
            assert_eq!(got, Ok(level));
        } else {
            let e = got.unwrap_err();
            assert!(e.contains(level.name()) && e.contains("cannot run"), "{e}");
        }
    }
    assert_eq!(parse_setting(Some("0")), Ok(Int8Level::Off));
    assert_eq!(parse_setting(Some("OFF")), Ok(Int8Level::Off));
    assert_eq!(parse_setting(None), Ok(Int8Level::best()));
    assert_eq!(parse_setting(Some("auto")), Ok(Int8Level::best()));
    let e = parse_setting(Some("avx9")).unwrap_err();
    assert!(e.contains("avx9") && e.contains("avx512_vnni"), "{e}");
    assert!(Int8Level::best() == Int8Level::Off || have.contains(&Int8Level::best()));
    // `auto` takes the first preferred level this CPU runs: AVX-VNNI before AVX-512 VNNI,
    // except on AMD.
    if crate::simd::level() != crate::simd::Level::Scalar {
        let first = Int8Level::preference()
            .into_iter()
            .find(|l| have.contains(l))
            .unwrap_or(Int8Level::Off);
        assert_eq!(Int8Level::best(), first);
        let amd = crate::int8::cpu_is_amd();
        if have.contains(&Int8Level::AvxVnni) && !(amd && have.contains(&Int8Level::Avx512Vnni)) {
            assert_eq!(Int8Level::best(), Int8Level::AvxVnni);
        }
        if amd && have.contains(&Int8Level::Avx512Vnni) {
            assert_eq!(Int8Level::best(), Int8Level::Avx512Vnni);
        }
    }
    // Both orders hold every SIMD level once, AVX2 last.
    for amd in [false, true] {
        let order = Int8Level::preference_for(amd);
        assert_eq!(order[2], Int8Level::Avx2);
        assert!(order.contains(&Int8Level::AvxVnni) && order.contains(&Int8Level::Avx512Vnni));
        assert_eq!(order[0] == Int8Level::Avx512Vnni, amd);
    }
}

/// Q8_0 codes at the extremes (±127 weights against ±127 activations): the AVX2 kernel's
/// signed path cannot saturate where an unsigned one would.
#[test]
fn q8_extremes_do_not_saturate() {
    let (rows, cols, n) = (8, 64, 3);
    let mut v = vec![0f32; rows * cols];
    for (i, w) in v.iter_mut().enumerate() {
        *w = if (i / 3) % 2 == 0 { 1.0 } else { -1.0 };
    }
    let m = QMatrix::from_f32(QuantFormat::Q8_0, rows, cols, &v).unwrap();
    let w = rows_of(&m);
    let p = m.into_packed();
    let mut x = vec![0f32; n * cols];
    for (i, xv) in x.iter_mut().enumerate() {
        *xv = if (i / 2) % 3 == 0 { -1.0 } else { 1.0 };
    }
    let (want, mag) = naive_matmul(&w, rows, cols, &x, n);
    for precision in [Precision::Precise, Precision::Fast] {
        let p = p.clone().with_precision(precision);
        for level in Int8Level::available() {
            let mut out = vec![f32::NAN; n * rows];
            p.int8_matmul_at(level, &x, n, &mut out);
            assert_close(&out, &want, &mag, 1e-5, &format!("{level} {precision:?}"));
        }
    }
}
