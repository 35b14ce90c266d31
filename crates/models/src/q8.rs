//! Weights in 8-bit blocks (GGML's Q8_0: 32 values share one scale, kept here as f32) and the
//! products that decoding steps (a few rows) and, in the interleaved layout, prompts make with
//! them.
//!
//! A decoding step multiplies a few rows of activations (one per stream) by every weight
//! matrix. With one stream it is bound by reading the weights; with several, by the arithmetic
//! done per activation row. Two layouts:
//!
//! - `Rows`, GGML's: row after row. A step widens each block to f32 once and multiplies it into
//!   every activation row with FMAs: per 64 weights, 12 widening operations shared by all rows
//!   and 4 FMAs per row, then a horizontal sum per output and row.
//! - `Interleaved`, on CPUs with AVX512-VNNI. The weights of 16 output rows are interleaved 4
//!   bytes at a time, so one `vpdpbusd` multiplies 4 activations into all 16 outputs and each
//!   output's sum stays in its own lane. The step rounds its activations to 16-bit integers
//!   per block of 32 (one scale each), split into a high and a low signed byte: per block of
//!   32 inputs and 16 outputs and per activation row, 16 integer dot products, a shift and an
//!   add, and one scale FMA (32 FMAs in `Rows`), and no horizontal sums. `vpdpbusd` multiplies
//!   unsigned bytes by signed ones, so weights are stored + 128 as unsigned bytes, and each
//!   block's sum starts at −128 × the sum of its activations, which takes the surplus off again.
//!   Prompts (any number of rows) use it too, a group's weights staying in cache across rows,
//!   instead of dequantizing every matrix for the call.
//!
//! Either way every activation row is computed with the same operations in the same order
//! whatever the number of rows, so a stream decodes alike alone or batched with others.

use crate::generate::{accumulate, by_weight_rows, FEW_ROWS};
use candle_core::{Device, Tensor};

/// Values per block (one scale each).
const Q8_BLOCK: usize = 32;

/// Output rows interleaved in the `Interleaved` layout: the i32 lanes of one 512-bit register.
const LANES: usize = 16;

/// The most groups of [`LANES`] output rows one task of the interleaved product computes (256
/// rows, as [`by_weight_rows`] gives a task); smaller matrices get fewer, so that each thread has
/// about 4 tasks.
const GROUPS_PER_TASK: usize = 16;

/// A weight matrix (rows × cols) in 8-bit blocks: a quarter of F32's bytes.
pub(crate) struct Q8Matrix {
    rows: usize,
    cols: usize,
    layout: Layout,
    values: Vec<i8>,
    /// One per block: row after row (`Rows`), or per group of 16 rows block after block, the 16
    /// rows' scales together (`Interleaved`).
    scales: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `values[o·cols + c]` is weight (o, c).
    Rows,
    /// Weight (16g + l, 32b + 4q + j) + 128, as an unsigned byte, is at
    /// `values[(((g·blocks + b)·8 + q)·16 + l)·4 + j]`.
    Interleaved,
}

/// Where weight (16g + l, 32b + 4q + j) is in the `Interleaved` layout, `block` = g·blocks + b
/// (the index of [`Layout::Interleaved`]).
fn interleaved_at(block: usize, q: usize, l: usize, j: usize) -> usize {
    ((block * (Q8_BLOCK / 4) + q) * LANES + l) * 4 + j
}

