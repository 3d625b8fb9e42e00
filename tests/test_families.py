"""Any Hugging Face causal LM: layers, width, start token and decoder blocks come from the model itself.

Tiny random models of several families (Llama, Qwen2 without a BOS token, GPT-2 with learned positions,
GPT-NeoX/Pythia, Phi-3) are saved as local folders, as a user's download would be.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from hsae.activations import HarvestConfig, harvest
from hsae.corpora import CorpusSpec
from hsae.evaluation.tail import final_hidden, tail_hidden
from hsae.models import ModelSpec, byte_tokenizer, decoder_layers, describe_model, load_model, stopped_forward

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=40, intermediate_size=80, num_hidden_layers=4,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=56, n_layer=4, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=72, intermediate_size=144,
                                                             num_hidden_layers=4, num_attention_heads=4)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                   num_attention_heads=4, num_key_value_heads=4)),
}


def save_family(root, family, plant_token=None):
    """A random model of ``family`` with the byte tokenizer (Qwen2's without BOS) saved under ``root``."""
    import transformers

    config_name, model_name, sizes = FAMILIES[family]
    tokenizer = byte_tokenizer()
    if family == "qwen2":
        tokenizer.bos_token = None
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=0)
    config = getattr(transformers, config_name)(**ids, **sizes)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    if plant_token is not None:  # an attention sink: one token's embedding far above the rest
        with torch.no_grad():
            model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(plant_token)] *= 500.0
    folder = root / family
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, config.get_text_config().hidden_size


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_facts_and_tail_come_from_the_model(family, tmp_path):
    folder, hidden = save_family(tmp_path, family)
    info = describe_model(ModelSpec(str(folder)))
    assert (info.family, info.n_layers, info.d_model) == (family, 4, hidden)
    loaded = load_model(ModelSpec(str(folder), layer=1))
    assert len(decoder_layers(loaded.model)) == 4
    ids = torch.randint(3, 200, (2, 12))
    # Re-running the layers after L from the layer-L residual gives the full forward's final hidden states.
    resid = stopped_forward(loaded, ids)
    torch.testing.assert_close(tail_hidden(loaded, resid), final_hidden(loaded, ids), rtol=1e-4, atol=1e-4)
    last = stopped_forward(loaded, ids, layer=3)
    torch.testing.assert_close(tail_hidden(loaded, last, layer=3), final_hidden(loaded, ids), rtol=1e-4, atol=1e-4)


def test_planted_attention_sinks_are_dropped_and_counted(tmp_path):
    folder, hidden = save_family(tmp_path, "llama", plant_token=".")
    cfg = HarvestConfig(model=ModelSpec(str(folder), layer=2), corpus=CorpusSpec("toy"), ctx_len=32, n_ctxs=40,
                        n_eval_ctxs=8, shard_ctxs=16, holdout_fraction=0.3)
    result = harvest(cfg, tmp_path / "cache", progress=None)
    dot = byte_tokenizer().convert_tokens_to_ids(".")
    tokens = np.load(result.dir / "tokens_train.npy")[:, 1:]  # the packed contexts, start token cut
    planted = int((tokens == dot).sum())
    assert planted > 0 and result.outliers("train") == planted
    assert dot not in set(result.token_ids("train").tolist())
    assert len(result.token_ids("train")) == tokens.size - planted
    x, _ = result.arrays("train")
    norms = torch.from_numpy(x).norm(dim=1)
    assert float(norms.max() / norms.median()) < cfg.outlier_factor


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_family_harvests_and_finishes_a_trial(family, ray_session, tmp_path, monkeypatch):
    from tune import ablate

    folder, hidden = save_family(tmp_path, family)
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "relu.yaml"
    space.write_text("description: one relu SAE\ntrials:\n  - variant: relu\n")
    out = tmp_path / "results"
    assert ablate.main(["--profile", "tiny", "--model", str(folder), "--space", str(space), "--out", str(out)]) == 0
    row = pd.read_parquet(out / "trials.parquet").iloc[0]
    assert row["status"] == "completed" and row["model"] == str(folder)
    assert row["cfg_d_in"] == hidden and row["explained_variance"] > 0
