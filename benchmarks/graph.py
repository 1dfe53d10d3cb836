"""Graph store and queries at FlyWire scale, side by side with plain DuckDB SQL and networkx.

A synthetic connectome the size of FlyWire's (139 k neurons, ~50 M
synapses with a cleft score) is written as ``em/synapses.parquet`` in a
store, in chunks (never all of it in memory as Python objects), with compact
dtypes. Then, each in a fresh process so time and peak memory are its own:

* **connectome** — ingest: ``workflows.graph.build_edges`` (synapse Parquet →
  ``graph/edges.parquet`` + neuron synapse counts), and the in-memory kernel
  ``aggregate_edges`` on columns already in RAM (ids as our segmentation
  writes them, 1…n; and FlyWire-style 64-bit root ids). Queries on
  ``open_graph``: partner queries (p50 / p99 over 1000 random neurons, each
  direction), a 1000 × 1000 adjacency between random sets, 2-hop downstream
  neighbourhoods.
* **DuckDB** — the same with plain SQL: ``GROUP BY`` the synapse Parquet into
  an in-memory table, sort it by ``(pre_id, post_id)`` (so its zone maps
  serve ``pre_id`` lookups), write it as Parquet, then ``WHERE pre_id = ?`` …
  on the table (prepared statements).
* **networkx** — a ``DiGraph`` cannot hold 50 M synapses (or the 15 M
  edges: ~470 B an edge measured, ~7 GB) on this 24 GB machine shared with
  others, so it is built from the aggregated edges with ≥ 5 synapses (the
  usual FlyWire threshold); its queries are compared with connectome's and
  DuckDB's on the same threshold. Its synapse-ingest rate is measured on a
  1 M-synapse sample (``add_edge`` / weight += 1 per synapse).

Time is wall-clock without imports; CPU time (all threads) is given too,
since the machine is shared. Peak memory is the child's VmHWM, and "above
imports" subtracts what the imports alone take.

The ingest runs ``--repeat`` times (best wall time reported, every run kept
with its CPU time and the load average around it), next to the time that
decoding the three columns alone takes with the same two reader threads (the
floor that the Parquet file sets); ``--lz4-copy`` repeats it on an LZ4 copy of
the synapse file.

Run: ``python benchmarks/graph.py [--neurons 140000] [--synapses 50000000]
[--work DIR] [--repeat 3] [--lz4-copy] [--json benchmarks/results/graph.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

COMMON = r"""
import json, os, sys, time
import numpy as np
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
class Clock:
    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time(); return self
    def __exit__(self, *a):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c
