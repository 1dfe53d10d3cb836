"""Graph kernels and queries on small graphs with known answers.

References: plain-Python aggregation, scipy.ndimage measurements, and
networkx (triad census, reciprocity, shortest paths, neighbourhoods).
"""

import collections

import networkx as nx
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from scipy import ndimage as ndi

import connectome.graph._aggregate as agg
from connectome.errors import InputError, StoreError
from connectome.graph import (
    Graph,
    IdIndex,
    aggregate_edges,
    block_statistics,
    check_query,
    merge_statistics,
    neuron_table,
    run_query,
    triad_census,
)


def reference_edges(pre, post, size):
    d = collections.defaultdict(lambda: [0, 0])
    for a, b, s in zip(pre.tolist(), post.tolist(), size.tolist()):
        if a and b:
            d[(a, b)][0] += 1
            d[(a, b)][1] += s
    keys = sorted(d)
    return keys, [d[k][0] for k in keys], [d[k][1] for k in keys]


# ------------------------------------------------------------------ ids
def test_id_index_direct_and_hashed():
    rng = np.random.default_rng(0)
    small = np.unique(rng.integers(1, 5000, 800)).astype(np.uint64)
    big = np.unique(rng.integers(2**40, 2**63, 3000)).astype(np.uint64)  # FlyWire-like root ids
    for ids in (small, big):
        index = IdIndex(ids)
        probe = np.concatenate([ids, ids + np.uint64(1), np.array([0, 2**64 - 1], np.uint64)])
        expect = np.searchsorted(ids, probe)
        expect = np.where((expect < ids.size) & (ids[np.minimum(expect, ids.size - 1)] == probe), expect, -1)
        assert np.array_equal(index.lookup(probe), expect)
        assert index.position(int(ids[7])) == 7 and index.position(-3) == -1
    assert index._direct is None  # the big ids took the hash path
    with pytest.raises(InputError, match="sorted and unique"):
        IdIndex(np.array([3, 2], np.uint64))


# ------------------------------------------------------------------ aggregation
@pytest.mark.parametrize("ids_kind", ["small", "root_ids"])
@pytest.mark.parametrize("threads", [1, 2])
def test_aggregate_edges_equals_group_by(xp, ids_kind, threads, monkeypatch):
    # exercise the radix partition (many buckets) and the piecewise reduction (runs crossing pieces)
    monkeypatch.setattr(agg, "BUCKET", 300)
    monkeypatch.setattr(agg, "PIECE", 97)
    monkeypatch.setattr(agg, "GROUP", 1000)
    rng = np.random.default_rng(1)
    m = 20000
    pre = rng.integers(0, 60, m).astype(np.uint64)  # 0 = unassigned, left out
    post = rng.integers(0, 60, m).astype(np.uint64)
    size = rng.integers(0, 5000, m)
    known = None
    if ids_kind == "root_ids":
        table = np.concatenate([[0], np.unique(rng.integers(2**50, 2**62, 200))[:59]]).astype(np.uint64)
        pre, post = table[pre], table[post]
        known = np.unique(table[1:])
    keys, counts, sums = reference_edges(pre, post, size)
    e = aggregate_edges(xp.asarray(pre), xp.asarray(post), xp.asarray(size), ids=known, threads=threads)
    got = {k: np.asarray(v.get() if hasattr(v, "get") else v) for k, v in e.items()}
    assert list(zip(got["pre_id"].tolist(), got["post_id"].tolist())) == keys
    assert got["n_synapses"].tolist() == counts and got["total_size"].tolist() == sums
    assert got["pre_id"].dtype == np.uint64 and got["n_synapses"].dtype == np.int64


def test_aggregate_edges_without_sizes_and_oversized_sizes():
    pre, post = np.array([3, 3, 1, 3]), np.array([1, 1, 3, 2])
    e = aggregate_edges(pre, post)
    assert e["pre_id"].tolist() == [1, 3, 3] and e["post_id"].tolist() == [3, 1, 2]
    assert e["n_synapses"].tolist() == [1, 2, 1] and e["total_size"].tolist() == [0, 0, 0]
    # root ids plus sizes of 2**40 leave no room in a packed word: the argsort path gives the same result
    ids = np.array([2**62 + 5, 2**62 + 9], np.uint64)
    size = np.array([2**40, 1, 2**40 + 3, 7])
    e = aggregate_edges(ids[[0, 0, 1, 0]], ids[[1, 1, 0, 0]], size)
    assert e["pre_id"].tolist() == [2**62 + 5, 2**62 + 5, 2**62 + 9]
    assert e["n_synapses"].tolist() == [1, 2, 1] and e["total_size"].tolist() == [7, 2**40 + 1, 2**40 + 3]


