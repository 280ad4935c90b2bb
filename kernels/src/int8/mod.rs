//! The int8 product on the packed layout ([`crate::packed`]), one implementation per
//! instruction set, chosen at run time:
//!
//! | level | instruction | files |
//! |---|---|---|
//! | [`Int8Level::Avx512Vnni`] | EVEX `vpdpbusd` on 256-bit registers (32 of them) | `avx512_vnni.rs` |
//! | [`Int8Level::AvxVnni`] | VEX `vpdpbusd` (AVX-VNNI: Alder Lake, Sapphire Rapids, Zen 5) | `avx_vnni.rs` |
//! | [`Int8Level::Avx2`] | `vpmaddubsw` + `vpmaddwd` (every AVX2 server) | `avx2.rs` |
//! | [`Int8Level::Portable`] | plain Rust ([`crate::packed::groups_portable`], the reference) | `packed.rs` |
//!
//! The x86 levels share one register tile (`tile.rs`), generic over the instruction
//! that multiplies four u8 weights by four i8 activations into an i32 lane ([`tile::Dot`]).
//!
//! `PAGODA_KERNELS_INT8` picks the level: unset or `auto` takes the best this CPU has
//! ([`Int8Level::preference`]: AVX-VNNI, then AVX-512 VNNI, then AVX2 — the two VNNI
//! levels the other way round on AMD; none — the ggml
//! layout with f32 activations — on a CPU without AVX2/FMA/F16C or with
//! `PAGODA_KERNELS_SCALAR=1`); `off` (or `0`) keeps the ggml layout; `portable`, `avx2`,
//! `avx_vnni`, `avx512_vnni` force one, so a machine with a higher level measures and
//! tests a lower one. Forcing a level this CPU lacks is an error ([`setting`]).

use crate::gemm::OutWriter;
use crate::packed::{self, Acts};
use crate::quant::QuantFormat;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512_vnni;
#[cfg(target_arch = "x86_64")]
mod avx_vnni;
#[cfg(target_arch = "x86_64")]
mod tile;

#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) use avx2::force_precise_tile as force_avx2_precise_tile;

/// Which int8 kernel quantized matmuls use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Int8Level {
    /// No int8 path: matrices keep the ggml layout and multiply f32 activations.
    Off,
    /// The packed layout with the portable kernel (slow; for tests and other targets).
    Portable,
    /// AVX2: `vpmaddubsw` / `vpmaddwd`.
    Avx2,
    /// AVX-VNNI: VEX-encoded `vpdpbusd`.
    AvxVnni,
    /// AVX-512 VNNI: EVEX-encoded `vpdpbusd`, 32 registers.
    Avx512Vnni,
}

/// The environment variable that picks the level.
pub const ENV: &str = "PAGODA_KERNELS_INT8";

impl Int8Level {
    /// Every level, lowest first.
    pub const ALL: [Int8Level; 5] = [
        Int8Level::Off,
        Int8Level::Portable,
        Int8Level::Avx2,
        Int8Level::AvxVnni,
        Int8Level::Avx512Vnni,
    ];

