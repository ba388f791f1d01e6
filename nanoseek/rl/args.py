"""Flags of `nanoseek grpo` and `nanoseek distill`; no torch import, so `nanoseek --help` stays fast."""

from __future__ import annotations

import argparse

from ..data.tasks import TASKS

TEMPLATES = ("chat", "r1-zero", "plain")  # plain: the problem then a newline, as the pretraining corpus writes it


def add_grpo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="the starting policy (an SFT'd model dir)")
    p.add_argument("--task", required=True, choices=list(TASKS), help="which task")
    p.add_argument("--out", required=True, metavar="RUN", help="run dir: metrics, checkpoints, the final model")
    p.add_argument("--level", type=int, help="train on one difficulty level (default: all, cycling)")
    p.add_argument("--steps", type=int, default=100, help="GRPO steps (default 100)")
    p.add_argument("--prompts", type=int, default=8, help="problems per step, P (default 8)")
    p.add_argument("--group", type=int, default=8, help="completions per problem, G (default 8)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest completion (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (default 1, as R1-Zero)")
    p.add_argument("--inner-updates", type=int, default=1,
                   help="optimizer steps per batch of rollouts, mu (default 1: the ratio starts at 1)")
    p.add_argument("--minibatch", type=int, default=16, help="sequences per forward/backward (default 16)")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range epsilon (default 0.2)")
    p.add_argument("--beta", type=float, default=0.04,
                   help="KL weight to the reference (default 0.04 as DeepSeekMath; R1-Zero used 0.001; 0: no "
                        "reference model)")
    p.add_argument("--averaging", choices=["sequence", "token"], default="sequence",
                   help="sequence: mean over each completion's tokens, then over completions (GRPO as published); "
                        "token: mean over all tokens of the batch (default sequence)")
    p.add_argument("--normalize", choices=["signal", "batch"], default="signal",
                   help="what the loss averages over: signal — the completions of groups with reward variance "
                        "only (default; a step with 2 such groups moves as far as one with 16); batch — all P x G "
                        "completions, the groups without variance counting with advantage 0 (the published "
                        "objective: a step with little signal moves proportionally less)")
    p.add_argument("--ref-refresh", type=int, default=0, help="copy the policy into the reference every N steps "
                                                              "(default 0: never)")
    p.add_argument("--resample", type=int, default=0, metavar="N",
                   help="dynamic sampling (DAPO): while fewer than P groups of a step have reward variance, draw "
                        "P more problems, up to N extra draws, and train on the first P groups with signal "
                        "(default 0: off)")
    p.add_argument("--resample-from", type=int, default=0, metavar="STEP",
                   help="resample only from this step on (default 0); with --ref-refresh STEP, a second stage that "
                        "starts from the first stage's policy as its reference (docs/grpo.md)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--warmup", type=int, default=0, metavar="STEPS",
                   help="raise the lr linearly over the first STEPS steps (default 0: none). Adam's first updates "
                        "move every weight by about the lr whatever its gradient, which at lr 3e-4 knocked a "
                        "`small` SFT model's rollout accuracy from 18%% to 4%% in one step (docs/grpo.md)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    p.add_argument("--format-weight", type=float, default=0.1, help="format reward weight (default 0.1)")
    p.add_argument("--language-weight", type=float, default=0.0,
                   help="language-consistency reward weight (default 0: off)")
    p.add_argument("--template", choices=list(TEMPLATES), default="chat",
                   help="prompt template: chat (default), r1-zero (R1-Zero's plain text), plain (problem + newline)")
    p.add_argument("--seed", type=int, default=0, help="seed for problems and sampling (default 0)")
    p.add_argument("--max-running", type=int,
                   help="sequences the engine decodes together (default: prompts x group, one rollout in one batch)")
    p.add_argument("--compile", action="store_true",
                   help="roll out through the compiled decode step (torch.compile, needs g++ on CPU): compiles once "
                        "at start (~50 s for `small` here), then reuses the graph as the weights change "
                        "(docs/grpo.md has the measured speed-up)")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (default 20)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, metavar="DIR", help="the model to learn from (e.g. a GRPO run)")
    p.add_argument("--student", required=True, metavar="DIR",
                   help="the model to train (a smaller model dir with the same tokenizer)")
    p.add_argument("--task", required=True, choices=list(TASKS), help="which task")
    p.add_argument("--out", required=True, metavar="RUN", help="run dir: data, the student's SFT run, report.json")
    p.add_argument("--problems", type=int, default=500, help="train problems to sample (default 500)")
    p.add_argument("--k", type=int, default=4, help="teacher samples per problem (default 4)")
    p.add_argument("--keep-per-problem", type=int, default=2, help="distinct correct samples kept (default 2)")
    p.add_argument("--temperature", type=float, default=0.7, help="teacher sampling temperature (default 0.7)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest completion (default 256)")
    p.add_argument("--steps", type=int, default=300, help="student SFT steps (default 300)")
    p.add_argument("--lr", type=float, default=5e-4, help="student SFT learning rate (default 5e-4)")
    p.add_argument("--eval-n", type=int, default=100, help="test problems for the report (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--max-running", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