def test_aggregate_edges_bad_input_is_one_line():
    for args, msg in [
        ((np.array([1, 2]), np.array([1])), "differ in length"),
        ((np.array([1, -2]), np.array([1, 1])), "non-negative"),
        ((np.array([1.5, 2]), np.array([1, 1])), "whole numbers"),
        ((np.array(["a"]), np.array(["b"])), "integers"),
    ]:
        with pytest.raises(InputError, match=msg) as info:
            aggregate_edges(*args)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------ neuron statistics
def test_block_statistics_match_scipy_and_do_not_depend_on_blocks(xp):
    rng = np.random.default_rng(2)
    labels = ndi.zoom(rng.integers(0, 12, (4, 6, 6)), (3, 5, 5), order=0).astype(np.uint64)  # blobs, 0 = background
    labels[0, 0, :] = 11  # a run along a whole row
    ids = np.unique(labels)
    ids = ids[ids > 0]
    whole = block_statistics(xp.asarray(labels))
    assert whole["neuron_id"].tolist() == ids.tolist()
    ones = np.ones_like(labels)
    assert np.array_equal(whole["n_voxels"], ndi.sum_labels(ones, labels, ids))
    table = neuron_table(whole)
    com = np.array(ndi.center_of_mass(ones, labels, ids))
    assert np.allclose(np.stack([table["z"], table["y"], table["x"]], axis=1), com)
    boxes = ndi.find_objects(labels.astype(np.int64))
    for k, i in enumerate(ids):
        box = boxes[int(i) - 1]
        assert [table[c][k] for c in ("z_min", "y_min", "x_min")] == [s.start for s in box]
        assert [table[c][k] for c in ("z_max", "y_max", "x_max")] == [s.stop - 1 for s in box]
    parts = [block_statistics(xp.asarray(labels[z:z + 5, y:y + 7, x:x + 9]), (z, y, x))
             for z in range(0, 12, 5) for y in range(0, 30, 7) for x in range(0, 30, 9)]
    merged = merge_statistics(parts)
    for c in whole:
        assert np.array_equal(merged[c], whole[c]), c


def test_block_statistics_edge_cases():
    empty = block_statistics(np.zeros((2, 3, 4), np.uint64))
    assert all(len(v) == 0 for v in empty.values())
    with pytest.raises(InputError, match="3-D"):
        block_statistics(np.zeros((3, 4), np.uint64))
    with pytest.raises(InputError, match="integers"):
        block_statistics(np.zeros((2, 3, 4), np.float32))


# ------------------------------------------------------------------ motifs
def test_triad_census_matches_networkx():
    rng = np.random.default_rng(3)
    for n, p in [(25, 0.2), (40, 0.08), (3, 1.0)]:
        a = (rng.random((n, n)) < p).astype(int)
        np.fill_diagonal(a, 1)  # self-loops are ignored, as by networkx
        g = nx.from_numpy_array(a, create_using=nx.DiGraph)
        g.remove_edges_from(nx.selfloop_edges(g))
        assert triad_census(sp.csr_array(a)) == dict(nx.triadic_census(g))


# ------------------------------------------------------------------ queries on a known graph
@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(4)
    n = 60
    ids = np.sort(rng.choice(np.arange(100, 10**6), n, replace=False)).astype(np.uint64)
    a = (rng.random((n, n)) < 0.08) * rng.integers(1, 9, (n, n))
    np.fill_diagonal(a, 0)
    i, j = np.nonzero(a)
    names = [f"N{k:02d}" for k in range(n)]
    neurons = pa.table({"neuron_id": ids, "name": names, "n_voxels": np.arange(n) * 10})
    g = Graph.from_edges(ids[i], ids[j], a[i, j], a[i, j] * 100, neurons=neurons)
    ref = nx.DiGraph()
    ref.add_nodes_from(ids.tolist())
    ref.add_weighted_edges_from(zip(ids[i].tolist(), ids[j].tolist(), a[i, j].tolist()), weight="n")
    return g, ref, ids, a


