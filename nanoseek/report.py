"""The speedrun's report card: OUT/report/report.md with tables, and PNG plots beside it.

Everything in it is read back from what the stages recorded (OUT/stages/*.json) and logged
(each run's metrics.jsonl); nothing is estimated here except the parameter and KV-cache
arithmetic of `nanoseek cost`.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

from .io import write_atomic

STAGE_NAMES = {"pretrain": "pretrained", "sft": "SFT", "more_sft": "SFT, twice as long (control)", "rl": "GRPO",
               "distill": "distilled student"}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _labeled_levels(plan) -> list[int]:
    """The levels the labeled set drew from: the plan's, or all of the task's when it has none of them
    (as `Speedrun._problems` does, e.g. --task countdown)."""
    from .data.tasks import TASKS
    task = TASKS[plan.task]
    return plan.levels_in(task) or list(task.levels)


def _num(x, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def write_report(out: str | Path, plan, records: dict[str, dict]) -> Path:
    import torch

    from .config import ModelConfig
    from .cost import estimate
    from .plot import plot_accuracy, plot_grpo, plot_run

    out = Path(out)
    rep = out / "report"
    rep.mkdir(exist_ok=True)
    cfg = ModelConfig.from_json(out / "pretrain")
    cost = estimate(cfg, seq_len=plan.seq_len, dtype="bf16")
    total = sum(r["seconds"] for r in records.values())
    lines = ["# nanoseek speedrun", "",
             f"`{out}` · {time.strftime('%Y-%m-%d %H:%M')} · {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"torch {torch.__version__}"
             + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
             + f" · total {total / 60:.1f} min", ""]

    lines += ["## Model", ""]
    lines += _table(["", "value"], [
        ["shape", f"`{plan.preset}`: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                  f"{cfg.n_routed_experts} routed experts (top {cfg.num_experts_per_tok}) + {cfg.n_shared_experts} "
                  f"shared, MLA latent {cfg.kv_lora_rank} + RoPE key {cfg.qk_rope_head_dim}, "
                  f"{cfg.num_nextn_predict_layers} MTP module"],
        ["parameters, total", f"{cost.params_total / 1e6:.2f} M"],
        ["parameters, activated per token", f"{cost.params_activated / 1e6:.2f} M "
                                            f"({cost.params_activated / cost.params_total:.0%})"],
        ["MTP module", f"{cost.params_mtp / 1e6:.2f} M"],
        ["KV cache per token (bf16), MLA", f"{cost.kv_bytes_per_token:,} B"],
        ["KV cache per token (bf16), standard MHA", f"{cost.kv_bytes_per_token_mha:,} B "
                                                     f"(MLA needs {cost.kv_bytes_per_token / cost.kv_bytes_per_token_mha:.1%})"],
        ["vocabulary", f"{records['tokenizer']['vocab_size']:,} tokens (byte-level BPE trained on the curated corpus)"],
    ])

    data, tokens = records["data"], records["tokens"]
    cur = data["curate"]
    labeled = data["sft_examples"]  # per task: examples, and how many of them worked
    own = labeled[plan.task]
    lines += ["## Stages", ""]
    rows = [["data", _num(data["seconds"]), "–", "–", "–",
             f"{data['raw_megabytes']:.1f} MB raw → {cur['bytes_out'] / 1e6:.1f} MB curated; "
             f"{cur['exact_duplicates']:,} exact + {cur['near_duplicates']:,} near duplicates and "
             f"{sum(cur['dropped'].values()):,} low-quality records removed; "
             f"SFT set {sum(c['examples'] for c in labeled.values())} examples ({own['worked']} of the "
             f"{own['examples']} `{plan.task}` ones worked, the rest the answer only)"],
            ["tokenizer", _num(records["tokenizer"]["seconds"]), "–", "–", "–",
             f"{records['tokenizer']['vocab_size']:,} tokens"],
            ["tokens", _num(tokens["seconds"]), _num(tokens["tokens"]), "–", "–", f"{tokens['documents']:,} documents"]]
    for name in ("pretrain", "sft", "more_sft"):
        r = records[name]
        rows.append([name, _num(r["seconds"]), _num(r["tokens"]), _num(r["tokens_per_s"]), _pct(r["mfu"]),
                     f"{r['steps']} steps, final next-token loss {_num(r['final_loss'], '.3f')}"
                     + (" (the control: more SFT on the same examples, from the SFT model)" if name == "more_sft"
                        else "")])
    r = records["rl"]
    rows.append(["rl (GRPO)", _num(r["seconds"]), _num(r["generated_tokens"]), _num(r["tokens_per_s"]), "–",
                 f"{r['steps']} steps of {plan.grpo_prompts} problems × {plan.grpo_group}"
                 + (f" (from step {plan.grpo_stage2 + 1}: up to {plan.grpo_resample} more draws while groups lack "
                    f"reward variance; the reference refreshed to the policy every {plan.grpo_stage2} steps)"
                    if plan.grpo_resample and r["steps"] > plan.grpo_stage2 else "")
                 + "; reward "
                 f"{_num(r['first_reward'], '.2f')} → {_num(r['last_reward'], '.2f')}, response length "
                 f"{_num(r['first_length'], '.0f')} → {_num(r['last_length'], '.0f')} tokens (first → last 10 steps); "
                 f"rollouts {_pct(r['rollout_share'])} of the time"])
    if "distill" in records:
        d = records["distill"]
        rows.append(["distill", _num(d["seconds"]), "–", "–", "–",
                     f"skipped: {d['skipped']}" if "skipped" in d else
                     f"student: `{plan.preset}` at {plan.distill_layers} layer(s) "
                     f"({d['report']['student_parameters'] / 1e6:.2f} M parameters) pretrained "
                     f"{plan.distill_pretrain_steps} steps, then "
                     f"SFT'd on {d['report']['examples']} verified samples of the GRPO model; {plan.task} "
                     f"pass@1 {_pct(d['student_pretrained_eval'][plan.task]['pass1'])} pretrained → "
                     f"{_pct(d['eval'][plan.task]['pass1'])} distilled"])
    rows.append(["report", _num(records.get("report", {}).get("seconds", 0)), "–", "–", "–", ""])
    lines += ["Wall time includes the evaluation after each training stage. Tokens: trained on (pretrain, "
              "SFT) or generated in rollouts (GRPO). MFU against this machine's measured matmul peak.", ""]
    lines += _table(["stage", "seconds", "tokens", "tokens/s", "MFU", "notes"], rows)

    evaluated = [s for s in ("pretrain", "sft", "more_sft", "rl", "distill") if s in records and "eval" in records[s]]
    tasks = list(records[evaluated[0]]["eval"])
    lines += ["## Accuracy", "",
              "Greedy pass@1 on fixed held-out test problems (how many in brackets; the test split never appears in "
              f"the corpus or the SFT set); the pretrained model sees the problem as the corpus writes it, the "
              f"others in the chat template. Format: the share of answers in `<think>…</think> "
              f"<answer>…</answer>` form. The labeled set held {own['examples']} `{plan.task}` problems of levels "
              f"{', '.join(map(str, _labeled_levels(plan)))} with their answers, {own['worked']} of them with the worked "
              f"solution too (the others only its one-line conclusion); GRPO practised on unlabeled "
              f"level-{plan.grpo_level} `{plan.task}` problems (rewarded by the verifier only).", ""]
    rows = []
    for task in tasks:
        rows.append([f"{task} ({records[evaluated[0]]['eval'][task]['n']})"] + [f"{_pct(records[s]['eval'][task]['pass1'])} (format {_pct(records[s]['eval'][task]['format'])})"
                              for s in evaluated])
    main = records[evaluated[0]]["eval"][tasks[0]]["by_level"]
    for level in main:
        rows.append([f"{tasks[0]} level {level}"] + [_pct(records[s]["eval"][tasks[0]]["by_level"].get(level))
                                                     for s in evaluated])
    practised = {s: records[s]["eval"][tasks[0]].get("practised") for s in evaluated}
    if all(practised.values()):
        first = next(iter(practised.values()))
        rows.append([f"**{tasks[0]} level {first['level']}, {first['n']} problems (GRPO's level)**"]
                    + [_pct(practised[s]["pass1"]) for s in evaluated])
    lines += _table(["task"] + [STAGE_NAMES[s] for s in evaluated], rows)
    if all(practised.get(s) for s in ("sft", "more_sft", "rl")):
        rl, more = (100 * (practised[s]["pass1"] - practised["sft"]["pass1"]) for s in ("rl", "more_sft"))
        lines += [f"On GRPO's level, from the SFT model: GRPO {rl:+.1f} points, more SFT on the same labeled "
                  f"examples {more:+.1f} points.", ""]

    gap = records["sft"].get("gap")
    if gap:
        lines += [f"Before GRPO, the SFT model on {gap['n']} *train* problems of level {gap['level']}: greedy "
                  f"{_pct(gap['greedy'])}, pass@{gap['k']} at temperature 1 {_pct(gap['pass_k'])} — a gap of "
                  f"{100 * (gap['pass_k'] - gap['greedy']):.1f} points, about the most GRPO can add by sharpening "
                  f"what sampling already finds (docs/grpo.md).", ""]

    spec = records["rl"].get("speculative")
    if spec:
        lines += ["## MTP self-speculative decoding", "",
                  "The GRPO model decoding test prompts one at a time, greedy: the MTP module drafts the "
                  "token after next and the main model verifies it in the same forward.", ""]
        lines += _table(["", "value"], [
            ["drafts accepted", _pct(spec["acceptance_rate"])],
            ["tokens/s plain → speculative", f"{spec['plain']['tokens'] / spec['plain']['seconds']:.0f} → "
                                             f"{spec['speculative']['tokens'] / spec['speculative']['seconds']:.0f} "
                                             f"({spec['speedup']:.2f}x)"],
            ["same tokens as plain greedy", "yes" if spec["identical_outputs"] else "NO"]])

    plots = []
    for path in plot_run(out / "pretrain"):
        shutil.copy(path, rep / f"pretrain_{path.name}")
        plots.append(f"pretrain_{path.name}")
    for path in plot_run(out / "sft"):
        if path.name == "loss.png":
            shutil.copy(path, rep / "sft_loss.png")
            plots.append("sft_loss.png")
    for path in plot_run(out / "more_sft"):
        if path.name == "loss.png":
            shutil.copy(path, rep / "more_sft_loss.png")
            plots.append("more_sft_loss.png")
    for path in plot_grpo(out / "rl"):
        shutil.copy(path, rep / f"rl_{path.name}")
        plots.append(f"rl_{path.name}")
    plot_accuracy({STAGE_NAMES[s]: {t: records[s]["eval"][t]["pass1"] for t in tasks} for s in evaluated},
                  rep / "accuracy.png")
    plots.append("accuracy.png")
    titles = {"pretrain_loss.png": "Pretraining loss (next token and MTP)", "pretrain_lr.png": "Learning rate",
              "pretrain_expert_load.png": "Expert load during pretraining (1 = an even share)",
              "sft_loss.png": "SFT loss", "more_sft_loss.png": "Control: SFT loss, continued on the same examples", "rl_reward.png": "GRPO reward, accuracy and format rate",
              "rl_response_length.png": "GRPO response length", "accuracy.png": "Test accuracy after each stage"}
    lines += ["## Plots", ""]
    for name in plots:
        lines += [f"### {titles.get(name, name)}", "", f"![{name}]({name})", ""]
    path = rep / "report.md"
    write_atomic(path, "\n".join(lines))
    return path
