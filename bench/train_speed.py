"""Training speed on huanhuan: the tutorial's full fine-tuning recipe vs chatft, in one run.

Trains the Qwen2-7B shape (random weights) with (a) the tutorial's recipe (HF Trainer + its
DeepSpeed JSON, batch 1, 128 tokens; measured for --steps steps, the 3-epoch job extrapolated)
and (b) chatft's recommended configuration (short run; ``chatft_e2e``: the whole 3-epoch job with
export, measured), plus ablations that each flip one of chatft's kernel choices. Every variant
runs in its own process tree, so a crash or an out-of-memory loses only that row; the result
file is rewritten after each variant. Prints a table and a last line of JSON, and writes
``bench/results/train_speed_<label>.json`` with the command, versions and hardware.

    python bench/train_speed.py --gpus 1 --variants tutorial,chatft,chatft_e2e --steps 6
    python bench/train_speed.py --gpus 4 --variants all --steps 6
    python bench/train_speed.py --model-config tiny --gpus 2 --variants tutorial,chatft --steps 3

The library side (recipe, runners, measurements) is :mod:`bench.lib.train_speed`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib import checkout_env, environment  # noqa: E402
from bench.lib import measure  # noqa: E402
from bench.lib import shapes  # noqa: E402
from bench.lib import tutorial_recipe as recipe  # noqa: E402
from bench.lib import train_speed as ts  # noqa: E402
from chatft.train.plan.hardware import host_memory  # noqa: E402

RESULTS = REPO / "bench" / "results"
SHORT = ("tutorial", "chatft")
ALL_VARIANTS = ("tutorial", "chatft", "chatft_e2e", *ts.ABLATIONS)
#: Measured earlier on one H200 with HF Trainer (the numbers this benchmark re-measures).
REFERENCE_1XH200 = {"tutorial_recipe_tokens_per_s": 16.6, "tutorial_recipe_gpu_gib": 28,
                    "tutorial_recipe_host_rss_gib": 141,
                    "tuned_plain_hf_bf16_batch16_tokens_per_s": 2232}
NOTES = [
    "Weights are random (built from the config on the GPU): speed and memory do not depend on "
    "their values.",
    "mfu = non-padding tokens/s per GPU x 6 x N_params / 989e12 (H200 dense bf16 datasheet "
    "peak); 6N counts the matmuls of forward and backward, attention's quadratic term is left out.",
    "The tutorial trained Qwen-7B-Chat (Qwen-1 architecture via remote code); its recipe runs here "
    "unchanged on the Qwen2-7B shape through transformers' native Qwen2. Its one fix: "
    "warmup_steps 1 (DeepSpeed's WarmupDecayLR refuses 0).",
    "Throughput and step times leave out the first --warmup-steps steps of each variant; tokens "
    "are non-padding tokens of all GPUs.",
    "speedup_vs_seed = tokens/s per GPU over the tutorial recipe's (the seed) in the same run; "
    "e2e_speedup_vs_seed = the recipe's extrapolated 3-epoch wall time over chatft's measured one.",
    "throughput_vs_chatft (ablation rows) = tokens/s per GPU over the chatft row's: above 1, the "
    "flipped knob is faster than chatft's choice.",
]


def default_shared() -> Path:
    env = os.environ.get("CHATFT_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def expand_variants(spec: str) -> list[str]:
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        group = {"all": ALL_VARIANTS, "ablations": tuple(ts.ABLATIONS)}.get(name, (name,))
        for v in group:
            if v not in ALL_VARIANTS:
                sys.exit(f"unknown variant {v!r}; known: {', '.join(ALL_VARIANTS)}, ablations, all")
            if v not in out:
                out.append(v)
    return out


def add_speedups(rows: dict[str, dict], ref_tps: float | None, basis: str | None) -> None:
    seed = rows.get("tutorial")
    seed_ok = seed is not None and seed.get("status") == "ok" and seed.get("tokens_per_s_per_gpu")
    if seed_ok:
        ref_tps, basis = seed["tokens_per_s_per_gpu"], "tutorial row of this result"
    for name, row in rows.items():
        tps = row.get("tokens_per_s_per_gpu")
        row["speedup_vs_seed"] = round(tps / ref_tps, 2) if tps and ref_tps else None
        row["speedup_basis"] = basis if tps and ref_tps else None
        if name != "tutorial" and seed_ok and seed.get("e2e_wall_s") and row.get("e2e_wall_s"):
            row["e2e_speedup_vs_seed"] = round(seed["e2e_wall_s"] / row["e2e_wall_s"], 2)
    base = rows.get("chatft", {}).get("tokens_per_s_per_gpu")
    for name in ts.ABLATIONS:
        row = rows.get(name)
        if row is not None and base and row.get("tokens_per_s_per_gpu"):
            # > 1: the flipped knob is faster than chatft's choice
            row["throughput_vs_chatft"] = round(row["tokens_per_s_per_gpu"] / base, 3)


def fmt(x, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def e2e_cell(r: dict) -> str:
    if r.get("e2e_wall_s") is None:
        return "-"
    return f"{r['e2e_wall_s']:,.0f}s " + ("(est)" if r["e2e_kind"] == "extrapolated" else "(meas)")


#: Table columns: header, width, cell.
COLUMNS = (
    ("variant", -12, lambda r: r["variant"]),
    ("status", -9, lambda r: r["status"]),
    ("tok/s/GPU", 10, lambda r: fmt(r.get("tokens_per_s_per_gpu"), ",.1f")),
    ("MFU", 7, lambda r: fmt(r.get("mfu"), ".2%")),
    ("step p50", 9, lambda r: fmt(r.get("step_time_p50_s"), ".3f", "s")),
    ("GPU alloc", 9, lambda r: fmt(r.get("peak_gpu_allocated_gib"), ".1f")),
    ("GPU resv", 9, lambda r: fmt(r.get("peak_gpu_reserved_gib"), ".1f")),
    ("host RSS", 9, lambda r: fmt(r.get("peak_host_rss_gib"), ".1f")),
    ("1st step", 9, lambda r: fmt(r.get("time_to_first_step_s"), ".1f", "s")),
    ("3-epoch job", 15, e2e_cell),
    ("speedup", 8, lambda r: fmt(r.get("speedup_vs_seed"), ".1f", "x")),
)


def print_table(rows: list[dict]) -> None:
    def line(cells) -> str:
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, COLUMNS))

    head = line(h for h, _, _ in COLUMNS)
    print(head)
    print("-" * len(head))
    for r in rows:
        print(line(cell(r) for _, _, cell in COLUMNS))
    print("(GPU/host memory in GiB; GPU = peak torch allocated/reserved of the largest process; "
          "3-epoch job: est = extrapolated, meas = measured)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=1,
                    help="GPUs (on a machine without GPUs: CPU processes)")
    ap.add_argument("--variants", default=",".join(SHORT),
                    help=f"comma-separated: {', '.join(ALL_VARIANTS)}; 'ablations' or 'all'")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of the short runs")
    ap.add_argument("--warmup-steps", type=int, default=1,
                    help="first steps of each run left out of throughput and step times")
    ap.add_argument("--model-config", choices=sorted(shapes.MODEL_CONFIGS), default="qwen2-7b")
    ap.add_argument("--data", type=Path, help="huanhuan.json (default: $CHATFT_SHARED/data/ "
                                              "or ../shared/data/ next to the checkout)")
    ap.add_argument("--tiktoken", type=Path, help="qwen.tiktoken (default: next to --data's "
                                                  "shared folder, assets/qwen.tiktoken)")
    ap.add_argument("--global-batch", type=int, default=ts.CHATFT_GLOBAL_BATCH,
                    help="chatft's global batch in samples")
    ap.add_argument("--accumulation", type=int, default=None,
                    help="chatft's gradient accumulation (default 1; one GPU splits the step by --micro_batch_tokens)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU processes instead of GPUs, tutorial model in fp32 (implied "
                         "without CUDA)")
    ap.add_argument("--force", action="store_true",
                    help="run the tutorial recipe even where host memory looks too small")
    ap.add_argument("--workdir", type=Path,
                    help="logs, run folders (default: runs/train_speed/<label>)")
    ap.add_argument("--keep-export", action="store_true",
                    help="keep chatft_e2e's exported weights (deleted after the check by default)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the result file")
    ap.add_argument("--label", help="result file name: train_speed_<label>.json")
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    cpu_smoke = args.cpu_smoke or not cuda
    if cpu_smoke and args.model_config != "tiny":
        sys.exit("without GPUs only --model-config tiny is practical (a 7B model on a CPU takes hours)")
    if cuda and not cpu_smoke and torch.cuda.device_count() < args.gpus:
        sys.exit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) visible")
    variants = expand_variants(args.variants)
    if "tutorial" in variants and args.steps >= recipe.TUTORIAL_TRAINING_ARGS["save_steps"]:
        sys.exit(f"--steps {args.steps}: the tutorial's recipe saves a checkpoint (~100 GB for 7B) "
                 f"every {recipe.TUTORIAL_TRAINING_ARGS['save_steps']} steps; measure fewer steps")
    shared = default_shared()
    data = args.data or shared / "data" / "huanhuan.json"
    tiktoken = args.tiktoken or (data.parent.parent / "assets" / "qwen.tiktoken")
    for path, what in ((data, "--data"), (tiktoken, "--tiktoken")):
        if not path.is_file():
            sys.exit(f"{what}: {path} not found (set CHATFT_SHARED or pass {what})")
    if cpu_smoke:
        device_name = "cpu"
    else:
        device_name = torch.cuda.get_device_name(0).split()[-1].lower()  # "NVIDIA H200" -> "h200"
    label = args.label or (f"{device_name}x{args.gpus}_{args.model_config}"
                           + ("_smoke" if cpu_smoke else ""))
    workdir = (args.workdir or REPO / "runs" / "train_speed" / label).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shape = shapes.MODEL_CONFIGS[args.model_config]
    params = shapes.n_params(shape)
    env = checkout_env()
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cpu_smoke:
        print("cpu smoke run: CPU processes, the tutorial's model in fp32 (no fp16 on a CPU), "
              "chatft in fp32; numbers say nothing about GPUs", file=sys.stderr)

    t0 = time.perf_counter()
    model_dir = shapes.write_model_folder(workdir / "model", shape, tiktoken)
    prep = {"model_folder_s": round(time.perf_counter() - t0, 2)}
    if "tutorial" in variants:
        # The tutorial loads DeepSpeed's CPUAdam at start; build it once here (first use
        # compiles it, ~1-2 min) so the recipe's time to first step does not include a compile.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import deepspeed; "
                        "deepspeed.ops.op_builder.CPUAdamBuilder().load()"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        prep["cpu_adam_build_or_load_s"] = round(time.perf_counter() - t0, 1)

    ctx = ts.BenchContext(workdir=workdir, model_dir=model_dir, data=data.resolve(),
                          gpus=args.gpus, steps=args.steps, warmup=args.warmup_steps,
                          params=params, global_batch=args.global_batch,
                          accumulation=args.accumulation, cpu_smoke=cpu_smoke,
                          timeout_s=args.timeout, env=env)
    command = "python " + shlex.join(sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_speed_{label}.json"
    rows: dict[str, dict] = {}
    if path.is_file():  # rows of earlier invocations with the same label stay, unless re-run
        old = json.loads(path.read_text())
        if old.get("gpus") == args.gpus and old.get("model", {}).get("name") == args.model_config:
            rows = {r["variant"]: r for r in old.get("rows", []) if r["variant"] not in variants}
    on_reference_setup = args.gpus == 1 and args.model_config == "qwen2-7b" and not cpu_smoke
    ref = REFERENCE_1XH200 if on_reference_setup else None
    result = {
        "benchmark": "train_speed", "label": label, "command": command,
        "complete": False, "notes": NOTES, "cpu_smoke": cpu_smoke, "gpus": args.gpus,
        "model": {"name": args.model_config, "n_params": params, "config": shape,
                  "weights": "random"},
        "data": {"path": str(data), "records": len(json.loads(data.read_text(encoding="utf-8")))},
        "settings": {"steps": args.steps, "warmup_steps_excluded": args.warmup_steps,
                     "chatft_global_batch": args.global_batch, "peak_flops_per_gpu": measure.PEAK_FLOPS,
                     "tutorial_training_args": recipe.TUTORIAL_TRAINING_ARGS,
                     "tutorial_max_length": recipe.TUTORIAL_MAX_LENGTH,
                     "tutorial_ds_config": recipe.TUTORIAL_DS_CONFIG,
                     "tutorial_launch_line": recipe.TUTORIAL_LAUNCH},
        "reference_1xh200": ref, "prep": prep,
        "versions": environment.versions(("deepspeed", "accelerate", "liger-kernel")),
        "hardware": environment.hardware("cuda" if cuda else "cpu", gpu_count_key="gpus_visible"),
        "workdir": str(workdir), "rows": [],
    }

    def save() -> None:
        add_speedups(rows, ref["tutorial_recipe_tokens_per_s"] if ref else None,
                     "reference_1xh200 (measured earlier)" if ref else None)
        result["rows"] = [rows[v] for v in ALL_VARIANTS if v in rows]
        result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    for name in variants:
        print(f"== {name}", file=sys.stderr, flush=True)
        out = workdir / name
        skip = None
        if name in ts.ABLATIONS:
            skip = ts.ablation_skip_reason(name, cpu_smoke)
        if name == "tutorial" and not args.force:
            need = recipe.tutorial_host_memory_needed(params)
            host = host_memory().usable  # the planner's probe: RAM, or the container's limit
            if need > 0.95 * host:
                skip = (f"the recipe needs ~{need / ts.GIB:.0f} GiB of host memory (141 GiB "
                        f"measured for 7B), this machine has {host / ts.GIB:.0f} GiB; "
                        f"--force runs it")
        if skip:
            row = {"variant": name, "status": "skipped", "reason": skip}
        elif name == "tutorial":
            row = ts.run_tutorial(ctx, out)
        else:
            settings = ts.ABLATIONS.get(name, ts.ChatftSettings())
            row = ts.run_chatft(ctx, name, settings, e2e=name == "chatft_e2e", out=out)
            if name == "chatft_e2e" and not args.keep_export:
                for f in (out / "run" / "final").glob("*.safetensors"):
                    f.unlink()
        row["bench_command"] = command
        rows[name] = row
        save()
        print(f"   {row['status']}" + (f": {row.get('reason') or row.get('note') or ''}"
                                      if row["status"] != "ok" else "") +
              (f"\n{row['error']}" if row.get("error") else ""), file=sys.stderr, flush=True)

    result["complete"] = True
    save()
    print_table(result["rows"])
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))
    return 0 if all(r["status"] in ("ok", "skipped") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
