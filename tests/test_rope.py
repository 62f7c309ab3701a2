"""RoPE scaling, band by band. Each scaled variant treats frequency bands differently; a test configuration
that puts no frequency in some band cannot catch a wrong formula there. So each configuration below is
chosen to have frequencies in every band, the test asserts that it does (and that the bands really differ
from one another), and then checks our frequencies and logits against transformers'."""

import math

import pytest
import torch
from checkpoints import hf_model

from minillm import LLM
from minillm.model.config import load_config
from minillm.model.rope import RotaryEmbedding, _default_inv_freq

LLAMA3 = dict(
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=512,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
)
YARN = dict(
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=4096,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        beta_fast=32.0,
        beta_slow=1.0,
        original_max_position_embeddings=1024,
    ),
)
DYNAMIC = dict(max_position_embeddings=32, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0))


def rotary(folder):
    return RotaryEmbedding(load_config(folder))


def transformers_inv_freq(folder, seq_len=None):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.AutoConfig.from_pretrained(folder)
    kind = config.rope_parameters["rope_type"]
    inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](
        config, torch.device("cpu"), **({"seq_len": seq_len} if seq_len else {})
    )
    return inv_freq, factor


def bands(default, scaled, factor):
    """Label each frequency: 'kept' (unchanged), 'scaled' (divided by factor) or 'blended' (in between)."""
    out = []
    for d, s in zip(default.tolist(), scaled.tolist()):
        if math.isclose(s, d, rel_tol=1e-6):
            out.append("kept")
        elif math.isclose(s, d / factor, rel_tol=1e-6):
            out.append("scaled")
        else:
            assert d / factor < s < d, f"{s} is outside [{d / factor}, {d}]"
            out.append("blended")
    return out


@pytest.mark.parametrize("options", [LLAMA3, YARN], ids=["llama3", "yarn"])
def test_every_band_is_populated_and_matches_transformers(checkpoint, options):
    folder = checkpoint("llama", **options)
    ours = rotary(folder)
    rope = options["rope_parameters"]
    default = _default_inv_freq(rope["rope_theta"], options["head_dim"])
    labels = bands(default, ours.inv_freq, rope["factor"])
    # High frequencies (short wavelengths) kept, low ones scaled, a blend in between: each band non-empty,
    # in that order from the first frequency to the last.
    assert labels[0] == "kept" and labels[-1] == "scaled"
    assert {"kept", "blended", "scaled"} == set(labels), labels
    assert labels == sorted(labels, key=["kept", "blended", "scaled"].index)
    reference, attention_factor = transformers_inv_freq(folder)
    assert torch.equal(ours.inv_freq, reference.float())
    assert ours.attention_scaling == pytest.approx(attention_factor, rel=0, abs=0)


def test_yarn_bands_sit_where_the_beta_ramp_says(checkpoint):
    """yarn: dimensions below the beta_fast boundary extrapolate (kept), beyond beta_slow interpolate
    (scaled), and the ramp between blends them: check the boundaries computed from the formula."""
    ours = rotary(checkpoint("llama", **YARN))
    rope, dim = YARN["rope_parameters"], YARN["head_dim"]

    def boundary(rotations):
        return (
            dim
            * math.log(rope["original_max_position_embeddings"] / (rotations * 2 * math.pi))
            / (2 * math.log(rope["rope_theta"]))
        )

    low, high = math.floor(boundary(rope["beta_fast"])), math.ceil(boundary(rope["beta_slow"]))
    assert 0 < low < high < dim // 2  # the ramp lies inside the frequencies, with some on each side
    labels = bands(_default_inv_freq(rope["rope_theta"], dim), ours.inv_freq, rope["factor"])
    assert labels[:low] == ["kept"] * low
    assert labels[high:] == ["scaled"] * (dim // 2 - high)
    assert set(labels[low + 1 : high]) == {"blended"}


def test_dynamic_frequencies_change_only_beyond_the_original_length(checkpoint):
    folder = checkpoint("llama", **DYNAMIC)
    ours = rotary(folder)
    assert torch.equal(ours._dynamic_inv_freq(32), ours.inv_freq)  # within the pretrained length: untouched
    longer = ours._dynamic_inv_freq(48)
    assert (longer < ours.inv_freq)[1:].all() and longer[0] == ours.inv_freq[0]  # all but the first slow down
    reference, _ = transformers_inv_freq(folder, seq_len=48)  # (the forward's own path is checked bitwise below)
    torch.testing.assert_close(longer, reference.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("options", [LLAMA3, YARN, DYNAMIC], ids=["llama3", "yarn", "dynamic"])
def test_logits_bitwise_equal_to_transformers_on_the_band_configs(checkpoint, options):
    folder = checkpoint("llama", **options)
    ids = torch.randint(2, 300, (48,), generator=torch.Generator().manual_seed(5)).tolist()  # beyond 32 for dynamic
    with torch.no_grad():
        reference = hf_model(folder)(torch.tensor([ids])).logits[0]
    assert torch.equal(LLM.load(folder, prepack=False).logits(ids), reference)


def yarn(**parameters):
    rope = dict(YARN["rope_parameters"]) | parameters
    return dict(YARN, rope_parameters=rope)


EDGE_CONFIGS = {
    "linear": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "llama3-low-factor-2": dict(LLAMA3, rope_parameters=dict(LLAMA3["rope_parameters"], low_freq_factor=2.0)),
    "yarn-mscale-both": yarn(factor=2.0, mscale=0.707, mscale_all_dim=0.5),  # DeepSeek's form
    "yarn-mscale-one": yarn(factor=2.0, mscale=0.707),
    "yarn-factor-1": yarn(factor=1.0),
    "yarn-ramp-clamped": yarn(beta_fast=1e6, beta_slow=1e-6),  # the ramp runs past both ends of the channels
    "yarn-ramp-empty": yarn(beta_fast=8.0, beta_slow=8.0, truncate=False),  # low == high
}


@pytest.mark.parametrize("name", EDGE_CONFIGS)
def test_frequencies_and_attention_factor_equal_transformers_on_edge_configs(checkpoint, name):
    """The branches the band configurations do not reach: linear scaling, YaRN's mscale forms, a factor of
    1, a ramp clamped at both ends and an empty ramp, llama3 with another low_freq_factor."""
    folder = checkpoint("llama", **EDGE_CONFIGS[name])
    ours = rotary(folder)
    reference, attention_factor = transformers_inv_freq(folder)
    assert torch.equal(ours.inv_freq, reference.float())
    assert ours.attention_scaling == attention_factor
    positions = torch.arange(40)
    cos, sin = ours.cos_sin(positions, torch.bfloat16)
    cos32, sin32 = ours.cos_sin(positions, torch.float32)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos32.shape == (40, ours.dim)
    assert torch.equal(cos, cos32.bfloat16()) and torch.equal(sin, sin32.bfloat16())
    angles = torch.outer(positions.float(), ours.inv_freq).repeat(1, 2)
    assert torch.equal(cos32, angles.cos() * ours.attention_scaling)
