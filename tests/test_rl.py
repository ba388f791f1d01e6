"""GRPO's pieces: rule rewards against adversarial outputs, group advantages, the loss by hand."""

import math

import pytest
import torch

from nanoseek.data.tasks import TASKS
from nanoseek.rl.grpo import group_advantages, grpo_loss
from nanoseek.rl.rewards import RewardConfig, format_reward, language_reward, score

FORMAT = [
    ("<think>12 + 30 = 42</think> <answer>42</answer>", 1.0),
    ("  <think>\nsteps\n</think>\n<answer>42</answer>\n", 1.0),
    ("<answer>42</answer>", 0.0),  # no reasoning
    ("<think>x</think>", 0.0),  # no answer
    ("<think>x</think> <answer>42</answer> <answer>41</answer>", 0.0),  # two answers
    ("<think>a</think><think>b</think><answer>42</answer>", 0.0),  # two think blocks
    ("<answer>42</answer><think>x</think>", 0.0),  # wrong order
    ("so: <think>x</think> <answer>42</answer>", 0.0),  # text outside the blocks
    ("<think>x</think> <answer>42</answer> thanks", 0.0),
    ("<think> </think> <answer>42</answer>", 0.0),  # empty reasoning
    ("<think>x</think> <answer> </answer>", 0.0),  # empty answer
    ("<think>x <answer>42</answer></think>", 0.0),  # answer inside the reasoning
    ("", 0.0),
]


@pytest.mark.parametrize("completion, want", FORMAT)
def test_format_reward(completion, want):
    assert format_reward(completion) == want


def test_accuracy_reward_goes_through_the_verifier():
    task = TASKS["arithmetic"]
    p = task.problems("train", 1, level=2, seed=0)[0]
    right = task.solution(p)
    s = score(task, p, right)
    assert s.correct and s.formatted and s.reward == pytest.approx(1.1)
    wrong = right.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
    assert score(task, p, wrong).reward == pytest.approx(0.1)
    # the right number, but twice, or outside the answer tags, earns nothing
    assert score(task, p, right + f" <answer>{p.answer}</answer>").reward == 0.0
    assert score(task, p, f"the answer is {p.answer}").reward == 0.0
    assert score(task, p, f"<answer>{p.answer}</answer>").reward == 1.0  # correct, not formatted


def test_language_reward():
    assert language_reward("<think>add the tens</think><answer>4</answer>") == 1.0
    assert language_reward("<think>加 the</think>") == pytest.approx(3 / 4)
    assert language_reward("no think block") == 0.0
    task = TASKS["arithmetic"]
    p = task.problems("train", 1, level=1, seed=0)[0]
    mixed = task.solution(p).replace("<think>\n", "<think>\n思考 ")
    cfg = RewardConfig(format_weight=0.0, language_weight=0.5)
    assert 1.0 < score(task, p, mixed, cfg).reward < score(task, p, task.solution(p), cfg).reward == 1.5


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv, flat = group_advantages(r)
    std = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a])
    assert flat.tolist() == [False, True, False] and adv[1].tolist() == [0, 0, 0, 0]
    assert adv[2].sum().item() == pytest.approx(0, abs=1e-5) and adv[2, 3] > 0
    adv, flat = group_advantages(r, scale="none")  # Dr. GRPO: r - mean, no division by std
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.75, -0.75, -0.75, 2.25]]
    assert flat.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, scale="max")


