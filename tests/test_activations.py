import hashlib
import re

import numpy as np
import pytest
import torch

from hsae.activations import HarvestConfig, Harvester, harvest
from hsae.corpora import FORGET, CorpusSpec
from hsae.models import ModelNotFoundError, ModelSpec, describe_model, load_model
from hsae.server import ShardedRows, create_activation_server, fetch


def test_served_activations_equal_hidden_states_at_layer(tiny_harvest_cfg, tmp_path):
    h = harvest(tiny_harvest_cfg, root=tmp_path, progress=None)
    loaded = load_model(tiny_harvest_cfg.model)
    tokens = np.load(h.dir / "tokens_train.npy")
    with torch.no_grad():
        out = loaded.model(input_ids=torch.from_numpy(tokens), output_hidden_states=True)
    layer = tiny_harvest_cfg.model.layer
    expected = out.hidden_states[layer + 1][:, 1:, :].reshape(-1, loaded.d_model).numpy()  # BOS excluded
    x, _ = h.arrays("train")
    assert x.shape == (40 * 31, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)


def test_same_seed_same_batches_other_seed_other_batches(tiny_harvest_cfg, tmp_path):
    a = harvest(tiny_harvest_cfg, root=tmp_path / "a", progress=None)
    b = harvest(tiny_harvest_cfg, root=tmp_path / "b", progress=None)
    assert a.key == b.key
    np.testing.assert_array_equal(a.arrays("train")[0], b.arrays("train")[0])
    from dataclasses import replace

    c = harvest(replace(tiny_harvest_cfg, seed=7), root=tmp_path / "c", progress=None)
    assert c.key != a.key
    assert not np.array_equal(c.arrays("train")[0], a.arrays("train")[0])


def test_truncated_shard_is_rebuilt_not_served(tiny_harvest_cfg, tmp_path):
    first = harvest(tiny_harvest_cfg, root=tmp_path, progress=None)
    victim = first.dir / "train_00001.npy"
    victim.write_bytes(victim.read_bytes()[:1000])
    harvester = Harvester(tiny_harvest_cfg, tmp_path, progress=None)
    assert not harvester.cache.shard_is_valid("train", 1)
    assert harvester.cache.shard_is_valid("train", 0)
    second = harvester.run()
    assert harvester.forwards == 2  # only shard 1 (16 contexts, 8 per forward) was recomputed
    np.testing.assert_array_equal(second.arrays("train")[0], first.arrays("train")[0])
    # A flipped byte (same size) fails the checksum too.
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert not Harvester(tiny_harvest_cfg, tmp_path, progress=None).cache.shard_is_valid("train", 1)


def test_a_redone_shard_is_said_with_its_file_and_reason(tiny_harvest_cfg, tmp_path):
    fresh: list[str] = []
    first = harvest(tiny_harvest_cfg, root=tmp_path, progress=fresh.append)
    assert not any("repair" in line.lower() for line in fresh)  # an empty cache is harvested, not repaired
    assert any("harvesting train: 3/3 shards" in line for line in fresh)
    shard_lines = [line for line in fresh if re.search(r"train shard \d/3: [\d,]+/[\d,]+ tokens", line)]
    assert len(shard_lines) == 3 and "ETA" in shard_lines[0] and "done in" in shard_lines[-1]

    labels = first.dir / "train_00001.labels.npy"  # shard 2 of 3: one flipped byte, same size
    raw = bytearray(labels.read_bytes())
    raw[-3] ^= 0xFF
    labels.write_bytes(bytes(raw))
    (first.dir / "eval_00000.json").unlink()  # eval shard 1 of 1: its sidecar deleted
    harvester = Harvester(tiny_harvest_cfg, tmp_path, progress=None)
    checksum = harvester.cache.shard_problem("train", 1)
    sidecar = harvester.cache.shard_problem("eval", 0)
    assert checksum is not None and "train shard 2/3" in checksum and "train_00001.labels.npy" in checksum
    assert "checksum" in checksum and "does not match" in checksum
    assert sidecar is not None and "eval_00000.json" in sidecar and "missing" in sidecar and "checksum" not in sidecar
    assert harvester.cache.shard_problem("train", 0) is None

    lines: list[str] = []
    harvester.progress = lines.append
    second = harvester.run()
    repairs = [line for line in lines if "repairing the activation cache" in line]
    assert repairs == [f"[hsae] repairing the activation cache: {checksum}; re-harvesting it",
                       f"[hsae] repairing the activation cache: {sidecar}; re-harvesting it"]
    assert any("harvesting train: 1/3 shards (2 already cached)" in line for line in lines)
    assert harvester.forwards == 3  # shard 2 (two forwards of 8 contexts) and the eval shard (one)
    assert all(harvester.cache.shard_is_valid(split, i) for split in ("train", "eval")
               for i in range(tiny_harvest_cfg.n_shards(split)))
    np.testing.assert_array_equal(second.arrays("train")[1], first.arrays("train")[1])