/// Whether this CPU runs the interleaved kernel.
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The largest magnitude in `block`: the largest bit pattern of the absolute values (the same
/// order for floats that are not NaN), so that the loop vectorizes.
#[inline(always)]
fn largest_magnitude(block: &[f32]) -> f32 {
    f32::from_bits(block.iter().map(|v| v.to_bits() & 0x7fff_ffff).max().unwrap_or(0))
}

/// `x` clamped to ±`limit` (NaN to −`limit`) and rounded half away from zero, as `f32::round`
/// would, without its libm call and without the saturating `as` cast, which LLVM does not
/// vectorize (it made rounding an activation ~2 ns a value, one scalar conversion each).
#[inline(always)]
fn round_half_away(x: f32, limit: f32) -> i32 {
    debug_assert!(limit < 1e9);
    let x = x.max(-limit).min(limit);
    // Safety: x is not NaN (max returns the other operand for NaN) and |x + 0.5| <= limit + 0.5,
    // inside i32.
    unsafe { (x + 0.5f32.copysign(x)).to_int_unchecked() }
}

/// Rounds each block of 32 values of `data` to 8 bits into `values` (scale = the block's largest
/// magnitude / 127, into `scales`).
fn round_blocks(data: &[f32], values: &mut [i8], scales: &mut [f32]) {
    for ((block, out), scale) in data.chunks_exact(Q8_BLOCK).zip(values.chunks_exact_mut(Q8_BLOCK)).zip(scales.iter_mut()) {
        let max = largest_magnitude(block);
        *scale = max / 127.0;
        let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
        for (o, v) in out.iter_mut().zip(block) {
            *o = round_half_away(v * inv, 127.0) as i8;
        }
    }
}

impl Q8Matrix {
    /// Whether `w` (rows × cols) splits into whole blocks.
    pub(crate) fn fits(w: &Tensor) -> candle_core::Result<bool> {
        Ok(w.dim(1)? % Q8_BLOCK == 0 && w.device().is_cpu())
    }

    /// Rounds `w` (rows × cols, cols a multiple of [`Q8_BLOCK`]) to 8 bits per block, in the
    /// layout this CPU multiplies fastest.
    pub(crate) fn quantize(w: &Tensor) -> candle_core::Result<Q8Matrix> {
        let (rows, cols) = w.dims2()?;
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        let mut values = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * cols / Q8_BLOCK];
        round_blocks(&data, &mut values, &mut scales);
        let q = Q8Matrix { rows, cols, layout: Layout::Rows, values, scales };
        Ok(if vnni() && rows % LANES == 0 { q.interleaved() } else { q })
    }

    /// The same weights in the `Interleaved` layout.
    fn interleaved(self) -> Q8Matrix {
        assert_eq!(self.layout, Layout::Rows);
        let blocks = self.cols / Q8_BLOCK;
        let mut values = vec![0i8; self.values.len()];
        let mut scales = vec![0f32; self.scales.len()];
        for o in 0..self.rows {
            let (g, l) = (o / LANES, o % LANES);
            for b in 0..blocks {
                scales[(g * blocks + b) * LANES + l] = self.scales[o * blocks + b];
                for q in 0..Q8_BLOCK / 4 {
                    for j in 0..4 {
                        let w = self.values[o * self.cols + b * Q8_BLOCK + q * 4 + j];
                        values[interleaved_at(g * blocks + b, q, l, j)] = (w as u8 ^ 0x80) as i8;
                    }
                }
            }
        }
        Q8Matrix { layout: Layout::Interleaved, values, scales, ..self }
    }

    /// Bytes one pass over the matrix reads.
    pub(crate) fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    /// The F32 matrix (rows × cols), for products with many rows (prompts, training).
    pub(crate) fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let (cols, blocks) = (self.cols, self.cols / Q8_BLOCK);
        let mut out = vec![0f32; self.rows * cols];
        match self.layout {
            Layout::Rows => out.par_chunks_mut(cols).enumerate().for_each(|(o, row)| {
                for (b, block) in row.chunks_mut(Q8_BLOCK).enumerate() {
                    let scale = self.scales[o * blocks + b];
                    for (w, v) in block.iter_mut().zip(&self.values[o * cols + b * Q8_BLOCK..]) {
                        *w = *v as f32 * scale;
                    }
                }
            }),
            Layout::Interleaved => out.par_chunks_mut(LANES * cols).enumerate().for_each(|(g, rows)| {
                let values = &self.values[g * LANES * cols..(g + 1) * LANES * cols];
                for (b, quads) in values.chunks(Q8_BLOCK * LANES).enumerate() {
                    let scales = &self.scales[(g * blocks + b) * LANES..(g * blocks + b + 1) * LANES];
                    for (q, quad) in quads.chunks(4 * LANES).enumerate() {
                        for (l, four) in quad.chunks(4).enumerate() {
                            for (j, v) in four.iter().enumerate() {
                                rows[l * cols + b * Q8_BLOCK + q * 4 + j] = ((*v as u8 ^ 0x80) as i8) as f32 * scales[l];
                            }
                        }
                    }
                }
            }),
        }
        Tensor::from_vec(out, (self.rows, cols), device)
    }

    /// Whether [`Q8Matrix::matmul`] takes `rows` rows: a few (decoding steps) in either layout,
    /// any number (prompts too) in the interleaved one.
    pub(crate) fn multiplies(&self, rows: usize) -> bool {
        rows <= FEW_ROWS || self.layout == Layout::Interleaved
    }

    /// `x · Wᵀ` straight from the 8-bit blocks (F32 `x` on the CPU, rows as
    /// [`Q8Matrix::multiplies`] allows).
    pub(crate) fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols || !self.multiplies(m) {
            candle_core::bail!("Q8Matrix::matmul: {m}×{k} times ({}×{})ᵀ in the {:?} layout", self.rows, self.cols, self.layout);
        }
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        match self.layout {
            Layout::Rows => self.widened_matmul(&xs, m, x.device()),
            Layout::Interleaved => self.interleaved_matmul(&xs, m, x.device()),
        }
    }

    /// `Rows`: each block widened to f32 once and multiplied into every row of `xs`.
    fn widened_matmul(&self, xs: &[f32], m: usize, device: &Device) -> candle_core::Result<Tensor> {
        let (k, blocks) = (self.cols, self.cols / Q8_BLOCK);
        by_weight_rows(m, self.rows, device, |o, out| {
            let (values, scales) = (&self.values[o * k..(o + 1) * k], &self.scales[o * blocks..(o + 1) * blocks]);
            #[cfg(target_arch = "x86_64")]
            if crate::generate::avx512::available() {
                // Safety: the CPU has AVX-512F and FMA (just checked).
                return unsafe { avx512::widened_rows(xs, values, scales, out) };
            }
            widened_dots(xs, values, scales, out)
        })
    }

    /// `Interleaved`: the rows of `xs` rounded to 16 bits ([`RoundedRows`]), 16 outputs and up
    /// to [`FEW_ROWS`] rows per kernel call. A task takes a few groups of outputs and runs all
    /// rows through each group in turn, so with many rows (a prompt) a group's weights are read
    /// from memory once and then from the cache. Tasks are sized by the matrix, up to
    /// [`GROUPS_PER_TASK`] groups, so that even a 192-row product keeps every core busy (k and v
    /// were one task of a decoding step when it took 16 groups regardless).
    fn interleaved_matmul(&self, xs: &[f32], m: usize, device: &Device) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        assert!(vnni(), "the interleaved layout is made only where AVX512-VNNI runs");
        let (n, k, blocks) = (self.rows, self.cols, self.cols / Q8_BLOCK);
        if m == 0 {
            return Tensor::zeros((0, n), candle_core::DType::F32, device);
        }
        let chunks: Vec<RoundedRows> = xs.chunks(FEW_ROWS * k).map(|rows| RoundedRows::new(rows, k)).collect();
        let group_values = blocks * Q8_BLOCK * LANES;
        let groups_per_task = (n / LANES / (4 * rayon::current_num_threads())).clamp(1, GROUPS_PER_TASK);
        // out_t[(g·m + r)·16 + l] = x_r · w_{16g + l}
        let mut out_t = vec![0f32; n * m];
        out_t.par_chunks_mut(groups_per_task * LANES * m).enumerate().for_each(|(c, task)| {
            for (i, out) in task.chunks_mut(LANES * m).enumerate() {
                let g = c * groups_per_task + i;
                let values = &self.values[g * group_values..(g + 1) * group_values];
                let scales = &self.scales[g * blocks * LANES..(g + 1) * blocks * LANES];
                for (act, out) in chunks.iter().zip(out.chunks_mut(FEW_ROWS * LANES)) {
                    // Safety: the CPU has AVX-512F and AVX512-VNNI (asserted above).
                    #[cfg(target_arch = "x86_64")]
                    unsafe { avx512::interleaved_rows(act, values, scales, out) };
                    // never reached off x86_64 (the assertion), but it computes the same
                    #[cfg(not(target_arch = "x86_64"))]
                    interleaved_dots(act, values, scales, out);
                }
            }
        });
        let mut out = vec![0f32; m * n];
        out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            for (g, lanes) in row.chunks_mut(LANES).enumerate() {
                lanes.copy_from_slice(&out_t[(g * m + r) * LANES..(g * m + r + 1) * LANES]);
            }
        });
        Tensor::from_vec(out, (m, n), device)
    }
}

