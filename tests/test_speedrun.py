"""`nanoseek speedrun --quick`: R1's whole recipe, its report, Ctrl-C + rerun, and the final model dir."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import load_model
from nanoseek.cli import main
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.tokenizer import Tokenizer
from nanoseek.speedrun import MODEL_FILES
from nanoseek.train.common import complete_checkpoints

STAGES = ["data", "tokenizer", "tokens", "pretrain", "base", "r1zero", "sft", "rl", "rft", "rejection", "rl2", "final",
          "report"]
DISTILL = ["student", "distill", "student_rl"]


def _speedrun(out: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanoseek", "speedrun", "--quick", "--out", str(out), "--quiet",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def interrupted_then_finished(tmp_path_factory):
    """A quick speedrun without distillation stopped by Ctrl-C during pretraining, then rerun to the end."""
    out = tmp_path_factory.mktemp("speedrun") / "run"
    proc = _speedrun(out, "--no-distill")
    deadline = time.monotonic() + 300
    while not complete_checkpoints(out / "pretrain"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "pretraining never wrote a checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err1 = proc.communicate(timeout=300)
    first = proc.returncode
    stopped_at = len((out / "pretrain" / "metrics.jsonl").read_text().splitlines())
    proc = _speedrun(out, "--no-distill")
    out2, err2 = proc.communicate(timeout=600)
    assert proc.returncode == 0, err2
    return out, first, err1, stopped_at


def test_ctrl_c_stops_and_a_rerun_continues(interrupted_then_finished):
    out, first, err, stopped_at = interrupted_then_finished
    assert first == 130 and "run the same command again to continue" in err
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((out / "speedrun.json").read_text())["plan"]
    assert 0 < stopped_at < plan["pretrain_steps"]
    assert [r["step"] for r in rows] == list(range(1, plan["pretrain_steps"] + 1))  # continued, nothing redone
    assert sorted(p.stem for p in (out / "stages").iterdir()) == sorted(STAGES)


def test_ctrl_c_on_a_stages_last_step_keeps_the_stage_and_stops_the_run(tmp_path, monkeypatch, capsys):
    """A loop whose last step is under way when Ctrl-C comes finishes it; the speedrun must not go on."""
    from nanoseek.speedrun import Speedrun, make_plan, run
    from nanoseek.train.common import graceful_sigint

    def data_then_ctrl_c(self):
        with graceful_sigint() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop["now"]  # the loop would save and leave here: its work is done
        return {"stopped_in": "data"}

    def never(self):
        raise AssertionError("the speedrun went on after Ctrl-C")

    monkeypatch.setattr(Speedrun, "stage_data", data_then_ctrl_c)
    monkeypatch.setattr(Speedrun, "stage_tokenizer", never)
    assert run(tmp_path / "run", make_plan(True), distill=False, quiet=True) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "stages" / "data.json").read_text())["stopped_in"] == "data"


def test_report_has_every_table_and_plot(interrupted_then_finished):
    out = interrupted_then_finished[0]
    report = (out / "report" / "report.md").read_text()
    for heading in ("## Model", "## Stages", "## Accuracy", "## What RL added", "## Sampled completions",
                    "## MTP self-speculative decoding", "## Plots"):
        assert heading in report
    for needle in ("parameters, total", "parameters, activated per token", "KV cache per token (bf16), MLA",
                   "standard MHA", "drafts accepted", "| pretrain |", "| r1zero |", "| sft |", "| rl |", "| rft |",
                   "| rejection |", "| rl2 |", "| **arithmetic** (16) |", "| arithmetic level 2 (8) |",
                   "| **sort** (16) |", "greedy pass@1 / pass@2", "R1-Zero over the pretrained model",
                   "GRPO over the compute-matched RFT control", "`final/` is the `rl2` model",
                   "labeled set: 80 `arithmetic`, 20 `sort` problems, each worked"):
        assert needle in report, needle
    images = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert {"pretrain_loss.png", "pretrain_expert_load.png", "r1zero_reward.png", "rl_reward.png",
            "rl_response_length.png", "heldout.png", "accuracy.png"} <= set(images)
    for name in images:
        assert (out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_stage_is_scored_under_one_protocol(interrupted_then_finished):
    """The same test problems for every stage, pass@1 and pass@k, the chat template after the base; the base under
    both templates; the R1-Zero curve; the RFT control asked for as many samples as GRPO drew; every fine-tuning
    stage in the plan's precision."""
    out = interrupted_then_finished[0]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "stages").iterdir()}
    base = records["base"]
    assert base["template"] in ("plain", "r1-zero") and base["eval"] == base[base["template"]]
    for stage in ("base", "r1zero", "sft", "rl", "rft", "rejection", "rl2"):
        for task in ("arithmetic", "sort"):
            ev = records[stage]["eval"][task]
            assert ev["n"] == 16 and ev["k"] == 2 and 0 <= ev["pass1"] <= 1 and 0 <= ev["pass_k"] <= 1
            assert ev["template"] == {"base": base["template"], "r1zero": base["template"]}.get(stage, "chat")
            assert [e["prompt"] for e in ev["examples"]] == [e["prompt"] for e in base["eval"][task]["examples"]]
        assert set(records[stage]["eval"]["arithmetic"]["levels"]) == {"1", "2"}
    curve = records["r1zero"]["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2, 3] and all("mean_tokens" in c for c in curve)
    assert records["rft"]["asked"] == records["rl"]["samples"]
    trained = [r for r in ("rft", "rejection") if "skipped" not in records[r]]  # a quick run may verify nothing
    for run in ("pretrain", "sft", *trained):  # the plan's precision, not the host's load at the time
        assert json.loads((out / run / "precision.json").read_text())["reason"] == "--precision fp32", run
    spec = records["final"]["speculative"]
    assert spec["identical_outputs"] and 0 <= spec["acceptance_rate"] <= 1


def test_the_labeled_set_is_worked_and_apart_from_the_test_problems(interrupted_then_finished):
    from nanoseek.data.tasks import TASKS

    out = interrupted_then_finished[0]
    sft = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 100
    seed = -1_000_000  # the labeled set's draw: none a GRPO step or a sampling stage makes
    labeled = [p for lv in (1, 2) for p in TASKS["arithmetic"].problems("train", 40, level=lv, seed=seed, strict=False)]
    sorts = [p for lv in (3, 4) for p in TASKS["sort"].problems("train", 10, level=lv, seed=seed)]  # the plan's levels
    by_prompt = {p.prompt: p for p in labeled + sorts}
    counts = {"arithmetic": 0, "sort": 0}
    for m in sft:  # every label a real labeled set's: the worked solution, right
        problem = by_prompt[m["messages"][0]["content"]]
        task = TASKS[problem.task]
        assert m["messages"][1]["content"] == task.solution(problem) and task.verify(problem, task.solution(problem))
        counts[task.name] += 1
    assert counts == {"arithmetic": 80, "sort": 20}
    records = json.loads((out / "stages" / "data.json").read_text())
    assert records["sft_examples"] == counts
    prompts = {m["messages"][0]["content"] for m in sft}
    test = {p.prompt for t in TASKS.values() for p in t.problems("test", 300)}
    assert not prompts & test


def test_a_finished_speedrun_reruns_nothing(interrupted_then_finished):
    out = interrupted_then_finished[0]
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}
    proc = _speedrun(out, "--no-distill")
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "stages").iterdir()} == before


