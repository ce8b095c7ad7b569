"""MoCEIR's constructor refuses arguments that cannot build a working model, naming the argument,
before it allocates anything; the arguments it accepts give a model whose forward runs."""
import pytest
import torch

from moce_kernels import MoCEIR

TINY = dict(dim=8, num_blocks=[1, 1, 1, 1])


@pytest.mark.parametrize("inp, out", [(4, 3), (3, 1), (1, 3)])
def test_channels_must_match_for_the_global_residual(inp, out):
    # the output is output_conv(features) + input, as in the authors' model: (4, 3) failed at the
    # first forward and (3, 1) silently returned 3 channels (the residual broadcast)
    with pytest.raises(ValueError, match=f"out_channels = {out} must equal inp_channels = {inp}"):
        MoCEIR(inp_channels=inp, out_channels=out, **TINY)


@pytest.mark.parametrize("channels", [1, 4])
def test_other_channel_counts_run(channels):
    model = MoCEIR(inp_channels=channels, out_channels=channels, **TINY).eval()
    with torch.no_grad():
        y = model(torch.rand(1, channels, 16, 16))
    assert y.shape == (1, channels, 16, 16)


BAD = [  # (arguments, the name the error must give)
    (dict(num_dec_blocks=[0, 0, 0]), r"num_dec_blocks\[0\] = 0"),
    (dict(num_dec_blocks=[1, -1, 1]), r"num_dec_blocks\[1\] = -1"),
    (dict(num_blocks=[1, 1, -2, 1]), r"num_blocks\[2\] = -2"),
    (dict(num_blocks=[1, 1, 1, 0]), r"num_blocks\[3\] = 0"),
    (dict(num_refinement_blocks=-1), "num_refinement_blocks = -1"),
    (dict(stage_depth=[1, -3, 1]), r"stage_depth\[1\] = -3"),
    (dict(depth_type="constant", stage_depth=[1, 0, 1]), r"stage_depth\[1\] = 0"),
    (dict(depth_type=-1), "depth_type = -1"),
    (dict(depth_type=0), "depth_type = 0"),
    (dict(dim=-8), "dim"),
    (dict(inp_channels=0, out_channels=0), "inp_channels = 0"),
    (dict(inp_channels=-3, out_channels=-3), "inp_channels = -3"),
    (dict(levels=-1), "levels"),
    (dict(num_experts=0, topk=0), "num_experts = 0"),
    (dict(rank=-2), "rank = -2"),
    (dict(rank=0), "rank = 0"),
    (dict(ffn_expansion_factor=-2), "ffn_expansion_factor = -2"),
    (dict(ffn_expansion_factor=0.01), "ffn_expansion_factor = 0.01"),
    (dict(ffn_expansion_factor=float("nan")), "ffn_expansion_factor = nan"),
    (dict(ffn_expansion_factor=float("inf")), "ffn_expansion_factor = inf"),
]


@pytest.mark.parametrize("kwargs, name", BAD, ids=[n for _, n in BAD])
def test_impossible_sizes_are_refused_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MoCEIR(**dict(TINY, **kwargs))


WRONG_TYPES = [  # values a JSON file or a command line can hold: each refused before anything is built
    dict(ffn_expansion_factor="2"), dict(dim="8"), dict(dim=8.0), dict(levels=4.0), dict(levels=True),
    dict(heads=[1, 1, "1", 1]), dict(num_blocks=[1, 1, 1.5, 1]), dict(num_dec_blocks="111"),
    dict(num_refinement_blocks=1.0), dict(rank="2"), dict(num_experts=4.0), dict(topk=1.5), dict(topk=True),
    dict(stage_depth=[3, 2, 1.0]), dict(inp_channels="3"), dict(bias="False"), dict(with_complexity=1),
    dict(ffn_expansion_factor=True),
]


@pytest.mark.parametrize("kwargs", WRONG_TYPES, ids=[repr(k) for k in WRONG_TYPES])
def test_wrong_types_are_refused_naming_the_argument(kwargs):
    (name,) = kwargs
    with pytest.raises((TypeError, ValueError), match=name):
        MoCEIR(**dict(TINY, **kwargs))


def test_refused_before_allocating(monkeypatch):
    """ffn_expansion_factor "2" made int(dim * "2") a 32-digit number of channels (284 PB)."""
    def no_conv(*args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", no_conv)
    with pytest.raises(TypeError, match="ffn_expansion_factor"):
        MoCEIR(dim=32, ffn_expansion_factor="2")


def test_zero_refinement_blocks_and_fractional_expansion_still_build():
    model = MoCEIR(num_refinement_blocks=0, ffn_expansion_factor=2.66, **TINY).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