/// Activation rows for the interleaved kernel, rounded to 16 bits per block of 32 (one scale
/// each) and split into bytes: value = 256 · high + low, both signed. 8 bits alone (GGML's
/// choice) tripled the divergence from the F32 model's next-token distribution (mean KL 0.0014
/// → 0.0046 over a 123-token passage, top-1 agreement 0.992 → 0.976); 16 bits cost one more
/// integer dot product per 4 weights and row and keep the 8-bit weights' own error.
struct RoundedRows {
    /// Values per row.
    k: usize,
    high: Vec<i8>,
    low: Vec<i8>,
    /// One per block, row after row.
    scales: Vec<f32>,
    /// Per block: −128 × the sum of its 16-bit values (weights are stored + 128).
    surplus: Vec<i32>,
}

/// The largest magnitude of a rounded activation, 127 · 256 + 127: its high byte stays within
/// ±127.
const HALF_MAX: f32 = 32639.0;

impl RoundedRows {
    fn new(xs: &[f32], k: usize) -> RoundedRows {
        let blocks = xs.len() / Q8_BLOCK;
        let mut act = RoundedRows { k, high: vec![0; xs.len()], low: vec![0; xs.len()], scales: vec![0.0; blocks], surplus: vec![0; blocks] };
        #[cfg(target_arch = "x86_64")]
        if vnni() {
            // Safety: the CPU has AVX-512F and AVX-512BW (vnni() checked them).
            unsafe { avx512::round(&mut act, xs) };
            return act;
        }
        act.round(xs);
        act
    }

