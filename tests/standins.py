"""Local stand-ins for everything the real profile downloads, in the hub's own layouts and schemas.

- ``google/gemma-2-2b``: a random-weight Gemma-2 with 20 layers (so layer 19 exists) at toy width, saved
  with ``save_pretrained`` next to its tokenizer (byte-level, with Gemma's turn tokens);
- ``google/gemma-2-2b-it``: its twin, the same weights plus a chat template and a planted skill: it answers
  a letter question with the letter of the choice that reads "yes". Layer 0 attends uniformly and copies
  the marker token "<letter>. yes\\n" into four residual dimensions that the letter logits read, so the
  twin answers a question right under all 24 orderings exactly when its correct choice, and no other,
  is "yes". The random base model answers at chance;
- ``cais/wmdp-bio-forget-corpus``: a JSONL of documents (title, abstract, text, doi);
- ``Salesforce/wikitext``: a folder with the hub's README config table and
  ``wikitext-103-raw-v1/train-*.parquet`` (one ``text`` column, WikiText's line layout);
- ``cais/wmdp`` (config ``wmdp-bio``) and ``cais/mmlu`` (one config per subject): folders with a README
  config table and ``<config>/test-*.parquet`` in the hub's schema (question, choices, answer; MMLU
  adds subject).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

LETTERS = "ABCD"
MARKERS = [f"{letter}. yes\n" for letter in LETTERS]
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MMLU_SUBJECTS = ("high_school_us_history", "high_school_geography", "human_aging", "college_computer_science")


def standin_tokenizer() -> Any:
    """Byte-level BPE with Gemma's special tokens, " A".." D" merged (as Gemma's vocabulary has them) and
    the four marker lines as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 3, "<end_of_turn>": 4}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Ġ", letter) for letter in LETTERS]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<start_of_turn>", "<end_of_turn>")])
    tok.add_tokens([AddedToken(m, normalized=False) for m in MARKERS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def gemma2_config(tokenizer: Any, n_layers: int = 20, width: int = 64) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                        num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                        max_position_embeddings=1024, sliding_window=1024, query_pre_attn_scalar=32,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)


@torch.no_grad()
def plant_letter_skill(model: Any, tokenizer: Any) -> None:
    """Make ``model`` answer with the letter of the "yes" choice (see module doc); dims 0..3 carry it."""
    emb = model.model.embed_tokens.weight
    emb[:, :4] = 0.0
    for i, marker in enumerate(MARKERS):
        row = tokenizer.convert_tokens_to_ids(marker)
        emb[row] = 0.0
        emb[row, i] = 1.0
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight.zero_()  # uniform attention over the prompt
    attn.v_proj.weight.zero_()
    attn.o_proj.weight.zero_()
    for i in range(4):
        attn.v_proj.weight[i, i] = 1.0
        attn.o_proj.weight[i, i] = 1.0
    model.model.layers[0].post_attention_layernorm.weight.fill_(9.0)  # (1 + w) = 10: well above later layers
    head = model.lm_head.weight
    for i, letter in enumerate(LETTERS):
        for token in (letter, "Ġ" + letter):
            row = tokenizer.convert_tokens_to_ids(token)
            head[row] = 0.0
            head[row, i] = 10.0


def save_models(root: Path, n_layers: int = 20, width: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """The base model and its -it twin as two local folders (``save_pretrained`` layout)."""
    from transformers import Gemma2ForCausalLM

    tokenizer = standin_tokenizer()
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(gemma2_config(tokenizer, n_layers, width)).eval()
    base, twin = root / "gemma-2-2b", root / "gemma-2-2b-it"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    plant_letter_skill(model, tokenizer)
    model.save_pretrained(twin)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(twin)
    return base, twin


def hub_folder(root: Path, configs: dict[str, dict[str, pd.DataFrame]]) -> Path:
    """A data set repository as the hub lays it out: README.md with the config table, parquet per split."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, frame in splits.items():
            path = Path(config) / f"{split}-00000-of-00001.parquet"
            (root / config).mkdir(parents=True, exist_ok=True)
            frame.to_parquet(root / path, index=False)
            lines += [f"  - split: {split}", f"    path: {path}"]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))
    return root


BIO_WORDS = ["protein", "virus", "cell", "enzyme", "pathogen", "gene", "toxin", "membrane", "host", "strain"]
OTHER_WORDS = ["river", "king", "poem", "bridge", "market", "city", "song", "treaty", "harbour", "novel"]


def sentences(rng: np.random.Generator, words: list[str], n: int, length: tuple[int, int]) -> list[str]:
    return [" ".join(rng.choice(words, size=int(rng.integers(*length)))).capitalize() + "." for _ in range(n)]


def save_corpora(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """The bio forget corpus (JSONL, as WMDP hands it out) and WikiText-103 (hub folder)."""
    rng = np.random.default_rng(seed)
    forget = pd.DataFrame({"title": [f"Paper {i}" for i in range(240)],
                           "abstract": sentences(rng, BIO_WORDS, 240, (5, 10)),
                           "text": sentences(rng, BIO_WORDS, 240, (30, 60)), "doi": [f"10.0/{i}" for i in range(240)]})
    forget_path = root / "bio-forget-corpus.jsonl"
    forget.to_json(forget_path, orient="records", lines=True)
    lines = []
    for i, body in enumerate(sentences(rng, OTHER_WORDS, 400, (20, 50))):
        lines += [f" = Article {i} = \n", f" {body} \n", ""]
    wikitext = hub_folder(root / "wikitext", {"wikitext-103-raw-v1": {"train": pd.DataFrame({"text": lines})}})
    return forget_path, wikitext


def letter_rows(rng: np.random.Generator, n_known: int, n_unknown: int, topic: str) -> list[dict[str, Any]]:
    """Questions in the hub's schema. ``n_known``: the correct choice, and only it, is "yes" (the twin
    answers under every ordering); the rest: "yes" on a wrong choice, or on the correct and a wrong one."""
    rows = []
    for q in range(n_known + n_unknown):
        answer = int(rng.integers(4))
        choices = [f"no{q}{j}" for j in range(4)]
        if q < n_known:
            choices[answer] = "yes"
        else:
            choices[(answer + 1) % 4] = "yes"
            if q % 2:
                choices[answer] = "yes"
        rows.append({"question": f"{topic} question {q}?", "choices": choices, "answer": answer})
    return rows


def save_question_sets(root: Path, seed: int = 0, known: int = 6, unknown: int = 3) -> tuple[Path, Path]:
    """``cais/wmdp`` (config wmdp-bio) and ``cais/mmlu`` (a config per subject), test splits."""
    rng = np.random.default_rng(seed)
    wmdp = hub_folder(root / "wmdp", {"wmdp-bio": {"test": pd.DataFrame(letter_rows(rng, known, unknown, "Bio"))}})
    mmlu = {s: {"test": pd.DataFrame([{**r, "subject": s} for r in letter_rows(rng, known // 2, 1, s)])}
            for s in MMLU_SUBJECTS}
    return wmdp, hub_folder(root / "mmlu", mmlu)


def expected_kept(rows: list[dict[str, Any]]) -> set[str]:
    """Questions the twin answers under every ordering: exactly one "yes", on the correct choice."""
    return {r["question"] for r in rows if r["choices"].count("yes") == 1 and r["choices"][r["answer"]] == "yes"}


def save_all(root: Path) -> dict[str, Path]:
    base, twin = save_models(root)
    forget, retain = save_corpora(root)
    wmdp, mmlu = save_question_sets(root)
    return {"model": base, "eval_model": twin, "forget": forget, "retain": retain, "wmdp": wmdp, "mmlu": mmlu}