def test_adding_distill_later_runs_it_and_rewrites_the_report(interrupted_then_finished):
    out = interrupted_then_finished[0]
    before = (out / "stages" / "sft.json").stat().st_mtime_ns
    proc = _speedrun(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for name in DISTILL:
        assert (out / "stages" / f"{name}.json").exists()
    distill = json.loads((out / "stages" / "distill.json").read_text())
    assert distill["asked"] == 16 * 2 and distill["eval"]["arithmetic"]["n"] == 16  # skipped or not, it is scored
    report = (out / "report" / "report.md").read_text()
    assert "student, distilled" in report and "the distilled student over GRPO on the student" in report
    assert (out / "stages" / "sft.json").stat().st_mtime_ns == before


def test_other_settings_on_the_same_dir_are_refused(interrupted_then_finished, capsys):
    out = interrupted_then_finished[0]
    assert main(["speedrun", "--quick", "--out", str(out), "--quiet", "--pretrain-steps", "7"]) == 2
    err = capsys.readouterr().err
    assert "pretrain_steps: 60 there, 7 now" in err and "pick a new --out" in err


def test_the_final_model_loads_in_transformers_with_the_same_greedy_tokens(interrupted_then_finished):
    transformers = pytest.importorskip("transformers")
    rl = interrupted_then_finished[0] / "final"
    assert sorted(p.name for p in rl.iterdir()) == sorted([*MODEL_FILES, "model.safetensors"])
    tok = Tokenizer.load(rl)
    prompt = tok.render_chat([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True)[0]
    engine = Engine(load_model(rl), tok)
    ours = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0].output  # up to EOS
    hf = transformers.AutoModelForCausalLM.from_pretrained(rl, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(rl)
    theirs_prompt = hf_tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=True,
                                               add_generation_prompt=True)
    assert (theirs_prompt if isinstance(theirs_prompt, list) else theirs_prompt["input_ids"]) == prompt
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id,
                             pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    if tok.eos_id in theirs:  # both stop at the end of the answer, the EOS token included
        theirs = theirs[: theirs.index(tok.eos_id) + 1]
    assert len(ours) >= 5 and ours == theirs


def test_speedrun_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["speedrun", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--quick", "--no-distill", "--task", "--pretrain-steps", "--sft-steps", "--grpo-steps",
                 "--eval-n", "--seed", "--quiet"):
        assert flag in text


def test_bad_step_counts_are_refused(tmp_path, capsys):
    assert main(["speedrun", "--quick", "--out", str(tmp_path / "x"), "--grpo-steps", "0"]) == 2
    assert "--grpo-steps must be >= 1" in capsys.readouterr().err
    assert main(["speedrun", "--quick", "--out", str(tmp_path / "x"), "--eval-n", "100000"]) == 2
    assert "--eval-n must be <= 2,000 (got 100,000)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_plans_operation_weights_reach_the_curated_corpus(tmp_path):
    import gzip
    import re

    from nanoseek.speedrun import Speedrun, make_plan

    plan = make_plan(True, corpus_ops=(("-", 1.0), ("+", 0.0), ("x", 0.0)), corpus_mb=0.3)
    Speedrun(tmp_path / "run", plan, distill=False, quiet=True).stage_data()
    text = "".join(gzip.open(f, "rt").read() for f in (tmp_path / "run" / "data" / "curated").glob("*.jsonl.gz"))
    ops = re.findall(r"What is [0-9]+ ([-+x]) [0-9]+\?", text)
    assert len(ops) > 50 and set(ops) == {"-"}


def test_the_plans_task_levels_reach_the_curated_corpus(tmp_path):
    import gzip
    import re

    from nanoseek.speedrun import Speedrun, make_plan

    plan = make_plan(True, corpus_tasks=(("arithmetic", (4,)),), corpus_mb=0.3)
    Speedrun(tmp_path / "run", plan, distill=False, quiet=True).stage_data()
    text = "".join(gzip.open(f, "rt").read() for f in (tmp_path / "run" / "data" / "curated").glob("*.jsonl.gz"))
    operands = re.findall(r"What is ([0-9]+) [-+x] ([0-9]+)\?", text)
    assert len(operands) > 50 and {len(a) for a, _ in operands} == {4}
    assert "Sort " not in text


def test_a_bad_task_is_refused_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["speedrun", "--quick", "--out", str(tmp_path / "x"), "--task", "arithmetic@9"])
    assert "arithmetic has levels [1, 2, 3, 4, 5]" in capsys.readouterr().err
    from nanoseek.speedrun import make_plan

    plan = make_plan(True, task="sort@3,arithmetic@2", seed=3)
    assert plan.headline == "sort" and plan.seed == 3
    assert not (tmp_path / "x").exists()