def pct(ns):
    a = np.asarray(ns) / 1e6
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": int(a.size)}
work, n_neurons, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = os.path.join(work, "flywire.zarr")
syn_path = os.path.join(store, "em", "synapses.parquet")
out = {}
"""

GENERATE = COMMON + r"""
import pyarrow as pa, pyarrow.parquet as pq
from connectome.io import Dataset
from connectome.graph import _store as st
target = int(sys.argv[4])
codec = sys.argv[5] if len(sys.argv) > 5 else "zstd"
rng = np.random.default_rng(seed)
t0 = time.perf_counter()
N = n_neurons
# out-degree (distinct partners) heavy-tailed, mean ~107; partners half local (a "neuropil"
# neighbourhood in id order), half global with preference for hub neurons
deg = np.clip(rng.lognormal(np.log(80), 0.8, N), 1, 4000).astype(np.int64)
deg = (deg * (1.1 * target / 3.3 / deg.sum())).astype(np.int64) + 1
pre = np.repeat(np.arange(N, dtype=np.int64), deg)
hub = rng.lognormal(0, 1.0, N); hub /= hub.sum()
local = rng.random(pre.size) < 0.5
post = np.empty(pre.size, np.int64)
post[local] = (pre[local] + rng.normal(0, 2000, int(local.sum())).astype(np.int64)) % N
post[~local] = rng.choice(N, int((~local).sum()), p=hub)
keep = pre != post
key = np.unique(pre[keep] * N + post[keep])
del pre, post, local, keep
epre, epost = (key // N).astype(np.uint32) + 1, (key % N).astype(np.uint32) + 1  # ids 1..N
del key
# synapses per connection: mostly 1-3, with a heavy tail (mean ~4)
count = np.minimum(rng.geometric(0.45, epre.size) + (rng.random(epre.size) < 0.15) * rng.geometric(0.08, epre.size), 2000)
order = rng.permutation(epre.size)  # keep a random subset of connections, not the lowest ids
epre, epost, count = epre[order], epost[order], count[order]
del order
csum = np.cumsum(count)
n_edges = int(np.searchsorted(csum, target) + 1)
epre, epost, count = epre[:n_edges], epost[:n_edges], count[:n_edges]
count[-1] -= int(csum[n_edges - 1] - target)
idx = np.repeat(np.arange(n_edges, dtype=np.int32), count)
rng.shuffle(idx)  # synapses in random order, as a detector writes them block by block
ds = Dataset.create(store, overwrite=True)
st.write_table(ds, st.NEURONS, pa.table({"neuron_id": pa.array(np.arange(1, N + 1, dtype=np.uint64))}))
schema = pa.schema([("synapse_id", pa.int64()), ("size", pa.int32()), ("score", pa.float32()),
                    ("pre_id", pa.uint64()), ("post_id", pa.uint64())])
os.makedirs(os.path.dirname(syn_path), exist_ok=True)
chunk = 5_000_000
with pq.ParquetWriter(syn_path, schema, compression=codec) as w:
    for lo in range(0, target, chunk):
        e = idx[lo:lo + chunk]
        k = e.size
        w.write_table(pa.table({
            "synapse_id": np.arange(lo + 1, lo + k + 1, dtype=np.int64),
            "size": rng.lognormal(np.log(400), 0.6, k).astype(np.int32) + 1,
            "score": rng.uniform(0, 200, k).astype(np.float32),
            "pre_id": epre[e].astype(np.uint64), "post_id": epost[e].astype(np.uint64)}, schema=schema),
            row_group_size=1 << 20)
out.update(seconds=time.perf_counter() - t0, synapses=int(idx.size), true_edges=n_edges,
           file_mb=os.path.getsize(syn_path) / 2**20, peak_mb=hwm_mb())
print(json.dumps(out))
"""

CONNECTOME = COMMON + r"""
import shutil, threading
import pyarrow.parquet as pq
from concurrent.futures import ThreadPoolExecutor
from connectome.io import Dataset
from connectome.graph import aggregate_edges, open_graph
from workflows.graph import build_edges
repeat, lz4 = int(sys.argv[4]), sys.argv[5] == "1"
def load():
    return float(open("/proc/loadavg").read().split()[0])
base = hwm_mb()
def ingest(where):
    ds = Dataset(where)
    runs = []
    for _ in range(repeat):
        l0 = load()
        with Clock() as c:
            rep = build_edges(ds, overwrite=True)
        runs.append({"wall_s": c.wall, "cpu_s": c.cpu, "msyn_per_s": rep["synapses"] / c.wall / 1e6,
                     "msyn_per_cpu_s": rep["synapses"] / c.cpu / 1e6, "load": [l0, load()]})
    best = min(runs, key=lambda r: r["wall_s"])
    return {"wall_s": best["wall_s"], "cpu_s": best["cpu_s"], "msyn_per_s": best["msyn_per_s"],
            "cpu_s_min": min(r["cpu_s"] for r in runs), "synapses": rep["synapses"], "edges": rep["edges"],
            "runs": runs, "peak_mb": hwm_mb(), "above_imports_mb": hwm_mb() - base}
def decode_only(path):
    # the floor set by Parquet decoding: the same three columns, the same two reader threads, nothing else
    n_groups = pq.ParquetFile(path).metadata.num_row_groups
    def read(groups):
        pf = pq.ParquetFile(path, memory_map=True)
        for g in groups:
            for b in pf.iter_batches(batch_size=1 << 20, row_groups=[g], columns=["pre_id", "post_id", "size"],
                                     use_threads=False):
                b.column(0).to_numpy()
    with Clock() as c, ThreadPoolExecutor(2) as pool:
        list(pool.map(read, [list(range(0, n_groups, 2)), list(range(1, n_groups, 2))]))
    return {"wall_s": c.wall, "cpu_s": c.cpu}
out["decode_only"] = decode_only(syn_path)
out["ingest"] = ingest(store)
if lz4:  # the same synapses in an LZ4-compressed file (what a faster-to-read em/synapses.parquet would give)
    other = os.path.join(work, "flywire-lz4.zarr")
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(store, other, ignore=shutil.ignore_patterns("synapses.parquet", "edges.parquet"))
    src = pq.ParquetFile(syn_path)
    lz4_path = os.path.join(other, "em", "synapses.parquet")
    with pq.ParquetWriter(lz4_path, src.schema_arrow, compression="lz4") as w:
        for g in range(src.metadata.num_row_groups):
            w.write_table(src.read_row_group(g), row_group_size=1 << 20)
    out["lz4_file_mb"] = os.path.getsize(lz4_path) / 2**20
    out["decode_only_lz4"] = decode_only(lz4_path)
    out["ingest_lz4"] = ingest(other)
    shutil.rmtree(other, ignore_errors=True)
rep = out["ingest"]
# the kernel alone, columns already in memory
t = pq.read_table(syn_path, columns=["pre_id", "post_id", "size"])
pre, post, size = (t.column(k).to_numpy() for k in ("pre_id", "post_id", "size"))
del t
with Clock() as c:
    e = aggregate_edges(pre, post, size)
out["kernel_small_ids"] = {"wall_s": c.wall, "cpu_s": c.cpu, "msyn_per_s": pre.size / c.wall / 1e6}
assert e["pre_id"].size == rep["edges"]
rng = np.random.default_rng(seed + 1)
roots = np.unique(rng.integers(720575940000000000, 720575949999999999, int(n_neurons * 1.01)))[:n_neurons]
roots = np.concatenate([[0], np.sort(roots)]).astype(np.uint64)
rpre, rpost = roots[pre], roots[post]
del pre, post, e
with Clock() as c:
    e = aggregate_edges(rpre, rpost, size, ids=roots[1:])
out["kernel_root_ids"] = {"wall_s": c.wall, "cpu_s": c.cpu, "msyn_per_s": rpre.size / c.wall / 1e6}
assert e["pre_id"].size == rep["edges"]
del rpre, rpost, size, e
out["peak_mb"] = hwm_mb(); out["import_mb"] = base
print(json.dumps(out))
"""

CONNECTOME_QUERIES = COMMON + r"""
from connectome.graph import open_graph
base = hwm_mb()
rss0 = rss_mb()
with Clock() as c:
    g = open_graph(store)
    g._adjacency().incoming()  # the upstream index is built on first use; count it in the load
out["load"] = {"wall_s": c.wall, "cpu_s": c.cpu, "rss_added_mb": rss_mb() - rss0}
rng = np.random.default_rng(seed + 2)
ids = g.ids
probe = ids[rng.integers(0, ids.size, 1000)]
for name, direction, m in (("partners_down", "down", 1), ("partners_up", "up", 1),
                           ("partners_down_min5", "down", 5), ("partners_up_min5", "up", 5)):
    ns = []
    for i in probe:
        t0 = time.perf_counter_ns(); r = g.partners(int(i), direction, min_synapses=m); ns.append(time.perf_counter_ns() - t0)
    out[name] = pct(ns)
adj_ns, nnz = [], []
for _ in range(10):
    a, b = rng.choice(ids, 1000, replace=False), rng.choice(ids, 1000, replace=False)
    t0 = time.perf_counter_ns(); mat = g.adjacency(a, b); adj_ns.append(time.perf_counter_ns() - t0); nnz.append(mat.nnz)
out["adjacency_1000"] = {**pct(adj_ns), "nnz_mean": float(np.mean(nnz))}
for name, m in (("two_hop", 1), ("two_hop_min5", 5)):
    ns, sizes = [], []
    for i in probe[:50]:
        t0 = time.perf_counter_ns(); h = g.neighbourhood(int(i), hops=2, direction="down", min_synapses=m)
        ns.append(time.perf_counter_ns() - t0); sizes.append(h.num_rows)
    out[name] = {**pct(ns), "neurons_mean": float(np.mean(sizes))}
check = [int(x) for x in probe[:5]]
out["check"] = {str(i): sorted(g.partners(i, "down", min_synapses=5)["neuron_id"].to_pylist()) for i in check}
out["check_two_hop"] = {str(i): g.neighbourhood(i, hops=2, direction="down", min_synapses=5).num_rows for i in check}
out["edges_min5"] = int(np.count_nonzero(g._adjacency().weight >= 5))
out["peak_mb"] = hwm_mb(); out["rss_mb"] = rss_mb(); out["import_mb"] = base
print(json.dumps(out))
"""

DUCKDB = COMMON + r"""
import duckdb, pyarrow as pa
base = hwm_mb()
con = duckdb.connect(":memory:")
con.execute("SET threads = 2")
with Clock() as c:
    con.execute(f"CREATE TABLE edges AS SELECT pre_id, post_id, count(*) AS n_synapses, sum(size) AS total_size "
                f"FROM read_parquet('{syn_path}') GROUP BY pre_id, post_id")
n_edges = con.execute("SELECT count(*) FROM edges").fetchone()[0]
n_syn = con.execute(f"SELECT count(*) FROM read_parquet('{syn_path}')").fetchone()[0]
out["ingest"] = {"wall_s": c.wall, "cpu_s": c.cpu, "edges": n_edges, "msyn_per_s": n_syn / c.wall / 1e6,
                 "peak_mb": hwm_mb(), "above_imports_mb": hwm_mb() - base}
with Clock() as c:  # sorted by pre_id, the table's zone maps let a pre_id lookup skip most of it
    con.execute("CREATE TABLE sorted_edges AS SELECT * FROM edges ORDER BY pre_id, post_id")
    con.execute("DROP TABLE edges")
    con.execute("ALTER TABLE sorted_edges RENAME TO edges")
out["sort"] = {"wall_s": c.wall, "cpu_s": c.cpu}
with Clock() as c:
    con.execute(f"COPY edges TO '{work}/duck_edges.parquet' (FORMAT parquet)")
out["write"] = {"wall_s": c.wall, "cpu_s": c.cpu}
ids = np.arange(1, n_neurons + 1)
rng = np.random.default_rng(seed + 2)
probe = ids[rng.integers(0, ids.size, 1000)]  # the same neurons as connectome's run
queries = {
    "partners_down": "SELECT post_id, n_synapses, total_size FROM edges WHERE pre_id = ? ORDER BY n_synapses DESC, post_id",
    "partners_up": "SELECT pre_id, n_synapses, total_size FROM edges WHERE post_id = ? ORDER BY n_synapses DESC, pre_id",
    "partners_down_min5": "SELECT post_id, n_synapses, total_size FROM edges WHERE pre_id = ? AND n_synapses >= 5 ORDER BY n_synapses DESC, post_id",
    "partners_up_min5": "SELECT pre_id, n_synapses, total_size FROM edges WHERE post_id = ? AND n_synapses >= 5 ORDER BY n_synapses DESC, pre_id",
}
for name, q in queries.items():
    ns = []
    for i in (probe if "down" in name else probe[:200]):
        t0 = time.perf_counter_ns(); r = con.execute(q, [int(i)]).fetchall(); ns.append(time.perf_counter_ns() - t0)
    out[name] = pct(ns)
adj_ns = []
for _ in range(10):
    a, b = rng.choice(ids, 1000, replace=False), rng.choice(ids, 1000, replace=False)
    ta, tb = pa.table({"id": a.astype(np.uint64)}), pa.table({"id": b.astype(np.uint64)})
    t0 = time.perf_counter_ns()
    con.register("rows_", ta); con.register("cols_", tb)
    r = con.execute("SELECT e.pre_id, e.post_id, e.n_synapses FROM edges e SEMI JOIN rows_ ON e.pre_id = rows_.id "
                    "SEMI JOIN cols_ ON e.post_id = cols_.id").fetchall()
    adj_ns.append(time.perf_counter_ns() - t0)
out["adjacency_1000"] = pct(adj_ns)
two = ("WITH h1 AS (SELECT DISTINCT post_id AS id FROM edges WHERE pre_id = $1 AND n_synapses >= $2) "
       "SELECT id FROM h1 UNION SELECT e.post_id FROM edges e JOIN h1 ON e.pre_id = h1.id WHERE e.n_synapses >= $2 "
       "UNION SELECT $1")
for name, m in (("two_hop", 1), ("two_hop_min5", 5)):
    ns, sizes = [], []
    for i in probe[:50]:
        t0 = time.perf_counter_ns(); r = con.execute(two, [int(i), m]).fetchall(); ns.append(time.perf_counter_ns() - t0); sizes.append(len(r))
    out[name] = {**pct(ns), "neurons_mean": float(np.mean(sizes))}
check = [int(x) for x in probe[:5]]
out["check"] = {str(i): sorted(r[0] for r in con.execute(queries["partners_down_min5"], [i]).fetchall()) for i in check}
out["check_two_hop"] = {str(i): len(con.execute(two, [i, 5]).fetchall()) for i in check}
out["peak_mb"] = hwm_mb(); out["rss_mb"] = rss_mb(); out["import_mb"] = base
print(json.dumps(out))
"""

NETWORKX = COMMON + r"""
import networkx as nx, pyarrow.parquet as pq, pyarrow.compute as pc
base = hwm_mb()
# the thresholded graph (>= 5 synapses) from the aggregated edges
t = pq.read_table(os.path.join(store, "graph", "edges.parquet"))
t = t.filter(pc.greater_equal(t.column("n_synapses"), 5))
cols = [t.column(k).to_pylist() for k in ("pre_id", "post_id", "n_synapses", "total_size")]
del t
rss0 = rss_mb()
with Clock() as c:
    G = nx.DiGraph()
    G.add_nodes_from(range(1, n_neurons + 1))
    G.add_edges_from((u, v, {"n_synapses": w, "total_size": s}) for u, v, w, s in zip(*cols))
out["build_min5"] = {"edges": G.number_of_edges(), "wall_s": c.wall, "cpu_s": c.cpu, "rss_added_mb": rss_mb() - rss0}
del cols
ids = np.arange(1, n_neurons + 1)
rng = np.random.default_rng(seed + 2)
probe = ids[rng.integers(0, ids.size, 1000)]
for name, adj in (("partners_down_min5", G.succ), ("partners_up_min5", G.pred)):
    ns = []
    for i in probe:
        t0 = time.perf_counter_ns()
        r = sorted(((v, d["n_synapses"], d["total_size"]) for v, d in adj[int(i)].items()), key=lambda x: (-x[1], x[0]))
        ns.append(time.perf_counter_ns() - t0)
    out[name] = pct(ns)
adj_ns = []
for _ in range(10):
    a, b = rng.choice(ids, 1000, replace=False), rng.choice(ids, 1000, replace=False)
    t0 = time.perf_counter_ns()
    bs = set(b.tolist()); col = {v: j for j, v in enumerate(b.tolist())}
    entries = [(k, col[v], d["n_synapses"]) for k, u in enumerate(a.tolist()) for v, d in G.succ[u].items() if v in bs]
    adj_ns.append(time.perf_counter_ns() - t0)
out["adjacency_1000_min5"] = pct(adj_ns)
ns, sizes = [], []
for i in probe[:50]:
    t0 = time.perf_counter_ns(); h = nx.single_source_shortest_path_length(G, int(i), cutoff=2)
    ns.append(time.perf_counter_ns() - t0); sizes.append(len(h))
out["two_hop_min5"] = {**pct(ns), "neurons_mean": float(np.mean(sizes))}
check = [int(x) for x in probe[:5]]
out["check"] = {str(i): sorted(G.succ[i]) for i in check}
out["check_two_hop"] = {str(i): len(nx.single_source_shortest_path_length(G, i, cutoff=2)) for i in check}
out["peak_graph_mb"] = hwm_mb()
# synapse-by-synapse ingest on a 1 M sample (the networkx way to aggregate)
pf = pq.ParquetFile(syn_path)
b = next(pf.iter_batches(batch_size=1_000_000, columns=["pre_id", "post_id", "size"]))
pre, post, size = (b.column(k).to_pylist() for k in ("pre_id", "post_id", "size"))
H = nx.DiGraph()
with Clock() as c:
    for u, v, s in zip(pre, post, size):
        d = H.get_edge_data(u, v)
        if d is None:
            H.add_edge(u, v, n_synapses=1, total_size=s)
        else:
            d["n_synapses"] += 1; d["total_size"] += s
out["ingest_sample"] = {"synapses": len(pre), "wall_s": c.wall, "cpu_s": c.cpu, "msyn_per_s": len(pre) / c.wall / 1e6}
out["peak_mb"] = hwm_mb(); out["rss_mb"] = rss_mb(); out["import_mb"] = base
print(json.dumps(out))
"""


def child(code: str, *args) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=HERE.parent)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--neurons", type=int, default=140_000)
    p.add_argument("--synapses", type=int, default=50_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch store")
    p.add_argument("--skip", default="", help="comma-separated: generate (reuse --work), connectome, duckdb, networkx")
    p.add_argument("--codec", default="zstd", help="compression of the generated synapse file (zstd: as the "
                   "pipeline writes em/synapses.parquet)")
    p.add_argument("--repeat", type=int, default=3, help="ingest runs (the best is reported, all are kept)")
    p.add_argument("--lz4-copy", action="store_true", help="also ingest an LZ4 copy of the synapse file")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="graph-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    results = {"neurons": a.neurons, "synapses": a.synapses, "date": time.strftime("%Y-%m-%d"),
               "cpus": os.cpu_count(), "load_before": loadavg()}
    try:
        if "generate" not in skip:
            print(f"generating {a.synapses:,} synapses among {a.neurons:,} neurons in {work} ...", flush=True)
            results["generate"] = child(GENERATE, work, a.neurons, a.seed, a.synapses, a.codec)
            print(json.dumps(results["generate"]), flush=True)
        for name, code in (("connectome", CONNECTOME), ("connectome_queries", CONNECTOME_QUERIES),
                           ("duckdb", DUCKDB), ("networkx", NETWORKX)):
            if name in skip or name.split("_")[0] in skip:
                continue
            print(f"{name} ...", flush=True)
            results[f"load_{name}"] = loadavg()
            extra = (a.repeat, int(a.lz4_copy)) if name == "connectome" else ()
            results[name] = child(code, work, a.neurons, a.seed, *extra)
            print(json.dumps(results[name]), flush=True)
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    checks = [results[k].get("check") for k in ("connectome_queries", "duckdb", "networkx") if k in results]
    results["same_answers"] = all(c == checks[0] for c in checks)
    hops = [results[k].get("check_two_hop") for k in ("connectome_queries", "duckdb", "networkx") if k in results]
    results["same_two_hop"] = all(h == hops[0] for h in hops)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("same_answers", "same_two_hop")}))
    return results


if __name__ == "__main__":
    main()
