"""GGUF export: an independent reader (transformers' GGUF loader, ``gguf_file=``) agrees with
the exported folder on logits and token ids; the metadata is what llama.cpp's own SmolLM2
file says; what cannot be mapped is refused before anything is written; the export checks
itself; the Modelfile; the CLI.

(llama.cpp itself reads the files in ``bench/gguf_llamacpp.py``: building it takes minutes.)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chatft.export.gguf import QUANTS, TensorPlan, _encode, export_gguf
from chatft.export.gguf_vocab import PROBE_TEXTS, GGUFExportError, vocab_from_tokenizer
from tests.export.conftest import PERSONA_LLAMA, PERSONA_QWEN, huanhuan_conversations

FOLDERS = {"qwen2": "qwen2_folder", "llama": "llama_folder"}


def _conversations(huanhuan_path: Path, persona: str) -> list[list[dict]]:
    """Probe prompts: four huanhuan exchanges and one English one, with the persona."""
    convs = huanhuan_conversations(huanhuan_path, 4)
    convs.append([{"role": "user", "content": "Hello! Who are you, and what do you do?"},
                  {"role": "assistant", "content": "I keep the light at Gullrock, 3 miles out."}])
    return [[{"role": "system", "content": persona}] + [m for m in c if m["role"] != "system"]
            for c in convs]


def _ids(tokenizer, conv: list[dict]) -> torch.Tensor:
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # [1, T]


def _logits(model, tokenizer, convs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=_ids(tokenizer, c)).logits[0].float() for c in convs]  # [T, V]


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float, int]:
    """(max |diff| / max |logit| over all prompts, top-1 agreement, positions compared)."""
    rel = max(float((r - g).abs().max() / r.abs().max()) for r, g in zip(ref, got))
    same = torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)]).float()
    return rel, float(same.mean()), same.numel()


def _q8_0_rounded_(model) -> None:
    """Round every 2-D weight as the q8_0 export stores it (blocks of 32 along each row,
    one scale per block), in place."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                q = quantize(p.detach().float().numpy(), Q.Q8_0)
                p.copy_(torch.from_numpy(dequantize(q, Q.Q8_0)).reshape(p.shape))


