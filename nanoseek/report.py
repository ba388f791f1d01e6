"""The speedrun's report card: OUT/report/report.md with tables, and PNG plots beside it.

Everything in it is read back from what the stages recorded (OUT/stages/*.json) and logged
(each run's metrics.jsonl and eval.jsonl); nothing is estimated here except the parameter and
KV-cache arithmetic of `nanoseek cost` and the standard errors (binomial, from the test problems'
count). The reading of what RL added is written from the numbers by fixed rules, so it says
"does not hold" whenever the numbers say so.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import time
from pathlib import Path

from .io import write_atomic

STAGE_NAMES = {"base": "pretrained", "r1zero": "R1-Zero (GRPO from base)", "sft": "cold-start SFT",
               "rl": "GRPO", "rft": "RFT (control)", "rejection": "rejection sampling + SFT", "rl2": "GRPO, second",
               "student": "student, pretrained", "distill": "student, distilled",
               "student_rl": "student, SFT + GRPO (control)"}
R1_STAGES = ("base", "r1zero", "sft", "rl", "rft", "rejection", "rl2")
STUDENT_STAGES = ("student", "distill", "student_rl")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def _se(p: float, n: int) -> float:
    """The binomial standard error of a rate p measured on n problems."""
    return math.sqrt(max(p * (1 - p), 0.25 / n) / n) if n else float("nan")


def _diff(a: dict, b: dict) -> tuple[float, float]:
    """pass@1 difference a - b in points and its standard error: paired over the same test problems (the spread
    of the per-problem differences), or, without per-problem results, the two rates' errors combined."""
    d = 100 * (a["pass1"] - b["pass1"])
    if len(a.get("correct", [])) == len(b.get("correct", [])) == a["n"] > 1:
        diffs = [x - y for x, y in zip(a["correct"], b["correct"])]
        mean = sum(diffs) / len(diffs)
        var = sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)
        return d, 100 * math.sqrt(max(var, 0.25 / len(diffs)) / len(diffs))
    return d, 100 * math.hypot(_se(a["pass1"], a["n"]), _se(b["pass1"], b["n"]))


