"""One GRPO step, nanoseek against TRL's GRPOTrainer: same model, prompts, G, completion length.

    pip install trl                      # TRL is not a nanoseek dependency
    python benchmarks/grpo_speed.py      # a random `small`, 4 prompts x G 8, 64-token completions, 4 steps

Both run the same model dir (TRL through transformers' DeepseekV3ForCausalLM), fp32 on the
CPU (or `--device cuda`), with a frozen reference (beta 0.04), one optimizer step per batch of rollouts, and the same
reward: a deterministic function of the completion text with variance inside every group, so
both libraries train on every completion (a random model never solves a task, and nanoseek skips
zero-variance groups, which would flatter it). Completions run to the length limit or an
end-of-sentence, which a random model rarely samples; the mean completion length of each side
is reported. The variants differ as documented in docs/grpo.md: nanoseek averages per sequence
(DeepSeekMath's GRPO); TRL here uses its default, loss_type="dapo" (token-level). nanoseek
runs twice: eager, and with its rollouts through the compiled decode step (`grpo --compile`;
compiling happens before the warm-up step and is not timed, and the script reports any graph
compiled during the timed steps, which would mean the weight updates broke the graph's reuse).
The three take turns step by step (a TRL step, then one eager and one compiled nanoseek step,
from inside TRL's training loop but outside its step timing), so a drift in the machine's speed
reaches all three alike.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import tempfile
import time

import torch

from nanoseek import Transformer, load_model, preset, save_model
from nanoseek.data.tasks import TASKS
from nanoseek.rl import train as rl_train
from nanoseek.rl.evaluate import prompt_ids
from nanoseek.rl.rewards import Score
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.common import AdamW


def text_reward(text: str) -> float:
    """0 or 1 from a hash of the text: varies within every group, costs nothing."""
    return float(hashlib.sha256(text.encode()).digest()[0] % 2)


class Ours:
    """nanoseek's GRPO step on the model dir, eager or with compiled rollouts, built and warmed up
    (one untimed step; compiling, for `compiled`, before it) so that `step()` times one more."""

    def __init__(self, model_dir: str, args, compiled: bool = False):
        rl_train.score = lambda task, problem, text, cfg: Score(text_reward(text), False, False, 0.0)
        self.policy = load_model(model_dir).to(args.device)
        self.tok = Tokenizer.load(model_dir)
        self.cfg = rl_train.GRPOConfig(task="arithmetic", level=2, prompts=args.prompts, group=args.group,
                                       max_tokens=args.tokens, minibatch=args.prompts * args.group, beta=0.04, lr=1e-6)
        self.ref = load_model(model_dir).to(args.device).requires_grad_(False)
        self.optim = AdamW(self.policy.parameters(), lr=self.cfg.lr, weight_decay=0.0)  # as rl/train.py
        self.engine = rl_train.Engine(self.policy, self.tok, max_running=args.prompts * args.group, compile=compiled)
        if compiled:
            self.engine.warm_up()
        self.task, self.steps = TASKS["arithmetic"], []
        self._step(0)  # warm-up

    def _step(self, step: int) -> dict:
        return rl_train.grpo_step(self.policy, self.ref, self.optim, self.engine, self.task, self.cfg, step, self.tok)

    def step(self) -> None:
        self.steps.append(self._step(len(self.steps) + 1))

    def result(self) -> tuple[float, float, float]:
        """Mean seconds per step, mean completion length, and the rollouts' share of the step."""
        seconds = sum(m["seconds"] for m in self.steps)
        return (seconds / len(self.steps), sum(m["response_length"] for m in self.steps) / len(self.steps),
                sum(m["rollout_seconds"] for m in self.steps) / seconds)


