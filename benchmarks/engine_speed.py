"""Generation speed: nanoseek's latent-cache engine against transformers `generate`, same weights.

    python benchmarks/engine_speed.py                             # tiny and small, fp32
    python benchmarks/engine_speed.py --spec-model runs/base      # + speculative decoding on a trained model
    python benchmarks/engine_speed.py --presets --spec-model runs/base   # only speculative decoding
    python benchmarks/engine_speed.py --device cuda --dtype bf16  # on a GPU

For each preset one random model dir is written by nanoseek and loaded by both libraries
(transformers' DeepseekV3ForCausalLM with its own DynamicCache). Cases: decode at batch 1 and 16
with 128-token prompts, decode at batch 1 after a 2048-token prompt, and prefill. Decode tokens/s
count the tokens after the first (prefill makes the first): nanoseek times its engine's steps
after the prefill step; transformers' decode time is generate(N new tokens) minus generate(1).
Both run greedy for a fixed number of tokens (end-of-sentence ignored). Runs alternate between the
libraries; the median of --repeats runs is reported. KV bytes per token are read off each
library's cache after the run. nanoseek runs twice: eager, and with `compile=True` (its decode step
through torch.compile, compiled during the warm-up run, not timed); transformers runs eagerly, as
`generate` does by default.

With --spec-model (a model dir trained with MTP, e.g. by `nanoseek pretrain`), the engine decodes
the synthetic tasks' prompts at batch 1 with and without MTP self-speculative decoding, eager and
compiled, and reports each speed-up against plain decoding of the same kind and the share of
drafts accepted.
Needs the `dev` extra (transformers).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch

from nanoseek import Transformer, load_model, preset, save_model
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.perf import host_line, host_peaks
from nanoseek.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = ["1x128", "16x128", "1x2048"]  # batch x prompt tokens


def _clock() -> float:
    """Seconds, after the GPU (if any) has finished what was queued."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def ours(model, tok, prompts: torch.Tensor, new: int, speculative: bool = False, compile: bool = False) -> dict:
    """Seconds of the prefill step and of the decode steps after it; cache bytes per token."""
    B, P = prompts.shape
    engine = Engine(model, tok, max_running=B, speculative=speculative, compile=compile,
                    num_blocks=B * -(-(P + new + 2) // 16))
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for row in prompts.tolist():
        engine.add(row, params)
    t0 = _clock()
    engine.step()
    t1 = _clock()
    while engine.has_work():
        engine.step()
    t2 = _clock()
    return {"prefill": t1 - t0, "decode": t2 - t1, "kv_bytes": engine.cache.bytes_per_token(),
            "acceptance": engine.acceptance_rate}


def theirs(hf, prompts: torch.Tensor, new: int) -> dict:
    def generate(n):
        t = _clock()
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
        return _clock() - t, out

    t_prefill, _ = generate(1)
    t_all, out = generate(new)
    cache = out.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    tokens = prompts.shape[0] * tensors[0].shape[-2]
    return {"prefill": t_prefill, "decode": t_all - t_prefill,
            "kv_bytes": sum(t.numel() * t.element_size() for t in tensors) / tokens}


def case(text: str) -> str:
    """An argparse type: BATCHxTOKENS, e.g. 1x2048."""
    parts = text.split("x")
    if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise argparse.ArgumentTypeError(f"a case is BATCHxPROMPT_TOKENS with both > 0, such as 1x2048 (got {text!r})")
    return text


def compare(name: str, new: int, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
            cases: list[str] = CASES, compiled: bool = True) -> list[dict]:
    import transformers
    cfg = preset(name, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tok = Tokenizer.byte_level()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d, extra_files=tok.files())
        model = load_model(d).to(device, dtype).eval()
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    for case in cases:
        batch, plen = map(int, case.split("x"))
        prompts = torch.randint(9, cfg.vocab_size, (batch, plen), device=device)
        runs = {"eager": lambda n: ours(model, tok, prompts, n),
                "compiled": lambda n: ours(model, tok, prompts, n, compile=True),
                "hf": lambda n: theirs(hf, prompts, n)}
        if not compiled:
            runs["compiled"] = lambda n: {"prefill": None, "decode": None}
        times: dict[str, dict[str, list]] = {k: {} for k in runs}
        for run in runs.values():
            run(4)  # warm-up (and the compile)
        for _ in range(repeats):  # alternate, so drift hits all three
            for key, run in runs.items():
                for k, v in run(new).items():
                    times[key].setdefault(k, []).append(v)
        a, c, b = ({k: statistics.median(v) if v[0] is not None else None for k, v in times[key].items()}
                   for key in runs)
        dec_a, dec_c, dec_b = (batch * (new - 1) / x["decode"] if x["decode"] else math.nan for x in (a, c, b))
        pre_a, pre_b = batch * plen / a["prefill"], batch * plen / b["prefill"]
        rows.append(dict(model=name, batch=batch, prompt=plen, decode_ours=dec_a, decode_compiled=dec_c,
                         decode_hf=dec_b, prefill_ours=pre_a, prefill_hf=pre_b, kv_ours=a["kv_bytes"],
                         kv_hf=b["kv_bytes"]))
        r = rows[-1]
        compiled = "" if math.isnan(dec_c) else f", compiled {dec_c:8.1f} ({dec_c / dec_b:.2f}x)"
        print(f"{name:6} batch {batch:2} prompt {plen:4}: decode eager {dec_a:8.1f} ({dec_a / dec_b:.2f}x){compiled} "
              f"vs transformers {dec_b:8.1f} tok/s  prefill {pre_a:8.0f} vs "
              f"{pre_b:8.0f} tok/s ({pre_a / pre_b:.2f}x)  KV {r['kv_ours']:.0f} vs {r['kv_hf']:.0f} B/token",
              flush=True)
    return rows


def speculative(path: str, new: int, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Batch 1 on the tasks' test prompts: plain vs speculative decoding, eager and compiled, alternating
    per prompt so drift hits all four; tokens/s over all prompts, and the share of drafts kept."""
    from nanoseek.data.tasks import TASKS
    model = load_model(path).to(device, dtype).eval()
    tok = Tokenizer.load(path)
    # the corpus writes each problem as "prompt\n<think>..."; the model continues from there
    prompts = [p.prompt + "\n" for name in TASKS for p in TASKS[name].problems("test", 4)]
    ids = [tok.encode(p) for p in prompts]
    variants = {"eager": {}, "eager speculative": {"speculative": True}, "compiled": {"compile": True},
                "compiled speculative": {"speculative": True, "compile": True}}
    for kwargs in variants.values():  # warm-up: the compiles, and both of a draft's outcomes
        for row in ids[:2]:
            ours(model, tok, torch.tensor([row], device=device), 16, **kwargs)
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    kept: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for row in ids:
            x = torch.tensor([row], device=device)
            for name, kwargs in variants.items():
                r = ours(model, tok, x, new, **kwargs)
                seconds[name].append(r["decode"])
                kept[name].append(r["acceptance"])
    speed = {k: (new - 1) * len(v) / sum(v) for k, v in seconds.items()}
    accepted = kept["eager speculative"]
    print(f"speculative, batch 1, {len(ids)} task prompts x {repeats}, {new} tokens (tok/s): "
          f"eager plain {speed['eager']:.1f}, speculative {speed['eager speculative']:.1f} "
          f"({speed['eager speculative'] / speed['eager']:.2f}x); compiled plain {speed['compiled']:.1f}, "
          f"speculative {speed['compiled speculative']:.1f} "
          f"({speed['compiled speculative'] / speed['compiled']:.2f}x); acceptance {statistics.mean(accepted):.1%} "
          f"(min {min(accepted):.0%}, max {max(accepted):.0%}; compiled {statistics.mean(kept['compiled speculative']):.1%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=["tiny", "small"],
                    help="model presets to compare (default tiny small; none given: only the speculative case)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case, median reported (default 3)")
    ap.add_argument("--cases", nargs="+", type=case, default=CASES, metavar="BxT",
                    help=f"batch x prompt tokens of each case (default {' '.join(CASES)})")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled engine (and its compile time)")
    ap.add_argument("--spec-model", metavar="DIR", help="a trained model dir with MTP for the speculative case")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and cache (default fp32)")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    import transformers
    transformers.logging.set_verbosity_error()
    where = (f"torch {torch.__version__}, {torch.cuda.get_device_name()}" if args.device == "cuda"
             else host_line(host_peaks()))
    print(f"{where}; transformers {transformers.__version__}, {args.dtype}, greedy, {args.new_tokens} new tokens")
    with torch.no_grad():
        for name in args.presets:
            compare(name, args.new_tokens, args.repeats, args.device, dtype, args.cases, not args.no_compiled)
        if args.spec_model:
            speculative(args.spec_model, args.new_tokens * 2, args.repeats, args.device, dtype)


if __name__ == "__main__":
    main()
