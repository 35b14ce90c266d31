//! Distance kernels with runtime CPU dispatch.
//!
//! Every kernel exists as a plain scalar loop (the reference, and the fallback on CPUs without
//! the features below) and as AVX2+FMA and AVX-512F versions. [`kernels()`] picks the best set
//! once per process with `is_x86_feature_detected!`, so one binary runs everywhere (no
//! `-C target-cpu=native`: that SIGILLs on older CPUs). The SIMD versions keep several
//! accumulators to hide FMA latency; their sums differ from the scalar loop's only by float
//! rounding.

use std::sync::OnceLock;

/// `(a·b, a·a, b·b)`, what a cosine distance needs, in one pass.
pub type CosineParts = (f32, f32, f32);

/// One set of kernels. All take slices of equal length (the caller checks).
pub struct Kernels {
    pub name: &'static str,
    pub dot: fn(&[f32], &[f32]) -> f32,
    pub l2_squared: fn(&[f32], &[f32]) -> f32,
    pub l1: fn(&[f32], &[f32]) -> f32,
    pub cosine_parts: fn(&[f32], &[f32]) -> CosineParts,
}

/// The scalar reference kernels.
pub static SCALAR: Kernels = Kernels {
    name: "scalar",
    dot: scalar::dot,
    l2_squared: scalar::l2_squared,
    l1: scalar::l1,
    cosine_parts: scalar::cosine_parts,
};

/// The best kernels this CPU supports, chosen on first use.
pub fn kernels() -> &'static Kernels {
    static CHOSEN: OnceLock<&'static Kernels> = OnceLock::new();
    CHOSEN.get_or_init(detect)
}

/// Every kernel set this CPU can run, best first (for tests and benchmarks).
pub fn available() -> Vec<&'static Kernels> {
    let mut all = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            all.push(&x86::AVX512);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            all.push(&x86::AVX2);
        }
    }
    all.push(&SCALAR);
    all
}

fn detect() -> &'static Kernels {
    available()[0]
}

/// Cosine distance from its parts, as pgvector computes it: NaN when either vector is zero,
/// the similarity clamped to [-1, 1] against rounding.
pub fn cosine_distance_from_parts((dot, norm_a, norm_b): CosineParts) -> f64 {
    let similarity = dot as f64 / (norm_a as f64 * norm_b as f64).sqrt();
    if similarity.is_nan() {
        return f64::NAN;
    }
    1.0 - similarity.clamp(-1.0, 1.0)
}

