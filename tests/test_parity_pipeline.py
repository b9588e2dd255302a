"""megatiny parity under pipeline layouts: pp, interleaved pp and tp x pp agree with the single
device micro-batch by micro-batch; a stale pipeline message, a vocabulary partition that ignores
the padding and an unsynced tied embedding are each named first; layouts that cannot be cut fail
before any rank starts."""

import re

import pytest

from megatiny.config import Config, ConfigError
from megatiny.parallel.layers import VocabParallelEmbedding
from megatiny.parity import format_report, run_parity

CONFIG = "launch/configs/tiny-cpu.yaml"


def config(n_layers: int) -> Config:  # vocab 300: padded to 512 at tp=2
    return Config.from_yaml(
        CONFIG, ["model.vocab_size=300", f"model.n_layers={n_layers}", "data.tokenizer=null"]
    )


def stale_activation_send(model, ctx):
    """The planted bug: every activation sent down the pipeline is the first one sent (a send
    buffer reused without refilling it). Micro-batch 0 is right; micro-batch 1 is not."""
    if ctx.pp_size == 1:
        return
    from megatiny.parallel.pipeline import P2P

    post, first = P2P.post, []

    def stale(self, messages):
        out = []
        for kind, t, peer in messages:
            if kind == "send" and peer > self.rank:  # activations flow up the stages at pp=2
                if not first:
                    first.append(t.detach().clone())
                t = first[0]
            out.append((kind, t, peer))
        return post(self, out)

    P2P.post = stale  # in this forked rank only


def partition_without_padding(model, ctx):
    """The planted bug (the Megatron-LM#1754 kind): the embedding's shards were cut from the
    vocabulary padded to V' = 512 (256 rows per rank), but the ranks split the lookups as if the
    300 ids were cut evenly (150 per rank), so ids 150..255 are looked up twice and ids 256.. at
    the wrong rows."""
    embed = model.embed
    if isinstance(embed, VocabParallelEmbedding):
        per_rank = -(-embed.num_embeddings // embed.tp)
        embed.vocab_start = embed.tp_rank * per_rank
        embed.vocab_end = embed.vocab_start + per_rank


def no_tied_gradient_sum(model, ctx):
    """The planted bug: the first and last stage never sum their tied-embedding gradients."""
    import megatiny.parallel.pipeline as pipeline

    pipeline.sync_tied_grads = lambda *args, **kwargs: None


def test_pipeline_layouts_agree_with_the_single_device_run():
    layouts = ["tp=1", "pp=2", "pp=2,virtual_pipeline_size=2", "tp=2,pp=2"]
    report = run_parity(config(4), layouts, seq_length=16)
    assert report.ok, format_report(report)
    assert report.micro_batches == 2  # the reference accumulates the pipeline's 2 micro-batches
    # Every reference tensor was found (a missing one is a difference), plus the tied
    # embedding's gradient on the last stage, compared too.
    assert len({r.compared for r in report.results}) == 1 and report.results[0].compared > 150


def test_recomputed_blocks_are_compared_once_per_micro_batch():
    # The reference recomputes a block right after its forward, 1F1B after another micro-batch's.
    cfg = config(2)
    cfg.model.recompute = "full"
    report = run_parity(cfg, ["tp=1", "pp=2"], seq_length=16)
    assert report.ok, format_report(report)


def test_a_stale_pipeline_message_is_named_at_the_receiving_stage():
    report = run_parity(config(2), ["tp=1", "pp=2"], seq_length=16, patch=stale_activation_send)
    first = report.results[0].differences[0]
    # Stage 1 starts at block 1; micro-batch 0 is right, micro-batch 1's input is stale.
    assert (first.step, first.micro_batch, first.kind, first.name) == (
        0, 1, "output", "blocks.1.norm1"
    )  # fmt: skip
    assert first.collective.startswith("p2p(pp)") and "recv_forward(mb 1)" in first.collective
    assert not any(d.micro_batch == 0 for d in report.results[0].differences)
    assert " 1  output  blocks.1.norm1 " in format_report(report).splitlines()[3]


def test_a_vocabulary_partition_without_padding_names_the_embedding():
    report = run_parity(
        config(2), ["tp=1", "tp=2", "tp=2,pp=2"], seq_length=16, patch=partition_without_padding
    )
    for result in report.results:
        first = result.differences[0]
        assert (first.step, first.micro_batch, first.kind, first.name) == (0, 0, "output", "embed")
        assert first.collective.startswith("all_reduce(tp)"), first.collective
        assert first.collective.endswith("in embed")  # its own reduction: it is the culprit


def test_an_unsynced_tied_embedding_names_both_copies():
    report = run_parity(config(2), ["tp=1", "pp=2"], seq_length=16, patch=no_tied_gradient_sum)
    found = [(d.kind, d.name, d.note) for d in report.results[0].differences]
    assert found == [
        ("grad", "embed.weight", ""),
        ("grad", "embed.weight", "its copy on pipeline rank 1"),
        ("step", "grad_norm", ""),
    ]


@pytest.mark.parametrize(
    "layout, n_layers, message",
    [
        ("pp=2,virtual_pipeline_size=2", 2, "n_layers=2 is not divisible by"),
        ("pp=3", 4, "n_layers=4 is not divisible by"),
        ("virtual_pipeline_size=2", 4, "needs pp > 1"),
        ("pp=2,dp=4", 4, "--batch-size 4 is not divisible by dp x micro-batches = 4 x 2"),
        ("cp=2", 4, "cp is not supported yet"),
    ],
)
def test_a_layout_that_cannot_run_is_refused_before_any_rank_starts(layout, n_layers, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:  # timeout=1: nothing runs
        run_parity(config(n_layers), ["tp=1", layout], seq_length=16, timeout=1)
    assert str(e.value).startswith("layout tp=1,")  # the layout at fault, not the reference
