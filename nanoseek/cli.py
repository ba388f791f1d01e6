"""`nanoseek <command>`: one argparse subcommand per verb.

Each command is a pair: `parser_NAME` declares its flags (for pretrain, sft, grpo and distill they
live beside their typed configs in train/args.py and rl/args.py) and `cmd_NAME` turns the parsed
flags into a config and calls the library. Nothing in the package imports this module.

Run `nanoseek --help` for the list and `nanoseek COMMAND --help` for every flag of a command.
Also runs as `python -m nanoseek`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import PRESETS, SHAPE_ONLY, ConfigError, ModelConfig, preset, vllm_mla_note
from .data.shards import ShardError
from .data.tasks import SPLITS, TASKS, task_name
from .rl import args as rl_args
from .tokenizer import TokenizerError
from .train import args as train_args
from .train.args import TrainError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class UsageError(Exception):
    """Bad command-line input; printed without a traceback."""


def _config_from(args: argparse.Namespace) -> tuple[str, ModelConfig]:
    if bool(args.preset) == bool(args.config):
        raise UsageError("give exactly one of --preset NAME or --config PATH")
    if args.preset:
        return args.preset, preset(args.preset)
    return args.config, ModelConfig.from_json(args.config)


def _add_config_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--preset", choices=list(PRESETS), help="a built-in model shape")
    sp.add_argument("--config", metavar="PATH", help="a config.json file, or a model dir holding one")


def parser_init(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("init", help="write a randomly initialised model dir (HF deepseek_v3 layout)",
                        description="Write a randomly initialised model dir (Hugging Face deepseek_v3 layout) "
                                    "that nanoseek and transformers load.")
    _add_config_flags(sp)
    sp.add_argument("--out", required=True, metavar="DIR", help="model dir to write (replaced atomically)")
    sp.add_argument("--seed", type=int, default=0, help="random seed for the initial weights (default 0)")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype on disk (default fp32)")
    sp.add_argument("--tokenizer", metavar="DIR",
                    help="a trained tokenizer dir to ship with the model (default: the built-in byte-level one)")
    sp.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_model
    from .model import Transformer
    from .tokenizer import Tokenizer

    name, cfg = _config_from(args)
    if args.preset in SHAPE_ONLY:
        raise UsageError(f"preset {args.preset!r} is shape-only (for `nanoseek cost`); it is far too large "
                         f"to instantiate here. Use one of: {', '.join(p for p in PRESETS if p not in SHAPE_ONLY)}")
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else Tokenizer.byte_level()
    tok.check_fits(cfg.vocab_size)
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    out = save_model(model, args.out, dtype=getattr(torch, DTYPES[args.dtype]),
                     extra_files=tok.files(cfg.max_position_embeddings))
    print(f"wrote {out}: {name}, {model.num_parameters():,} parameters, seed {args.seed}, {args.dtype}, "
          f"{'byte-level' if not args.tokenizer else args.tokenizer} tokenizer ({tok.vocab_size} tokens)")
    if note := vllm_mla_note(cfg):
        print(f"note: {note}")
    return 0


def parser_tokenizer(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with DeepSeek's special tokens",
                        description="Train a byte-level BPE tokenizer (HF tokenizers) on text files and write "
                                    "tokenizer.json and tokenizer_config.json (with the chat template).")
    sp.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help=".txt/.md/.jsonl(.gz)/.parquet files or directories (curated dirs included)")
    sp.add_argument("--vocab-size", type=int, required=True, help="target vocabulary size (>= 265)")
    sp.add_argument("--out", required=True, metavar="DIR", help="where to write the tokenizer files")
    sp.add_argument("--text-field", help="jsonl / parquet field holding the text (default: text or content)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_tokenizer)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import train_on_files

    tok, problems = train_on_files(args.input, args.vocab_size, args.text_field, progress=not args.quiet)
    tok.save(args.out)
    for p in problems[:10]:
        print(f"skipped {p}", file=sys.stderr)
    print(f"wrote {args.out}: {tok.vocab_size} tokens ({len(problems)} input problems skipped)")
    return 0


def parser_curate(sub: argparse._SubParsersAction) -> None:
    from .data.curate import CurateConfig
    d = CurateConfig()
    sp = sub.add_parser("curate", help="clean, filter, de-duplicate and classify a corpus into shards",
                        description="Normalise (NFC, control characters), filter by quality heuristics, remove "
                                    "exact and near (MinHash LSH) duplicates, classify domain and language, and "
                                    "write jsonl.gz shards with a report.")
    sp.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help=".txt/.md/.jsonl(.gz)/.parquet files or directories")
    sp.add_argument("--out", required=True, metavar="DIR", help="output dir (replaced atomically)")
    sp.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes analysing documents (default: all cores)")
    sp.add_argument("--min-chars", type=int, default=d.min_chars, help=f"drop shorter texts (default {d.min_chars})")
    sp.add_argument("--max-chars", type=int, default=d.max_chars, help=f"drop longer texts (default {d.max_chars})")
    sp.add_argument("--min-alnum-ratio", type=float, default=d.min_alnum_ratio,
                    help=f"min share of letters and digits among non-space characters (default {d.min_alnum_ratio})")
    sp.add_argument("--max-symbol-ratio", type=float, default=d.max_symbol_ratio,
                    help=f"max share of junk symbols (# $ %% & @ ^ _ | ~ {{}} [], emoji) (default {d.max_symbol_ratio})")
    sp.add_argument("--max-dup-line-ratio", type=float, default=d.max_dup_line_ratio,
                    help=f"max share of repeated lines (default {d.max_dup_line_ratio})")
    sp.add_argument("--max-dup-ngram-ratio", type=float, default=d.max_dup_ngram_ratio,
                    help=f"max share of repeated word 5-grams (default {d.max_dup_ngram_ratio})")
    sp.add_argument("--near-dup-threshold", type=float, default=d.near_dup_threshold,
                    help=f"Jaccard similarity above which texts are near duplicates (default {d.near_dup_threshold})")
    sp.add_argument("--num-perm", type=int, default=d.num_perm, help=f"MinHash permutations (default {d.num_perm})")
    sp.add_argument("--shard-records", type=int, default=d.shard_records,
                    help=f"records per output shard (default {d.shard_records})")
    sp.add_argument("--text-field", help="jsonl / parquet field holding the text (default: text or content)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_curate)


def cmd_curate(args: argparse.Namespace) -> int:
    import dataclasses

    from .data.curate import CurateConfig, NothingUsable, curate

    cfg = CurateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CurateConfig)})
    try:
        report = curate(args.input, args.out, cfg, workers=args.workers, progress=not args.quiet)
    except NothingUsable as e:
        raise UsageError(str(e)) from None
    print(report.table())
    print(f"wrote {args.out}: {len(report.shards)} shard(s) and curate_report.json")
    return 0


def parser_tokenize(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("tokenize", help="turn a curated dir into token shards for training",
                        description="Tokenize every curated shard (in parallel processes) into uint16/uint32 "
                                    "token files with per-document offsets, domains and difficulties.")
    sp.add_argument("--input", required=True, metavar="DIR", help="a dir written by `nanoseek curate`")
    sp.add_argument("--tokenizer", required=True, metavar="DIR", help="a dir written by `nanoseek tokenizer`")
    sp.add_argument("--out", required=True, metavar="DIR", help="output dir (replaced atomically)")
    sp.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .data.shards import tokenize_dir

    index = tokenize_dir(args.input, args.tokenizer, args.out, workers=args.workers, progress=not args.quiet)
    print(f"wrote {args.out}: {index['num_tokens']:,} tokens in {index['num_docs']:,} documents, "
          f"{len(index['shards'])} shard(s), {index['dtype']}")
    return 0


def parser_tasks(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("tasks", help="the synthetic reasoning tasks: sample problems, or write a raw corpus",
                        description="Print problems of a synthetic task with their worked solutions, or write "
                                    "a generated raw corpus for `nanoseek curate`.")
    sp.add_argument("action", choices=["sample", "corpus"],
                    help="sample: print problems with solutions; corpus: write a raw jsonl corpus "
                         "(task solutions, prose, code, Chinese, junk and planted duplicates) to curate")
    sp.add_argument("--task", choices=list(TASKS), help="which task (for sample)")
    sp.add_argument("--out", metavar="DIR", help="where to write the corpus (for corpus)")
    sp.add_argument("--megabytes", type=float, default=20, help="corpus size (for corpus; default 20)")
    sp.add_argument("--split", choices=list(SPLITS), default="train", help="which split (default train)")
    sp.add_argument("--n", type=int, default=3, help="how many problems (default 3)")
    sp.add_argument("--level", type=int, help="one difficulty level (default: cycle through all)")
    sp.add_argument("--seed", type=int, help="sampling seed (the test split is fixed without one; corpus: 0)")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.set_defaults(func=cmd_tasks)


def cmd_tasks(args: argparse.Namespace) -> int:
    from .data.tasks import get_task

    if args.action == "corpus":
        from .data.corpus import write_corpus

        if not args.out:
            raise UsageError("tasks corpus needs --out DIR")
        files = write_corpus(args.out, args.megabytes, seed=args.seed or 0)
        print(f"wrote {len(files)} file(s), {sum(f.stat().st_size for f in files) / 1e6:.1f} MB, to {args.out}")
        return 0
    if not args.task:
        raise UsageError("tasks sample needs --task NAME")
    try:
        task = get_task(args.task)
        problems = task.problems(args.split, args.n, level=args.level, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for p in problems:
        if args.json:
            print(json.dumps({"key": p.key, "level": p.level, "prompt": p.prompt, "answer": p.answer,
                              "solution": task.solution(p)}, ensure_ascii=False))
        else:
            print(f"[{p.task} level {p.level}] {p.prompt}\n{task.solution(p)}\n")
    return 0


def parser_cost(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("cost", help="parameters, KV-cache bytes, FLOPs, and training and serving dollars of a config",
                        description="Print total and activated parameters, KV-cache bytes per token (MLA "
                                    "against MHA and GQA-8), FLOPs per token, the cache of a 128K context, and "
                                    "what pretraining and serving cost at a stated GPU throughput and price "
                                    "(defaults: DeepSeek-V3's published figures).")
    _add_config_flags(sp)
    sp.add_argument("--seq-len", type=int, default=4096,
                    help="context length for the attention FLOPs (default 4096)")
    sp.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8"], default="bf16",
                    help="cache element type (default bf16)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    from .cost import V3_BUDGET as b  # no torch import: --help stays fast
    sp.add_argument("--train-tokens", type=float, default=b.train_tokens,
                    help=f"pretraining tokens (default V3's {b.train_tokens:.3g})")
    sp.add_argument("--peak-tflops", type=float, default=b.peak_tflops,
                    help=f"one GPU's peak TFLOP/s in the training precision (default {b.peak_tflops:g}: the H800's "
                         "dense bf16)")
    sp.add_argument("--mfu", type=float, default=b.mfu,
                    help=f"model FLOPs utilisation assumed, as a fraction of the peak (default {b.mfu:g}: about "
                         "what V3's published GPU-hours imply)")
    sp.add_argument("--gpu-hour-price", type=float, default=b.gpu_hour_usd,
                    help=f"dollars per GPU-hour (default {b.gpu_hour_usd:g}, V3's rental assumption)")
    sp.add_argument("--extra-gpu-hours", type=float, default=b.extra_gpu_hours,
                    help=f"GPU-hours beside pretraining (default {b.extra_gpu_hours:.0f}: V3's context extension "
                         "and post-training)")
    sp.add_argument("--decode-tokens-per-s", type=float, default=b.decode_tokens_per_s,
                    help=f"output tokens/s of one serving node (default {b.decode_tokens_per_s:.0f}: DeepSeek-V2's "
                         "on 8 H800s)")
    sp.add_argument("--node-gpus", type=int, default=b.node_gpus, help=f"GPUs per serving node (default {b.node_gpus})")
    sp.add_argument("--usd-to-rmb", type=float, default=b.usd_to_rmb,
                    help=f"exchange rate for the RMB figure (default {b.usd_to_rmb:g})")
    sp.set_defaults(func=cmd_cost)


def cmd_cost(args: argparse.Namespace) -> int:
    from .cost import Budget, dollars, estimate, format_cost, format_dollars

    name, cfg = _config_from(args)
    budget = Budget(args.train_tokens, args.peak_tflops, args.mfu, args.gpu_hour_price, args.extra_gpu_hours,
                    args.decode_tokens_per_s, args.node_gpus, args.usd_to_rmb)
    for flag, value in [("--train-tokens", budget.train_tokens), ("--peak-tflops", budget.peak_tflops),
                        ("--decode-tokens-per-s", budget.decode_tokens_per_s), ("--node-gpus", budget.node_gpus)]:
        if value <= 0:
            raise UsageError(f"{flag} must be > 0 (got {value:g})")
    if not 0 < budget.mfu <= 1:
        raise UsageError(f"--mfu must be a fraction in (0, 1] (got {budget.mfu:g})")
    if budget.gpu_hour_usd < 0 or budget.extra_gpu_hours < 0 or budget.usd_to_rmb <= 0:
        raise UsageError("--gpu-hour-price and --extra-gpu-hours must be >= 0 and --usd-to-rmb > 0")
    try:
        cost = estimate(cfg, seq_len=args.seq_len, dtype=args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
    money = dollars(cost, budget)
    if args.json:
        print(json.dumps({"name": name, **cost.as_dict(), **money}, indent=2))
    else:
        print(format_cost(name, cost))
        print(format_dollars(money, budget, cost.seq_len))
    return 0


def parser_pretrain(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("pretrain", help="pretrain a model on token shards (CE + MTP, bias balancing)",
                        description="Pretrain from a preset or config.json on token shards: next-token + MTP loss, "
                                    "auxiliary-loss-free balancing, AdamW or Muon, WSD or cosine schedule, atomic "
                                    "checkpoints with exact resume. Runs under torchrun for data parallel.")
    train_args.add_arguments(sp)
    sp.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train import pretrain

    pretrain.run(train_args.pretrain_config(args))
    return 0


def parser_sft(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("sft", help="supervised fine-tuning on chat examples (assistant tokens only)",
                        description="Fine-tune a model dir on jsonl chat examples with the loss on the assistant's "
                                    "tokens only; packing or padding; the same loop, checkpoints and resume as "
                                    "pretrain.")
    train_args.add_sft_arguments(sp)
    sp.set_defaults(func=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    from .train import sft

    sft.run(train_args.sft_config(args))
    return 0


def parser_plot(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("plot", help="PNG plots of a training run: losses, lr, expert load",
                        description="Write RUN/plots/loss.png, lr.png and expert_load.png from RUN/metrics.jsonl.")
    sp.add_argument("run", metavar="RUN", help="a run dir written by pretrain or sft")
    sp.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    try:
        written = plot_run(args.run)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    for path in written:
        print(f"wrote {path}")
    return 0


COMPILE_HELP = ("compile the decode step with torch.compile (needs g++): compiling takes from seconds (tiny) to a "
                "minute or two (small) at start, then decoding is several times faster (docs/benchmarks.md); with "
                "--speculative the verify and draft steps are compiled too (a few minutes for small)")


def _add_device_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--device", default="auto",
                    help="where the model runs: auto (the first GPU if torch sees one, else the CPU; default), "
                         "cpu, cuda or cuda:N")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="weights and KV cache: fp32 (default) or bf16 (half the memory; on CPUs often slower "
                         "than fp32)")


def _load(args: argparse.Namespace):
    """(model on --device in --dtype, its tokenizer) for the generating commands."""
    import torch

    from .checkpoint import load_model, resolve_device
    from .tokenizer import Tokenizer

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return load_model(args.model, dtype=getattr(torch, DTYPES[args.dtype]), device=device), Tokenizer.load(args.model)


def _engine(model, tok, args: argparse.Namespace, **kwargs):
    """The engine a generating command asked for; with --compile, compiled before it returns."""
    from .engine.engine import Engine

    try:
        engine = Engine(model, tok, compile=args.compile, **kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.compile:
        print("compiling the decode step ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            engine.warm_up()
        except RuntimeError as e:
            raise UsageError(str(e)) from None
        print(f"compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return engine


def parser_generate(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("generate", help="continue a prompt with a model dir, streaming to the terminal",
                        description="Generate from a model dir (its own tokenizer) through the latent-cache engine, "
                                    "printing text as it is produced.")
    sp.add_argument("--model", required=True, metavar="DIR", help="a model dir (or a training run dir)")
    sp.add_argument("--prompt", required=True, help="the text to continue")
    sp.add_argument("--max-tokens", type=int, default=128, help="most new tokens (default 128)")
    sp.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    sp.add_argument("--seed", type=int, help="sampling seed (same seed, same output)")
    sp.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    sp.add_argument("--speculative", action="store_true",
                    help="MTP self-speculative decoding: the MTP module drafts a token, the main model checks it "
                         "in the same forward (same greedy output; needs a model with an MTP layer)")
    _add_device_arguments(sp)
    sp.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    sp.add_argument("--verbose", action="store_true",
                    help="print why generation finished, tokens/s and the draft acceptance rate")
    sp.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.sampling import SamplingParams

    model, tok = _load(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, stop=args.stop or [])
    engine = _engine(model, tok, args, max_running=1, speculative=args.speculative)
    try:
        engine.add(args.prompt, params)
    except ValueError as e:
        raise UsageError(str(e)) from None
    reason, count, start = None, 0, time.perf_counter()
    while engine.has_work():
        for out in engine.step():
            print(out.delta, end="", flush=True)
            reason, count = out.finish_reason or reason, count + 1
    print()
    if args.verbose:
        seconds = time.perf_counter() - start
        spec = (f", {engine.acceptance_rate:.0%} of {engine.drafted} MTP drafts accepted"
                if engine.acceptance_rate is not None else "")
        print(f"[finished: {reason}; {count} tokens in {seconds:.2f} s, {count / seconds:.1f} tokens/s{spec}]",
              file=sys.stderr)
    return 0


CHAT_HELP = "/reset starts a new conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply."


def parser_chat(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("chat", help="multi-turn chat with a model dir in the terminal",
                        description="Chat through the model's chat template. Reasoning (<think>...</think>) is "
                                    "shown dimmed and left out of the history, as DeepSeek-R1 does. " + CHAT_HELP +
                                    " Arrow keys edit and recall earlier lines (kept in "
                                    "~/.local/state/nanoseek/chat_history).")
    sp.add_argument("--model", required=True, metavar="DIR", help="a model dir (or a training run dir)")
    sp.add_argument("--system", metavar="TEXT", help="a system message at the start of every conversation")
    sp.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    sp.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6, as DeepSeek "
                                                                   "recommends for R1)")
    sp.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    sp.add_argument("--seed", type=int, help="sampling seed for every reply")
    sp.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    _add_device_arguments(sp)
    sp.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    sp.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from .engine.reasoning import ReasoningSplitter
    from .engine.sampling import SamplingParams

    model, tok = _load(args)
    engine = _engine(model, tok, args, max_running=1, speculative=args.speculative)
    try:
        SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens).validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    dim, reset = ("\033[2m", "\033[0m") if color else ("", "")
    history = _ChatHistory()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"nanoseek chat: {args.model}. {CHAT_HELP}")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            continue
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages = list(system)
            print("(new conversation)")
            continue
        if line.startswith("/") or not line:
            if line:
                print(f"unknown command {line}; {CHAT_HELP}")
            continue
        ids, _ = tok.render_chat(messages + [{"role": "user", "content": line}], add_generation_prompt=True)
        room = engine.max_len - len(ids)
        if room < 1:
            print(f"(the conversation is {len(ids)} tokens, the model's context is {engine.max_len}; "
                  f"/reset to start over)")
            continue
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=min(args.max_tokens, room))
        split = ReasoningSplitter(implicit=False)
        answer, reason, shown_reasoning = "", None, False
        stream = engine.stream(ids, params)
        try:
            for out in stream:
                reasoning, content = split.push(out.delta)
                if out.finish_reason:
                    r, c = split.finish()
                    reasoning, content = reasoning + r, content + c
                    reason = out.finish_reason
                if reasoning:
                    print(dim + reasoning + reset, end="", flush=True)
                    shown_reasoning = True
                if content:
                    if shown_reasoning and not answer:
                        print()
                    print(content, end="", flush=True)
                    answer += content
        except KeyboardInterrupt:
            stream.close()  # cancels the reply and frees its cache blocks
            reason = "interrupted"
        print(reset)
        if reason == "length":
            print(f"(cut at {params.max_tokens} tokens)")
        elif reason == "interrupted":
            print("(stopped)")
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer.strip()}]
    history.save()
    return 0


class _ChatHistory:
    """Line editing and a persistent input history, where the readline module exists."""

    def __init__(self):
        self.path = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "nanoseek" / "chat_history"
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input()
            self.readline = None
            return
        self.readline = readline
        try:
            readline.read_history_file(self.path)
        except OSError:
            pass

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.set_history_length(1000)
            self.readline.write_history_file(self.path)
        except OSError:
            pass


def parser_serve(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("serve", help="OpenAI-compatible HTTP server with streaming and a web chat page",
                        description="Serve a model dir over HTTP: /v1/chat/completions (reasoning_content split as "
                                    "DeepSeek-R1 does), /v1/completions (echo + logprobs for lm-evaluation-harness), "
                                    "/v1/models, /health, and a chat page at /. All requests share the engine's "
                                    "continuous batching; over --max-running + --max-queue requests get 503.")
    sp.add_argument("--model", required=True, metavar="DIR", help="a model dir (or a training run dir)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    sp.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sp.add_argument("--api-key", metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSEEK_API_KEY, else none)")
    sp.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: the dir's name)")
    sp.add_argument("--max-running", type=int, default=16, help="sequences decoded together (default 16)")
    sp.add_argument("--max-queue", type=int, default=64,
                    help="sequences waiting beyond those running before 503 (default 64)")
    sp.add_argument("--prefill-hold", type=int, default=4, metavar="STEPS",
                    help="hold requests that arrive while others decode for up to STEPS decode steps (less once "
                         "enough gather to fill every free slot), so they share one prefill instead of each "
                         "stalling the batch; trades a little time-to-first-token for throughput; 0 admits at "
                         "once (default 4)")
    sp.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                    help="largest request body; bigger ones get 413 (default 1 MiB)")
    sp.add_argument("--reasoning-parser", choices=["deepseek_r1", "none"], default="deepseek_r1",
                    help="deepseek_r1: text before </think> goes to reasoning_content (default); none: all content")
    sp.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    _add_device_arguments(sp)
    sp.add_argument("--compile", action="store_true", help=COMPILE_HELP + "; compiled before the server listens")
    sp.add_argument("--quiet", action="store_true", help="no access log")
    sp.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    import uvicorn

    from .server.app import create_app

    if args.max_running < 1 or args.max_queue < 0 or args.max_body < 1 or args.prefill_hold < 0:
        raise UsageError("--max-running and --max-body must be >= 1, --max-queue and --prefill-hold >= 0")
    model, tok = _load(args)
    key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    name = args.served_model_name or Path(args.model).resolve().name
    engine = _engine(model, tok, args, max_running=args.max_running, speculative=args.speculative,
                     prefill_hold=args.prefill_hold)
    app = create_app(engine, tok, name, api_key=key, max_queue=args.max_queue, max_body=args.max_body,
                     reasoning=args.reasoning_parser == "deepseek_r1", engine_thread=False)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"nanoseek serve: model '{name}' ({model.num_parameters() / 1e6:.1f}M parameters, context "
          f"{engine.max_len}) on http://{args.host}:{args.port}/ ; API key {'required' if key else 'off'}",
          file=sys.stderr)
    # HTTP on a thread, the engine on the main one (see EngineRunner.run); Ctrl-C or SIGTERM stops both
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           access_log=not args.quiet))
    http = threading.Thread(target=server.run, name="http")
    http.start()
    runner = app.state.runner
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        while http.is_alive() and not server.started:
            time.sleep(0.05)
        if http.is_alive():
            runner.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join()
    return 0 if server.started else 1


def parser_grpo(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("grpo", help="GRPO reinforcement learning with rule rewards on a reasoning task",
                        description="R1-style RL: G completions per problem from the engine, rule rewards (accuracy, "
                                    "format, optional language consistency), group-normalised advantages, the clipped "
                                    "GRPO loss with a k3 KL to a frozen reference. Checkpoints and --resume like "
                                    "pretrain. See docs/grpo.md.")
    rl_args.add_grpo_arguments(sp)
    sp.set_defaults(func=cmd_grpo)


def cmd_grpo(args: argparse.Namespace) -> int:
    from .rl import train

    train.run(rl_args.grpo_run(args))
    return 0


def parser_rft(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("rft", help="rejection-sampling fine-tuning: GRPO's compute-matched control",
                        description="Draw as many completions as a GRPO run sampled from its start, keep those the "
                                    "task verifies, and fine-tune the start on them (RFT). GRPO counts as a win only "
                                    "where it beats this.")
    rl_args.add_rft_arguments(sp)
    sp.set_defaults(func=cmd_rft)


def cmd_rft(args: argparse.Namespace) -> int:
    from .rl import rft

    rft.run(rl_args.rft_config(args))
    return 0


def parser_distill(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("distill", help="rejection-sample a teacher's verified answers and SFT a smaller student",
                        description="R1-style distillation: k teacher samples per train problem, keep those the task "
                                    "verifies, fine-tune the student on them, report teacher and student test "
                                    "accuracy (RUN/report.json).")
    rl_args.add_distill_arguments(sp)
    sp.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from .rl import distill

    distill.run(rl_args.distill_config(args))
    return 0


def parser_eval(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("eval", help="accuracy on a reasoning task: pass@1 (greedy), pass@k and maj@k",
                        description="Evaluate a model dir on a task's fixed split through the engine: greedy pass@1 "
                                    "per problem, and with --k > 1, k samples per problem for pass@k (unbiased "
                                    "estimator) and maj@k (majority vote on the extracted answers).")
    sp.add_argument("--model", required=True, metavar="DIR", help="a model dir (or a training run dir)")
    sp.add_argument("--task", required=True, choices=list(TASKS), help="which task")
    sp.add_argument("--split", choices=list(SPLITS), default="test", help="which split (default test: fixed)")
    sp.add_argument("--n", type=int, default=100, help="problems (default 100)")
    sp.add_argument("--level", type=int, help="one difficulty level (default: all, cycling)")
    sp.add_argument("--k", type=int, default=1, help="samples per problem for pass@k / maj@k (default 1: greedy only)")
    sp.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for k > 1 (default 0.7)")
    sp.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    sp.add_argument("--template", choices=["chat", "r1-zero", "plain"], default="chat",
                    help="chat: the chat template, as SFT teaches (default); r1-zero: R1-Zero's plain-text prompt; "
                         "plain: the problem and a newline, as the pretraining corpus writes it (base models)")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sp.add_argument("--max-running", type=int, default=32, help="sequences decoded together (default 32)")
    _add_device_arguments(sp)
    sp.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--per-problem", action="store_true", help="with --json: every problem's greedy output and result")
    sp.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .data.tasks import get_task
    from .rl.evaluate import evaluate, format_report

    if args.n < 1 or args.k < 1 or args.max_tokens < 1 or args.max_running < 1:
        raise UsageError("--n, --k, --max-tokens and --max-running must be >= 1")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (got {args.temperature})")
    try:
        task = get_task(args.task)
        problems = task.problems(args.split, args.n, level=args.level)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model, tok = _load(args)
    engine = _engine(model, tok, args, max_running=args.max_running)
    start = time.perf_counter()
    report = evaluate(engine, task, problems, k=args.k, temperature=args.temperature, max_tokens=args.max_tokens,
                      template=args.template, seed=args.seed, split=args.split)
    if args.json:
        print(json.dumps({**report.to_dict(args.per_problem), "seconds": round(time.perf_counter() - start, 2)}))
    else:
        print(format_report(report))
        print(f"  ({time.perf_counter() - start:.1f} s)")
    return 0


def parser_export(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("export", help="write a model dir as a GGUF file for llama.cpp",
                        description="Write a model dir as one GGUF file (llama.cpp's deepseek2 architecture, with "
                                    "its tokenizer and chat template), for llama.cpp, Ollama and other GGUF "
                                    "runtimes. The MTP module is left out. docs/interop.md says what was checked.")
    sp.add_argument("--model", required=True, metavar="DIR", help="a model dir (or a training run dir)")
    sp.add_argument("--gguf", required=True, metavar="OUT", help="the .gguf file to write (atomically)")
    sp.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16",
                    help="weights: f32, f16 (default) or q8_0 (8-bit blocks of 32, llama.cpp's Q8_0); norms "
                         "and the router stay f32")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportError, write_gguf

    try:
        info = write_gguf(args.model, args.gguf, args.dtype, progress=not args.quiet)
    except ExportError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {info['path']}: {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB, {info['dtype']}, "
          f"{info['vocab']} tokens (pre-tokenizer {info['pre_tokenizer']}); the MTP module is left out")
    return 0


MAX_EVAL_N = 2000  # speedrun's evaluations: 2,000 problems x 4 stages is hours on 2 cores already


def parser_speedrun(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("speedrun", help="the main job: data to served reasoning model, with a report card",
                        description="Generate and curate a corpus, train a tokenizer, pretrain a DeepSeek-V3-style "
                                    "MoE + MLA model with MTP, then R1's recipe: R1-Zero (GRPO from the pretrained "
                                    "model), cold-start SFT on <= 500 labeled examples, GRPO, rejection sampling + "
                                    "SFT, a second GRPO stage, and distillation into a smaller student, each "
                                    "against its control (RFT; GRPO on the student). Every stage is scored on the "
                                    "same test problems (pass@1 and pass@k) and OUT/report/report.md has the tables "
                                    "and plots; the last model is OUT/final. Every stage is resumable: rerun the "
                                    "same command to continue. docs/speedrun.md says how long it takes; --quick "
                                    "takes a few minutes.")
    sp.add_argument("--out", default="runs/speedrun", metavar="DIR",
                    help="run directory; rerunning with the same DIR continues where it stopped "
                         "(default runs/speedrun)")
    sp.add_argument("--quick", action="store_true",
                    help="the `tiny` model and small budgets: checks the whole pipeline in a few minutes")
    sp.add_argument("--no-distill", dest="distill", action="store_false",
                    help="skip the distillation stages (student, distill, student_rl); a later rerun without "
                         "this flag adds them")
    sp.add_argument("--task", type=task_name,
                    help="what RL practises: a task, or a mixture of tasks and levels such as "
                         "arithmetic@2,arithmetic@3,sort@3,sort@4 (the first task is the headline; default: the "
                         "plan's)")
    sp.add_argument("--pretrain-steps", type=int, help="override the pretraining steps of the budget")
    sp.add_argument("--sft-steps", type=int, help="override the SFT steps of the budget")
    sp.add_argument("--grpo-steps", type=int,
                    help="override the steps of the GRPO stages (r1zero, rl, student_rl; the RFT control's SFT steps "
                         "follow it) of the budget")
    sp.add_argument("--eval-n", type=int, help="test problems per task in each evaluation (at most 2,000)")
    sp.add_argument("--seed", type=int, help="seed for data, initialisation and sampling (default 0)")
    sp.add_argument("--quiet", action="store_true", help="no progress bars or per-stage output")
    sp.set_defaults(func=cmd_speedrun)


def cmd_speedrun(args: argparse.Namespace) -> int:
    from . import speedrun

    for name in ("pretrain_steps", "sft_steps", "grpo_steps", "eval_n"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.eval_n is not None and args.eval_n > MAX_EVAL_N:
        raise UsageError(f"--eval-n must be <= {MAX_EVAL_N:,} (got {args.eval_n:,}): each problem is generated and "
                         f"answered at every evaluation stage; `nanoseek eval --n` takes larger runs of one model")
    try:
        plan = speedrun.make_plan(args.quick, **{k: getattr(args, k) for k in ("pretrain_steps", "sft_steps",
                                                                                "grpo_steps", "eval_n", "seed", "task")
                                                 if getattr(args, k) is not None})
    except speedrun.SpeedrunError as e:
        raise UsageError(str(e)) from None
    return speedrun.run(args.out, plan, distill=args.distill, quiet=args.quiet)


# `nanoseek --help` lists the commands in this order.
PARSERS = (parser_init, parser_tokenizer, parser_curate, parser_tokenize, parser_tasks, parser_cost, parser_pretrain,
           parser_sft, parser_generate, parser_chat, parser_serve, parser_grpo, parser_rft, parser_distill,
           parser_eval, parser_export, parser_plot, parser_speedrun)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek's LLM system in miniature.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in PARSERS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, TokenizerError, ShardError, TrainError, FloatingPointError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        checkpoint = sys.modules.get("nanoseek.checkpoint")  # loaded only by commands that use models
        if checkpoint is None or not isinstance(e, checkpoint.CheckpointError):
            raise
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