def test_shard_problems_are_told_apart(tiny_harvest_cfg, tmp_path):
    h = harvest(tiny_harvest_cfg, root=tmp_path, progress=None)
    cache = Harvester(tiny_harvest_cfg, tmp_path, progress=None).cache
    (h.dir / "train_00000.json").write_text("{not json")
    (h.dir / "train_00001.tokens.npy").unlink()
    (h.dir / "train_00002.json").unlink()
    for name in ("train_00002.npy", "train_00002.labels.npy", "train_00002.tokens.npy", "train_00002.contexts.npy"):
        (h.dir / name).unlink()
    assert "sidecar train_00000.json unreadable" in cache.shard_problem("train", 0)
    assert cache.shard_problem("train", 1).endswith("train_00001.tokens.npy is missing")
    assert cache.shard_problem("train", 2) == "train shard 3/3: not harvested yet"
    assert not any(cache.shard_is_valid("train", i) for i in range(3))
    assert cache.shard_is_valid("eval", 0)


def test_domain_labels_line_up_with_their_tokens(tiny_harvest_cfg, tmp_path):
    h = harvest(tiny_harvest_cfg, root=tmp_path, progress=None)
    tok = load_model(tiny_harvest_cfg.model).tokenizer
    forget_words = {"cell", "gene", "virus", "enzyme", "protein", "tissue"}
    retain_words = {"city", "river", "king", "music", "bridge", "poem"}
    for split in ("train", "eval"):
        for shard in h.shards[split]:
            assert len(shard.labels) == len(shard.tokens) == len(shard.x)
            contexts = shard.tokens.reshape(-1, 31)
            context_labels = shard.labels.reshape(-1, 31)
            for ids, labels in zip(contexts, context_labels, strict=True):
                assert len(set(labels.tolist())) == 1  # a context never mixes domains
                # Contexts cut words at their edges: judge only the complete words inside.
                words = re.findall(r"[a-z]+", tok.decode(ids).lower().replace("<eos>", " "))[1:-1]
                own, other = (forget_words, retain_words) if labels[0] == FORGET else (retain_words, forget_words)
                shared = {"item", "is", "a"}  # every toy document opens "Item<i> is a ..."
                assert words and set(words) <= own | shared, (labels[0], set(words) - own - shared)
                assert not set(words) & other
    labels = h.arrays("train")[1]
    assert set(np.unique(labels)) == {0, 1}
    assert (labels == FORGET).sum() == 20 * 31  # balanced: half the 40 contexts are forget


def test_server_serves_refs_and_second_server_reads_disk_only(ray_session, tiny_harvest_cfg, tmp_path):
    ray = ray_session
    server = create_activation_server(tiny_harvest_cfg, name="test-acts-1", cache_root=str(tmp_path), num_cpus=0)
    info = ray.get(server.prepare.remote())
    assert ray.get(server.forwards.remote()) == 6  # 40 train + 8 eval contexts, 8 per forward
    served = fetch(info)
    assert len(served.x) == 40 * 31 and served.model.d_model == 64
    direct = harvest(tiny_harvest_cfg, root=tmp_path, progress=None)
    np.testing.assert_array_equal(served.x[np.arange(len(served.x))], direct.arrays("train")[0])
    ray.kill(server)

    again = create_activation_server(tiny_harvest_cfg, name="test-acts-2", cache_root=str(tmp_path), num_cpus=0)
    info2 = ray.get(again.prepare.remote())
    assert ray.get(again.forwards.remote()) == 0
    assert ray.get(again.model_loaded.remote()) is False  # served from disk: the model never loaded
    assert info2.harvest_key == info.harvest_key and info2.model == info.model
    ray.kill(again)