def test_partners_match_the_matrix(small):
    g, ref, ids, a = small
    for k in (0, 17, 59):
        down = g.partners(int(ids[k]), "down")
        want = sorted(((int(ids[j]), int(a[k, j])) for j in np.flatnonzero(a[k])), key=lambda t: (-t[1], t[0]))
        assert list(zip(down["neuron_id"].to_pylist(), down["n_synapses"].to_pylist())) == want
        assert down["total_size"].to_pylist() == [100 * w for _, w in want]
        up = g.partners(f"N{k:02d}", "up", min_synapses=4)
        want_up = {int(ids[i]) for i in np.flatnonzero(a[:, k] >= 4)}
        assert set(up["neuron_id"].to_pylist()) == want_up
        both = g.partners(int(ids[k]), "both")
        assert both.num_rows == np.count_nonzero(a[k]) + np.count_nonzero(a[:, k])


def test_adjacency_neighbourhood_path_reciprocity(small):
    g, ref, ids, a = small
    rows, cols = [5, 1, 30, 5], [2, 40, 7, 1, 3]
    m = g.adjacency(ids[rows], ids[cols])
    assert np.array_equal(m.toarray(), a[np.ix_(rows, cols)])
    assert np.array_equal(g.adjacency(ids[rows], ids[cols], min_synapses=5).toarray(),
                          np.where(a[np.ix_(rows, cols)] >= 5, a[np.ix_(rows, cols)], 0))
    hood = g.neighbourhood(int(ids[3]), hops=2, direction="down")
    want = nx.single_source_shortest_path_length(ref, int(ids[3]), cutoff=2)
    assert dict(zip(hood["neuron_id"].to_pylist(), hood["hops"].to_pylist())) == want
    undirected = nx.single_source_shortest_path_length(ref.to_undirected(), int(ids[3]), cutoff=3)
    hood = g.neighbourhood([int(ids[3])], hops=3)
    assert dict(zip(hood["neuron_id"].to_pylist(), hood["hops"].to_pylist())) == undirected
    for u, v in [(0, 9), (12, 44), (5, 5)]:
        path = g.shortest_path(int(ids[u]), int(ids[v]))
        try:
            cost = nx.dijkstra_path_length(ref, int(ids[u]), int(ids[v]), weight=lambda a_, b_, d: 1.0 / d["n"])
        except nx.NetworkXNoPath:
            assert path.num_rows == 0
            continue
        assert path["cost"].to_pylist()[-1] == pytest.approx(cost)
        steps = path["neuron_id"].to_pylist()
        assert steps[0] == int(ids[u]) and steps[-1] == int(ids[v])
        assert all(ref.has_edge(x, y) for x, y in zip(steps, steps[1:]))
    hops = g.shortest_path(int(ids[0]), int(ids[9]), weight="hops")
    if hops.num_rows:
        assert hops.num_rows - 1 == nx.shortest_path_length(ref, int(ids[0]), int(ids[9]))
    assert g.reciprocity() == pytest.approx(nx.overall_reciprocity(ref))
    pairs = g.reciprocal_pairs()
    want = {(min(x, y), max(x, y)) for x, y in ref.edges if ref.has_edge(y, x)}
    assert set(zip(pairs["neuron_a"].to_pylist(), pairs["neuron_b"].to_pylist())) == want
    assert g.motifs() == dict(nx.triadic_census(ref))


def test_find_and_sql(small):
    g, _, ids, _ = small
    assert g.find(name="N1*")["name"].to_pylist() == [f"N1{k}" for k in range(10)]
    assert g.find(n_voxels=(100, 130))["n_voxels"].to_pylist() == [100, 110, 120, 130]
    assert g.find(name=["N03", "N07"], where="n_voxels > 40")["name"].to_pylist() == ["N07"]
    t = g.sql("SELECT count(*) AS n, sum(n_synapses) AS w FROM edges")
    assert t.to_pylist() == [{"n": g._adjacency().m, "w": int(g._adjacency().weight.sum())}]
    with pytest.raises(InputError, match="unknown neuron attribute"):
        g.find(colour="red")