pub mod scalar {
    use super::CosineParts;

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut sum = 0.0f32;
        for (x, y) in a.iter().zip(b) {
            sum += x * y;
        }
        sum
    }

    pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
        let mut sum = 0.0f32;
        for (x, y) in a.iter().zip(b) {
            let d = x - y;
            sum += d * d;
        }
        sum
    }

    pub fn l1(a: &[f32], b: &[f32]) -> f32 {
        let mut sum = 0.0f32;
        for (x, y) in a.iter().zip(b) {
            sum += (x - y).abs();
        }
        sum
    }

    pub fn cosine_parts(a: &[f32], b: &[f32]) -> CosineParts {
        let (mut ab, mut aa, mut bb) = (0.0f32, 0.0f32, 0.0f32);
        for (x, y) in a.iter().zip(b) {
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        (ab, aa, bb)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Safety, for the whole module: each `unsafe` block below either calls a
    //! `#[target_feature]` function, which `available()` only hands out after detecting the
    //! feature, or loads through pointers at offsets `< n` where `n` is the shorter slice's
    //! length.
    use super::{CosineParts, Kernels};
    use std::arch::x86_64::*;

    pub static AVX2: Kernels = Kernels {
        name: "avx2+fma",
        dot: |a, b| unsafe { dot_avx2(a, b) },
        l2_squared: |a, b| unsafe { l2_squared_avx2(a, b) },
        l1: |a, b| unsafe { l1_avx2(a, b) },
        cosine_parts: |a, b| unsafe { cosine_parts_avx2(a, b) },
    };

    pub static AVX512: Kernels = Kernels {
        name: "avx512f",
        dot: |a, b| unsafe { dot_avx512(a, b) },
        l2_squared: |a, b| unsafe { l2_squared_avx512(a, b) },
        l1: |a, b| unsafe { l1_avx512(a, b) },
        cosine_parts: |a, b| unsafe { cosine_parts_avx512(a, b) },
    };

    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Runs `step(acc, x, y)` over 8-lane blocks with four accumulators, then the tail in
    /// scalar code with `tail(x, y)`.
    macro_rules! avx2_reduce {
        ($a:expr, $b:expr, $step:expr, $tail:expr) => {{
            let (a, b) = ($a, $b);
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let (x, y) = unsafe {
                        (_mm256_loadu_ps(pa.add(i + 8 * k)), _mm256_loadu_ps(pb.add(i + 8 * k)))
                    };
                    *acc = $step(*acc, x, y);
                }
                i += 32;
            }
            while i + 8 <= n {
                let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
                acc[0] = $step(acc[0], x, y);
                i += 8;
            }
            let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut sum = hsum256(total);
            for j in i..n {
                sum += $tail(a[j], b[j]);
            }
            sum
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        avx2_reduce!(a, b, |acc, x, y| _mm256_fmadd_ps(x, y, acc), |x: f32, y: f32| x * y)
    }

    #[target_feature(enable = "avx2,fma")]
    fn l2_squared_avx2(a: &[f32], b: &[f32]) -> f32 {
        avx2_reduce!(
            a,
            b,
            |acc, x, y| {
                let d = _mm256_sub_ps(x, y);
                _mm256_fmadd_ps(d, d, acc)
            },
            |x: f32, y: f32| (x - y) * (x - y)
        )
    }

    #[target_feature(enable = "avx2,fma")]
    fn l1_avx2(a: &[f32], b: &[f32]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        avx2_reduce!(
            a,
            b,
            |acc, x, y| _mm256_add_ps(acc, _mm256_andnot_ps(sign, _mm256_sub_ps(x, y))),
            |x: f32, y: f32| (x - y).abs()
        )
    }

    #[target_feature(enable = "avx2,fma")]
    fn cosine_parts_avx2(a: &[f32], b: &[f32]) -> CosineParts {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut ab, mut aa, mut bb) = ([_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2]);
        let mut i = 0;
        while i + 16 <= n {
            for k in 0..2 {
                let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i + 8 * k)), _mm256_loadu_ps(pb.add(i + 8 * k))) };
                ab[k] = _mm256_fmadd_ps(x, y, ab[k]);
                aa[k] = _mm256_fmadd_ps(x, x, aa[k]);
                bb[k] = _mm256_fmadd_ps(y, y, bb[k]);
            }
            i += 16;
        }
        while i + 8 <= n {
            let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
            ab[0] = _mm256_fmadd_ps(x, y, ab[0]);
            aa[0] = _mm256_fmadd_ps(x, x, aa[0]);
            bb[0] = _mm256_fmadd_ps(y, y, bb[0]);
            i += 8;
        }
        let mut s_ab = hsum256(_mm256_add_ps(ab[0], ab[1]));
        let mut s_aa = hsum256(_mm256_add_ps(aa[0], aa[1]));
        let mut s_bb = hsum256(_mm256_add_ps(bb[0], bb[1]));
        for j in i..n {
            s_ab += a[j] * b[j];
            s_aa += a[j] * a[j];
            s_bb += b[j] * b[j];
        }
        (s_ab, s_aa, s_bb)
    }

    /// Mask selecting the first `rest` (< 16) lanes.
    fn tail_mask(rest: usize) -> __mmask16 {
        ((1u32 << rest) - 1) as __mmask16
    }

    /// Runs `step(acc, x, y)` over 16-lane blocks with four accumulators; the tail is loaded
    /// with a mask (masked-off lanes read as zero, which every step here maps to zero).
    macro_rules! avx512_reduce {
        ($a:expr, $b:expr, $step:expr) => {{
            let (a, b) = ($a, $b);
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let (x, y) = unsafe {
                        (_mm512_loadu_ps(pa.add(i + 16 * k)), _mm512_loadu_ps(pb.add(i + 16 * k)))
                    };
                    *acc = $step(*acc, x, y);
                }
                i += 64;
            }
            while i + 16 <= n {
                let (x, y) = unsafe { (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i))) };
                acc[0] = $step(acc[0], x, y);
                i += 16;
            }
            if i < n {
                let m = tail_mask(n - i);
                let (x, y) = unsafe { (_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i))) };
                acc[1] = $step(acc[1], x, y);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
        }};
    }

    #[target_feature(enable = "avx512f")]
    fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        avx512_reduce!(a, b, |acc, x, y| _mm512_fmadd_ps(x, y, acc))
    }

    #[target_feature(enable = "avx512f")]
    fn l2_squared_avx512(a: &[f32], b: &[f32]) -> f32 {
        avx512_reduce!(a, b, |acc, x, y| {
            let d = _mm512_sub_ps(x, y);
            _mm512_fmadd_ps(d, d, acc)
        })
    }

    #[target_feature(enable = "avx512f")]
    fn l1_avx512(a: &[f32], b: &[f32]) -> f32 {
        avx512_reduce!(a, b, |acc, x, y| _mm512_add_ps(acc, _mm512_abs_ps(_mm512_sub_ps(x, y))))
    }

    #[target_feature(enable = "avx512f")]
    fn cosine_parts_avx512(a: &[f32], b: &[f32]) -> CosineParts {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut ab, mut aa, mut bb) = ([_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2]);
        let mut i = 0;
        while i + 32 <= n {
            for k in 0..2 {
                let (x, y) = unsafe { (_mm512_loadu_ps(pa.add(i + 16 * k)), _mm512_loadu_ps(pb.add(i + 16 * k))) };
                ab[k] = _mm512_fmadd_ps(x, y, ab[k]);
                aa[k] = _mm512_fmadd_ps(x, x, aa[k]);
                bb[k] = _mm512_fmadd_ps(y, y, bb[k]);
            }
            i += 32;
        }
        while i < n {
            let m = if i + 16 <= n { 0xffff } else { tail_mask(n - i) };
            let (x, y) = unsafe { (_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i))) };
            ab[0] = _mm512_fmadd_ps(x, y, ab[0]);
            aa[0] = _mm512_fmadd_ps(x, x, aa[0]);
            bb[0] = _mm512_fmadd_ps(y, y, bb[0]);
            i += 16;
        }
        (
            _mm512_reduce_add_ps(_mm512_add_ps(ab[0], ab[1])),
            _mm512_reduce_add_ps(_mm512_add_ps(aa[0], aa[1])),
            _mm512_reduce_add_ps(_mm512_add_ps(bb[0], bb[1])),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut SmallRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    /// Tolerance for a sum of `n` terms of magnitude up to `scale`, computed in another order.
    fn close(got: f32, want: f32, n: usize, scale: f32) -> bool {
        (got - want).abs() <= 1e-5 * (n as f32 + 1.0) * scale + 1e-6
    }

    #[test]
    fn every_kernel_set_matches_the_scalar_reference() {
        let mut rng = SmallRng::seed_from_u64(7);
        let sets = available();
        assert!(sets.iter().any(|k| k.name == "scalar"));
        let mut lengths: Vec<usize> = (0..=130).collect();
        lengths.extend([255, 256, 257, 383, 384, 385, 511, 767, 768, 1023, 1536, 4097, 16000]);
        for &n in &lengths {
            for _ in 0..3 {
                let (a, b) = (random(&mut rng, n), random(&mut rng, n));
                let want_dot = scalar::dot(&a, &b);
                let want_l2 = scalar::l2_squared(&a, &b);
                let want_l1 = scalar::l1(&a, &b);
                let want_cos = scalar::cosine_parts(&a, &b);
                for k in &sets {
                    assert!(close((k.dot)(&a, &b), want_dot, n, 4.0), "{} dot n={n}", k.name);
                    assert!(close((k.l2_squared)(&a, &b), want_l2, n, 16.0), "{} l2 n={n}", k.name);
                    assert!(close((k.l1)(&a, &b), want_l1, n, 4.0), "{} l1 n={n}", k.name);
                    let got = (k.cosine_parts)(&a, &b);
                    assert!(close(got.0, want_cos.0, n, 4.0), "{} cos.ab n={n}", k.name);
                    assert!(close(got.1, want_cos.1, n, 4.0), "{} cos.aa n={n}", k.name);
                    assert!(close(got.2, want_cos.2, n, 4.0), "{} cos.bb n={n}", k.name);
                }
            }
        }
    }

    #[test]
    fn simd_tails_do_not_read_past_the_end() {
        // Slices cut out of a larger buffer whose tail is poisoned with huge values: a kernel
        // that read past `n` would pick them up.
        let mut rng = SmallRng::seed_from_u64(11);
        for n in 0..70 {
            let mut a = random(&mut rng, n);
            let mut b = random(&mut rng, n);
            a.extend([1e30f32; 16]);
            b.extend([1e30f32; 16]);
            for k in available() {
                let got = (k.dot)(&a[..n], &b[..n]);
                assert!(close(got, scalar::dot(&a[..n], &b[..n]), n, 4.0), "{} n={n}", k.name);
            }
        }
    }

    #[test]
    fn cosine_distance_matches_pgvector_edge_cases() {
        let k = kernels();
        let zero = [0.0f32; 3];
        let v = [1.0f32, 2.0, 3.0];
        assert!(cosine_distance_from_parts((k.cosine_parts)(&zero, &v)).is_nan());
        assert_eq!(cosine_distance_from_parts((k.cosine_parts)(&v, &v)), 0.0);
        let neg = [-1.0f32, -2.0, -3.0];
        assert_eq!(cosine_distance_from_parts((k.cosine_parts)(&v, &neg)), 2.0);
        let orth = [0.0f32, 3.0, -2.0];
        assert!((cosine_distance_from_parts((k.cosine_parts)(&v, &orth)) - 1.0).abs() < 1e-7);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dispatch_prefers_simd_when_the_cpu_has_it() {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            assert_ne!(kernels().name, "scalar");
        }
    }
}