def test_grpo_loss_equals_a_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    old = torch.tensor([[-1.5, -1.0, -0.5], [0.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.5, -0.7], [-0.5, -1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    eps, beta = 0.2, 0.1

    def term(lp, o, rf, a):
        ratio = math.exp(lp - o)
        surr = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        kl = math.exp(rf - lp) - (rf - lp) - 1
        return surr - beta * kl

    rows = [[term(logp[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i].item()) for t in range(3)]
            for i in range(2)]
    per_seq = [sum(rows[0]) / 3, sum(rows[1][:2]) / 2]
    loss, stats = grpo_loss(logp, old, adv, mask, ref, clip_eps=eps, beta=beta, averaging="sequence")
    assert loss.item() == pytest.approx(-(per_seq[0] + per_seq[1]) / 2, rel=1e-6)
    loss, _ = grpo_loss(logp, old, adv, mask, ref, clip_eps=eps, beta=beta, averaging="token")
    assert loss.item() == pytest.approx(-(sum(rows[0]) + sum(rows[1][:2])) / 5, rel=1e-6)
    # clipped where the min takes the clipped side: (0, 0) ratio e^0.5 > 1.2 with A > 0, and (1, 0)
    # ratio e^-0.3 < 0.8 with A < 0; not (1, 1): ratio e^0.8 with A < 0 keeps the lower unclipped term
    assert stats.clip_fraction == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="averaging"):
        grpo_loss(logp, old, adv, mask, averaging="mean")


def test_loss_gradient_pushes_rewarded_tokens_up():
    logits = torch.zeros(2, 4, requires_grad=True)
    tokens = torch.tensor([[1], [2]])
    logp = logits.log_softmax(-1).gather(1, tokens)  # (2, 1)
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    loss.backward()
    assert logits.grad[0, 1] < 0 < logits.grad[1, 2]  # descent raises token 1 of row 0, lowers token 2 of row 1
    assert stats.ratio == pytest.approx(1.0) and stats.clip_fraction == 0.0 and stats.kl == 0.0


# ---- evaluation ---------------------------------------------------------------------------------

def test_pass_at_k_estimator():
    from nanoseek.rl.evaluate import pass_at_k
    assert pass_at_k(10, 0, 3) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 / 4) * (2 / 3))  # 1 - C(3,2)/C(4,2) = 0.5
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than k wrong ones: every k-subset has a right one


def test_tally_counts_exactly():
    from nanoseek.rl.evaluate import tally
    task = TASKS["arithmetic"]
    ps = task.problems("test", 4, level=1)
    right = [task.solution(p) for p in ps]
    wrong = [r.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
             for r, p in zip(right, ps)]
    greedy = [(right[0], 10), (wrong[1], 20), (f"<answer>{ps[2].answer}</answer>", 5), ("rambling", 30)]
    sampled = [[right[0]] * 4, [wrong[1], right[1], wrong[1], wrong[1]], [right[2], wrong[2], right[2], "x"],
               ["x"] * 4]
    rep = tally(task, ps, greedy, sampled, k=4, split="test")
    assert rep.n == 4 and rep.pass1 == 0.5 and rep.format_rate == 0.5 and rep.mean_tokens == 16.25
    assert [r.samples_correct for r in rep.problems] == [4, 1, 2, 0]
    assert rep.pass_k == pytest.approx((1 + 1 + 1 + 0) / 4)
    # majority: problem 1 votes for the wrong answer 3 to 1; problem 2 for the right one 2 to 1
    assert [r.majority_correct for r in rep.problems] == [True, False, True, False] and rep.maj_k == 0.5
    assert rep.by_level == {1: 0.5}


