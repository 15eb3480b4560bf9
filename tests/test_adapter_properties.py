"""Property tests of the adapter loader over generated configs and weights (hypothesis).

Every generated adapter either loads and gives PEFT's logits (PEFT running it alone), or is refused with
an ``AdapterError`` that names the adapter; nothing else is raised, and no load takes long. Generated:
ranks, ``lora_alpha`` (sane to absurd), rsLoRA, targets as lists or regexes, ``rank_pattern`` /
``alpha_pattern``, ``layers_to_transform``, the weights' dtype, and damage to the weights file (wrong
shapes, integer dtypes, NaN, overlapping offsets, truncation, a huge declared tensor, unknown keys) or to
any config field (random JSON values).
"""

from __future__ import annotations

import copy
import json
import math
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from blora import load_loras
from blora.lora import AdapterError

pytestmark = pytest.mark.usefixtures("one_thread")

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ST = "adapter_model.safetensors"
CFG = "adapter_config.json"
IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 11]])
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLOW_S = 10.0  # one load: far above what any example needs, far below a hang


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg).eval()


@st.composite
def lora_configs(draw) -> dict:
    """PEFT ``LoraConfig`` arguments."""
    names = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True))
    target = draw(st.sampled_from(["list", "regex", "all-linear"]))
    target_modules = {"list": names, "regex": rf".*\.({'|'.join(names)})", "all-linear": "all-linear"}[target]
    alpha = draw(st.one_of(st.floats(0.5, 64), st.sampled_from([0.0, -8.0, 1e4, 1e30, 1e38, 1e300])))
    kwargs = dict(
        r=draw(st.integers(1, 6)),
        lora_alpha=alpha,
        use_rslora=draw(st.booleans()),
        target_modules=target_modules,
    )
    if draw(st.booleans()):
        kwargs["rank_pattern"] = {draw(st.sampled_from(names)): draw(st.integers(1, 6))}
    if draw(st.booleans()):
        kwargs["alpha_pattern"] = {draw(st.sampled_from(names)): draw(st.floats(0.5, 32))}
    if target == "list" and draw(st.booleans()):
        kwargs["layers_to_transform"] = [draw(st.integers(0, 1))]
    return kwargs


DAMAGE = [
    "none",
    "dtype",
    "int_dtype",
    "shape",
    "nan",
    "overlap",
    "truncate",
    "huge",
    "extra_key",
    "unknown_module",
]


def make_peft_adapter(base, path: Path, kwargs: dict, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(path))
    return path


def raw_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Path, header: dict, data: bytes, size: int | None = None) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)
        if size is not None:
            f.truncate(size)


