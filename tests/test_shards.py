import json
import random

import numpy as np
import pytest
import torch

from nanoseek.cli import main
from nanoseek.data.curate import curate
from nanoseek.data.shards import Loader, ShardError, tokenize_dir
from nanoseek.data.tasks import TASKS
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    with open(root / "corpus.jsonl", "w") as f:
        for name, task in TASKS.items():
            for p in task.problems("train", 150, seed=0):
                f.write(json.dumps({"text": f"{p.prompt}\n{task.solution(p)}", "difficulty": p.level}) + "\n")
        rng = random.Random(0)
        for i in range(60):
            words = " ".join("".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(40))
            f.write(json.dumps({"text": f"Story number {i}: {words}"}) + "\n")
    curate([root / "corpus.jsonl"], root / "curated", workers=1)
    tok = Tokenizer.train((json.loads(l)["text"] for l in open(root / "corpus.jsonl")), 600)
    tok.save(root / "tok")
    tokenize_dir(root / "curated", root / "tok", root / "tokens", workers=2)
    return root, tok


def test_tokens_round_trip_and_workers_agree(data, tmp_path):
    root, tok = data
    tokenize_dir(root / "curated", root / "tok", tmp_path / "t1", workers=1)
    index = json.loads((root / "tokens" / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["num_docs"] == 510
    for shard in index["shards"]:
        assert (tmp_path / "t1" / shard["tokens"]).read_bytes() == (root / "tokens" / shard["tokens"]).read_bytes()
    tokens = np.fromfile(root / "tokens" / index["shards"][0]["tokens"], dtype=np.uint16)
    docs = np.load(root / "tokens" / index["shards"][0]["docs"])
    first = tok.decode(tokens[docs[0, 0]:docs[0, 0] + docs[0, 1]].tolist())
    assert first.startswith("What is") and "<answer>" in first


def test_rows_are_packed_with_bos_per_document(data):
    root, tok = data
    loader = Loader(root / "tokens", seq_len=64, batch_size=4, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x[0, 0] == tok.bos_id
    text = tok.decode(x[0].tolist())
    assert text.count("<｜begin▁of▁sentence｜>") == (x[0] == tok.bos_id).sum()


def test_a_document_that_fits_a_row_is_never_cut_from_its_beginning(data):
    """A task's working is always trained after its prompt: a document that does not fit in a row's rest
    starts the next row whole. Only a document longer than a row continues across rows."""
    root, tok = data
    loader = Loader(root / "tokens", seq_len=256, batch_size=1, seed=0, weights={"math": 1.0})
    assert int(loader.docs["math"][:, 2].max()) < 256
    whole = 0
    for _ in range(60):
        x, y = loader.next_batch()
        row = torch.cat([x[0], y[0, -1:]]).tolist()
        assert row[0] == tok.bos_id
        starts = [i for i, t in enumerate(row) if t == tok.bos_id] + [len(row)]
        for a, b in zip(starts, starts[1:]):
            text = tok.decode(row[a + 1:b])
            assert any(text.startswith(s) or s.startswith(text) for s in ("What is", "Using the numbers", "Sort ")), text
            whole += b < len(row)
            assert b == len(row) or text.endswith("</answer>")
    assert whole > 60
    long = Loader(root / "tokens", seq_len=16, batch_size=1, seed=0, weights={"prose": 1.0})
    rows = [torch.cat([x[0], y[0, -1:]]) for x, y in (long.next_batch() for _ in range(3))]
    assert rows[0][0] == tok.bos_id and rows[1][0] != tok.bos_id  # a story continues into the next row


def test_deterministic_for_a_seed(data):
    root, _ = data
    a = [Loader(root / "tokens", 32, 2, seed=3).next_batch()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], Loader(root / "tokens", 32, 2, seed=4).next_batch()[0])


def test_resume_is_exact(data):
    root, _ = data
    ref = Loader(root / "tokens", 48, 3, seed=1, weights={"math": 2.0, "prose": 1.0})
    want = [ref.next_batch() for _ in range(40)]  # several epochs of the small prose domain
    first = Loader(root / "tokens", 48, 3, seed=1, weights={"math": 2.0, "prose": 1.0})
    for _ in range(13):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = Loader(root / "tokens", 48, 3, seed=1, weights={"math": 2.0, "prose": 1.0})
    resumed.load_state_dict(state)
    for i in range(13, 40):
        x, y = resumed.next_batch()
        assert torch.equal(x, want[i][0]) and torch.equal(y, want[i][1]), i


def test_mixture_weights(data):
    root, tok = data
    only_prose = Loader(root / "tokens", 64, 8, seed=0, weights={"prose": 1.0})
    text = tok.decode(only_prose.next_batch()[0].flatten().tolist())
    assert "Story number" in text and "<answer>" not in text
    with pytest.raises(ShardError, match="unknown domain"):
        Loader(root / "tokens", 64, 8, weights={"poetry": 1.0})


def test_curriculum_orders_by_difficulty(data):
    root, tok = data
    loader = Loader(root / "tokens", 64, 1, seed=0, weights={"math": 1.0}, curriculum=True)
    levels = []
    for _ in range(60):
        domain, doc = loader._next_doc()
        levels.append(int(loader.docs[domain][doc, 4]))
    assert levels == sorted(levels) and levels[0] == 1


def test_data_parallel_ranks_split_the_global_stream(data):
    root, _ = data
    single = Loader(root / "tokens", 32, 4, seed=2)
    ranks = [Loader(root / "tokens", 32, 2, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x = single.next_batch()[0]
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(x[0::2], parts[0]) and torch.equal(x[1::2], parts[1])


def test_corrupt_and_missing_shards(data, tmp_path):
    root, _ = data
    with pytest.raises(ShardError, match="index.json: not found"):
        Loader(tmp_path, 32, 1)
    import shutil
    shutil.copytree(root / "tokens", tmp_path / "t")
    f = next((tmp_path / "t").glob("tokens-*.bin"))
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ShardError, match=f"{f.name}: expected .* bytes"):
        Loader(tmp_path / "t", 32, 1)


def test_cli_tokenizer_and_tokenize(data, tmp_path, capsys):
    root, _ = data
    assert main(["tokenizer", "--input", str(root / "curated"), "--vocab-size", "300", "--out",
                 str(tmp_path / "tok"), "--quiet"]) == 0
    assert main(["tokenize", "--input", str(root / "curated"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "tokens"), "--quiet"]) == 0
    assert "510 documents" in capsys.readouterr().out
    assert main(["tokenize", "--input", str(tmp_path), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2


def test_token_dtype_by_vocab_size():
    from nanoseek.data.shards import token_dtype
    assert token_dtype(4096) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == token_dtype(129280) == "uint32"