    /// Rounds `xs` block by block (scale = largest magnitude / [`HALF_MAX`], half away from
    /// zero). Written so that it vectorizes (inlined into [`avx512::round`]); NaN or infinite
    /// activations give NaN outputs, never undefined behaviour.
    #[inline(always)]
    fn round(&mut self, xs: &[f32]) {
        let blocks = xs.chunks_exact(Q8_BLOCK).zip(self.high.chunks_exact_mut(Q8_BLOCK)).zip(self.low.chunks_exact_mut(Q8_BLOCK));
        for (b, ((block, high), low)) in blocks.enumerate() {
            let max = largest_magnitude(block);
            self.scales[b] = max / HALF_MAX;
            let inv = if max > 0.0 { HALF_MAX / max } else { 0.0 };
            let mut sum = 0i32;
            for ((h, l), v) in high.iter_mut().zip(low.iter_mut()).zip(block) {
                let q = round_half_away(v * inv, HALF_MAX);
                let up = (q + 128) >> 8;
                *h = up as i8;
                *l = (q - 256 * up) as i8;
                sum += q;
            }
            self.surplus[b] = -128 * sum;
        }
    }

    fn rows(&self) -> usize {
        self.high.len() / self.k
    }
}

/// `out[r] = x_r · w` for a row of 8-bit blocks without AVX-512 (`values`, one scale per block).
fn widened_dots(xs: &[f32], values: &[i8], scales: &[f32], out: &mut [f32]) {
    let k = values.len();
    let mut acc = [[0f32; 16]; FEW_ROWS];
    for (b, &scale) in scales.iter().enumerate() {
        let mut wide = [0f32; Q8_BLOCK];
        for (w, v) in wide.iter_mut().zip(&values[b * Q8_BLOCK..(b + 1) * Q8_BLOCK]) {
            *w = *v as f32 * scale;
        }
        for half in 0..Q8_BLOCK / 16 {
            let wc: &[f32; 16] = wide[half * 16..half * 16 + 16].try_into().expect("16 values");
            accumulate(&mut acc, out.len(), xs, k, b * Q8_BLOCK + half * 16, wc);
        }
    }
    for (r, v) in out.iter_mut().enumerate() {
        *v = acc[r].iter().sum::<f32>();
    }
}