def damage(path: Path, kind: str, data) -> None:
    """Apply one kind of damage to the adapter's weights file (``data``: hypothesis draws)."""
    st_path = path / ST
    tensors = load_file(str(st_path))
    key = data.draw(st.sampled_from(sorted(tensors)))
    if kind == "dtype":
        dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64]))
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(st_path))
    elif kind == "int_dtype":
        tensors[key] = tensors[key].to(torch.int32)
        save_file(tensors, str(st_path))
    elif kind == "shape":
        t = tensors[key]
        tensors[key] = t[:-1] if t.shape[0] > 1 else torch.cat([t, t])
        save_file(tensors, str(st_path))
    elif kind == "nan":
        tensors[key].view(-1)[data.draw(st.integers(0, tensors[key].numel() - 1))] = math.nan
        save_file(tensors, str(st_path))
    elif kind == "overlap":
        header, body = raw_header(st_path)
        ordered = sorted(
            (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
        )
        victim = ordered[data.draw(st.integers(1, len(ordered) - 1))] if len(ordered) > 1 else ordered[0]
        start, end = header[victim]["data_offsets"]
        shift = data.draw(st.integers(1, 4)) * 4 if start else 0
        header[victim]["data_offsets"] = [start - shift, end - shift] if start else [start + 4, end + 4]
        write_raw(st_path, header, body)
    elif kind == "truncate":
        raw = st_path.read_bytes()
        st_path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "huge":
        header, body = raw_header(st_path)
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        size = data.draw(st.sampled_from([1 << 28, 1 << 30, 1 << 36]))
        header[key.replace("lora_A", "lora_B") if "lora_A" in key else key + "x"] = {
            "dtype": "F32", "shape": [size // 4], "data_offsets": [end, end + size],
        }  # fmt: skip
        write_raw(st_path, header, body, size=8 + len(json.dumps(header)) + 8 + end + size)
    elif kind == "extra_key":
        tensors["base_model.model.model.layers.0.self_attn.q_proj.something.weight"] = torch.ones(2)
        save_file(tensors, str(st_path))
    elif kind == "unknown_module":
        tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.ones(2, 32)
        tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 2)
        save_file(tensors, str(st_path))


def blora_logits(base, path: Path) -> torch.Tensor:
    """Load ``path`` as adapter 'gen' (raises AdapterError or anything unexpected) and run it."""
    t0 = time.perf_counter()
    model, lora_map = load_loras(copy.deepcopy(base), {"gen": str(path)})
    assert time.perf_counter() - t0 < SLOW_S, "a load took far too long"
    with torch.no_grad():
        return model(input_ids=IDS, adapter_ids=torch.tensor([lora_map["gen"]])).logits[0]


def peft_logits(base, path: Path) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()(input_ids=IDS).logits[0]


def check_outcome(base, path: Path, may_load: bool, peft_reference: bool = True) -> str:
    """Loads and matches PEFT, or refused with a message naming the adapter. Returns the outcome."""
    try:
        got = blora_logits(base, path)
    except AdapterError as exc:
        assert "'gen'" in str(exc), f"the message does not name the adapter: {exc}"
        return "refused"
    assert may_load, "damaged weights were loaded"
    if peft_reference:
        ref = peft_logits(base, path)
        if bool(torch.isfinite(ref).all()):
            err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            assert err < 2e-2 if may_load == "lossy" else err < 1e-4, f"differs from PEFT: {err}"
    return "loaded"


@SETTINGS
@given(kwargs=lora_configs(), kind=st.sampled_from(DAMAGE), data=st.data())
def test_generated_adapters_load_like_peft_or_are_refused(base, tmp_path_factory, kwargs, kind, data):
    path = make_peft_adapter(base, tmp_path_factory.mktemp("gen"), kwargs, seed=data.draw(st.integers(0, 9)))
    if kind != "none":
        damage(path, kind, data)
    may_load = {"none": True, "dtype": "lossy"}.get(kind, False)
    outcome = check_outcome(base, path, may_load)
    if kind in ("none", "dtype") and outcome == "refused":
        # refused although undamaged: only for a scaling PEFT runs to non-finite logits (or an absurd one)
        ref = peft_logits(base, path)
        scale_absurd = abs(kwargs["lora_alpha"]) >= 1e30
        assert scale_absurd or not bool(torch.isfinite(ref).all()), f"valid adapter refused: {kwargs}"


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
FIELDS = [
    "r", "lora_alpha", "target_modules", "use_rslora", "exclude_modules", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern", "fan_in_fan_out", "use_dora", "lora_bias", "modules_to_save",
    "peft_type", "bias",
]  # fmt: skip


@pytest.fixture(scope="module")
def valid(base, tmp_path_factory) -> Path:
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return make_peft_adapter(base, tmp_path_factory.mktemp("valid"), kwargs, seed=1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON)
def test_any_json_value_in_any_config_field_is_loaded_or_refused(base, valid, tmp_path_factory, field, value):
    path = tmp_path_factory.mktemp("cfg")
    for name in (ST, CFG):
        (path / name).write_bytes((valid / name).read_bytes())
    config = json.loads((path / CFG).read_text())
    config[field] = value
    (path / CFG).write_text(json.dumps(config))
    try:
        got = blora_logits(base, path)
    except AdapterError as exc:
        assert "'gen'" in str(exc)
        return
    try:
        ref = peft_logits(base, path)  # what blora accepts, PEFT runs, with the same result
    except Exception:  # PEFT crashes on it (e.g. rank_pattern: null): blora must have read the default
        del config[field]
        (path / CFG).write_text(json.dumps(config))
        ref = peft_logits(base, path)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), f"{field}={value!r}: differs from PEFT"
