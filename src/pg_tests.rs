//! `#[pg_test]`s: SQL behaviour inside a real backend. SQLSTATE-level checks of every bad input
//! live in tests/test_vector.py, which runs against the installed extension.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: pgrx::IntoDatum + pgrx::FromDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).expect("query failed")
    }

    #[pg_test]
    fn text_round_trip() {
        assert_eq!(one::<String>("SELECT '[1, 2.5 ,-3e2]'::vector::text").unwrap(), "[1,2.5,-300]");
        assert_eq!(one::<String>("SELECT '[1e-05,1234567]'::vector::text").unwrap(), "[1e-05,1.234567e+06]");
    }

    #[pg_test]
    fn distances_match_their_definitions() {
        assert_eq!(one::<f64>("SELECT '[0,0]'::vector <-> '[3,4]'").unwrap(), 5.0);
        assert_eq!(one::<f64>("SELECT '[1,2,3]'::vector <#> '[4,5,6]'").unwrap(), -32.0);
        assert_eq!(one::<f64>("SELECT inner_product('[1,2,3]', '[4,5,6]')").unwrap(), 32.0);
        assert_eq!(one::<f64>("SELECT '[1,2]'::vector <=> '[2,4]'").unwrap(), 0.0);
        assert_eq!(one::<f64>("SELECT '[1,0]'::vector <=> '[0,1]'").unwrap(), 1.0);
        assert!(one::<f64>("SELECT '[0,0]'::vector <=> '[1,1]'").unwrap().is_nan());
        assert_eq!(one::<f64>("SELECT l1_distance('[1,2]', '[4,-2]')").unwrap(), 7.0);
        assert_eq!(one::<f64>("SELECT '[1,2]'::vector <+> '[4,-2]'").unwrap(), 7.0);
    }

    #[pg_test]
    fn functions_and_arithmetic() {
        assert_eq!(one::<i32>("SELECT vector_dims('[1,2,3]')").unwrap(), 3);
        assert_eq!(one::<f64>("SELECT vector_norm('[3,4]')").unwrap(), 5.0);
        assert_eq!(one::<String>("SELECT l2_normalize('[3,4]')::text").unwrap(), "[0.6,0.8]");
        assert_eq!(one::<String>("SELECT subvector('[1,2,3,4,5]', 2, 3)::text").unwrap(), "[2,3,4]");
        assert_eq!(one::<String>("SELECT ('[1,2]'::vector + '[3,4]')::text").unwrap(), "[4,6]");
        assert_eq!(one::<String>("SELECT ('[1,2]'::vector - '[3,4]')::text").unwrap(), "[-2,-2]");
        assert_eq!(one::<String>("SELECT ('[1,2]'::vector * '[3,4]')::text").unwrap(), "[3,8]");
        assert_eq!(one::<String>("SELECT ('[1,2]'::vector || '[3]')::text").unwrap(), "[1,2,3]");
    }

    #[pg_test]
    fn aggregates() {
        Spi::run("CREATE TABLE agg_t (v vector(2)); INSERT INTO agg_t VALUES ('[1,2]'), ('[3,6]'), (NULL)").unwrap();
        assert_eq!(one::<String>("SELECT avg(v)::text FROM agg_t").unwrap(), "[2,4]");
        assert_eq!(one::<String>("SELECT sum(v)::text FROM agg_t").unwrap(), "[4,8]");
        assert_eq!(one::<String>("SELECT avg(v)::text FROM agg_t WHERE false"), None);
    }

    #[pg_test]
    fn btree_index_orders_and_finds() {
        Spi::run("CREATE TABLE bt (v vector(2)); INSERT INTO bt SELECT ARRAY[i % 7, i]::real[] FROM generate_series(1, 200) i;
                  CREATE INDEX ON bt (v); SET enable_seqscan = off").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM bt WHERE v = '[3,10]'").unwrap(), 1);
        assert_eq!(one::<String>("SELECT v::text FROM bt ORDER BY bt.v LIMIT 1").unwrap(), "[0,7]");
    }

    #[pg_test]
    fn casts_with_arrays() {
        assert_eq!(one::<String>("SELECT ARRAY[1,2,3]::vector::text").unwrap(), "[1,2,3]");
        assert_eq!(one::<String>("SELECT ARRAY[1.5,2]::numeric[]::vector::text").unwrap(), "[1.5,2]");
        assert_eq!(one::<String>("SELECT ARRAY[1.5,2]::float8[]::vector::text").unwrap(), "[1.5,2]");
        assert_eq!(one::<Vec<f32>>("SELECT '[1,2]'::vector::real[]").unwrap(), vec![1.0, 2.0]);
        assert_eq!(one::<Vec<f64>>("SELECT '[1.5,2]'::vector::float8[]").unwrap(), vec![1.5, 2.0]);
        assert_eq!(one::<Vec<i32>>("SELECT '[1.4,2.6]'::vector::int[]").unwrap(), vec![1, 3]);
    }

    #[pg_test(error = "expected 3 dimensions, not 2")]
    fn typmod_is_checked_on_insert() {
        Spi::run("CREATE TABLE tm (v vector(3)); INSERT INTO tm VALUES ('[1,2]')").unwrap();
    }

    #[pg_test(error = "different vector dimensions 2 and 3")]
    fn operands_must_agree() {
        Spi::run("SELECT '[1,2]'::vector <-> '[1,2,3]'").unwrap();
    }

    #[pg_test(error = "array must not contain nulls")]
    fn null_array_elements_are_refused() {
        Spi::run("SELECT ARRAY[1,NULL,3]::vector").unwrap();
    }

    #[pg_test]
    fn hnsw_build_insert_search_vacuum_check() {
        Spi::run(
            "CREATE TABLE hv (id int, v vector(4));
             INSERT INTO hv SELECT i, ARRAY[i, (i * i) % 97, i % 13, 1] FROM generate_series(1, 500) i;
             CREATE INDEX hv_idx ON hv USING hnsw (v vector_l2_ops) WITH (m = 8, ef_construction = 32);
             INSERT INTO hv SELECT i, ARRAY[i, (i * i) % 97, i % 13, 1] FROM generate_series(501, 800) i;
             SET enable_seqscan = off; SET hnsw.ef_search = 64",
        )
        .unwrap();
        let nearest = one::<i32>("SELECT id FROM hv ORDER BY v <-> ARRAY[42, (42 * 42) % 97, 42 % 13, 1]::vector LIMIT 1");
        assert_eq!(nearest, Some(42));
        assert_eq!(one::<i64>("SELECT count(*) FROM lorag.hnsw_check('hv_idx')"), Some(0));
        Spi::run("DELETE FROM hv WHERE id % 2 = 0").unwrap();
        // VACUUM cannot run inside the test's transaction; the graph repair is covered by
        // tests/test_hnsw.py. Deleted rows are filtered by visibility here.
        let odd = one::<i32>("SELECT id FROM hv ORDER BY v <-> ARRAY[43, (43 * 43) % 97, 43 % 13, 1]::vector LIMIT 1");
        assert_eq!(odd, Some(43));
    }

    #[pg_test(error = "value 1 out of bounds for option \"m\"")]
    fn hnsw_options_are_checked() {
        Spi::run("CREATE TABLE ho (v vector(3)); CREATE INDEX ON ho USING hnsw (v vector_l2_ops) WITH (m = 1)").unwrap();
    }
}
