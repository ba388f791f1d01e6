"""nanoseek's CUDA paths, checked and timed on one GPU in one short run.

    python benchmarks/gpu_check.py --out gpu                      # everything below
    python benchmarks/gpu_check.py --out gpu --spec-model DIR     # + speculative decoding on a trained model

The test suite runs on CPUs only (CI has no GPU); this script is what to run when a GPU is at hand.
Each check prints one line (ok / FAILED and its numbers) and the run goes on after a failure; the
results land in OUT/gpu_check.json.

1. Same computation on the GPU: a random `tiny` model's logits on cuda against the CPU (fp32); the
   engine's greedy tokens on cuda (continuous batching, 6 ragged prompts, 3 running at a time)
   against the CPU engine's, the compiled decode step's (torch.compile, Triton kernels) and
   transformers' `DeepseekV3ForCausalLM.generate` on cuda; with --spec-model, MTP speculative
   greedy == plain greedy on cuda, eager and compiled, and its speed-up in each.
2. Every training stage on the GPU: `nanoseek speedrun --quick` end to end (pretrain with
   bf16 autocast, SFT, GRPO with engine rollouts, eval, distillation), then `torchrun
   --nproc_per_node=1 -m nanoseek pretrain` on the speedrun's tokens (the NCCL process group).
3. Numbers: benchmarks/engine_speed.py on cuda (fp32 and bf16), benchmarks/grpo_speed.py on cuda
   (needs `pip install trl`) and the speedrun's stage times.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from nanoseek import Transformer, load_model, preset, save_model
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.tokenizer import Tokenizer

PROMPTS = ["What is 12 + 30?", "hi", "A longer prompt about rivers and mountains.", "中文",
           "def f(x): return", "the cat sat on the mat"]
GREEDY = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (24, 9, 32, 17, 40, 5)]
RESULTS: dict[str, dict] = {}
DEVICE = "cuda"
OUT: Path | None = None


def check(name: str):
    """Run one check; record ok/failed, its numbers and its time; never stop the run."""
    def wrap(fn):
        t = time.perf_counter()
        try:
            info = fn() or {}
            ok = info.pop("ok", True)
        except Exception as e:  # a failure is a result here
            info, ok = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}, False
        info["seconds"] = round(time.perf_counter() - t, 1)
        RESULTS[name] = {"ok": ok, **info}
        shown = {k: v for k, v in info.items() if k != "traceback"}
        print(f"[{'ok' if ok else 'FAILED'}] {name}: {json.dumps(shown, ensure_ascii=False)}", flush=True)
        if OUT:  # after every check, so a run cut short keeps what it measured
            (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, ensure_ascii=False))
        return fn
    return wrap


def random_tiny(path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    with torch.no_grad():  # larger weights than the init, so routing and attention matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, path, extra_files=Tokenizer.byte_level().files())


def outputs(engine: Engine) -> list[list[int]]:
    return [r.output for r in engine.generate(PROMPTS, GREEDY)]


def same_computation(d: Path, spec_model: str | None) -> None:
    tok = Tokenizer.byte_level()
    random_tiny(d / "tiny")
    cpu = load_model(d / "tiny").eval()
    gpu = load_model(d / "tiny").to(DEVICE).eval()
    reference: dict[str, list] = {}

    @check("logits cuda vs cpu (fp32)")
    def _():
        x = torch.randint(0, 512, (2, 64))
        with torch.no_grad():
            a, b = cpu(x), gpu(x.to(DEVICE)).cpu()
        diff = (a - b).abs().max().item()
        return {"max_abs_diff": diff, "logit_scale": a.abs().max().item(), "ok": diff < 1e-3}

    @check("engine greedy cuda == cpu (continuous batching)")
    def _():
        reference["cpu"] = outputs(Engine(cpu, tok, max_running=3))
        reference["gpu"] = outputs(Engine(gpu, tok, max_running=3))
        same = sum(a == b for a, b in zip(reference["cpu"], reference["gpu"]))
        return {"sequences_equal": f"{same}/{len(PROMPTS)}", "ok": same == len(PROMPTS)}

    @check("engine compiled == eager on cuda")
    def _():
        engine = Engine(gpu, tok, max_running=3, compile=True)
        t = time.perf_counter()
        engine.warm_up()
        compile_s = time.perf_counter() - t
        same = sum(a == b for a, b in zip(outputs(engine), reference["gpu"]))
        return {"sequences_equal": f"{same}/{len(PROMPTS)}", "compile_seconds": round(compile_s, 1),
                "ok": same == len(PROMPTS)}

    @check("engine greedy == transformers generate on cuda")
    def _():
        import transformers
        transformers.logging.set_verbosity_error()
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d / "tiny", dtype=torch.float32).to(DEVICE).eval()
        same = 0
        for prompt, params, ours in zip(PROMPTS, GREEDY, reference["gpu"]):
            x = torch.tensor([tok.encode(prompt)], device=DEVICE)
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=params.max_tokens,
                              min_new_tokens=params.max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            same += out[0, x.shape[1]:].tolist() == ours
        return {"sequences_equal": f"{same}/{len(PROMPTS)}", "transformers": transformers.__version__,
                "ok": same == len(PROMPTS)}

    if spec_model:
        for compiled in (False, True):
            @check(f"speculative greedy == plain greedy on cuda, {'compiled' if compiled else 'eager'} (trained model)")
            def _():
                model = load_model(spec_model).to(DEVICE, torch.float32).eval()
                mtok = Tokenizer.load(spec_model)
                from nanoseek.data.tasks import TASKS
                prompts = [p.prompt + "\n" for name in TASKS for p in TASKS[name].problems("test", 4)]
                params = SamplingParams(temperature=0, max_tokens=128)
                timing, compile_s = {}, {}
                for kind in ("plain", "speculative"):
                    t = time.perf_counter()
                    engine = Engine(model, mtok, max_running=1, speculative=kind == "speculative", compile=compiled)
                    engine.warm_up()  # compiled: the graphs (the greedy fused step, the sampled verify and draft)
                    engine.generate(prompts[:1], params)
                    compile_s[kind] = round(time.perf_counter() - t, 1)
                    t = time.perf_counter()
                    timing[kind] = (engine.generate(prompts, params), time.perf_counter() - t)
                    if kind == "speculative":
                        acceptance = engine.acceptance_rate
                plain, spec = timing["plain"][0], timing["speculative"][0]
                same = sum(a.output == b.output for a, b in zip(plain, spec))
                tokens = sum(len(r.output) for r in plain)
                return {"sequences_equal": f"{same}/{len(prompts)}", "acceptance": round(acceptance, 3),
                        "plain_tok_s": round(tokens / timing["plain"][1], 1),
                        "speculative_tok_s": round(tokens / timing["speculative"][1], 1),
                        "speedup": round(timing["plain"][1] / timing["speculative"][1], 2),
                        "warm_up_seconds": compile_s, "ok": same == len(prompts)}


def run(cmd: list[str], log: Path, timeout: int) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}; tail of {log.name}:\n"
                           + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return p


def training(out: Path, work: Path) -> None:
    run_dir = work / "quick"

    @check("speedrun --quick on the GPU")
    def _():
        run([sys.executable, "-m", "nanoseek", "speedrun", "--quick", "--out", str(run_dir)],
            out / "speedrun.log", timeout=420)
        card = json.loads((run_dir / "speedrun.json").read_text())
        return {"speedrun_json": card}

    @check("torchrun --nproc_per_node=1 pretrain small (NCCL)")
    def _():
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        run(torchrun + ["-m", "nanoseek", "pretrain", "--preset", "small", "--data", str(run_dir / "data" / "tokens"),
                        "--tokenizer", str(run_dir / "tokenizer"), "--out", str(work / "ddp"), "--steps", "60",
                        "--batch-size", "16", "--seq-len", "256"], out / "torchrun.log", timeout=240)
        last = json.loads((work / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
        return {"last_metrics": last, "ok": (work / "ddp" / "model.safetensors").exists()}


def speed(out: Path, spec_model: str | None) -> None:
    here = Path(__file__).resolve().parent
    for dtype in ("fp32", "bf16"):
        @check(f"engine_speed.py on cuda, {dtype}")
        def _():
            cmd = [sys.executable, str(here / "engine_speed.py"), "--device", DEVICE, "--dtype", dtype,
                   "--repeats", "2"]
            if spec_model and dtype == "fp32":
                cmd += ["--spec-model", spec_model]
            run(cmd, out / f"engine_speed_{dtype}.log", timeout=300)
            return {"lines": [line for line in (out / f"engine_speed_{dtype}.log").read_text().splitlines()
                              if "tok/s" in line]}

    @check("grpo_speed.py on cuda (nanoseek vs TRL's GRPOTrainer)")
    def _():
        if importlib.util.find_spec("trl") is None:  # not a nanoseek dependency
            return {"skipped": "TRL is not installed here: pip install trl, then rerun", "ok": False}
        run([sys.executable, str(here / "grpo_speed.py"), "--device", DEVICE], out / "grpo_speed.log", timeout=420)
        return {"lines": [line for line in (out / "grpo_speed.log").read_text().splitlines()
                          if "s/step" in line or "ratio" in line or "by part" in line]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and the logs of each command")
    ap.add_argument("--spec-model", metavar="DIR", help="a model dir trained with MTP (speculative decoding checks)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["same", "training", "speed"],
                    help="parts to leave out")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same script on the CPU, to try it")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); nothing to check")
    global OUT
    out = OUT = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    RESULTS["machine"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None,
                          "cuda": torch.version.cuda, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    print(json.dumps(RESULTS["machine"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "same" not in args.skip:
            same_computation(work, args.spec_model)
        if "training" not in args.skip:
            training(out, work)
        if "speed" not in args.skip:
            speed(out, args.spec_model)
    failed = [k for k, v in RESULTS.items() if k != "machine" and not v["ok"]]
    print(f"{len(RESULTS) - 1 - len(failed)} checks ok, {len(failed)} failed" + (f": {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