def theirs(model_dir: str, problems, args, between=lambda: None) -> tuple[float, float, float]:
    """Mean seconds per step, mean completion length, and generation's share of the step; `between()`
    runs after each of TRL's steps but the last, outside its timing."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or "<｜▁pad▁｜>"
    nano_tok = Tokenizer.load(model_dir)
    rows = [{"prompt": nano_tok.decode(prompt_ids(nano_tok, p, "chat"))} for p in problems]
    def reward(completions, **kwargs):
        return [text_reward(c) for c in completions]

    n = args.prompts * args.group
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=n, gradient_accumulation_steps=1,
                            steps_per_generation=1, num_generations=args.group,
                            max_completion_length=args.tokens, beta=0.04, learning_rate=1e-6,
                            use_cpu=args.device == "cpu",
                            bf16=False, max_steps=args.steps + 1, logging_steps=1, report_to="none",
                            save_strategy="no", temperature=1.0, disable_tqdm=True, seed=0)
        times: list[float] = []
        generating: list[float] = []

        class Clock(transformers.TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t = time.perf_counter()
                generating.append(0.0)

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t)
                if len(times) <= args.steps:
                    between()

        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tok,
                              train_dataset=datasets.Dataset.from_list(rows * (args.steps + 2)), callbacks=[Clock()])
        generate = trainer._generate  # TRL's sampling of the completions (transformers' generate here)

        def timed_generate(*a, **k):
            t = time.perf_counter()
            out = generate(*a, **k)
            generating[-1] += time.perf_counter() - t
            return out

        trainer._generate = timed_generate
        with contextlib.redirect_stdout(io.StringIO()):  # its per-step log dicts; log_history keeps them
            trainer.train()
        lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history
                   if "completions/mean_length" in h][1:]
    steady = times[1:]  # the first step is the warm-up, as on our side
    return sum(steady) / len(steady), sum(lengths) / len(lengths), sum(generating[1:]) / sum(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model preset (default small)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt, G (default 8)")
    ap.add_argument("--tokens", type=int, default=64, help="max completion length (default 64)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each, after one warm-up (default 4)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: both libraries there, fp32")
    args = ap.parse_args()
    import trl
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, trl {trl.__version__}, {where}, fp32, "
          f"{args.preset}, {args.prompts} prompts x G {args.group}, <= {args.tokens} completion tokens", flush=True)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        save_model(Transformer(preset(args.preset)), d, extra_files=Tokenizer.byte_level().files())
        problems = TASKS["arithmetic"].problems("train", args.prompts, level=2, seed=0)
        eager, compiled = Ours(d, args), Ours(d, args, compiled=True)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

        def ours_in_turn():  # after each TRL step: one eager and one compiled nanoseek step
            eager.step()
            compiled.step()

        t_trl, len_trl, share_trl = theirs(d, problems, args, ours_in_turn)
        # the optimizer changes the weights in place; the compiled graph must not be rebuilt for that
        added = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        (t_ours, len_ours, share), (t_comp, len_comp, share_comp) = eager.result(), compiled.result()
        print(f"nanoseek:           {t_ours:.2f} s/step (mean completion {len_ours:.1f} tokens; rollouts {share:.0%})")
        print(f"nanoseek --compile: {t_comp:.2f} s/step (mean completion {len_comp:.1f} tokens; rollouts "
              f"{share_comp:.0%}; graphs compiled during the timed steps: {added})")
        print(f"TRL:                {t_trl:.2f} s/step (mean completion {len_trl:.1f} tokens; generation "
              f"{share_trl:.0%})")
        print(f"by part, s/step: sampling the completions {share * t_ours:.2f} eager / {share_comp * t_comp:.2f} "
              f"compiled / {share_trl * t_trl:.2f} TRL; the rest (log-probs, loss, backward, optimizer) "
              f"{(1 - share) * t_ours:.2f} / {(1 - share_comp) * t_comp:.2f} / {(1 - share_trl) * t_trl:.2f}")
        print(f"ratio: {t_trl / t_ours:.2f}x TRL's step rate eager, {t_trl / t_comp:.2f}x compiled")


if __name__ == "__main__":
    main()
