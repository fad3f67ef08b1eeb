"""Does llama.cpp itself read chatft's GGUF export as chatft reads the Hugging Face folder?

For each model folder and GGUF format: export the GGUF (with its own read-back check), answer
questions greedily with chatft (the code ``chatft chat --prompt`` runs) on the folder, then
with llama.cpp (``llama-cpp-python``, in its own virtual environment: it needs no torch) on the
GGUF through ``create_chat_completion``, which renders the prompt with the chat template stored
in the file and the persona stored under ``chatft.system_prompt``. Compared per question:

* the answer text (the criterion), and the token ids of prompt and answer;
* logits: llama.cpp evaluates chatft's prompt + answer ids; max |diff| / max |logit| against
  the folder's logits on the same ids, and the share of positions with the same top token.

Models: the default job's SmolLM2 persona export (``chatft train`` with no arguments writes
``runs/chatft/final``), and a tiny random Qwen2 (Qwen tokenizer, unit-scale weights) for the
Qwen2 mapping, whose answers are gibberish that must still match token for token. The
pre-tokenizer names are also compared with llama.cpp's own GGUF files of the two families.

The llama.cpp side runs as ``LLAMA_PYTHON -m bench.lib.gguf_llamacpp --llama-side JOB OUT``
(stdlib, numpy and llama_cpp only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

QWEN_PERSONA = "现在你要扮演皇帝身边的女人--甄嬛."
QWEN_QUESTIONS = ["你是谁？", "Who are you?"]


# --------------------------------------------------------------------------- llama.cpp side

def llama_side(job_path: str, out_path: str) -> None:
    """Runs in the llama-cpp-python environment: answer, tokenize and score each question."""
    import ctypes

    import numpy as np
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    results = []
    for item in job["items"]:
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=item["gguf"], n_ctx=item["n_ctx"], n_threads=2,
                              logits_all=True, verbose=False, seed=0)
        load_s = time.perf_counter() - t0
        meta = llm.metadata
        system = meta.get("chatft.system_prompt")
        for q in item["questions"]:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": q["question"]}]
            t0 = time.perf_counter()
            res = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1,
                                             repeat_penalty=1.0, max_tokens=q["max_new_tokens"])
            answer_s = time.perf_counter() - t0
            formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"],
                                            eos_token="", bos_token="")
            prompt = formatter(messages=messages).prompt
            prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            # The same greedy decode token by token, for the answer's ids.
            llm.reset()
            llm.eval(prompt_ids)
            answer_ids: list[int] = []
            while len(answer_ids) < q["max_new_tokens"]:
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, nxt):
                    break
                answer_ids.append(nxt)
                llm.eval([nxt])
            # llama.cpp's own text for those ids: llama-cpp-python 0.3.36 detokenizes through a
            # 32-byte buffer per token and drops longer pieces (Qwen has 39-byte Thai tokens).
            pieces = b""
            for tok_id in answer_ids:
                buf = ctypes.create_string_buffer(256)
                n = llama_cpp.llama_token_to_piece(llm._model.vocab, tok_id, buf, 256, 0, False)
                pieces += buf.raw[:n]
            # logits on chatft's ids: [T, vocab]
            ids = q["chatft_ids"]
            llm.reset()
            llm.eval(ids)
            scores = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
            ref = np.load(q["logits_file"])
            rel = float(np.abs(ref - scores).max() / np.abs(ref).max())
            top1 = float((ref.argmax(-1) == scores.argmax(-1)).mean())
            results.append({"gguf": item["gguf"], "question": q["question"],
                            "system_from_file": system,
                            "chat_format": llm.chat_format,
                            "text": res["choices"][0]["message"]["content"],
                            "finish_reason": res["choices"][0]["finish_reason"],
                            "completion_tokens": res["usage"]["completion_tokens"],
                            "prompt_ids": prompt_ids, "answer_ids": answer_ids,
                            "pieces_text": pieces.decode("utf-8", "replace"),
                            "logits_max_rel_diff": rel, "logits_top1_agreement": top1,
                            "logits_positions": len(ids), "load_s": round(load_s, 2),
                            "answer_s": round(answer_s, 2), "pre": meta.get("tokenizer.ggml.pre")})
        del llm
    Path(out_path).write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__,
                                          "results": results}, ensure_ascii=False), encoding="utf-8")


# --------------------------------------------------------------------------- chatft side

def unit_scale_(model, seed: int = 0) -> None:
    """Redraw every parameter in place at unit scale (``randn / sqrt(fan_in)``, norms
    ``1 + 0.1 randn``, biases ``0.1 randn``): every tensor moves the logits and the top token is
    clear, where the usual 0.02-std initialization leaves them nearly flat."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def tiny_qwen2_folder(folder: Path, tiktoken: Path) -> Path:
    """A random Qwen2 (hidden 64, 2 layers, GQA 4/2) with the Qwen tokenizer, unit-scale
    weights (so the top token is clear), saved as chatft's export writes a folder (bf16)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chatft.export.metadata import ChatMeta, write_meta
    from chatft.model.qwen_tokenizer import build_qwen_tokenizer

    tok = build_qwen_tokenizer(tiktoken)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6,
                      rope_theta=10000.0, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    unit_scale_(model, seed=0)
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    write_meta(folder, ChatMeta(system_prompt=QWEN_PERSONA, eot_token="<|im_end|>",
                                base_model="tiny-random-qwen2"))
    return folder


def chatft_answers(folder: Path, questions: list[str], max_new_tokens: int, workdir: Path,
                   tag: str) -> list[dict]:
    """chatft's greedy answers (``chatft chat --prompt``'s code path) with ids and logits."""
    import numpy as np
    import torch

    from chatft.serve.generate import SamplingParams, load_chat_model, reply

    cm = load_chat_model(folder, device="cpu")
    out = []
    for n, question in enumerate(questions):
        messages = [{"role": "user", "content": question}]
        t0 = time.perf_counter()
        r = reply(cm, messages, SamplingParams(max_new_tokens=max_new_tokens))
        answer_s = time.perf_counter() - t0
        prompt_ids = cm.prompt_ids(messages)
        # The same greedy decode, token by token, for the answer's ids.
        ids = list(prompt_ids)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                nxt = int(cm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if nxt in cm.stop_ids:
                    break
                ids.append(nxt)
            logits = cm.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # [T, V]
        logits_file = workdir / f"logits-{tag}-{n}.npy"
        np.save(logits_file, logits)
        answer_ids = ids[len(prompt_ids):]
        out.append({"question": question, "text": r.text, "finish_reason": r.finish_reason,
                    "prompt_ids": prompt_ids, "answer_ids": answer_ids,
                    "decoded_answer_ids": cm.tokenizer.decode(answer_ids),
                    "chatft_ids": ids, "logits_file": str(logits_file),
                    "max_new_tokens": max_new_tokens, "answer_s": round(answer_s, 2)})
    return out


def reference_pre(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    from gguf import GGUFReader

    return GGUFReader(path).fields["tokenizer.ggml.pre"].contents()


def default_job_folder(path: Path, log: dict) -> Path:
    """The default job's export; trained here (``chatft train``) when it does not exist."""
    if (path / "config.json").is_file():
        log["default_job"] = f"existing export {path}"
        return path
    out = path.parent
    cmd = [sys.executable, "-m", "chatft", "train", "--output_dir", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    log["default_job"] = {"command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0)}
    return path


def run(args) -> dict:
    from bench.lib.environment import hardware, versions
    from chatft.data.prepare import builtin_meta
    from chatft.export.gguf import export_gguf
    from chatft.model.loading import smollm2_gguf

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    cases = {"smollm2_persona": (default_job_folder(Path(args.smollm2_folder), info),
                                 builtin_meta("builtin:persona").get("ask", [])),
             "qwen2_tiny_random": (tiny_qwen2_folder(workdir / "qwen2-tiny", Path(args.qwen_tiktoken)),
                                   QWEN_QUESTIONS)}
    references = {"smollm2_persona": smollm2_gguf(),
                  "qwen2_tiny_random": Path(args.reference_qwen2) if args.reference_qwen2 else None}
    job, exports, chatft_side = {"items": []}, {}, {}
    for case, (folder, questions) in cases.items():
        chatft_side[case] = chatft_answers(folder, questions, args.max_new_tokens, workdir, case)
        for quant in args.quants.split(","):
            t0 = time.perf_counter()
            res = export_gguf(folder, workdir / f"{case}-{quant}.gguf", quant)
            exports[case, quant] = {"gguf": str(res.path), "seconds": round(time.perf_counter() - t0, 1),
                                    "mib": round(res.path.stat().st_size / 2**20, 1),
                                    "transformers_readback": res.check, "notes": res.notes,
                                    "reference_pre": reference_pre(references[case]),
                                    "reference_file": str(references[case]) if references[case] else None}
            job["items"].append({"gguf": str(res.path), "n_ctx": 2048,
                                 "questions": [{k: q[k] for k in ("question", "chatft_ids",
                                                                  "logits_file", "max_new_tokens")}
                                               for q in chatft_side[case]]})
    (workdir / "job.json").write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    subprocess.run([args.llama_python, "-m", "bench.lib.gguf_llamacpp", "--llama-side",
                    str(workdir / "job.json"), str(workdir / "llama.json")], check=True, env=env)
    llama = json.loads((workdir / "llama.json").read_text(encoding="utf-8"))
    rows = []
    for case, (folder, _) in cases.items():
        for quant in args.quants.split(","):
            gguf = exports[case, quant]["gguf"]
            for mine, theirs in zip(chatft_side[case],
                                    [r for r in llama["results"] if r["gguf"] == gguf]):
                rows.append({
                    "case": case, "quant": quant, "question": mine["question"],
                    "same_text": mine["text"] == theirs["text"],
                    "same_text_llama_cpp_pieces": mine["text"] == theirs["pieces_text"],
                    "common_prefix_tokens": next((k for k, (a, b) in enumerate(
                        zip(mine["answer_ids"], theirs["answer_ids"])) if a != b),
                        min(len(mine["answer_ids"]), len(theirs["answer_ids"]))),
                    "same_prompt_ids": mine["prompt_ids"] == theirs["prompt_ids"],
                    "same_answer_ids": mine["answer_ids"] == theirs["answer_ids"],
                    "chatft_text": mine["text"], "llama_cpp_text": theirs["text"],
                    "llama_cpp_pieces_text": theirs["pieces_text"],
                    "chatft_finish": mine["finish_reason"], "llama_cpp_finish": theirs["finish_reason"],
                    "answer_tokens": len(mine["answer_ids"]),
                    "llama_cpp_completion_tokens": theirs["completion_tokens"],
                    "logits_max_rel_diff": theirs["logits_max_rel_diff"],
                    "logits_top1_agreement": theirs["logits_top1_agreement"],
                    "logits_positions": theirs["logits_positions"],
                    "persona_from_file": theirs["system_from_file"],
                    "llama_cpp_chat_format": theirs["chat_format"], "pre": theirs["pre"],
                    "chatft_answer_s": mine["answer_s"], "llama_cpp_answer_s": theirs["answer_s"],
                })
    return {"bench": "gguf_llamacpp", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "versions": {**versions(extra=("gguf", "tokenizers")),
                         "llama_cpp_python": llama["llama_cpp_python"]},
            "hardware": hardware("cpu"),
            "llama_cpp_build": {"command": args.build_command, "seconds": args.build_seconds},
            "inputs": {**info, "smollm2_folder": str(cases["smollm2_persona"][0]),
                       "max_new_tokens": args.max_new_tokens, "note": args.note},
            "exports": {f"{c}/{q}": v for (c, q), v in exports.items()},
            "rows": rows,
            "f16_same_text": all(r["same_text"] for r in rows if r["quant"] == "f16"),
            "f16_same_text_llama_cpp_pieces": all(r["same_text_llama_cpp_pieces"] for r in rows
                                                  if r["quant"] == "f16"),
            "f16_same_ids": all(r["same_prompt_ids"] and r["same_answer_ids"] for r in rows
                                if r["quant"] == "f16"),
            "all_same_prompt_ids": all(r["same_prompt_ids"] for r in rows)}


def print_table(result: dict) -> None:
    print(f"{'case':<18} {'quant':<5} {'question':<28} {'text':<5} {'pieces':<6} {'ids':<5} "
          f"{'same tokens':>11} {'rel diff':>9} {'top-1':>6}")
    for r in result["rows"]:
        same = lambda ok: "same" if ok else "DIFF"  # noqa: E731
        print(f"{r['case']:<18} {r['quant']:<5} {r['question'][:28]:<28} "
              f"{same(r['same_text']):<5} {same(r['same_text_llama_cpp_pieces']):<6} "
              f"{same(r['same_prompt_ids'] and r['same_answer_ids']):<5} "
              f"{r['common_prefix_tokens']:>5} of {r['answer_tokens']:<3} "
              f"{r['logits_max_rel_diff']:>9.2e} {r['logits_top1_agreement']:>6.1%}")
    for r in result["rows"]:
        if r["case"] == "smollm2_persona":
            print(f"\n[{r['quant']}] {r['question']}\n  chatft:    {r['chatft_text']}\n"
                  f"  llama.cpp: {r['llama_cpp_text']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-side", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--llama-python", help="python of the environment with llama-cpp-python")
    p.add_argument("--smollm2-folder", default="runs/chatft/final",
                   help="the default job's export (trained with `chatft train` if missing)")
    p.add_argument("--qwen-tiktoken", default="../shared/assets/qwen.tiktoken")
    p.add_argument("--reference-qwen2", help="a Qwen2 GGUF made by llama.cpp's converter, to "
                                             "compare the pre-tokenizer name with")
    p.add_argument("--quants", default="f16,q8_0")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--build-command", default="", help="how llama-cpp-python was built (recorded)")
    p.add_argument("--build-seconds", type=float, help="how long that build took (recorded)")
    p.add_argument("--note", default="", help="recorded in the result (e.g. where a folder came from)")
    p.add_argument("--workdir", default="/tmp/chatft-gguf-llamacpp")
    p.add_argument("--out", default="bench/results/gguf_llamacpp_cpu.json")
    args = p.parse_args(argv)
    if args.llama_side:
        llama_side(*args.llama_side)
        return 0
    if not args.llama_python:
        p.error("--llama-python is required")
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n",
                              encoding="utf-8")
    print_table(result)
    summary = {k: result[k] for k in ("f16_same_text", "f16_same_text_llama_cpp_pieces",
                                      "f16_same_ids", "all_same_prompt_ids")}
    summary["rows"] = len(result["rows"])
    summary["max_logits_rel_diff"] = max(r["logits_max_rel_diff"] for r in result["rows"])
    summary["min_top1"] = min(r["logits_top1_agreement"] for r in result["rows"])
    print(json.dumps(summary))
    return 0 if result["f16_same_ids"] and result["f16_same_text_llama_cpp_pieces"] else 1


if __name__ == "__main__":
    sys.exit(main())
