"""SFT: assistant-only targets, packing and padding, exact resume of the batch stream, the CLI end to end."""

import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.data.tasks import TASKS
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.args import TrainError
from nanoseek.train.sft import ChatBatches, read_conversations


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    task = TASKS["arithmetic"]
    with open(root / "train.jsonl", "w") as f:
        for p in task.problems("train", 40, level=2, seed=0):
            f.write(json.dumps({"messages": [{"role": "user", "content": p.prompt},
                                             {"role": "assistant", "content": task.solution(p)}]}) + "\n")
    return root


def test_targets_are_the_assistant_tokens_only(examples):
    tok = Tokenizer.byte_level()
    convs = read_conversations([str(examples / "train.jsonl")], tok)
    batches = ChatBatches(convs, seq_len=128, batch_size=2, pad_id=tok.pad_id, packing=False, seed=0)
    x, y = batches.next_batch()
    assert x.shape == y.shape == (2, 128)
    for row_x, row_y in zip(x, y):
        learned = [t for t in row_y.tolist() if t != -100]
        text = tok.decode(learned)
        assert text.startswith("<think>") and "What is" not in text  # never the user's prompt
        assert (row_x == tok.pad_id).any() or len(learned) > 0


def test_packing_fills_rows_and_resumes_exactly(examples):
    tok = Tokenizer.byte_level()
    convs = read_conversations([str(examples / "train.jsonl")], tok)
    ref = ChatBatches(convs, 64, 3, tok.pad_id, packing=True, seed=1)
    want = [ref.next_batch() for _ in range(30)]  # several epochs
    assert not (want[0][0] == tok.pad_id).any()
    a = ChatBatches(convs, 64, 3, tok.pad_id, packing=True, seed=1)
    for _ in range(7):
        a.next_batch()
    b = ChatBatches(convs, 64, 3, tok.pad_id, packing=True, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for i in range(7, 30):
        x, y = b.next_batch()
        assert torch.equal(x, want[i][0]) and torch.equal(y, want[i][1])


@pytest.mark.parametrize("line, message", [
    ("{not json", "train.jsonl:2: expected a JSON object"),
    (json.dumps({"text": "x"}), "train.jsonl:2: expected a JSON object with a 'messages' list"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "train.jsonl:2: no assistant message"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), r"train.jsonl:2: messages\[0\]"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    (tmp_path / "train.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(TrainError, match=message):
        read_conversations([str(tmp_path / "train.jsonl")], Tokenizer.byte_level())


def test_sft_cli_trains_and_resumes(examples, tmp_path):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "base")]) == 0
    argv = ["sft", "--model", str(tmp_path / "base"), "--data", str(examples / "train.jsonl"), "--out",
            str(tmp_path / "sft"), "--steps", "30", "--batch-size", "4", "--seq-len", "96", "--precision", "fp32",
            "--warmup", "3", "--save-every", "10", "--quiet"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 1.0
    assert (tmp_path / "sft" / "model.safetensors").exists()
    assert main(argv[:argv.index("--steps") + 1] + ["40"] + argv[argv.index("--steps") + 2:] + ["--resume"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