def test_unknown_neurons_and_bad_options_are_one_line_errors(small):
    g, _, ids, _ = small
    cases = [
        (lambda: g.partners(7), "unknown neuron 7"),
        (lambda: g.partners("NOPE"), "unknown neuron 'NOPE'"),
        (lambda: g.partners(int(ids[0]), "sideways"), "direction must be one of"),
        (lambda: g.partners(int(ids[0]), min_synapses=0), "min_synapses"),
        (lambda: g.adjacency([int(ids[0]), 5], None), "unknown neuron 5"),
        (lambda: g.neighbourhood(int(ids[0]), hops=-1), "hops"),
        (lambda: g.shortest_path(int(ids[0]), int(ids[1]), weight="length"), "weight must be"),
        (lambda: g.partners(int(ids[0]), kind="electrical"), "no electrical synapses"),
        (lambda: g.synapses_in_box((0, 0, 0), (1, 1, 1)), "no store"),
    ]
    for call, msg in cases:
        with pytest.raises((InputError, StoreError), match=msg) as info:
            call()
        assert "\n" not in str(info.value)


def test_malformed_tables_are_store_errors():
    neurons = pa.table({"neuron_id": np.array([1, 2], np.uint64)})
    bad = [
        (pa.table({"pre_id": [1], "post_id": [3], "n_synapses": [1]}), "missing from neurons"),
        (pa.table({"pre_id": [1, 1], "post_id": [2, 2], "n_synapses": [1, 1]}), "appears twice"),
        (pa.table({"pre_id": [1], "post_id": [2]}), "missing column n_synapses"),
        (pa.table({"pre_id": ["a"], "post_id": [2], "n_synapses": [1]}), "integer ids"),
        (pa.table({"pre_id": [1], "post_id": [2], "n_synapses": [-1]}), "negative"),
    ]
    for edges, msg in bad:
        with pytest.raises(StoreError, match=msg):
            Graph(neurons, edges)
    with pytest.raises(StoreError, match="repeat"):
        Graph(pa.table({"neuron_id": np.array([2, 1, 2], np.uint64)}), bad[0][0])


# ------------------------------------------------------------------ SQL security
@pytest.mark.parametrize("query, message", [
    ("COPY (SELECT 1) TO 'out.csv'", "COPY statement"),
    ("ATTACH 'other.db'", "ATTACH statement"),
    ("INSTALL httpfs", "statement"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statement"),
    ("SET enable_external_access = true", "SET statement"),
    ("PRAGMA version", "PRAGMA statement"),
    ("SELECT 1; SELECT 2", "one SQL statement"),
    ("DROP VIEW edges", "DROP statement"),
    ("SELEC 1", "syntax error"),
    ("", "empty"),
])
def test_sql_statement_checks(query, message):
    with pytest.raises(InputError, match=message) as info:
        check_query(query)
    assert "\n" not in str(info.value)


def test_sql_cannot_touch_files(tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    tables = {"edges": pa.table({"a": [1, 2]})}
    assert run_query(tables, "WITH x AS (SELECT a FROM edges) SELECT sum(a) AS s FROM x").to_pylist() == [{"s": 3}]
    for q in (f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM '{secret}'",
              f"SELECT * FROM read_text('{secret}')", f"SELECT * FROM glob('{tmp_path}/*')"):
        with pytest.raises(InputError, match="SQL error") as info:
            run_query(tables, q)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]


# ------------------------------------------------------------------ streamed ingest (file → edges)
def synapse_file(path, pre, post, size=None, score=None, row_group=700, id_type=pa.uint64()):
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"synapse_id": np.arange(1, pre.size + 1), "pre_id": pa.array(pre, id_type),
            "post_id": pa.array(post, id_type)}
    if size is not None:
        cols["size"] = pa.array(size)
    if score is not None:
        cols["score"] = pa.array(score)
    pq.write_table(pa.table(cols), path, row_group_size=row_group, compression="zstd")
    return path


def random_synapses(rng, m, n_ids=80, roots=False):
    pre = rng.integers(0, n_ids, m).astype(np.uint64)  # 0 = unassigned
    post = rng.integers(0, n_ids, m).astype(np.uint64)
    ids = np.arange(1, n_ids, dtype=np.uint64)
    if roots:  # FlyWire-like 64-bit root ids
        ids = np.unique(rng.integers(720575940000000000, 720575949999999999, n_ids * 2))[:n_ids - 1].astype(np.uint64)
        table = np.concatenate([np.zeros(1, np.uint64), ids])
        pre, post = table[pre], table[post]
    return pre, post, rng.integers(1, 3000, m).astype(np.int32), ids