/// What [`avx512::interleaved_rows`] computes, one lane at a time in the same order (so the
/// results are equal bit for bit): the reference its test checks it against.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn interleaved_dots(act: &RoundedRows, values: &[i8], scales: &[f32], out: &mut [f32]) {
    let (k, blocks) = (act.k, act.k / Q8_BLOCK);
    for r in 0..act.rows() {
        for l in 0..LANES {
            let mut acc = 0f32;
            for b in 0..blocks {
                let (mut high, mut low) = (0i32, act.surplus[r * blocks + b]);
                for q in 0..Q8_BLOCK / 4 {
                    for j in 0..4 {
                        let w = values[interleaved_at(b, q, l, j)] as u8 as i32;
                        let at = r * k + b * Q8_BLOCK + q * 4 + j;
                        high += w * act.high[at] as i32;
                        low += w * act.low[at] as i32;
                    }
                }
                let sum = (high << 8) + low;
                acc = (sum as f32).mul_add(scales[b * LANES + l] * act.scales[r * blocks + b], acc);
            }
            out[r * LANES + l] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{RoundedRows, FEW_ROWS, LANES, Q8_BLOCK};
    use crate::generate::avx512::for_rows;
    use std::arch::x86_64::*;

    /// [`RoundedRows::round`] compiled for AVX-512 (its plain loops get 512-bit vectors).
    ///
    /// Safety: the CPU must have AVX-512F and AVX-512BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn round(act: &mut RoundedRows, xs: &[f32]) {
        act.round(xs)
    }

    /// `Rows` layout: `out[r] = x_r · w` for the `out.len()` rows of `xs`, each block of
    /// `values` (one scale per [`Q8_BLOCK`]) widened to F32 once.
    ///
    /// Safety: the CPU must have AVX-512F and FMA.
    pub unsafe fn widened_rows(xs: &[f32], values: &[i8], scales: &[f32], out: &mut [f32]) {
        assert!(Q8_BLOCK == 32 && values.len() == scales.len() * Q8_BLOCK && xs.len() == out.len() * values.len() && out.len() <= FEW_ROWS);
        // Safety: as for this function; the lengths were checked.
        unsafe { for_rows!(out.len(), widened_kernel(xs, values, scales, out)) }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn widened_kernel<const R: usize>(xs: &[f32], values: &[i8], scales: &[f32], out: &mut [f32]) {
        let k = values.len();
        let (x, v) = (xs.as_ptr(), values.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (b, &scale) in scales.iter().enumerate() {
            let s = _mm512_set1_ps(scale);
            // Safety: block b's 32 values are inside `values`, and every row of xs has k values.
            unsafe {
                let widen = |at: usize| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(v.add(at) as *const __m128i))), s);
                let (w0, w1) = (widen(b * 32), widen(b * 32 + 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xr = x.add(r * k + b * 32);
                    a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, a[0]);
                    a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr.add(16)), w1, a[1]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        }
    }

    /// `Interleaved` layout: `out[r·16 + l] = x_r · w_l` for the rows of `act` and the 16
    /// weight rows of one group (`values`, `scales`: the group's part).
    ///
    /// Safety: the CPU must have AVX-512F and AVX512-VNNI.
    pub unsafe fn interleaved_rows(act: &RoundedRows, values: &[i8], scales: &[f32], out: &mut [f32]) {
        let (rows, blocks) = (act.rows(), act.k / Q8_BLOCK);
        assert!(
            act.k % Q8_BLOCK == 0
                && values.len() == act.k * LANES
                && scales.len() == blocks * LANES
                && act.scales.len() == rows * blocks
                && act.surplus.len() == rows * blocks
                && act.high.len() == rows * act.k
                && act.low.len() == rows * act.k
                && out.len() == rows * LANES
                && rows <= FEW_ROWS
        );
        // Safety: as for this function; the lengths were checked.
        unsafe { for_rows!(rows, interleaved_kernel(act, values, scales, out)) }
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn interleaved_kernel<const R: usize>(act: &RoundedRows, values: &[i8], scales: &[f32], out: &mut [f32]) {
        let (k, blocks) = (act.k, act.k / Q8_BLOCK);
        let (wp, hp, lp) = (values.as_ptr(), act.high.as_ptr(), act.low.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        let mut w = [_mm512_setzero_si512(); Q8_BLOCK / 4];
        for b in 0..blocks {
            // Safety: block b of the group is values[b·512..(b + 1)·512] and its scales
            // scales[b·16..(b + 1)·16]; row r's block b is act.high and act.low[r·k + b·32..][..32] (all
            // checked by the caller).
            unsafe {
                for (q, wq) in w.iter_mut().enumerate() {
                    *wq = _mm512_loadu_si512(wp.add((b * 8 + q) * 4 * LANES).cast());
                }
                let sw = _mm512_loadu_ps(scales.as_ptr().add(b * LANES));
                for (r, a) in acc.iter_mut().enumerate() {
                    let (h, l) = (hp.add(r * k + b * Q8_BLOCK) as *const i32, lp.add(r * k + b * Q8_BLOCK) as *const i32);
                    let mut high = _mm512_setzero_si512();
                    let mut low = _mm512_set1_epi32(*act.surplus.get_unchecked(r * blocks + b));
                    for (q, wq) in w.iter().enumerate() {
                        high = _mm512_dpbusd_epi32(high, *wq, _mm512_set1_epi32(h.add(q).read_unaligned()));
                        low = _mm512_dpbusd_epi32(low, *wq, _mm512_set1_epi32(l.add(q).read_unaligned()));
                    }
                    let sum = _mm512_add_epi32(_mm512_slli_epi32::<8>(high), low);
                    let s = _mm512_mul_ps(sw, _mm512_set1_ps(*act.scales.get_unchecked(r * blocks + b)));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // Safety: out has R·16 values (checked by the caller).
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * LANES), *a) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight matrix of `rows` × `cols` with values of varied magnitude per block.
    fn weights(rows: usize, cols: usize) -> Tensor {
        let data: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / Q8_BLOCK % 5) as f32)).collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    fn close(a: &[f32], b: &[f32], tolerance: f32) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tolerance * scale, "value {i}: {x} vs {y} (largest {scale})");
        }
    }

    /// Both layouts dequantize to the same matrix, within 8-bit rounding of the original, and
    /// their products (1 to 8 rows in both, more in the interleaved one) agree with the F32
    /// product of that matrix.
    #[test]
    fn layouts_agree_and_products_match_f32() {
        let (rows, cols) = (576, 96); // 36 groups of 16: several tasks
        let w = weights(rows, cols);
        let mut plain = Q8Matrix::quantize(&w).unwrap();
        if plain.layout == Layout::Interleaved {
            // undo: build the Rows layout directly for the comparison
            let data = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (mut values, mut scales) = (vec![0i8; rows * cols], vec![0f32; rows * cols / Q8_BLOCK]);
            round_blocks(&data, &mut values, &mut scales);
            plain = Q8Matrix { rows, cols, layout: Layout::Rows, values, scales };
        }
        let dense = plain.dequantize(&Device::Cpu).unwrap();
        let inter = Q8Matrix { rows, cols, layout: Layout::Rows, values: plain.values.clone(), scales: plain.scales.clone() }.interleaved();
        let dense_i = inter.dequantize(&Device::Cpu).unwrap();
        assert_eq!(dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(), dense_i.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        close(&dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 0.01);
        // a few rows in both layouts; many (a prompt's) in the interleaved one
        for m in (1..=FEW_ROWS).chain([9, 21, 70]) {
            let x = weights(m, cols).affine(0.3, 0.1).unwrap();
            let want = x.matmul(&dense.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if plain.multiplies(m) {
                let got = plain.matmul(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                close(&got, &want, 1e-5);
            }
            if vnni() {
                let got = inter.matmul(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                close(&got, &want, 2e-3);
            }
        }
    }

    /// The VNNI kernel equals its scalar description bit for bit, for every row count, and a
    /// row's outputs do not depend on the other rows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn interleaved_kernel_equals_its_reference() {
        if !vnni() {
            eprintln!("no AVX512-VNNI here: skipping");
            return;
        }
        let (rows, cols) = (32, 128);
        let q = Q8Matrix::quantize(&weights(rows, cols)).unwrap();
        assert_eq!(q.layout, Layout::Interleaved);
        let group = cols * LANES;
        let xs = weights(FEW_ROWS, cols).affine(0.7, -0.2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let all = RoundedRows::new(&xs, cols);
        for m in 1..=FEW_ROWS {
            let act = RoundedRows::new(&xs[..m * cols], cols);
            for g in 0..rows / LANES {
                let (values, scales) = (&q.values[g * group..(g + 1) * group], &q.scales[g * cols / Q8_BLOCK * LANES..(g + 1) * cols / Q8_BLOCK * LANES]);
                let (mut fast, mut slow, mut every) = (vec![0f32; m * LANES], vec![0f32; m * LANES], vec![0f32; FEW_ROWS * LANES]);
                // Safety: vnni() said the CPU has AVX-512F and AVX512-VNNI.
                unsafe { avx512::interleaved_rows(&act, values, scales, &mut fast) };
                interleaved_dots(&act, values, scales, &mut slow);
                assert_eq!(fast, slow, "{m} rows, group {g}");
                interleaved_dots(&all, values, scales, &mut every);
                assert_eq!(fast[..], every[..m * LANES]);
            }
        }
    }
}
