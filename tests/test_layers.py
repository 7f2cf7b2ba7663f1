"""OTQLinear / OTQConv2d: forward parity with F.linear/F.conv2d, buffers, state_dict, dtype casts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_otq import OTQConv2d, OTQLinear


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_linear_forward_equals_f_linear_with_dequantized_weight(dtype: torch.dtype, granularity: str) -> None:
    linear = nn.Linear(64, 24).to(dtype)
    layer = OTQLinear.from_module(
        linear, bits=3, granularity=granularity, group_size=16 if granularity == "group" else None
    )
    x = torch.randn(5, 64, dtype=dtype)
    expected = F.linear(x, layer.dequantize_weight(dtype), linear.bias)
    assert torch.equal(layer(x), expected)
    assert layer(x).dtype == dtype


def test_linear_follows_input_dtype_and_keeps_bias_precision() -> None:
    linear = nn.Linear(32, 8)
    layer = OTQLinear.from_module(linear, bits=4)
    assert layer.bias.dtype == torch.float32
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    expected = F.linear(x, layer.dequantize_weight(torch.bfloat16), linear.bias.to(torch.bfloat16))
    assert torch.equal(layer(x), expected)


CONV_CASES = {
    "plain": dict(in_channels=4, out_channels=8, kernel_size=3),
    "stride-pad": dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1),
    "dilation": dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2),
    "groups": dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, padding=1),
    "no-bias-1x1": dict(in_channels=4, out_channels=8, kernel_size=1, bias=False),
    "reflect": dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, padding_mode="circular"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_forward_equals_conv_with_dequantized_weight(case: str) -> None:
    conv = nn.Conv2d(**CONV_CASES[case])
    layer = OTQConv2d.from_module(conv, bits=4)
    reference = conv.__class__(**CONV_CASES[case])
    reference.load_state_dict(
        {"weight": layer.dequantize_weight(), **({"bias": conv.bias} if conv.bias is not None else {})}
    )
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(layer(x), reference(x))
    plain = layer.dequantize()
    assert type(plain) is nn.Conv2d and torch.equal(plain(x), reference(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_dtypes(dtype: torch.dtype) -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1).to(dtype)
    layer = OTQConv2d.from_module(conv, bits=2)
    x = torch.randn(1, 3, 6, 6, dtype=dtype)
    assert torch.equal(layer(x), F.conv2d(x, layer.dequantize_weight(dtype), conv.bias, 1, 1))


def test_stored_tensors_state_dict_and_safetensors_roundtrip(tmp_path) -> None:
    layer = OTQLinear.from_module(nn.Linear(96, 40), bits=3, granularity="group", group_size=32)
    state = layer.state_dict()
    assert set(state) == {"weight", "codebook", "scale_codes", "scale_max", "scale_step", "bias"}
    assert state["weight"].dtype == torch.uint8 and torch.equal(state["weight"], layer.packed)  # the codes
    # the codes are the weight parameter (offload hooks move parameters), never trainable; the rest are buffers
    assert dict(layer.named_parameters()) == {"weight": layer.packed, "bias": layer.bias}
    assert type(layer.packed) is nn.Parameter and not layer.packed.requires_grad
    assert {name for name, _ in layer.named_buffers()} == {"codebook", "scale_codes", "scale_max", "scale_step"}
    assert set(layer.stored_tensors()) == set(state) - {"bias"}
    save_file(state, tmp_path / "layer.safetensors")
    loaded = load_file(tmp_path / "layer.safetensors")
    other = OTQLinear.from_module(nn.Linear(96, 40), bits=3, granularity="group", group_size=32)
    other.load_state_dict(loaded)
    x = torch.randn(3, 96)
    assert torch.equal(other(x), layer(x))
    for key, value in state.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype


def test_dequantize_returns_plain_linear() -> None:
    linear = nn.Linear(20, 10)
    layer = OTQLinear.from_module(linear, bits=8)
    plain = layer.dequantize()
    assert type(plain) is nn.Linear
    assert torch.equal(plain.weight, layer.dequantize_weight()) and torch.equal(plain.bias, linear.bias)
    x = torch.randn(4, 20)
    assert torch.equal(plain(x), layer(x))


def test_extra_repr_shows_the_quantization() -> None:
    text = repr(
        OTQLinear.from_module(nn.Linear(64, 8), bits=3, method="ot-equal-mass", granularity="group", group_size=16)
    )
    assert (
        "bits=3" in text and "method=ot-equal-mass" in text and "granularity=group" in text and "group_size=16" in text
    )
    conv_text = repr(OTQConv2d.from_module(nn.Conv2d(2, 4, 3, groups=2), bits=2))
    assert "groups=2" in conv_text and "bits=2" in conv_text


def test_dtype_cast_keeps_packed_data_and_moves_compute_dtype() -> None:
    layer = OTQLinear.from_module(nn.Linear(64, 16), bits=3, granularity="group", group_size=32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    stored = layer.stored_tensors()
    for key in ("weight", "codebook", "scale_codes", "scale_max", "scale_step"):
        assert torch.equal(stored[key], before[key]) and stored[key].dtype == before[key].dtype
    assert layer.bias.dtype == torch.float16 and layer.weight.dtype == torch.float16
    layer.to(torch.bfloat16)
    assert layer.weight_dtype == torch.bfloat16 and layer.codebook.dtype == torch.float16


def test_to_device(device: str) -> None:
    layer = OTQLinear.from_module(nn.Linear(32, 8), bits=4).to(device)
    assert layer.packed.device.type == device and layer.codebook.device.type == device
    assert type(layer.packed) is nn.Parameter and layer.packed.dtype == torch.uint8
    x = torch.randn(2, 32, device=device)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize_weight(), layer.bias))


def test_nbytes_of_layer() -> None:
    layer = OTQLinear.from_module(nn.Linear(128, 64), bits=2)
    assert layer.nbytes == 128 * 64 * 2 // 8 + 64 * 4 * 2


def test_from_module_rejects_wrong_types() -> None:
    with pytest.raises(TypeError, match="nn.Linear"):
        OTQLinear.from_module(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        OTQConv2d.from_module(nn.Linear(2, 2))


def test_integer_inputs_are_refused_like_nn_linear() -> None:
    linear = OTQLinear.from_module(nn.Linear(16, 8), bits=3)
    conv = OTQConv2d.from_module(nn.Conv2d(2, 4, 3), bits=3)
    with pytest.raises(TypeError, match=r"OTQLinear expects a floating-point input, got dtype torch.int64"):
        linear(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"OTQConv2d expects a floating-point input, got dtype torch.int32"):
        conv(torch.ones(1, 2, 5, 5, dtype=torch.int32))


def test_accelerate_moves_the_stored_codes_not_the_dequantized_view() -> None:
    # every accelerate offload hook reads a tensor back with getattr(module, name) and stores it moved: it must get
    # the codes, while any other caller of `layer.weight` gets the dequantized float view
    layer = OTQLinear.from_module(nn.Linear(64, 16), bits=3, granularity="group", group_size=32)
    codes, x = layer.packed.detach().clone(), torch.randn(2, 64)
    expected = layer(x)
    assert layer.weight.dtype == torch.float32 and layer.weight.shape == (16, 64)
    set_module_tensor_to_device(layer, "weight", "meta")  # what an offload hook does after each forward
    assert layer.packed.device.type == "meta" and layer.packed.dtype == codes.dtype
    assert layer.packed.shape == codes.shape
    assert layer.weight is layer.packed  # a skeleton shows its stored tensor, which loaders fill
    set_module_tensor_to_device(layer, "weight", "cpu", value=codes)  # and before each forward
    assert type(layer.packed) is nn.Parameter and not layer.packed.requires_grad
    assert torch.equal(layer.packed, codes) and torch.equal(layer(x), expected)


def test_set_stored_refuses_unknown_names() -> None:
    layer = OTQLinear.from_module(nn.Linear(16, 8), bits=3)
    with pytest.raises(KeyError, match=r"'bias' is not a stored tensor name; expected one of \['weight'"):
        layer.set_stored("bias", torch.zeros(8))