@pytest.mark.parametrize("roots", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_streamed_file_equals_whole_array(tmp_path, monkeypatch, roots, threads):
    import workflows.graph as wg

    monkeypatch.setattr(agg, "BUCKET", 200)  # many buckets, several row groups per bucket
    monkeypatch.setattr(agg, "GROUP", 700)
    rng = np.random.default_rng(11)
    pre, post, size, ids = random_synapses(rng, 30000, roots=roots)
    path = synapse_file(tmp_path / "s.parquet", pre, post, size)
    edges, counts = wg.aggregate_synapse_file(path, threads=threads, batch_rows=300)
    whole = aggregate_edges(pre, post, size.astype(np.int64))
    keys, n, s = reference_edges(pre, post, size)
    assert list(zip(edges["pre_id"].tolist(), edges["post_id"].tolist())) == keys
    assert edges["n_synapses"].tolist() == n and edges["total_size"].tolist() == s
    for c in whole:
        assert np.array_equal(edges[c], whole[c]) and edges[c].dtype == whole[c].dtype, c
    assert counts["synapses"] == pre.size and counts["unassigned"] == int(np.sum((pre == 0) | (post == 0)))
    # the same with the neuron list given (root ids: no extra pass to find them)
    edges2, _ = wg.aggregate_synapse_file(path, ids=ids, threads=threads)
    assert all(np.array_equal(edges2[c], whole[c]) for c in whole)


def test_min_score_and_degrees_of_the_stream(tmp_path, monkeypatch):
    import workflows.graph as wg
    from connectome.graph import with_degrees

    monkeypatch.setattr(agg, "BUCKET", 500)
    monkeypatch.setattr(agg, "GROUP", 1500)  # a few buckets a task
    rng = np.random.default_rng(12)
    pre, post, size, ids = random_synapses(rng, 20000)
    score = rng.uniform(0, 100, pre.size).astype(np.float32)
    score[::97] = np.nan  # a missing score never passes
    path = synapse_file(tmp_path / "s.parquet", pre, post, size, score)
    acc, counts = wg.accumulate_synapse_file(path, min_score=40.0, threads=2, batch_rows=512)
    chunks = list(acc.iter_result(lookahead=3))
    assert len(chunks) > 5  # pieces, in order
    e = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    kept = score >= 40.0
    keys, n, s = reference_edges(pre[kept], post[kept], size[kept])
    assert list(zip(e["pre_id"].tolist(), e["post_id"].tolist())) == keys and e["total_size"].tolist() == s
    assert counts["below_score"] == int(np.sum(~kept))
    neurons = pa.table({"neuron_id": np.arange(0, 100, dtype=np.uint64)})  # more neurons than the edges name
    want = with_degrees(neurons, e["pre_id"], e["post_id"], e["n_synapses"])
    got = acc.degrees_for(neurons.column("neuron_id").to_numpy())
    for c, v in got.items():
        assert np.array_equal(v, want.column(c).to_numpy()), c
    assert np.array_equal(acc.edge_neurons(), np.unique(np.concatenate([e["pre_id"], e["post_id"]])))
    with pytest.raises(InputError, match="edges name neuron 7, which the neuron table does not list"):
        acc.degrees_for(np.setdiff1d(np.arange(1, 80, dtype=np.uint64), [7]))


def test_accumulator_concurrent_adds_and_a_second_arena():
    import threading

    rng = np.random.default_rng(13)
    pre, post, size, _ = random_synapses(rng, 200000, n_ids=300)
    acc = agg.EdgeAccumulator(1000, 300, 3000, threads=2)  # far too few rows announced: more arenas
    parts = np.array_split(np.arange(pre.size), 16)
    threads = [threading.Thread(target=lambda ix=ix: acc.add(pre[ix], post[ix], size[ix], threads=1)) for ix in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acc.n == pre.size and len(acc._segments) > 1
    e = acc.result()
    keys, n, s = reference_edges(pre, post, size)
    assert list(zip(e["pre_id"].tolist(), e["post_id"].tolist())) == keys
    assert e["n_synapses"].tolist() == n and e["total_size"].tolist() == s


def test_accumulator_rejects_what_does_not_fit_the_word():
    acc = agg.EdgeAccumulator(10, 50, 100)
    with pytest.raises(InputError, match="exceeds the announced maximum 50"):
        acc.add(np.array([3, 51]), np.array([1, 2]), np.array([1, 1]))
    with pytest.raises(InputError, match="synapse size 300 exceeds the announced maximum 127"):
        acc.add(np.array([3, 5]), np.array([1, 2]), np.array([1, 300]))
    with pytest.raises(InputError, match="keep must be a boolean mask"):
        acc.add(np.array([3]), np.array([1]), keep=np.array([1]))


def test_unique_ids_of_a_stream():
    from connectome.graph._ids import unique_ids

    rng = np.random.default_rng(14)
    chunks = [rng.integers(0, 2**63, 3000, dtype=np.int64), rng.integers(0, 40, 50000).astype(np.uint32),
              np.zeros(5, np.uint64), np.array([], np.uint64)]
    want = np.unique(np.concatenate([c.astype(np.uint64) for c in chunks]))
    assert np.array_equal(unique_ids(chunks), want[want != 0])
    with pytest.raises(InputError, match="non-negative"):
        unique_ids([np.array([3, -1])])


def test_build_edges_streams_an_exact_delta_encoded_table(tmp_path, monkeypatch):
    import duckdb
    import pyarrow.parquet as pq

    import workflows.graph as wg
    from connectome.io import Dataset

    monkeypatch.setattr(agg, "BUCKET", 300)
    monkeypatch.setattr(agg, "GROUP", 900)
    monkeypatch.setattr(wg.st, "ROW_GROUP", 1000)  # several row groups, written while later buckets sort
    rng = np.random.default_rng(15)
    for roots in (False, True):
        pre, post, size, ids = random_synapses(rng, 25000, roots=roots)
        ds = Dataset.create(tmp_path / f"s{int(roots)}.zarr")
        synapse_file(ds.table_path("em/synapses"), pre, post, size)
        report = wg.build_edges(ds)
        keys, n, s = reference_edges(pre, post, size)
        e = ds.read_table("graph/edges")
        assert list(zip(e.column("pre_id").to_pylist(), e.column("post_id").to_pylist())) == keys
        assert e.column("n_synapses").to_pylist() == n and e.column("total_size").to_pylist() == s
        meta = pq.ParquetFile(ds.table_path("graph/edges")).metadata
        assert meta.num_row_groups > 3 and "DELTA_BINARY_PACKED" in meta.row_group(0).column(0).encodings
        got = duckdb.connect().execute(
            f"SELECT sum(n_synapses) FROM read_parquet('{ds.table_path('graph/edges')}')").fetchone()
        assert got[0] == report["used"] == int(np.sum((pre != 0) & (post != 0)))
        neurons = ds.read_table("graph/neurons")  # no table before: the neurons the edges name
        assert np.array_equal(neurons.column("neuron_id").to_numpy(), np.unique(np.concatenate(keys)))
        w = collections.Counter()
        for (a, _), k in zip(keys, n):
            w[a] += k
        assert dict(zip(neurons.column("neuron_id").to_pylist(), neurons.column("n_outputs").to_pylist())) == \
            {i: w.get(i, 0) for i in neurons.column("neuron_id").to_pylist()}
        assert not list(ds.table_path("graph/edges").parent.glob("*.tmp-*"))


def test_build_edges_with_a_neuron_table_that_misses_a_neuron_writes_nothing(tmp_path):
    import workflows.graph as wg
    from connectome.graph import _store as st
    from connectome.io import Dataset

    rng = np.random.default_rng(16)
    pre, post, size, ids = random_synapses(rng, 5000)
    ds = Dataset.create(tmp_path / "s.zarr")
    synapse_file(ds.table_path("em/synapses"), pre, post, size)
    st.write_table(ds, st.NEURONS, pa.table({"neuron_id": np.setdiff1d(ids, [int(pre[pre > 0][0])])}))
    with pytest.raises(StoreError, match="disagree") as info:
        wg.build_edges(ds)
    assert "\n" not in str(info.value)
    assert not ds.has_table("graph/edges")
    assert not list(ds.table_path("graph/edges").parent.glob("*.tmp-*"))
    st.write_table(ds, st.NEURONS, pa.table({"neuron_id": ids}))  # the full table: counts for every neuron
    wg.build_edges(ds)
    neurons = ds.read_table("graph/neurons")
    assert neurons.num_rows == ids.size and int(np.sum(neurons.column("n_inputs").to_numpy())) == \
        int(np.sum((pre != 0) & (post != 0)))
