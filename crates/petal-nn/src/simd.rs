//! The vector operations the kernels need, for three instruction sets:
//! AVX-512 (16 lanes), AVX2 + FMA (8 lanes) and a portable fallback (8
//! lanes of plain Rust, which the compiler vectorizes as it can). Kernels
//! are generic over [`Simd`] and instantiated once per instruction set
//! inside a `#[target_feature]` function (see `kernels.rs`), chosen at run
//! time by [`Isa::detect`].

/// An instruction set the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512F.
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU has; `PETAL_NN_ISA`
    /// (`portable`, `avx2`, `avx512`) can ask for a lesser one.
    pub fn detect() -> Isa {
        let best = Self::best();
        match std::env::var("PETAL_NN_ISA").ok().as_deref() {
            Some("portable") => Isa::Portable,
            Some("avx2") if best != Isa::Portable => Isa::Avx2,
            _ => best,
        }
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run (for tests comparing them).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        match Self::best() {
            Isa::Avx512 => v.extend([Isa::Avx2, Isa::Avx512]),
            Isa::Avx2 => v.push(Isa::Avx2),
            Isa::Portable => {}
        }
        v
    }

    /// Floats per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 | Isa::Portable => 8,
        }
    }

    /// Vector registers the kernels may plan for.
    pub(crate) fn registers(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 | Isa::Portable => 16,
        }
    }
}

/// Vector operations on `LANES` floats. All methods are unsafe: pointers
/// must be valid for `LANES` floats, and the instruction set must be
/// available (guaranteed by the dispatch in `kernels.rs`).
pub(crate) trait Simd: Copy {
    const LANES: usize;
    type V: Copy;
    type M: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `b > a ? b : a`: keeps `a` on ties (the first maximum, as PyTorch's
    /// max-pool) and when `a` is NaN (as PyTorch's ReLU).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> f32;
    unsafe fn eq(a: Self::V, b: Self::V) -> Self::M;
    unsafe fn gt(a: Self::V, b: Self::V) -> Self::M;
    /// `!a & b`.
    unsafe fn andnot(a: Self::M, b: Self::M) -> Self::M;
    unsafe fn or(a: Self::M, b: Self::M) -> Self::M;
    /// `m ? a : 0`.
    unsafe fn keep(m: Self::M, a: Self::V) -> Self::V;
    unsafe fn none() -> Self::M;
}

/// Plain Rust, 8 lanes.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Simd for Portable {
    const LANES: usize = 8;
    type V = [f32; 8];
    type M = [bool; 8];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        // SAFETY: the caller guarantees 8 readable floats at `p`.
        unsafe { std::ptr::read_unaligned(p as *const [f32; 8]) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees 8 writable floats at `p`.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if b[i] > a[i] { b[i] } else { a[i] })
    }
    #[inline(always)]
    unsafe fn hsum(v: Self::V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn eq(a: Self::V, b: Self::V) -> Self::M {
        std::array::from_fn(|i| a[i] == b[i])
    }
    #[inline(always)]
    unsafe fn gt(a: Self::V, b: Self::V) -> Self::M {
        std::array::from_fn(|i| a[i] > b[i])
    }
    #[inline(always)]
    unsafe fn andnot(a: Self::M, b: Self::M) -> Self::M {
        std::array::from_fn(|i| !a[i] & b[i])
    }
    #[inline(always)]
    unsafe fn or(a: Self::M, b: Self::M) -> Self::M {
        std::array::from_fn(|i| a[i] | b[i])
    }
    #[inline(always)]
    unsafe fn keep(m: Self::M, a: Self::V) -> Self::V {
        std::array::from_fn(|i| if m[i] { a[i] } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn none() -> Self::M {
        [false; 8]
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA, 8 lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    // SAFETY (whole impl): only called from functions compiled with
    // `avx2,fma` enabled, after runtime detection.
    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        type M = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            // `_mm256_max_ps(x, y)` is `x > y ? x : y`.
            unsafe { _mm256_max_ps(b, a) }
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            unsafe {
                let lo = _mm256_castps256_ps128(v);
                let hi = _mm256_extractf128_ps(v, 1);
                let s = _mm_add_ps(lo, hi);
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        unsafe fn eq(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_cmp_ps(a, b, _CMP_EQ_OQ) }
        }
        #[inline(always)]
        unsafe fn gt(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_cmp_ps(a, b, _CMP_GT_OQ) }
        }
        #[inline(always)]
        unsafe fn andnot(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_andnot_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn or(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_or_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn keep(m: __m256, a: __m256) -> __m256 {
            unsafe { _mm256_and_ps(m, a) }
        }
        #[inline(always)]
        unsafe fn none() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
    }

    /// AVX-512F, 16 lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    // SAFETY (whole impl): only called from functions compiled with
    // `avx512f` enabled, after runtime detection.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        type M = __mmask16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(b, a) }
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        unsafe fn eq(a: __m512, b: __m512) -> __mmask16 {
            unsafe { _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ) }
        }
        #[inline(always)]
        unsafe fn gt(a: __m512, b: __m512) -> __mmask16 {
            unsafe { _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) }
        }
        #[inline(always)]
        unsafe fn andnot(a: __mmask16, b: __mmask16) -> __mmask16 {
            !a & b
        }
        #[inline(always)]
        unsafe fn or(a: __mmask16, b: __mmask16) -> __mmask16 {
            a | b
        }
        #[inline(always)]
        unsafe fn keep(m: __mmask16, a: __m512) -> __m512 {
            unsafe { _mm512_maskz_mov_ps(m, a) }
        }
        #[inline(always)]
        unsafe fn none() -> __mmask16 {
            0
        }
    }
}