def test_cli_eval_json(tmp_path, capsys):
    import json

    from nanoseek import Transformer, preset, save_model
    from nanoseek.cli import main
    from nanoseek.tokenizer import Tokenizer
    torch.manual_seed(0)
    save_model(Transformer(preset("tiny")), tmp_path / "m", extra_files=Tokenizer.byte_level().files())
    assert main(["eval", "--model", str(tmp_path / "m"), "--task", "countdown", "--n", "3", "--k", "2",
                 "--max-tokens", "8", "--json", "--per-problem"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and out["k"] == 2 and len(out["problems"]) == 3
    assert all(p["samples"] == 2 and 0 <= p["greedy_tokens"] <= 8 for p in out["problems"])
    assert out["pass1"] == sum(p["greedy_correct"] for p in out["problems"]) / 3
    assert main(["eval", "--model", str(tmp_path / "m"), "--task", "countdown", "--n", "0"]) == 2


# ---- the GRPO loop ------------------------------------------------------------------------------

def test_sequence_logprobs_share_prompts_and_match_a_plain_forward():
    """Groups share one prompt forward (prompts of different lengths, a 1-token one, a group of one);
    every completion token's log-prob and the gradient must be what a plain forward of each whole
    sequence alone gives."""
    import random

    from nanoseek import Transformer, preset
    from nanoseek.rl.train import sequence_logprobs
    torch.manual_seed(0)
    rng = random.Random(0)
    model = Transformer(preset("tiny"))
    seqs, starts = [], []
    for plen, group in [(6, 3), (10, 2), (1, 2), (8, 1), (6, 2)]:
        prompt = [rng.randrange(2, 200) for _ in range(plen)]
        for _ in range(group):
            seqs.append(prompt + [rng.randrange(2, 200) for _ in range(rng.randrange(1, 12))])
            starts.append(plen)
    logp, mask, ent = sequence_logprobs(model, seqs, starts, entropy=True)
    ours = torch.autograd.grad((logp * mask).sum(), list(model.parameters()), allow_unused=True)
    total = 0
    for b, (s, start) in enumerate(zip(seqs, starts)):
        rows = model(torch.tensor([s]))[0, start - 1: -1].log_softmax(-1)  # predicting the completion
        alone = rows.gather(-1, torch.tensor(s[start:])[:, None])[:, 0]
        n = len(s) - start
        assert mask[b].tolist() == [1.0] * n + [0.0] * (mask.shape[1] - n)
        assert torch.allclose(logp[b, :n], alone, atol=1e-5)
        assert torch.allclose(ent[b, :n], -(rows.exp() * rows).sum(-1), atol=1e-4)
        total = total + alone.sum()
    plain = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    for a, b in zip(ours, plain):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # at the rollouts' temperature: the log-probs of the distribution they were sampled from
    hot = sequence_logprobs(model, seqs, starts, temperature=0.7)[0]
    for b, (s, start) in enumerate(zip(seqs, starts)):
        rows = (model(torch.tensor([s]))[0, start - 1: -1] / 0.7).log_softmax(-1)
        n = len(s) - start
        assert torch.allclose(hot[b, :n], rows.gather(-1, torch.tensor(s[start:])[:, None])[:, 0], atol=1e-5)
        assert not torch.allclose(hot[b, :n], logp[b, :n].detach(), atol=1e-3)


def test_grpo_updates_raise_the_logprob_of_rewarded_completions():
    from nanoseek import Transformer, preset
    from nanoseek.rl.train import sequence_logprobs
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    prompt = [0, 3, 20, 21, 4]
    seqs = [prompt + [40, 41, 42, 7], prompt + [50, 51, 52, 53], prompt + [60, 61, 7], prompt + [40, 70, 71]]
    starts = [len(prompt)] * 4
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def seq_logp():
        with torch.no_grad():
            logp, mask, _ = sequence_logprobs(model, seqs, starts)
        return (logp * mask).sum(-1)

    before = seq_logp()
    old = sequence_logprobs(model, seqs, starts)[0].detach()
    ref = old.clone()
    for _ in range(5):
        logp, mask, _ = sequence_logprobs(model, seqs, starts)
        loss, _ = grpo_loss(logp, old, adv[0], mask, ref, beta=0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = seq_logp()
    assert after[0] > before[0] and after[2] > before[2]  # rewarded: more likely
    assert after[1] < before[1] and after[3] < before[3]  # unrewarded: less likely


@pytest.fixture(scope="module")
def sft_tiny(tmp_path_factory):
    """tiny trained a few seconds on level-1 arithmetic solutions in the chat template: it writes the
    format some of the time, so rewards vary within groups."""
    from conftest import train_tiny

    from nanoseek import save_model
    from nanoseek.tokenizer import Tokenizer
    tok, task = Tokenizer.byte_level(), TASKS["arithmetic"]
    ids = []
    for p in task.problems("train", 200, level=1, seed=0):
        ids += tok.render_chat([{"role": "user", "content": p.prompt},
                                {"role": "assistant", "content": task.solution(p)}])[0]
    d = tmp_path_factory.mktemp("sft") / "m"
    save_model(train_tiny(ids, steps=300), d, extra_files=tok.files())
    return d


def test_cli_grpo_logs_checkpoints_and_resumes_exactly(sft_tiny, tmp_path):
    import json

    from nanoseek import load_model
    from nanoseek.cli import main
    flags = ["--model", str(sft_tiny), "--task", "arithmetic", "--level", "1", "--prompts", "4", "--group", "4",
             "--max-tokens", "64", "--lr", "1e-4", "--save-every", "2", "--quiet"]
    assert main(["grpo", *flags, "--out", str(tmp_path / "a"), "--steps", "4"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for key in ("reward", "accuracy", "format", "response_length", "kl", "clip_fraction", "entropy",
                "zero_variance_groups"):
        assert key in lines[0]
    assert sum(m["trained_sequences"] for m in lines) > 0  # some groups had reward variance
    # 2 steps, then --resume to 4: the same metrics and weights as 4 straight
    assert main(["grpo", *flags, "--out", str(tmp_path / "b"), "--steps", "2"]) == 0
    assert main(["grpo", *flags, "--out", str(tmp_path / "b"), "--steps", "4"]) == 2  # exists: needs --resume
    assert main(["grpo", *flags, "--out", str(tmp_path / "c"), "--max-running", "0"]) == 2
    assert main(["grpo", *flags, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"]) == 0
    resumed = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    drop = ("seconds", "rollout_seconds")
    assert [{k: v for k, v in m.items() if k not in drop} for m in resumed] == \
        [{k: v for k, v in m.items() if k not in drop} for m in lines]
    a, b = load_model(tmp_path / "a").state_dict(), load_model(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [[], ["--resample", "2", "--beta", "0.04"]], ids=["plain", "resample-kl"])
def test_grpo_under_torchrun_equals_one_process(sft_tiny, tmp_path, extra):
    """Two processes share the groups out, and take the same steps: the same rollouts, metrics and weights."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from nanoseek import load_model
    flags = ["grpo", "--model", str(sft_tiny), "--task", "arithmetic", "--level", "1", "--prompts", "4", "--group",
             "4", "--max-tokens", "64", "--lr", "1e-3", "--steps", "3", "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "nanoseek", *flags, "--out", str(tmp_path / "one")], check=True, env=env)
    subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m",
                    "nanoseek", *flags, "--out", str(tmp_path / "two")], check=True, env=env)
    one, two = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("reward", "accuracy", "response_length", "zero_variance_groups", "trained_sequences", "draws"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key  # sums in float32 per rank
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-6) and a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
    assert sum(m["trained_sequences"] for m in one) > 0
    a, b = load_model(tmp_path / "one").state_dict(), load_model(tmp_path / "two").state_dict()
    # The ranks reduce their sums in another order, and Adam's normalisation magnifies that rounding where a
    # gradient is near zero (1.0e-5 on one host); a wrong reduction moves weights by the order of lr (1e-3).
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 5e-5


def test_resample_draws_until_p_groups_have_signal(sft_tiny, tmp_path):
    """--resample (DAPO's dynamic sampling): more draws of P problems while fewer than P groups have reward
    variance; at most P groups train; each draw is other problems; a bad value is refused."""
    import json

    from nanoseek.cli import main
    from nanoseek.rl.train import GRPOConfig, rollout
    flags = ["--model", str(sft_tiny), "--task", "arithmetic", "--level", "1", "--prompts", "4", "--group", "4",
             "--max-tokens", "64", "--lr", "1e-4", "--quiet"]
    assert main(["grpo", *flags, "--out", str(tmp_path / "a"), "--steps", "3", "--resample", "2"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert 1 <= m["draws"] <= 3 and m["trained_sequences"] <= 4 * 4
        groups = 4 * m["draws"]
        with_signal = groups - m["zero_variance_groups"]
        assert m["trained_sequences"] == 4 * min(4, with_signal)
        assert with_signal >= 4 or m["draws"] == 3  # stopped: enough signal, or out of draws
    assert main(["grpo", *flags, "--out", str(tmp_path / "b"), "--resample", "-1"]) == 2
    assert main(["grpo", *flags, "--out", str(tmp_path / "b"), "--resample-from", "-1"]) == 2
    # --resample-from: plain steps first (one draw each), then resampling; the same draws as above after
    assert main(["grpo", *flags, "--out", str(tmp_path / "c"), "--steps", "3", "--resample", "2",
                 "--resample-from", "2"]) == 0
    staged = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [m["draws"] for m in staged[:2]] == [1, 1]
    assert all(m["trained_sequences"] == 4 * (4 - m["zero_variance_groups"]) for m in staged[:2])

    from nanoseek import load_model
    from nanoseek.engine.engine import Engine
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.load(sft_tiny)
    engine, cfg = Engine(load_model(sft_tiny), tok, max_running=8), GRPOConfig("arithmetic", level=1, prompts=2,
                                                                              group=2, max_tokens=8)
    first, again, second = (rollout(engine, TASKS["arithmetic"], cfg, 5, tok, draw)[1] for draw in (0, 0, 1))
    assert first == again and first != second  # the prompts of each draw


def test_cli_distill_keeps_only_verified_samples(sft_tiny, tmp_path, capsys):
    import json

    from nanoseek import Transformer, preset, save_model
    from nanoseek.cli import main
    from nanoseek.tokenizer import Tokenizer
    torch.manual_seed(1)
    student = tmp_path / "student-base"
    save_model(Transformer(preset("tiny", num_hidden_layers=1)), student, extra_files=Tokenizer.byte_level().files())
    out = tmp_path / "distill"
    assert main(["distill", "--teacher", str(sft_tiny), "--student", str(student), "--task", "arithmetic",
                 "--problems", "40", "--k", "8", "--temperature", "1.0", "--max-tokens", "64", "--steps", "5",
                 "--eval-n", "8", "--quiet", "--out", str(out)]) == 0
    task = TASKS["arithmetic"]
    by_prompt = {p.prompt: p for p in task.problems("train", 40, seed=0)}
    lines = [json.loads(x) for x in (out / "distill.jsonl").read_text().splitlines()]
    assert lines, "the teacher solved nothing"
    for ex in lines:  # every kept answer passes the verifier, and is the teacher's own
        user, assistant = ex["messages"]
        assert task.verify(by_prompt[user["content"]], assistant["content"])
    report = json.loads((out / "report.json").read_text())
    assert report["examples"] == len(lines) and report["test_problems"] == 8
    assert report["student_parameters"] < report["teacher_parameters"]
    assert (out / "student" / "config.json").exists()
    assert "teacher" in capsys.readouterr().out


def test_distill_under_torchrun_samples_and_trains_like_one_process(sft_tiny, tmp_path):
    """Two processes share the teacher's sampling out and train the student data parallel: the same
    examples, the same rows in every SFT step (each rank half of the batch), one report. (The weights are
    not compared: data parallel SFT averages each rank's per-token mean, as pretraining does.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from nanoseek import Transformer, load_model, preset, save_model
    from nanoseek.tokenizer import Tokenizer
    torch.manual_seed(1)
    student = tmp_path / "student-base"
    save_model(Transformer(preset("tiny", num_hidden_layers=1)), student, extra_files=Tokenizer.byte_level().files())
    # level 1, the only one the teacher was trained on: other levels it solves too rarely for 21 problems to be sure
    # of a verified answer on every host
    flags = ["distill", "--teacher", str(sft_tiny), "--student", str(student), "--task", "arithmetic@1", "--problems",
             "21", "--k", "8", "--temperature", "1.0", "--max-tokens", "64", "--steps", "4", "--eval-n", "8", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "nanoseek", *flags, "--out", str(tmp_path / "one")], check=True, env=env)
    subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m",
                    "nanoseek", *flags, "--out", str(tmp_path / "two")], check=True, env=env)
    assert (tmp_path / "one" / "distill.jsonl").read_text() == (tmp_path / "two" / "distill.jsonl").read_text()
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    same = ("task", "test_problems", "teacher_pass1", "student_before_pass1", "samples", "correct_samples",
            "problems", "problems_solved", "examples")
    assert {k: one[k] for k in same} == {k: two[k] for k in same}
    steps = [[json.loads(line)["tokens"] for line in (tmp_path / d / "student" / "metrics.jsonl").open()
              if '"tokens"' in line] for d in ("one", "two")]
    assert len(steps[0]) == 4 and steps[0] == steps[1]
    start = load_model(student).state_dict()
    trained = load_model(tmp_path / "two" / "student").state_dict()
    assert max((start[k] - trained[k]).abs().max().item() for k in start) > 0


def test_compiled_rollouts_follow_the_weight_updates(sft_tiny, tmp_path):
    """grpo --compile: the optimizer changes the weights in place between rollouts; the compiled decode
    step must decode with the new weights (as a fresh eager engine does), without compiling again."""
    import copy

    from nanoseek import load_model
    from nanoseek.cli import main
    from nanoseek.engine.engine import Engine
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.rl.train import GRPOConfig, grpo_step
    from nanoseek.tokenizer import Tokenizer
    tok, task = Tokenizer.load(sft_tiny), TASKS["arithmetic"]
    policy = load_model(sft_tiny)
    engine = Engine(policy, tok, max_running=16, compile=True)
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine.warm_up()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > compiled_before  # a graph, not eager fallback
    prompts = ["What is 3 + 4?", "What is 9 - 2?", "What is 5 x 6?"]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=True, ignore_eos=True)

    def decode(eng):
        return [(r.output, r.logprobs) for r in eng.generate(prompts, params)]

    before = decode(engine)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cfg = GRPOConfig("arithmetic", level=1, prompts=4, group=4, max_tokens=32, lr=1e-2, beta=0.0)
    optim = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    assert grpo_step(policy, None, optim, engine, task, cfg, 0, tok)["trained_sequences"] > 0  # weights moved
    after, eager = decode(engine), decode(Engine(copy.deepcopy(policy), tok, max_running=16))  # nothing cached
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the same graph, new weights
    assert [o for o, _ in after] == [o for o, _ in eager]
    assert max(abs(a - b) for (_, la), (_, lb) in zip(after, eager) for a, b in zip(la, lb)) < 1e-4
    # the first token comes from the (eager) prefill: the compiled steps' tokens must have moved too
    assert max(abs(a - b) for (_, la), (_, lb) in zip(after, before) for a, b in zip(la[1:], lb[1:])) > 1e-2
    # the flag, end to end
    assert main(["grpo", "--model", str(sft_tiny), "--task", "arithmetic", "--level", "1", "--prompts", "2",
                 "--group", "4", "--max-tokens", "16", "--steps", "1", "--compile", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    assert (tmp_path / "c" / "model.safetensors").exists()


def test_resume_between_reference_refreshes_is_exact(sft_tiny, tmp_path):
    """--ref-refresh with --save-every off the refresh steps: a refresh step checkpoints before it
    refreshes, and a run stopped in between resumes with the refreshed reference, exactly."""
    import json
    import shutil

    from nanoseek import load_model
    from nanoseek.cli import main
    from nanoseek.train.common import complete_checkpoints
    flags = ["--model", str(sft_tiny), "--task", "arithmetic", "--level", "1", "--prompts", "4", "--group", "4",
             "--max-tokens", "48", "--lr", "1e-3", "--ref-refresh", "2", "--save-every", "3", "--steps", "5",
             "--keep", "5", "--quiet"]
    assert main(["grpo", *flags, "--out", str(tmp_path / "a")]) == 0
    assert main(["grpo", *flags, "--out", str(tmp_path / "b")]) == 0
    done = complete_checkpoints(tmp_path / "b")
    assert [d.name[-1] for d in done] == ["2", "3", "4", "5"]  # refresh steps 2 and 4 checkpointed too
    # stopped between step 4's checkpoint and its reference refresh: the reference on disk is still
    # step 2's policy, and step 5 never finished
    shutil.rmtree(done[-1])
    shutil.rmtree(tmp_path / "b" / "reference")
    shutil.copytree(done[0], tmp_path / "b" / "reference")
    for f in tmp_path.glob("b/*.safetensors"):
        f.unlink()
    assert main(["grpo", *flags, "--out", str(tmp_path / "b"), "--resume"]) == 0
    rows = {r: [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"}
    drop = ("seconds", "rollout_seconds")
    assert [{k: v for k, v in m.items() if k not in drop} for m in rows["b"]] == \
        [{k: v for k, v in m.items() if k not in drop} for m in rows["a"]]
    a, b = load_model(tmp_path / "a").state_dict(), load_model(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_warmup_raises_the_lr_linearly(sft_tiny, tmp_path):
    import json

    from nanoseek.cli import main
    flags = ["--model", str(sft_tiny), "--task", "arithmetic", "--level", "1", "--prompts", "2", "--group", "4",
             "--max-tokens", "16", "--lr", "2e-4", "--quiet"]
    assert main(["grpo", *flags, "--out", str(tmp_path / "a"), "--steps", "3", "--warmup", "2"]) == 0
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-4, 2e-4, 2e-4])
    assert main(["grpo", *flags, "--out", str(tmp_path / "b"), "--warmup", "-1"]) == 2


def test_normalize_batch_scales_the_step_by_the_share_of_groups_with_signal(sft_tiny):
    """--normalize batch (the published mean over all P x G completions): the same rollouts give the
    gradient of --normalize signal times (groups with variance) / P."""
    import copy

    from nanoseek import load_model
    from nanoseek.engine.engine import Engine
    from nanoseek.rl.train import GRPOConfig, grpo_step
    from nanoseek.tokenizer import Tokenizer
    tok, start = Tokenizer.load(sft_tiny), load_model(sft_tiny)
    deltas, trained = {}, {}
    for normalize in ("signal", "batch"):
        policy = copy.deepcopy(start)
        cfg = GRPOConfig("arithmetic", level=1, prompts=4, group=4, max_tokens=32, beta=0.0, clip=1e9,
                         normalize=normalize)
        optim = torch.optim.SGD(policy.parameters(), lr=1.0)  # the step is the gradient itself
        m = grpo_step(policy, None, optim, Engine(policy, tok, max_running=16), TASKS["arithmetic"], cfg, 3, tok)
        trained[normalize] = m["trained_sequences"]
        deltas[normalize] = torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), start.parameters())])
    assert trained["signal"] == trained["batch"] and 0 < trained["batch"] < 16  # some groups without signal
    share = trained["batch"] / 16
    assert torch.allclose(deltas["batch"], deltas["signal"] * share, rtol=1e-4, atol=1e-7)
    assert deltas["signal"].abs().max() > 0


def test_rft_keeps_only_verified_samples_and_draws_the_count_asked(sft_tiny, tmp_path):
    """The RFT control draws exactly --samples completions (a GRPO run's count), --group per problem, keeps only
    those the task verifies (distinct per problem), fine-tunes the start on them into RUN, and reuses the samples
    when rerun."""
    import json

    from nanoseek import load_model
    from nanoseek.cli import main
    from nanoseek.data.tasks import Problem
    from nanoseek.rl.args import RFTConfig
    from nanoseek.rl.rft import run

    run_dir = tmp_path / "rft"
    flags = ["--model", str(sft_tiny), "--task", "arithmetic", "--level", "1", "--out", str(run_dir),
             "--group", "4", "--max-tokens", "128", "--steps", "2", "--quiet"]
    assert main(["rft", *flags, "--samples", "30"]) == 2  # not a whole number of groups
    assert main(["rft", *flags, "--samples", "128"]) == 0
    stats = json.loads((run_dir / "samples.json").read_text())
    assert stats["samples"] == 128 and stats["problems"] == 32
    assert 0 < stats["examples"] <= stats["correct_samples"] < 128  # the tiny model is right only sometimes
    task = TASKS["arithmetic"]
    rows = [json.loads(line)["messages"] for line in (run_dir / "rft.jsonl").read_text().splitlines()]
    assert len(rows) == stats["examples"]
    for user, assistant in rows:
        problem = next(p for p in task.problems("train", 32, level=1, seed=-1) if p.prompt == user["content"])
        assert isinstance(problem, Problem) and task.verify(problem, assistant["content"])
    assert len({(u["content"], a["content"]) for u, a in rows}) == len(rows)
    assert load_model(run_dir).cfg == load_model(sft_tiny).cfg  # RUN is the fine-tuned model dir
    assert not torch.equal(load_model(run_dir).lm_head.weight, load_model(sft_tiny).lm_head.weight)
    before = (run_dir / "rft.jsonl").read_text()
    again = run(RFTConfig(model=str(sft_tiny), task="arithmetic", level=1, out=str(run_dir), samples=128, group=4,
                          max_tokens=64, steps=2, quiet=True))
    assert again == stats and (run_dir / "rft.jsonl").read_text() == before


def test_grpo_eval_every_logs_the_held_out_curve_and_resumes_it(sft_tiny, tmp_path):
    """--eval-every N: greedy pass@1 on held-out test problems of the run's level at step 0, every N steps and at
    the end (RUN/eval.jsonl); step 0 is the start model's own score; a resumed run continues the curve."""
    import json

    from nanoseek import load_model
    from nanoseek.cli import main
    from nanoseek.engine.engine import Engine
    from nanoseek.rl.evaluate import evaluate
    from nanoseek.tokenizer import Tokenizer
    run = tmp_path / "rl"
    flags = ["--model", str(sft_tiny), "--task", "arithmetic", "--level", "1", "--prompts", "2", "--group", "4",
             "--max-tokens", "48", "--lr", "1e-4", "--save-every", "2", "--eval-every", "2", "--eval-n", "6",
             "--out", str(run), "--quiet"]
    assert main(["grpo", *flags, "--steps", "3"]) == 0
    rows = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 3] and all(r["n"] == 6 for r in rows)
    task = TASKS["arithmetic"]
    start = evaluate(Engine(load_model(sft_tiny), Tokenizer.load(sft_tiny)), task,
                     task.problems("test", 6, level=1), max_tokens=48)
    assert rows[0]["pass1"] == start.pass1 and rows[0]["mean_tokens"] == start.mean_tokens
    assert main(["grpo", *flags, "--steps", "4", "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (run / "eval.jsonl").read_text().splitlines()] == [0, 2, 3, 4]
    assert main(["grpo", *flags, "--steps", "4", "--eval-n", "0"]) == 2


def test_grpo_on_a_mixture_of_tasks_and_levels(sft_tiny, tmp_path, capsys):
    """--task NAME@LEVEL,...: one run practises several tasks and levels, each problem rewarded by its own
    verifier; its held-out curve is over the same mixture; --level with a mixture is a clear error."""
    import json

    from nanoseek.cli import main
    from nanoseek.data.tasks import get_task
    from nanoseek.rl.args import GRPOConfig
    from nanoseek.train.args import TrainError
    run = tmp_path / "rl"
    flags = ["--model", str(sft_tiny), "--task", "arithmetic@1,countdown@3", "--prompts", "2", "--group", "2",
             "--max-tokens", "24", "--eval-every", "1", "--eval-n", "4", "--out", str(run), "--quiet"]
    assert main(["grpo", *flags, "--steps", "1"]) == 0
    assert [json.loads(x)["n"] for x in (run / "eval.jsonl").read_text().splitlines()] == [4, 4]
    held_out = get_task("arithmetic@1,countdown@3").problems("test", 4)
    assert [p.task for p in held_out] == ["arithmetic", "countdown"] * 2
    assert main(["grpo", *flags, "--level", "1", "--out", str(tmp_path / "b")]) == 2
    assert "a mixture names its levels" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["grpo", *flags[:2], "--task", "arithmetic@9", *flags[4:]])
    assert "arithmetic has levels [1, 2, 3, 4, 5]" in capsys.readouterr().err
    with pytest.raises(TrainError, match="unknown task"):
        GRPOConfig("algebra")
