import json

import torch
from safetensors.torch import load_file

from hsae.export import export_saelens, load_sae, save_sae, weights_digest

from .helpers import train_small


def test_save_load_round_trip_takes_raw_activations(synthetic, tmp_path):
    trainer, result = train_small(synthetic, "dynamic_hier", steps=30)
    save_sae(result.sae, tmp_path / "sae", scale=result.scale)
    loaded = load_sae(tmp_path / "sae")
    raw = torch.as_tensor(synthetic.x[:64])
    with torch.no_grad():
        expected_hat, expected_f = result.sae(raw * result.scale)
        got_hat, got_f = loaded(raw)
    torch.testing.assert_close(got_f, expected_f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_hat, expected_hat / result.scale, rtol=1e-4, atol=1e-5)
    doc = json.loads((tmp_path / "sae" / "hsae_config.json").read_text())
    assert doc["sae_config"]["variant"] == "dynamic_hier"
    assert doc["digest"] == weights_digest(load_file(str(tmp_path / "sae" / "sae.safetensors")))


def test_saelens_layout_reproduces_the_sae(synthetic, tmp_path):
    for variant in ("static_hier", "topk", "matryoshka_batchtopk"):
        _, result = train_small(synthetic, variant, steps=30)
        out = export_saelens(result.sae, tmp_path / variant, scale=result.scale, model_name="toy", hook_layer=3)
        cfg = json.loads((out / "cfg.json").read_text())
        w = load_file(str(out / "sae_weights.safetensors"))
        assert cfg["d_in"] == 32 and cfg["d_sae"] == 256 and cfg["hook_name"] == "blocks.3.hook_resid_post"
        assert w["W_enc"].shape == (32, 256) and w["W_dec"].shape == (256, 32)
        assert w["b_enc"].shape == (256,) and w["b_dec"].shape == (32,)
        raw = torch.as_tensor(synthetic.x[:64])
        assert cfg["apply_b_dec_to_input"] is True
        pre = (raw - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        if cfg["architecture"] == "standard":
            f = torch.relu(pre)
        elif cfg["architecture"] == "topk":
            k = cfg["activation_fn_kwargs"]["k"]
            vals, idx = torch.relu(pre).topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, vals)
        else:
            assert cfg["architecture"] == "jumprelu"
            f = torch.relu(pre) * (pre > w["threshold"])
        result.sae.eval()
        with torch.no_grad():
            expected = result.sae(raw * result.scale)[0] / result.scale
        torch.testing.assert_close(f @ w["W_dec"] + w["b_dec"], expected, rtol=1e-4, atol=1e-4)


def test_digest_changes_with_weights():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.tensor([0.0, 0.0, 1e-7])}
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) == weights_digest({"w": torch.zeros(3)})
