"""Reasoning / content split: DeepSeek-R1's rule, whole and streamed in any pieces."""

import pytest

from nanoseek.engine.reasoning import ReasoningSplitter, split_reasoning

CASES = [  # text, implicit, (reasoning, content)
    ("<think>add 2 and 2</think><answer>4</answer>", True, ("add 2 and 2", "<answer>4</answer>")),
    ("add 2 and 2</think>\n\n4", True, ("add 2 and 2", "\n\n4")),  # opening tag in the prompt
    ("still thinking when it stopped", True, ("still thinking when it stopped", "")),  # no </think>
    ("<think>cut off", True, ("cut off", "")),
    ("  <think>a</think>b", True, ("a", "b")),
    ("<think></think>", True, ("", "")),
    ("a < b </think> c </think> d", True, ("a < b ", " c </think> d")),  # only the first closes
    ("</thin is not a tag", True, ("</thin is not a tag", "")),
    ("plain answer", False, ("", "plain answer")),
    ("<think>x</think>y", False, ("x", "y")),
    ("<thi", False, ("", "<thi")),
    ("", True, ("", "")),
]


@pytest.mark.parametrize("text, implicit, want", CASES)
def test_split_whole(text, implicit, want):
    assert split_reasoning(text, implicit) == want


@pytest.mark.parametrize("text, implicit, want", CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_split_streamed_equals_whole(text, implicit, want, size):
    split = ReasoningSplitter(implicit)
    reasoning = content = ""
    for i in range(0, len(text), size):
        r, c = split.push(text[i:i + size])
        assert not (r and content), "reasoning after content"
        reasoning, content = reasoning + r, content + c
    r, c = split.finish()
    assert (reasoning + r, content + c) == want
