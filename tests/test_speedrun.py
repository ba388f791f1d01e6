"""`nanoseek speedrun --quick`: the whole pipeline, its report, Ctrl-C + rerun, and the final model dir."""

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
from nanoseek.train.common import complete_checkpoints

STAGES = ["data", "tokenizer", "tokens", "pretrain", "sft", "more_sft", "rl", "report"]


def _speedrun(out: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanoseek", "speedrun", "--quick", "--out", str(out), "--quiet",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def interrupted_then_finished(tmp_path_factory):
    """A quick speedrun stopped by Ctrl-C during pretraining, then rerun to the end."""
    out = tmp_path_factory.mktemp("speedrun") / "run"
    proc = _speedrun(out)
    deadline = time.monotonic() + 300
    while not complete_checkpoints(out / "pretrain"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "pretraining never wrote a checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err1 = proc.communicate(timeout=300)
    first = proc.returncode
    stopped_at = len((out / "pretrain" / "metrics.jsonl").read_text().splitlines())
    proc = _speedrun(out)
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


def test_report_has_every_table_and_plot(interrupted_then_finished):
    out = interrupted_then_finished[0]
    report = (out / "report" / "report.md").read_text()
    for heading in ("## Model", "## Stages", "## Accuracy", "## MTP self-speculative decoding", "## Plots"):
        assert heading in report
    for needle in ("parameters, total", "parameters, activated per token", "KV cache per token (bf16), MLA",
                   "standard MHA", "drafts accepted", "| pretrain |", "| sft |", "| rl (GRPO) |", "| arithmetic (16) |",
                   "problems (GRPO's level)**", "On GRPO's level, from the SFT model: GRPO",
                   "*train* problems of level 2: greedy", "pass@4 at temperature 1",
                   "24 of the 60 `arithmetic` ones worked", "response length"):
        assert needle in report, needle
    images = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert {"pretrain_loss.png", "pretrain_expert_load.png", "rl_reward.png", "rl_response_length.png",
            "accuracy.png"} <= set(images)
    for name in images:
        assert (out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = {p.stem: json.loads(p.read_text()) for p in (out / "stages").iterdir()}
    spec = records["rl"]["speculative"]
    assert spec["identical_outputs"] and 0 <= spec["acceptance_rate"] <= 1
    for stage in ("pretrain", "sft", "rl"):
        for task in ("arithmetic", "countdown"):
            assert 0 <= records[stage]["eval"][task]["pass1"] <= 1
            assert records[stage]["eval"][task]["n"] == 16
    # every test problem stays out of the training data
    from nanoseek.data.tasks import TASKS
    sft = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 100
    # every label right; the plan's share of the arithmetic ones worked, the rest the one-line conclusion
    labeled = [p for lv in (1, 2) for p in TASKS["arithmetic"].problems("train", 30, level=lv, seed=1, strict=False)]
    by_prompt = {p.prompt: p for p in labeled + TASKS["countdown"].problems("train", 20, seed=1)
                 + TASKS["sort"].problems("train", 20, seed=1)}
    worked = {"arithmetic": 0, "countdown": 0, "sort": 0}
    for m in sft:
        problem = by_prompt[m["messages"][0]["content"]]
        task = TASKS[problem.task]
        answer = m["messages"][1]["content"]
        assert task.verify(problem, answer)
        assert answer in (task.solution(problem), task.brief(problem))
        worked[task.name] += answer == task.solution(problem)
    assert worked == {"arithmetic": 24, "countdown": 20, "sort": 20}
    assert records["data"]["sft_examples"] == {"arithmetic": {"examples": 60, "worked": 24},
                                               "countdown": {"examples": 20, "worked": 20},
                                               "sort": {"examples": 20, "worked": 20}}
    prompts = {m["messages"][0]["content"] for m in sft}
    test = {p.prompt for t in TASKS.values() for p in t.problems("test", 300)}
    assert not prompts & test


def test_a_finished_speedrun_reruns_nothing(interrupted_then_finished):
    out = interrupted_then_finished[0]
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}
    proc = _speedrun(out)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "stages").iterdir()} == before


def test_adding_distill_later_runs_it_and_rewrites_the_report(interrupted_then_finished):
    out = interrupted_then_finished[0]
    before = (out / "stages" / "sft.json").stat().st_mtime_ns
    proc = _speedrun(out, "--distill")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    record = json.loads((out / "stages" / "distill.json").read_text())
    assert "report" in record or "skipped" in record  # a quick teacher may solve nothing: then it says so
    assert "| distill |" in (out / "report" / "report.md").read_text()
    assert (out / "stages" / "sft.json").stat().st_mtime_ns == before


def test_other_settings_on_the_same_dir_are_refused(interrupted_then_finished, capsys):
    out = interrupted_then_finished[0]
    assert main(["speedrun", "--quick", "--out", str(out), "--quiet", "--pretrain-steps", "7"]) == 2
    err = capsys.readouterr().err
    assert "pretrain_steps: 60 there, 7 now" in err and "pick a new --out" in err


def test_the_final_model_loads_in_transformers_with_the_same_greedy_tokens(interrupted_then_finished):
    transformers = pytest.importorskip("transformers")
    rl = interrupted_then_finished[0] / "rl"
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
    for flag in ("--out", "--quick", "--distill", "--task", "--pretrain-steps", "--sft-steps", "--grpo-steps",
                 "--eval-n", "--seed", "--quiet"):
        assert flag in text


def test_bad_step_counts_are_refused(tmp_path, capsys):
    assert main(["speedrun", "--quick", "--out", str(tmp_path / "x"), "--grpo-steps", "0"]) == 2
    assert "--grpo-steps must be >= 1" in capsys.readouterr().err
    assert main(["speedrun", "--quick", "--out", str(tmp_path / "x"), "--eval-n", "100000"]) == 2
    assert "--eval-n must be <= 2,000 (got 100,000)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()



def test_another_task_moves_grpo_to_its_nearest_level():
    from nanoseek.data.tasks import TASKS
    from nanoseek.speedrun import make_plan

    for quick in (True, False):
        assert make_plan(quick).grpo_level == 2  # arithmetic has level 2
        plan = make_plan(quick, task="countdown", seed=3)
        assert plan.task == "countdown" and plan.seed == 3
        assert plan.grpo_level in TASKS["countdown"].levels and plan.grpo_level == 3
    from nanoseek.report import _labeled_levels  # what the report says the labeled set held
    assert _labeled_levels(make_plan(True)) == [1, 2] and _labeled_levels(make_plan(False)) == [1, 2, 3]
    assert _labeled_levels(make_plan(True, task="countdown")) == [3, 4]
