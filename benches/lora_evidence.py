"""The LoRA issue's promises, measured through SQL on real data (make bench-lora):

- learning: held-out PostgreSQL-manual perplexity with an adapter trained on 500 other chunks;
- frozen base: perplexity without the adapter, on the manual and on Cranfield abstracts, before
  and after training (must be equal exactly);
- no forgetting: the first adapter's perplexity after a second adapter is trained on Cranfield.

Needs the `manual` table of examples/manual.sql (make demo builds it). STEPS, LR and SEQ_LEN
override the training run.
"""
import os
import re
import subprocess
import time

import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = int(os.environ.get("STEPS", "24"))
LR = float(os.environ.get("LR", "2e-3"))
SEQ_LEN = int(os.environ.get("SEQ_LEN", "256"))


def cranfield(n):
    text = open(os.path.join(ROOT, "..", "shared", "data", "cranfield", "cran.all.1400")).read()
    docs = []
    for d in text.split(".I ")[1:]:
        w = d.split(".W", 1)[1] if ".W" in d else ""
        w = re.sub(r"\s+", " ", w).strip()
        if len(w) > 200:
            docs.append(w)
    return docs[:n]


def main():
    dsn = f"host={os.environ.get('PGHOST', '/tmp')} port={os.environ.get('PGPORT', '28815')} user=postgres dbname=lorag"
    with psycopg.connect(dsn, autocommit=True) as c:
        if not c.execute("SELECT to_regclass('manual') IS NOT NULL").fetchone()[0]:
            subprocess.run(["scripts/pg.sh", "psql", "-q", "-f", "examples/manual.sql"], cwd=ROOT, check=True)
        c.execute("DROP TABLE IF EXISTS ev_train, ev_held, ev_cran")
        c.execute("CREATE TABLE ev_train AS SELECT content FROM manual WHERE id % 4 <> 0 ORDER BY id LIMIT 500")
        c.execute("CREATE TABLE ev_held AS SELECT content FROM manual WHERE id % 4 = 0 ORDER BY id LIMIT 100")
        c.execute("CREATE TABLE ev_cran (content text)")
        with c.cursor().copy("COPY ev_cran (content) FROM STDIN") as cp:
            for d in cranfield(100):
                cp.write_row((d,))
        c.execute("SELECT lora_drop(name) FROM lorag.adapters WHERE name IN ('ev_manual', 'ev_cran')")

        def ppl(table, adapter=None):
            return c.execute("SELECT perplexity(%s::regclass, adapter => %s, seq_len => 256)", (table, adapter)).fetchone()[0]

        base_held, base_cran = ppl("ev_held"), ppl("ev_cran")
        t = time.time()
        r = c.execute("SELECT steps, final_loss, mean_loss, tokens, trainable_parameters, total_parameters, seconds "
                      "FROM lora_train('ev_train', adapter => 'ev_manual', max_steps => %s, learning_rate => %s, seq_len => %s)",
                      (STEPS, LR, SEQ_LEN)).fetchone()
        print(f"lora_train on 500 manual chunks: {r[0]} steps, {r[3]} tokens, loss {r[1]:.3f} (mean of last {min(10, r[0])}: {r[2]:.3f}), "
              f"{r[4]} of {r[5]} parameters trainable ({100 * r[4] / r[5]:.3f} %), {r[6]:.0f} s ({r[3] / r[6]:.0f} tokens/s through SQL)")
        tuned_held = ppl("ev_held", "ev_manual")
        after_held, after_cran = ppl("ev_held"), ppl("ev_cran")
        print(f"held-out manual perplexity (100 chunks): base {base_held:.3f}, with adapter {tuned_held:.3f} "
              f"→ {100 * (1 - tuned_held / base_held):.1f} % lower (aim ≥ 15 %)")
        print(f"frozen base: manual {base_held!r} → {after_held!r} ({'equal' if after_held == base_held else 'DIFFERENT'}), "
              f"Cranfield {base_cran!r} → {after_cran!r} ({'equal' if after_cran == base_cran else 'DIFFERENT'})")
        tuned_cran_before = ppl("ev_cran", "ev_manual")
        c.execute("SELECT * FROM lora_train('ev_cran', adapter => 'ev_cran', max_steps => 6, learning_rate => %s, seq_len => 128)", (LR,))
        again = ppl("ev_held", "ev_manual")
        print(f"no forgetting: manual adapter on held-out manual {tuned_held!r} → {again!r} after training a Cranfield adapter "
              f"({'equal' if again == tuned_held else 'DIFFERENT'}); on Cranfield {tuned_cran_before:.3f} "
              f"(base {base_cran:.3f}); Cranfield adapter on Cranfield {ppl('ev_cran', 'ev_cran'):.3f}")
        print(f"total {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
