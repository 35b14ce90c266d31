//! Distance kernels: nanoseconds per 384-dimension distance for every kernel set this CPU can
//! run, measured in the same process, and the dispatched kernel's speed-up over the scalar one.
//!
//!     cargo bench -p lorag-vector --bench distance
use lorag_vector::kernels::{available, cosine_distance_from_parts, kernels, Kernels, SCALAR};
use std::hint::black_box;
use std::time::Instant;

const DIM: usize = 384;
const POOL: usize = 512; // 512 x 384 x 4 B = 768 KiB: the pairs come from L2, as in an index scan

fn pool() -> Vec<Vec<f32>> {
    let mut x = 0x9E37_79B9u32;
    (0..POOL)
        .map(|_| {
            (0..DIM)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x as f32 / u32::MAX as f32) * 2.0 - 1.0
                })
                .collect()
        })
        .collect()
}

/// Best of several runs of `reps` passes over all pairs (i, i+1), in ns per distance.
fn measure(vs: &[Vec<f32>], f: impl Fn(&[f32], &[f32]) -> f64) -> f64 {
    let reps = 200;
    let mut best = f64::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        let mut acc = 0.0;
        for _ in 0..reps {
            for i in 0..POOL {
                acc += f(black_box(&vs[i]), black_box(&vs[(i + 1) % POOL]));
            }
        }
        black_box(acc);
        best = best.min(start.elapsed().as_nanos() as f64 / (reps * POOL) as f64);
    }
    best
}

fn cosine(k: &'static Kernels) -> impl Fn(&[f32], &[f32]) -> f64 {
    move |a, b| cosine_distance_from_parts((k.cosine_parts)(a, b))
}

fn main() {
    let vs = pool();
    println!("distance kernels, dim = {DIM}, dispatched = {}", kernels().name);
    println!("{:<10} {:>12} {:>12} {:>12} {:>12}", "kernels", "cosine ns", "l2sq ns", "dot ns", "l1 ns");
    for k in available() {
        println!(
            "{:<10} {:>12.2} {:>12.2} {:>12.2} {:>12.2}",
            k.name,
            measure(&vs, cosine(k)),
            measure(&vs, |a, b| (k.l2_squared)(a, b) as f64),
            measure(&vs, |a, b| (k.dot)(a, b) as f64),
            measure(&vs, |a, b| (k.l1)(a, b) as f64),
        );
    }
    let dispatched = measure(&vs, cosine(kernels()));
    let scalar = measure(&vs, cosine(&SCALAR));
    println!(
        "cosine distance, 384 dims: dispatched ({}) {:.2} ns, scalar {:.2} ns, speed-up {:.1}x",
        kernels().name,
        dispatched,
        scalar,
        scalar / dispatched
    );
}
