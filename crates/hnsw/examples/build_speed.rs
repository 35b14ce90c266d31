//! In-memory build speed: `cargo run --release -p lorag-hnsw --example build_speed -- 20000`
use lorag_hnsw::memory::MemoryGraph;
use lorag_hnsw::rng::Rng;
use lorag_hnsw::search::knn;
use lorag_hnsw::testdata::gaussian_mixture;
use lorag_hnsw::{Metric, Params};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20000);
    let data = gaussian_mixture(n, 384, 10, 1);
    let params = Params { m: 16, ef_construction: 64, metric: Metric::Cosine };
    let mut rng = Rng::new(3);
    let levels: Vec<usize> = data.iter().map(|_| params.level_for(rng.uniform())).collect();
    let threads: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let t = Instant::now();
    let g: MemoryGraph = lorag_hnsw::parallel::build(params, 384, data.iter().flatten().copied().collect(), &levels, threads, &Default::default()).unwrap();
    let build = t.elapsed().as_secs_f64();
    // queries near the data's own clusters: a member of every 50th cluster, moved a little
    let queries: Vec<Vec<f32>> = (0..200).map(|i| {
        let mut q = data[(i * 50 * 10 + 3) % n].clone();
        q.iter_mut().enumerate().for_each(|(j, x)| *x += if j % 7 == 0 { 0.05 } else { 0.0 });
        q
    }).collect();
    let mut hits = 0;
    let t = Instant::now();
    for q in &queries {
        let mut all: Vec<(f32, usize)> = data.iter().enumerate().map(|(i, v)| (Metric::Cosine.distance(q, v), i)).collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        let want: Vec<u64> = all[..10].iter().map(|x| x.1 as u64).collect();
        hits += knn(&g, q, 10, 40).iter().filter(|c| want.contains(&c.id)).count();
    }
    println!("n={n} build {build:.2}s ({:.0}/s), recall@10 ef=40 {:.3}, {:.1?}", n as f64 / build, hits as f64 / 2000.0, t.elapsed());
}