def _model_section(out: Path, plan, records: dict) -> list[str]:
    from .config import ModelConfig
    from .cost import estimate

    cfg = ModelConfig.from_json(out / "pretrain")
    cost = estimate(cfg, seq_len=plan.seq_len, dtype="bf16")
    return ["## Model", ""] + _table(["", "value"], [
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


def _grpo_note(r: dict, plan) -> str:
    return (f"{r['steps']} steps of {plan.grpo_prompts} problems × {plan.grpo_group} ({r['samples']:,} samples, "
            f"`{r['template']}` template); reward {_num(r['first_reward'], '.2f')} → "
            f"{_num(r['last_reward'], '.2f')}, "
            f"response length {_num(r['first_response_length'], '.0f')} → {_num(r['last_response_length'], '.0f')} "
            f"tokens (first → last 10 steps)")


def _sampled_note(r: dict, what: str) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    return (f"{r['correct_samples']:,} of {r['samples']:,} samples verified on {r['problems']:,} {what}; "
            f"{r['examples']:,} kept, {r['steps']} SFT steps")


def _stages_section(plan, records: dict) -> list[str]:
    data, tokens = records["data"], records["tokens"]
    cur = data["curate"]
    notes = {
        "data": f"{data['raw_megabytes']:.1f} MB raw → {cur['bytes_out'] / 1e6:.1f} MB curated; "
                f"{cur['exact_duplicates']:,} exact + {cur['near_duplicates']:,} near duplicates and "
                f"{sum(cur['dropped'].values()):,} low-quality records removed; labeled set: "
                + ", ".join(f"{n} `{t}`" for t, n in data["sft_examples"].items()) + " problems, each worked",
        "tokenizer": f"{records['tokenizer']['vocab_size']:,} tokens",
        "tokens": f"{tokens['tokens']:,} tokens in {tokens['documents']:,} documents",
    }
    for name in ("pretrain", "sft", "student"):
        if name in records:
            r = records[name]
            notes[name] = (f"{r['steps']} steps, {r['tokens']:,} tokens at {_num(r['tokens_per_s'])} tokens/s "
                           f"(MFU {_pct(r['mfu'])}), final next-token loss {_num(r['final_loss'], '.3f')}")
    if "student" in records:
        notes["student"] = f"{plan.distill_layers} layer(s) of `{plan.preset}`: " + notes["student"]
    for name in ("r1zero", "rl", "rl2", "student_rl"):
        if name in records:
            notes[name] = _grpo_note(records[name], plan)
    for name, what in (("rft", "train problems by the SFT model (as many samples as GRPO drew)"),
                       ("rejection", "unlabeled train problems by the GRPO model; SFT from the pretrained model "
                                     "with the labeled set"),
                       ("distill", "unlabeled train problems by the final model")):
        if name in records:
            notes[name] = _sampled_note(records[name], what)
    if "final" in records:
        notes["final"] = f"`final/` is the `{records['final']['from']}` model"
    rows = [[name, _num(r["seconds"]), notes.get(name, "")] for name, r in records.items()]
    total = sum(r["seconds"] for r in records.values())
    return ["## Stages", "", f"Wall time includes each stage's scoring; {total / 60:.1f} minutes in all.", ""] + \
        _table(["stage", "seconds", "notes"], rows)


def _accuracy_rows(records: dict, stages: list[str], k: int) -> list[list]:
    first = records[stages[0]]["eval"]
    rows = []
    for task, ev in first.items():
        rows.append([f"**{task}** ({ev['n']})"] + [f"{_pct(records[s]['eval'][task]['pass1'])} / "
                                                   f"{_pct(records[s]['eval'][task]['pass_k'])}" for s in stages])
        for lv, cell in ev["levels"].items():
            per = [records[s]["eval"][task]["levels"].get(lv) for s in stages]
            rows.append([f"{task} level {lv} ({cell['n']})"]
                        + [f"{_pct(c['pass1'])} / {_pct(c['pass_k'])}" if c else "–" for c in per])
    return rows


def _templates(base: dict) -> str:
    """The templates a pretrained model was scored in, as words: the plain, the R1-Zero and the chat template."""
    names = {"plain": "plain", "r1-zero": "R1-Zero", "chat": "chat"}
    tried = [names[t] for t in names if t in base]
    return ("the " + ", the ".join(tried[:-1]) + " and the " + tried[-1] if len(tried) > 1 else f"the {tried[0]}") + " template"


def _accuracy_section(plan, records: dict) -> list[str]:
    k = plan.eval_k
    lines = ["## Accuracy", "",
             f"Every stage on the same fixed test problems (how many in brackets; the test split never appears in "
             f"the corpus, the labeled set or any RL prompt): greedy pass@1 / pass@{k} at temperature 1 (unbiased "
             f"estimator). The pretrained models are scored under the {_templates(records['base'])} and counted "
             f"under their best one (here: `{records['base']['template']}`); R1-Zero in the template it trained "
             f"in; every other stage in the chat template. pass@1 rising towards pass@{k} is sharpening what sampling "
             f"already finds; pass@{k} rising is new capability.", ""]
    def header(stages: list[str]) -> list[str]:  # a stage that had nothing to train on is the model it went on from
        return ["test problems"] + [STAGE_NAMES[s] + (f" (nothing verified: = {records[s]['instead']})"
                                                      if "instead" in records[s] else "") for s in stages]

    stages = [s for s in R1_STAGES if s in records]
    lines += _table(header(stages), _accuracy_rows(records, stages, k))
    stages = [s for s in STUDENT_STAGES if s in records]
    if stages:
        lines += ["Distillation: the student is the teacher's shape at "
                  f"{plan.distill_layers} layer(s), pretrained on the same tokens.", ""]
        lines += _table(header(stages), _accuracy_rows(records, stages, k))
    return lines


def _claim(name: str, a: dict, b: dict, margin: float = 0.0) -> str:
    """One line: a claim, the measured difference with its standard error, and whether it holds: at least
    `margin` points, and more than two standard errors above 0."""
    d, se = _diff(a, b)
    holds = d >= margin and d - 2 * se > 0
    return f"- {name}: {d:+.1f} ± {se:.1f} points — **{'holds' if holds else 'does not hold'}**"


def _reading_section(plan, records: dict) -> list[str]:
    """What RL added, read from the numbers by fixed rules (the issue's acceptance criteria)."""
    head = plan.headline
    last = records["final"]["from"] if "final" in records else ("rl2" if "rl2" in records else "rl")
    if last not in records or "base" not in records:
        return []
    pre = max(("base", "sft"), key=lambda s: records[s]["eval"][head]["pass1"])
    lines = ["## What RL added", "",
             f"Each claim is a difference in greedy pass@1 with its standard error, paired over the same test "
             f"problems of this one run; it holds when it reaches its margin and is more than two standard errors "
             f"above 0. experiments/r1.py repeats the comparisons over seeds (docs/r1.md). The best stage before "
             f"RL on `{head}` is the {STAGE_NAMES[pre]} model.", ""]
    ev = {s: records[s]["eval"] for s in records if "eval" in records[s]}
    lines.append(_claim(f"final ({STAGE_NAMES[last]}) over the best pre-RL stage, `{head}`, by >= 10 points",
                        ev[last][head], ev[pre][head], margin=10))
    for task in ev[last]:
        if task != head:
            best = max(("base", "sft"), key=lambda s: ev[s][task]["pass1"])
            lines.append(_claim(f"final over the best pre-RL stage, `{task}`",
                                ev[last][task], ev[best][task]))
    fails = []
    for s in (x for x in R1_STAGES if x in ev and x not in (last, "rft")):  # the control is no stage of the recipe
        for task, e in ev[last].items():
            for label, mine, theirs in [(task, e, ev[s][task])] + [
                    (f"{task} level {lv}", c, ev[s][task]["levels"].get(lv)) for lv, c in e["levels"].items()]:
                d, se = _diff(mine, theirs) if theirs else (0.0, 0.0)
                if d < -se:
                    fails.append(f"{label} under {STAGE_NAMES[s]} ({d:+.1f} ± {se:.1f})")
    lines.append("- final at least every earlier stage on every task and level, within one standard error: "
                 + ("**holds**" if not fails else "**does not hold**: " + "; ".join(fails)))
    if "rft" in ev:
        lines.append(_claim(f"GRPO over the compute-matched RFT control, `{head}`", ev["rl"][head], ev["rft"][head]))
    if "r1zero" in ev:
        lines.append(_claim(f"R1-Zero over the pretrained model, `{head}`, by >= 15 points", ev["r1zero"][head],
                            ev["base"][head], margin=15))
    if "distill" in ev and "student_rl" in ev:
        lines.append(_claim(f"the distilled student over GRPO on the student, `{head}`", ev["distill"][head],
                            ev["student_rl"][head]))
        lines.append(_claim(f"the distilled student over its own base, `{head}`, by >= 10 points",
                            ev["distill"][head], ev["student"][head], margin=10))
    k, a, b = plan.eval_k, ev[last][head], ev[pre][head]
    rise1, se1 = _diff(a, b)
    risek = 100 * (a["pass_k"] - b["pass_k"])
    sek = 100 * math.hypot(_se(a["pass_k"], a["n"]), _se(b["pass_k"], b["n"]))
    up1, upk = rise1 > 2 * se1, risek > 2 * sek
    verdict = ("RL sharpened what sampling already found." if up1 and not upk
               else "sampling finds more than before, too." if upk
               else "neither moved by more than two standard errors.")
    lines += ["", f"On `{head}`, from the best pre-RL stage to the final model, pass@1 moved {rise1:+.1f} ± {se1:.1f} "
                  f"points and pass@{k} {risek:+.1f} ± {sek:.1f}: {verdict}", ""]
    return lines


def _samples_section(records: dict, last: str) -> list[str]:
    lines = ["## Sampled completions, before and after RL", "",
             "Greedy completions to the same test problems: the pretrained model (in its better template) and the "
             "final model.", ""]
    for task, ev in records["base"]["eval"].items():
        after = records[last]["eval"][task].get("examples", [])
        for before, fin in list(zip(ev.get("examples", []), after))[:2]:
            lines += [f"**{task}** — `{before['prompt']}`", "",
                      f"pretrained ({'right' if before['correct'] else 'wrong'}):", "", "```",
                      before["completion"].strip(), "```", "",
                      f"final ({'right' if fin['correct'] else 'wrong'}):", "", "```", fin["completion"].strip(), "```",
                      ""]
    return lines


def _speculative_section(spec: dict) -> list[str]:
    return ["## MTP self-speculative decoding", "",
            "The final model decoding test prompts one at a time, greedy: the MTP module drafts the token after "
            "next and the main model verifies it in the same forward.", ""] + _table(["", "value"], [
        ["drafts accepted", _pct(spec["acceptance_rate"])],
        ["tokens/s plain → speculative", f"{spec['plain']['tokens'] / spec['plain']['seconds']:.0f} → "
                                         f"{spec['speculative']['tokens'] / spec['speculative']['seconds']:.0f} "
                                         f"({spec['speedup']:.2f}x)"],
        ["same tokens as plain greedy", "yes" if spec["identical_outputs"] else "NO"]])


def _plots(out: Path, rep: Path, records: dict, plan) -> list[str]:
    from .plot import plot_accuracy, plot_curves, plot_grpo, plot_run

    plots = []

    def keep(path: Path, name: str) -> None:
        shutil.copy(path, rep / name)
        plots.append(name)

    for path in plot_run(out / "pretrain"):
        keep(path, f"pretrain_{path.name}")
    for name in ("r1zero", "rl", "rl2"):
        if name in records:
            for path in plot_grpo(out / name):
                keep(path, f"{name}_{path.name}")
    curves = {STAGE_NAMES[n]: out / n / "eval.jsonl" for n in ("r1zero", "rl", "rl2") if n in records}
    plot_curves(curves, rep / "heldout.png")
    plots.append("heldout.png")
    head = plan.headline
    evaluated = [s for s in (*R1_STAGES, *STUDENT_STAGES) if s in records]
    plot_accuracy({STAGE_NAMES[s]: {t: records[s]["eval"][t]["pass1"] for t in records[s]["eval"]} for s in evaluated},
                  rep / "accuracy.png")
    plots.append("accuracy.png")
    titles = {"pretrain_loss.png": "Pretraining loss (next token and MTP)", "pretrain_lr.png": "Learning rate",
              "pretrain_expert_load.png": "Expert load during pretraining (1 = an even share)",
              "heldout.png": f"Held-out greedy pass@1 and response length over the GRPO steps (`{head}` and the "
                             f"mixture RL practises)",
              "accuracy.png": "Test pass@1 after each stage"}
    for name in ("r1zero", "rl", "rl2"):
        titles[f"{name}_reward.png"] = f"{STAGE_NAMES[name]}: reward, accuracy and format rate of the rollouts"
        titles[f"{name}_response_length.png"] = f"{STAGE_NAMES[name]}: rollout response length"
    lines = ["## Plots", ""]
    for name in plots:
        lines += [f"### {titles.get(name, name)}", "", f"![{name}]({name})", ""]
    return lines


def write_report(out: str | Path, plan, records: dict[str, dict]) -> Path:
    import torch

    out = Path(out)
    rep = out / "report"
    rep.mkdir(exist_ok=True)
    lines = ["# nanoseek speedrun", "",
             f"`{out}` · {time.strftime('%Y-%m-%d %H:%M')} · {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
             "", f"RL practises `{plan.task}` (rule rewards only; no labels). The headline task is `{plan.headline}`.",
             ""]
    lines += _model_section(out, plan, records)
    lines += _stages_section(plan, records)
    lines += _accuracy_section(plan, records)
    lines += _reading_section(plan, records)
    if "final" in records:
        lines += _samples_section(records, records["final"]["from"])
        lines += _speculative_section(records["final"]["speculative"])
    lines += _plots(out, rep, records, plan)
    path = rep / "report.md"
    write_atomic(path, "\n".join(lines))
    return path