@pytest.fixture(scope="module")
def folder_logits(request, huanhuan_path):
    """``folder_logits(model, rounded)`` -> (tokenizer, probe conversations, the folder's
    logits; with ``rounded``, of the folder's weights rounded to q8_0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache: dict[tuple[str, bool], tuple] = {}

    def get(model: str, rounded: bool = False):
        if (model, rounded) not in cache:
            folder = request.getfixturevalue(FOLDERS[model])
            tok = AutoTokenizer.from_pretrained(folder)
            convs = _conversations(huanhuan_path, PERSONA_QWEN if model == "qwen2" else PERSONA_LLAMA)
            ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            if rounded:
                _q8_0_rounded_(ref)
            cache[model, rounded] = (tok, convs, _logits(ref, tok, convs))
        return cache[model, rounded]
    return get


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("model", ["qwen2", "llama"])
def test_transformers_reads_the_gguf_with_the_folders_logits(model, quant, exported, folder_logits):
    """f16/bf16: max relative difference <= 1e-2 against the folder. q8_0: <= 5e-2 against
    the folder, and the same logits (1e-4) and top tokens as the folder's weights rounded to
    q8_0: the file holds exactly the quantized weights. (Top-1 agreement of q8_0 with the
    unrounded weights depends on the model, not on the export: random weights, and
    SmolLM2-135M on Chinese text, leave near-ties that 8-bit rounding flips; see
    bench/results/gguf_llamacpp_cpu.json.)"""
    from transformers import AutoModelForCausalLM

    tok, convs, ref = folder_logits(model)
    path = exported(model, quant)
    got_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    got = _logits(got_model, tok, convs)
    rel, top1, positions = _compare(ref, got)
    assert positions > 200
    assert rel <= (5e-2 if quant == "q8_0" else 1e-2), (rel, top1)
    if quant == "q8_0":
        rel_rounded, top1_rounded, _ = _compare(folder_logits(model, rounded=True)[2], got)
        assert rel_rounded <= 1e-4 and top1_rounded == 1.0, (rel_rounded, top1_rounded)
    # the read-back model has the folder's shape (nothing fell back to a default)
    assert got_model.config.tie_word_embeddings == (model == "llama")
    assert got_model.config.num_hidden_layers == 2 and got_model.config.num_key_value_heads == 2


def test_gguf_tokenizer_encodes_all_of_huanhuan_like_the_qwen_tokenizer(exported, qwen_tokenizer,
                                                                      huanhuan_path):
    from transformers import AutoTokenizer

    path = exported("qwen2", "q8_0")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    convs = huanhuan_conversations(huanhuan_path)
    assert len(convs) == 3729
    prompts = [qwen_tokenizer.apply_chat_template(c[:2], tokenize=False, add_generation_prompt=True)
               for c in convs]
    # the template inside the GGUF renders the same text
    assert [tok.apply_chat_template(c[:2], tokenize=False, add_generation_prompt=True)
            for c in convs[:50]] == prompts[:50]
    whole = [qwen_tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    for texts in (prompts, whole, list(PROBE_TEXTS)):
        want = qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert tok(texts, add_special_tokens=False)["input_ids"] == want


def test_gguf_tokenizer_encodes_like_smollm2s(exported, smollm2_tokenizer, huanhuan_path):
    from importlib import resources

    from transformers import AutoTokenizer

    path = exported("llama", "bf16")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    persona = [json.loads(line) for line in (resources.files("chatft") / "data" / "assets" /
                                             "persona.jsonl").read_text(encoding="utf-8").splitlines()]
    convs = [[{"role": "system", "content": PERSONA_LLAMA}, *r["messages"]] for r in persona]
    convs += huanhuan_conversations(huanhuan_path, 300)
    texts = [smollm2_tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    assert [tok.apply_chat_template(c, tokenize=False) for c in convs[:20]] == texts[:20]
    for batch in (texts, list(PROBE_TEXTS)):
        assert tok(batch, add_special_tokens=False)["input_ids"] == \
            smollm2_tokenizer(batch, add_special_tokens=False)["input_ids"]


def _fields(path: Path, *keys: str) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = {k: reader.fields[k].contents() if k in reader.fields else None for k in keys}
    out["tensors"] = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    return out


TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token")


def test_llama_metadata_is_what_llama_cpps_own_smollm2_file_says(exported, smollm2_tokenizer):
    from chatft.model.loading import smollm2_gguf

    ours = _fields(exported("llama", "f16"), "general.architecture", "tokenizer.chat_template",
                   "tokenizer.ggml.eot_token_id", "chatft.system_prompt", "chatft.eot_token",
                   "llama.rope.dimension_count", "llama.attention.head_count_kv",
                   "general.file_type", *TOKENIZER_KEYS)
    ref = _fields(smollm2_gguf(), "general.architecture", *TOKENIZER_KEYS)
    assert ours["general.architecture"] == ref["general.architecture"] == "llama"
    for key in TOKENIZER_KEYS:  # vocabulary, merges, types, ids and the pre-tokenizer "smollm"
        assert ours[key] == ref[key], key
    assert ours["tokenizer.ggml.pre"] == "smollm"
    assert ours["tokenizer.chat_template"] == smollm2_tokenizer.chat_template
    assert ours["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
    assert ours["chatft.system_prompt"] == PERSONA_LLAMA and ours["chatft.eot_token"] == "<|im_end|>"
    assert ours["llama.rope.dimension_count"] == 16 and ours["llama.attention.head_count_kv"] == 2
    assert ours["general.file_type"] == 1  # MOSTLY_F16
    # tensor names: the reference file's, for our two layers; tied embeddings -> no output.weight
    ref_names = {n for n in ref["tensors"] if not n.startswith("blk.") or n.split(".")[1] in ("0", "1")}
    assert set(ours["tensors"]) == ref_names and "output.weight" not in ours["tensors"]
    for name, (kind, shape) in ours["tensors"].items():
        assert kind == ("F32" if len(shape) == 1 else "F16"), name


def test_qwen2_metadata(exported, qwen_tokenizer):
    f = _fields(exported("qwen2", "q8_0"), "general.architecture", "tokenizer.ggml.pre",
                "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.eot_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "qwen2.attention.head_count", "general.file_type")
    assert f["general.architecture"] == "qwen2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert len(f["tokenizer.ggml.tokens"]) == len(qwen_tokenizer)
    assert f["tokenizer.ggml.tokens"][151645] == "<|im_end|>"
    assert f["tokenizer.ggml.token_type"][151645] == 3 and f["tokenizer.ggml.token_type"][0] == 1
    assert f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.eot_token_id"] == 151645
    assert f["tokenizer.ggml.padding_token_id"] == 151643
    assert f["tokenizer.ggml.add_bos_token"] is False and f["qwen2.attention.head_count"] == 4
    assert f["general.file_type"] == 7  # MOSTLY_Q8_0
    t = f["tensors"]
    assert t["blk.0.attn_q.bias"] == ("F32", [64]) and t["blk.1.ffn_down.weight"][0] == "Q8_0"
    assert t["output.weight"][0] == "Q8_0" and t["output_norm.weight"][0] == "F32"


def test_vocabulary_is_padded_to_the_embedding_rows(qwen_tokenizer):
    n = len(qwen_tokenizer)
    v = vocab_from_tokenizer(qwen_tokenizer, n + 3, eot_id=151645)
    assert v.padded == 3 and len(v.tokens) == n + 3
    assert v.tokens[n:] == [f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"]
    assert v.types[n:] == [5, 5, 5]  # UNUSED
    with pytest.raises(GGUFExportError, match="past the model's vocabulary of 100"):
        vocab_from_tokenizer(qwen_tokenizer, 100, eot_id=151645)


def test_llama_query_rows_are_interleaved_per_head():
    """HF rotates the halves of a head (x[i], x[i+d/2]); llama.cpp's llama graph adjacent
    pairs: rows (0, 1, 2, 3 | 4, 5, 6, 7) of two heads of size 4 become (0, 2, 1, 3 | 4, 6, 5, 7)."""
    from gguf import GGMLQuantizationType

    w = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 3)  # [8 rows, 3 cols]
    plan = TensorPlan("q", "blk.0.attn_q.weight", Path("x"), (8, 3), int(GGMLQuantizationType.F32),
                      rope_heads=2)
    assert _encode(w, plan)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    bias = TensorPlan("q", "blk.0.attn_q.bias", Path("x"), (8,), int(GGMLQuantizationType.F32), 2)
    assert _encode(torch.arange(8.0), bias).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    plain = TensorPlan("q", "blk.0.attn_q.weight", Path("x"), (8, 3), int(GGMLQuantizationType.F16))
    assert np.array_equal(_encode(w, plain), w.numpy().astype(np.float16))


def test_export_checks_itself_and_leaves_no_broken_file(llama_folder, tmp_path, monkeypatch):
    """Without llama's row interleaving the file is wrong for every reader; the export's own
    read-back check must notice and put nothing in place."""
    import chatft.export.gguf as g

    real = g._encode
    monkeypatch.setattr(g, "_encode", lambda t, p: real(t, dataclasses.replace(p, rope_heads=0)))
    with pytest.raises(GGUFExportError, match="logits read back from the f16 file differ"):
        export_gguf(llama_folder, tmp_path / "broken.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
     "model_type 'mistral': GGUF export maps qwen2 and llama"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_refuses_an_unmapped_model_before_writing(llama_folder, tmp_path, changes, message):
    folder = _copy(llama_folder, tmp_path)
    _edit_config(folder, **changes)
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(GGUFExportError, match=message):
        export_gguf(folder, out)
    assert not out.parent.exists()


def test_refuses_an_unmapped_tokenizer_before_writing(llama_folder, smollm2_tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path / "out" / "m.gguf"
    # a sentencepiece-style (Unigram) tokenizer
    folder = _copy(llama_folder, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0))
    PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>").save_pretrained(folder)
    with pytest.raises(GGUFExportError, match="tokenizer type 'Unigram': GGUF export supports "
                                              "byte-level BPE"):
        export_gguf(folder, out)
    # byte-level BPE, but splitting text in a way llama.cpp has no name for
    shutil.rmtree(folder)
    folder = _copy(llama_folder, tmp_path)
    odd = copy.deepcopy(smollm2_tokenizer)
    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    odd.save_pretrained(folder)
    with pytest.raises(GGUFExportError, match="none of llama.cpp's pre-tokenizers"):
        export_gguf(folder, out)
    assert not out.parent.exists()


def test_modelfile(exported, smollm2_tokenizer):
    from chatft.export.ollama import modelfile_text, renders_chatml

    path = exported("qwen2", "f16")
    text = path.with_suffix(".Modelfile").read_text(encoding="utf-8")
    assert f"FROM ./{path.name}\n" in text
    assert f'SYSTEM """{PERSONA_QWEN}"""\n' in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n' in text
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in text
    llama3 = copy.deepcopy(smollm2_tokenizer)
    llama3.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                            "<|end_header_id|>\n\n{{ m['content'] }}<|im_end|>{% endfor %}")
    assert renders_chatml(smollm2_tokenizer) and not renders_chatml(llama3)
    assert "TEMPLATE" not in modelfile_text("m.gguf", chatml=False, system=None, eot_token="<|im_end|>")


def test_cli_export_gguf(llama_folder, tmp_path, capsys):
    from chatft.cli import main

    out = tmp_path / "persona.gguf"
    assert main(["export", str(llama_folder), "--format", "gguf", "--quant", "q8_0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (q8_0" in printed and "read-back check" in printed
    assert out.is_file() and out.with_suffix(".Modelfile").is_file()
    assert main(["export", str(llama_folder), "--quant", "q8_0"]) == 2
    assert "--quant is for --format gguf" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--format", "gguf"]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow
def test_train_exports_gguf_and_trains_from_it(llama_folder, chat_alpaca, tmp_path):
    """``--export_format gguf`` at the end of training, then ``--model exported.gguf``."""
    from tests.train.conftest import run_chatft, step_losses

    common = ["--data", chat_alpaca, "--system", PERSONA_QWEN, "--precision", "fp32",
              "--per_device_train_batch_size", "4", "--max_length", "512"]
    first = tmp_path / "first"
    proc = run_chatft("train", "--model", llama_folder, *common, "--output_dir", first,
                      "--max_steps", "1", "--export_format", "gguf", "--gguf_quant", "q8_0")
    gguf = first / "final-q8_0.gguf"
    assert gguf.is_file() and (first / "final-q8_0.Modelfile").is_file()
    assert not (first / "final").exists() and "read-back check" in proc.stdout
    second = tmp_path / "second"
    run_chatft("train", "--model", gguf, *common, "--output_dir", second, "--max_steps", "2")
    losses = step_losses(second)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((second / "final" / "config.json").read_text())["model_type"] == "llama"