@pytest.mark.slow  # an end-to-end fault run (≈ 15 s): in the full suite, out of the fast loop
def test_two_concurrent_consumers_get_identical_data(ray_session, tiny_harvest_cfg, tmp_path):
    ray = ray_session
    server = create_activation_server(tiny_harvest_cfg, name="test-acts-3", cache_root=str(tmp_path), num_cpus=0)
    info = ray.get(server.prepare.remote())

    @ray.remote(num_cpus=1)
    def consume(info):
        served = fetch(info)
        idx = np.arange(len(served.x))
        return hashlib.sha256(served.x[idx].tobytes() + served.labels[idx].tobytes()).hexdigest()

    digests = ray.get([consume.remote(info), consume.remote(info)])
    served = fetch(info)
    idx = np.arange(len(served.x))
    local = hashlib.sha256(served.x[idx].tobytes() + served.labels[idx].tobytes()).hexdigest()
    assert digests[0] == digests[1] == local
    ray.kill(server)


def test_sharded_rows_match_concatenation():
    parts = [np.arange(i * 10, i * 10 + n, dtype=np.float32)[:, None] for i, n in enumerate([3, 5, 4])]
    rows = ShardedRows(parts)
    full = np.concatenate(parts)
    idx = np.array([0, 2, 3, 7, 8, 11])
    np.testing.assert_array_equal(rows[idx], full[idx])
    assert len(rows) == 12


def test_bad_model_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"layer 9 is out of range for 'tiny': it has 4 layers \(0..3\)"):
        describe_model(ModelSpec("tiny", layer=9))
    with pytest.raises(ValueError, match=r"layer 40 is out of range for 'embedded': it has 18 layers"):
        describe_model(ModelSpec("embedded", layer=40))
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'; valid: \['auto'"):
        ModelSpec("tiny", dtype="fp8")
    with pytest.raises(ModelNotFoundError, match=r"cannot be found offline"):
        load_model(ModelSpec(str(tmp_path / "no-such-model")))
    with pytest.raises(ModelNotFoundError, match=r"cannot be found offline"):
        describe_model(ModelSpec("nobody/no-such-model-xyz"))
    with pytest.raises(ValueError, match=r"unknown corpus 'wiki'; valid corpora"):
        CorpusSpec("wiki")
    with pytest.raises(FileNotFoundError, match=r"--forget-corpus: .*does not exist"):
        CorpusSpec("wmdp", forget=str(tmp_path / "no-such-corpus.jsonl"))
    with pytest.raises(ValueError, match=r"store_dtype"):
        HarvestConfig(store_dtype="int8")


def test_a_bf16_harvest_trains_on_bf16_rows_and_is_scored_at_float32(ray_session, tmp_path):
    """``harvest_dtype`` changes the training data (its own harvest key, every row a bf16 value) and not the
    scoring: the evaluator runs the model at the dtype "auto" gives on this device (float32 on a CPU)."""
    from hsae.models import resolve_dtype
    from hsae.profiles import get_profile
    from tests.helpers import served, served_evaluator

    bf16, fp32 = (harvest(get_profile("tiny", harvest_dtype=d).harvest, root=tmp_path, progress=None)
                  for d in ("bfloat16", "float32"))
    assert bf16.key != fp32.key
    x, x32 = bf16.arrays("train")[0], fp32.arrays("train")[0]
    rows = torch.as_tensor(np.asarray(x[np.arange(256)]))
    assert torch.equal(rows.to(torch.bfloat16).float(), rows)  # computed in bf16
    assert not torch.equal(rows, torch.as_tensor(np.asarray(x32[np.arange(256)])))
    evaluator = served_evaluator("tiny", tmp_path, harvest_dtype="bfloat16")
    auto = resolve_dtype("auto", evaluator.loaded.device)
    assert next(evaluator.loaded.model.parameters()).dtype == auto == torch.float32  # a CPU test machine
    server = served("tiny", tmp_path)
    assert server.evaluator().loaded is server.harvester.loaded  # at "auto" the harvest's model serves: no copy
    with pytest.raises(ValueError, match=r"harvest.model: unknown dtype 'fp8'; valid: \['auto', 'float32'"):
        get_profile("tiny", harvest_dtype="fp8")
