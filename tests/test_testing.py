"""megatiny.testing.assert_parallel_equivalent: passes on correct layers at every layout, fails
naming the right tensor on a planted bug; the examples of docs/extending.md run as written."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatiny.parallel.comm import copy_to_tp, reduce_from_tp, reduce_scatter_to_sp
from megatiny.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatiny.testing import Layout, assert_parallel_equivalent, parse_layout
from megatiny.testing.gather import split_dims

DOC = Path(__file__).parents[1] / "docs" / "extending.md"
LAYOUTS = ["tp=2", "tp=2,sequence_parallel=true", "tp=2,dp=2"]


def doc_blocks() -> list[str]:
    """The ```python blocks of docs/extending.md not preceded by <!-- not run -->."""
    text = DOC.read_text()
    blocks = []
    for m in re.finditer(r"(<!-- not run -->\s*)?```python\n(.*?)```", text, re.S):
        if not m.group(1):
            blocks.append(m.group(2))
    return blocks


def test_docs_extending_examples_run():
    blocks = doc_blocks()
    assert len(blocks) >= 4, "the page's examples were not found"
    namespace: dict = {"__name__": "extending_md"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102
    assert "ParallelGatedMLP" in namespace


def _doc_layer():
    namespace: dict = {"__name__": "extending_md"}
    exec(compile("\n".join(doc_blocks()[:2]), str(DOC), "exec"), namespace)  # noqa: S102
    return namespace["GatedMLP"], namespace["ParallelGatedMLP"]


@pytest.mark.parametrize(
    "drop, names",
    [(reduce_from_tp, "worst output\\[0\\]"), (copy_to_tp, "worst input\\[0\\].grad")],
)
def test_the_docs_layer_with_a_missing_collective_fails_naming_the_tensor(monkeypatch, drop, names):
    single, parallel = _doc_layer()
    # The layer's module globals hold the comm Functions: replace one by the identity.
    monkeypatch.setitem(parallel.forward.__globals__, drop.__name__, lambda x, group: x)
    with pytest.raises(AssertionError, match=names):
        assert_parallel_equivalent(
            lambda: single(16, 32),
            lambda m, ctx, sequence_parallel: parallel(m, ctx.tp_group, sequence_parallel),
            torch.randn(4, 8, 16),
            layouts=["tp=2"],
        )


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc, self.proj = nn.Linear(16, 32, bias=bias), nn.Linear(32, 16, bias=bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def megatiny_mlp(m, ctx, sequence_parallel):
    m.fc = ColumnParallelLinear.from_linear(m.fc, ctx.tp_group, sequence_parallel=sequence_parallel)
    m.proj = RowParallelLinear.from_linear(
        m.proj, ctx.tp_group, sequence_parallel=sequence_parallel
    )
    return m


def test_megatiny_layers_pass_at_every_layout():
    assert_parallel_equivalent(MLP, megatiny_mlp, torch.randn(4, 8, 16), layouts=LAYOUTS + ["tp=4"])


class _BiasWithoutGradSum(RowParallelLinear):
    """Under SP each rank adds the bias to its own sequence shard: without copy_to_tp its
    gradient covers only that shard (forward unchanged)."""

    def forward(self, x):
        if not self.sequence_parallel:
            return super().forward(x)
        return reduce_scatter_to_sp(F.linear(x, self.weight), self.group, dim=1) + self.bias


def test_a_gradient_only_bug_is_named_by_parameter():
    def build(m, ctx, sequence_parallel):
        m = megatiny_mlp(m, ctx, sequence_parallel)
        m.proj.__class__ = _BiasWithoutGradSum
        return m

    with pytest.raises(
        AssertionError, match="worst grad proj.bias at tp=2,sequence_parallel=true"
    ) as e:
        assert_parallel_equivalent(MLP, build, torch.randn(4, 8, 16), layouts=LAYOUTS)
    assert "1 tensors over" in str(e.value)  # only that gradient: the forward is right


def test_a_layer_reducing_over_the_world_fails_only_beside_another_tp_group():
    def build(m, ctx, sequence_parallel):
        m = megatiny_mlp(m, ctx, sequence_parallel)
        m.proj.group = None  # the default (world) group instead of its TP group
        return m

    assert_parallel_equivalent(MLP, build, torch.randn(4, 8, 16), layouts=["tp=2"])
    with pytest.raises(AssertionError, match="at tp=2,dp=2"):
        assert_parallel_equivalent(MLP, build, torch.randn(4, 8, 16), layouts=["tp=2,dp=2"])


def test_column_splits_are_reassembled_in_segment_order():
    def build(m, ctx, sequence_parallel):
        return ColumnParallelLinear.from_linear(m, ctx.tp_group, splits=[8, 16, 8])

    assert_parallel_equivalent(
        lambda: nn.Linear(16, 32), build, torch.randn(2, 4, 16), layouts=["tp=2", "tp=4"]
    )


def test_layouts_parse_and_print():
    layout = parse_layout("tp=2, sequence_parallel=true,dp=2")
    assert layout == Layout(tp=2, dp=2, sequence_parallel=True)
    assert str(layout) == "tp=2,dp=2,sequence_parallel=true"
    assert parse_layout({"tp": 4}).world_size == 4
    with pytest.raises(ValueError, match="unknown key 'tpp'"):
        parse_layout("tpp=2")
    with pytest.raises(ValueError, match="needs tp > 1"):
        parse_layout("sequence_parallel=true")


def test_shard_shapes_are_checked():
    assert split_dims((4, 8), (4, 16), 2) == [1]
    assert split_dims((4, 64), (4, 100), 2) == [1]  # padded
    with pytest.raises(ValueError, match="not a 1/2 split"):
        split_dims((4, 3), (4, 16), 2)
    with pytest.raises(ValueError, match="only one split dim"):
        split_dims((2, 8), (4, 16), 2)
