-- The hnsw index access method, with pgvector's names so that existing DDL works unchanged.

CREATE FUNCTION hnswhandler(internal) RETURNS index_am_handler
    AS 'MODULE_PATHNAME', 'lorag_hnsw_handler' LANGUAGE C;

CREATE ACCESS METHOD hnsw TYPE INDEX HANDLER hnswhandler;
COMMENT ON ACCESS METHOD hnsw IS 'hnsw index access method (lorag)';

-- Support function 1 names the distance (the index computes it with SIMD kernels);
-- support function 2 marks opclasses whose vectors are normalised when stored.
CREATE OPERATOR CLASS vector_l2_ops
    DEFAULT FOR TYPE vector USING hnsw AS
    OPERATOR 1 <-> (vector, vector) FOR ORDER BY float_ops,
    FUNCTION 1 vector_l2_squared_distance(vector, vector);

CREATE OPERATOR CLASS vector_ip_ops
    FOR TYPE vector USING hnsw AS
    OPERATOR 1 <#> (vector, vector) FOR ORDER BY float_ops,
    FUNCTION 1 vector_negative_inner_product(vector, vector);

CREATE OPERATOR CLASS vector_cosine_ops
    FOR TYPE vector USING hnsw AS
    OPERATOR 1 <=> (vector, vector) FOR ORDER BY float_ops,
    FUNCTION 1 cosine_distance(vector, vector),
    FUNCTION 2 vector_norm(vector);

CREATE SCHEMA IF NOT EXISTS lorag;
-- lorag's functions, views and tables are for every role; each object grants what it allows.
GRANT USAGE ON SCHEMA lorag TO PUBLIC;

CREATE FUNCTION lorag._hnsw_check(regclass) RETURNS text[]
    AS 'MODULE_PATHNAME', 'lorag_hnsw_check' LANGUAGE C STRICT;

-- Structural problems of an hnsw index; no rows means the index is sound.
CREATE FUNCTION lorag.hnsw_check(index regclass) RETURNS SETOF text
    AS 'SELECT unnest(lorag._hnsw_check($1))' LANGUAGE sql STRICT;
-- It reads every page of any index without a privilege check: superusers decide who may.
REVOKE ALL ON FUNCTION lorag._hnsw_check(regclass), lorag.hnsw_check(regclass) FROM PUBLIC;