    /// The name used in logs, reports and `PAGODA_KERNELS_INT8`.
    pub fn name(self) -> &'static str {
        match self {
            Int8Level::Off => "off",
            Int8Level::Portable => "portable",
            Int8Level::Avx2 => "avx2",
            Int8Level::AvxVnni => "avx_vnni",
            Int8Level::Avx512Vnni => "avx512_vnni",
        }
    }

    /// Whether this CPU runs the level (`Off` and `Portable` run everywhere).
    pub fn supported(self) -> bool {
        match self {
            Int8Level::Off | Int8Level::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Int8Level::AvxVnni => avx_vnni::available(),
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx512Vnni => avx512_vnni::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The SIMD levels `auto` picks from on this CPU's vendor, best first. Where a CPU has
    /// both VNNI forms (docs/performance.md): on the Intel Xeons measured, the VEX kernel
    /// (AVX-VNNI) was ahead at every batch size end to end (+5–17 % on the default model);
    /// on an AMD Zen 5, with a full-width AVX-512 unit, the EVEX kernel was (+10–36 % at
    /// one stream, level or ahead at 32).
    pub fn preference() -> [Int8Level; 3] {
        Self::preference_for(cpu_is_amd())
    }

    /// [`Self::preference`] on an AMD CPU (`amd`) or any other.
    pub fn preference_for(amd: bool) -> [Int8Level; 3] {
        if amd {
            [Int8Level::Avx512Vnni, Int8Level::AvxVnni, Int8Level::Avx2]
        } else {
            [Int8Level::AvxVnni, Int8Level::Avx512Vnni, Int8Level::Avx2]
        }
    }

    /// The best SIMD level this CPU runs ([`Int8Level::preference`]), or `Off` (also when
    /// the portable kernels are forced with `PAGODA_KERNELS_SCALAR=1`).
    pub fn best() -> Int8Level {
        if crate::simd::level() == crate::simd::Level::Scalar {
            return Int8Level::Off;
        }
        Self::preference()
            .into_iter()
            .find(|l| l.supported())
            .unwrap_or(Int8Level::Off)
    }

    /// Every level this CPU runs that uses the packed layout, lowest first.
    pub fn available() -> Vec<Int8Level> {
        Self::ALL
            .into_iter()
            .filter(|l| *l != Int8Level::Off && l.supported())
            .collect()
    }
}

/// Whether the CPU's vendor string is AMD's (the kernels' choices that depend on the
/// microarchitecture go by vendor).
pub(crate) fn cpu_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        for (i, reg) in [r.ebx, r.edx, r.ecx].into_iter().enumerate() {
            vendor[4 * i..4 * i + 4].copy_from_slice(&reg.to_le_bytes());
        }
        &vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl std::fmt::Display for Int8Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The level a value of `PAGODA_KERNELS_INT8` asks for (`None`: unset), or why it cannot
/// be had.
pub fn parse_setting(value: Option<&str>) -> Result<Int8Level, String> {
    let Some(v) = value.map(str::trim) else {
        return Ok(Int8Level::best());
    };
    let level = match v.to_ascii_lowercase().as_str() {
        "" | "auto" | "1" => return Ok(Int8Level::best()),
        "0" | "off" => Int8Level::Off,
        other => Int8Level::ALL
            .into_iter()
            .find(|l| l.name() == other)
            .ok_or_else(|| {
                format!(
                    "{ENV}={v} is not a level (auto, off, portable, avx2, avx_vnni, avx512_vnni)"
                )
            })?,
    };
    if level.supported() {
        Ok(level)
    } else {
        let have: Vec<&str> = Int8Level::available().iter().map(|l| l.name()).collect();
        Err(format!(
            "{ENV}={v}: this CPU cannot run {} (it runs: {})",
            level.name(),
            have.join(", ")
        ))
    }
}

/// What `PAGODA_KERNELS_INT8` asks for, checked against this CPU. Servers call it at
/// start so that a bad value is an error, not a silent fallback.
pub fn setting() -> Result<Int8Level, String> {
    let v = std::env::var(ENV).ok();
    parse_setting(v.as_deref())
}

/// The level in use: [`setting`], or [`Int8Level::best`] where the setting is bad.
pub fn level() -> Int8Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Int8Level> = OnceLock::new();
    *LEVEL.get_or_init(|| setting().unwrap_or_else(|_| Int8Level::best()))
}

/// One product of a packed matrix: its bytes, the step's quantized activations, and
/// where the `n × rows` results go.
pub(crate) struct Product<'a, 'o> {
    pub format: QuantFormat,
    /// The packed matrix (`rows / 8` groups of `cols / 32` records).
    pub data: &'a [u8],
    pub cols: usize,
    /// `n` tokens of `cols` quantized activations.
    pub acts: &'a Acts,
    pub n: usize,
    pub out: &'a OutWriter<'o>,
}

/// Whether `level` multiplies `format` by the combined i16 codes ([`Acts::widen`], to be
/// filled before [`groups`]): AVX2's Q8_0 kernel with precise activations.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(crate) fn wants_wide(level: Int8Level, format: QuantFormat, precise: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level == Int8Level::Avx2 && level.supported() {
        return avx2::wide(format, precise);
    }
    false
}

/// Groups `g0..g1` of `p` (rows `g0·8..g1·8` for every token) on `level` (the portable
/// kernel for `Off`, `Portable`, or a level this CPU lacks).
///
/// # Safety
/// The caller must be the only writer of rows `g0·8..g1·8` of `p.out`; `p.data` must hold
/// at least `g1` groups of `p.cols` columns and `p.acts` `p.n` tokens (widened where
/// [`wants_wide`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(crate) unsafe fn groups(level: Int8Level, p: &Product<'_, '_>, g0: usize, g1: usize) {
    // SAFETY (every arm): the level's CPU features were checked just above; the rest is
    // this function's contract, forwarded.
    #[cfg(target_arch = "x86_64")]
    if level.supported() {
        match level {
            Int8Level::Avx512Vnni => return unsafe { avx512_vnni::groups(p, g0, g1) },
            Int8Level::AvxVnni => return unsafe { avx_vnni::groups(p, g0, g1) },
            Int8Level::Avx2 => return unsafe { avx2::groups(p, g0, g1) },
            Int8Level::Off | Int8Level::Portable => {}
        }
    }
    packed::groups_portable(p.format, p.data, p.cols, g0, g1, p.acts, p.n, |t, r, v| {
        // SAFETY: row ownership is the caller's contract.
        unsafe { p.out.put(t, r, v) }
    });
}
