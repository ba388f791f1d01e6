"""One GRPO step, nanoseek against TRL's GRPOTrainer: same model, prompts, G, completion length.

    pip install trl                      # TRL is not a nanoseek dependency
    python benchmarks/grpo_speed.py      # a random `small`, 4 prompts x G 8, 64-token completions, 3 steps

Both run the same model dir (TRL through transformers' DeepseekV3ForCausalLM), fp32 on the
CPU, with a frozen reference (beta 0.04), one optimizer step per batch of rollouts, and the same
reward: a deterministic function of the completion text with variance inside every group, so
both libraries train on every completion (a random model never solves a task, and nanoseek skips
zero-variance groups, which would flatter it). Completions run to the length limit or an
end-of-sentence, which a random model rarely samples; the mean completion length of each side
is reported. The variants differ as documented in docs/grpo.md: nanoseek averages per sequence
(DeepSeekMath's GRPO); TRL here uses its default, loss_type="dapo" (token-level). nanoseek
runs twice: eager, and with its rollouts through the compiled decode step (`grpo --compile`;
compiling happens before the warm-up step and is not timed, and the script reports any graph
compiled during the timed steps, which would mean the weight updates broke the graph's reuse).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time

import torch

from nanoseek import Transformer, load_model, preset, save_model
from nanoseek.data.tasks import TASKS
from nanoseek.rl import train as rl_train
from nanoseek.rl.evaluate import prompt_ids
from nanoseek.rl.rewards import Score
from nanoseek.tokenizer import Tokenizer


def text_reward(text: str) -> float:
    """0 or 1 from a hash of the text: varies within every group, costs nothing."""
    return float(hashlib.sha256(text.encode()).digest()[0] % 2)


def ours(model_dir: str, problems, args, compiled: bool = False) -> tuple[float, float, float]:
    """Mean seconds per step, mean completion length, and the rollouts' share of the step."""
    rl_train.score = lambda task, problem, text, cfg: Score(text_reward(text), False, False, 0.0)
    policy = load_model(model_dir)
    tok = Tokenizer.load(model_dir)
    cfg = rl_train.GRPOConfig(task="arithmetic", level=2, prompts=args.prompts, group=args.group, max_tokens=args.tokens,
                              minibatch=args.prompts * args.group, beta=0.04, lr=1e-6)
    ref = load_model(model_dir).requires_grad_(False)
    optim = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    engine = rl_train.Engine(policy, tok, max_running=args.prompts * args.group, compile=compiled)
    if compiled:
        engine.warm_up()
    task = TASKS["arithmetic"]
    rl_train.grpo_step(policy, ref, optim, engine, task, cfg, 0, tok)  # warm-up
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    times, lengths, rollout = [], [], []
    for step in range(1, args.steps + 1):
        m = rl_train.grpo_step(policy, ref, optim, engine, task, cfg, step, tok)
        times.append(m["seconds"])
        lengths.append(m["response_length"])
        rollout.append(m["rollout_seconds"])
    if compiled:  # the optimizer changes the weights in place; the graph must not be rebuilt for that
        added = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        print(f"  graphs compiled during the timed steps: {added}")
    return sum(times) / len(times), sum(lengths) / len(lengths), sum(rollout) / sum(times)


def theirs(model_dir: str, problems, args) -> tuple[float, float]:
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
                            max_completion_length=args.tokens, beta=0.04, learning_rate=1e-6, use_cpu=True,
                            bf16=False, max_steps=args.steps + 1, logging_steps=1, report_to="none",
                            save_strategy="no", temperature=1.0, disable_tqdm=True, seed=0)
        times: list[float] = []

        class Clock(transformers.TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t)

        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tok,
                              train_dataset=datasets.Dataset.from_list(rows * (args.steps + 2)), callbacks=[Clock()])
        trainer.train()
        lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history
                   if "completions/mean_length" in h][1:]
    steady = times[1:]  # the first step is the warm-up, as on our side
    return sum(steady) / len(steady), sum(lengths) / len(lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model preset (default small)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt, G (default 8)")
    ap.add_argument("--tokens", type=int, default=64, help="max completion length (default 64)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    args = ap.parse_args()
    import trl
    print(f"torch {torch.__version__}, trl {trl.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"{args.preset}, {args.prompts} prompts x G {args.group}, <= {args.tokens} completion tokens", flush=True)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        save_model(Transformer(preset(args.preset)), d, extra_files=Tokenizer.byte_level().files())
        problems = TASKS["arithmetic"].problems("train", args.prompts, level=2, seed=0)
        t_ours, len_ours, share = ours(d, problems, args)
        print(f"nanoseek:          {t_ours:.2f} s/step (mean completion {len_ours:.1f} tokens; rollouts {share:.0%})",
              flush=True)
        t_comp, len_comp, share_comp = ours(d, problems, args, compiled=True)
        print(f"nanoseek --compile: {t_comp:.2f} s/step (mean completion {len_comp:.1f} tokens; rollouts "
              f"{share_comp:.0%})", flush=True)
        t_trl, len_trl = theirs(d, problems, args)
        print(f"TRL:               {t_trl:.2f} s/step (mean completion {len_trl:.1f} tokens)")
        print(f"ratio: {t_trl / t_ours:.2f}x TRL's step rate eager, {t_trl / t_comp:.2f}x compiled")


if __name__ == "__main__":
    main()