def test_the_labeled_set_and_the_test_problems_hold_the_levels_the_plan_names(tmp_path):
    """Another task's levels come from the plan's eval_levels (the corpus's levels in the plans), else all of them."""
    from nanoseek.data.tasks import TASKS
    from nanoseek.speedrun import Speedrun, make_plan

    plan = make_plan(True, corpus_mb=0.2, eval_levels=(("sort", (3,)),))
    run = Speedrun(tmp_path / "run", plan, distill=False, quiet=True)
    run.stage_data()
    prompts = [json.loads(line)["messages"][0]["content"] for line in run.labeled.read_text().splitlines()]
    sorts = [q for q in prompts if q.startswith("Sort ")]
    assert len(sorts) == plan.sft_examples // 5 and {q.count(",") + 1 for q in sorts} == {3}
    assert run.protocol.levels() == {"arithmetic": list(plan.levels), "sort": [3]}
    whole = Speedrun(tmp_path / "all", make_plan(True, eval_levels=()), quiet=True).protocol
    assert whole.levels()["sort"] == list(TASKS["sort"].levels)


def test_claims_hold_only_past_their_margin_and_two_paired_standard_errors():
    from nanoseek.report import _claim, _diff
    from nanoseek.rl.recipe import Protocol

    a = {"pass1": 0.6, "n": 10, "correct": [1] * 6 + [0] * 4}
    b = {"pass1": 0.2, "n": 10, "correct": [1] * 2 + [0] * 8}
    d, se = _diff(a, b)  # per-problem differences 0,0,1,1,1,1,0,0,0,0: variance 0.2667, se sqrt(0.02667)
    assert d == pytest.approx(40.0) and se == pytest.approx(16.33, abs=0.01)
    assert _diff({"pass1": 0.6, "n": 10}, {"pass1": 0.2, "n": 10})[1] == pytest.approx(20.0)  # unpaired: 0.2
    assert "**holds**" in _claim("x", a, b) and "**holds**" in _claim("x", a, b, margin=40)
    assert "does not hold" in _claim("x", a, b, margin=41) and "does not hold" in _claim("x", b, a)
    near = {"pass1": 0.3, "n": 10, "correct": [1] * 3 + [0] * 7}  # +10 points on one problem: within 2 se
    assert "does not hold" in _claim("x", near, b)
    with pytest.raises(ValueError, match="k >= 2"):
        Protocol.build(4, "arithmetic", [1], ["sort"], k=1)


def test_a_run_written_before_a_setting_existed_continues_under_its_default(tmp_path):
    """speedrun.json from before a plan setting was added holds no value for it: it ran with the default."""
    from dataclasses import asdict, replace

    from nanoseek.speedrun import PLANS, Speedrun, SpeedrunError

    old = {k: v for k, v in json.loads(json.dumps(asdict(PLANS["quick"]))).items() if k != "corpus_checked"}
    (tmp_path / "speedrun.json").write_text(json.dumps({"plan": old, "distill": True}))
    Speedrun(tmp_path, PLANS["quick"])._check_settings()  # continues
    assert json.loads((tmp_path / "speedrun.json").read_text())["plan"]["corpus_checked"] == 0.0
    (tmp_path / "speedrun.json").write_text(json.dumps({"plan": old, "distill": True}))
    with pytest.raises(SpeedrunError, match=r"corpus_checked: 0.0 there, 0.3 now"):
        Speedrun(tmp_path, replace(PLANS["quick"], corpus_checked=0.3))._check_settings()
