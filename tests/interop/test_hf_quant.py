"""Hugging Face checkpoints saved pre-quantized by bitsandbytes (made here with transformers +
bitsandbytes on CPU) load as quantized leaves, bytes unchanged, with transformers' logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.interop.hf_quant import QuantizedCheckpointError
from jaxtune.interop.hf_weights import SafetensorsReader, load_hf
from jaxtune.job import load_model
from jaxtune.job.schema import ModelSource
from jaxtune.models import Model
from jaxtune.quant import QuantConfig, QuantizedWeight
from tests.hf_reference import save_model
from tests.reference import require

torch = require("torch")
transformers = require("transformers")
require("bitsandbytes")

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 11))


def _quantized_checkpoint(tmp_path, name="llama", **bnb):
    base = tmp_path / "base"
    save_model(name, base)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=transformers.BitsAndBytesConfig(**bnb), device_map="cpu", dtype=torch.float32)
    out = tmp_path / "quantized"
    model.save_pretrained(out)
    return out, model


@pytest.mark.parametrize("kind,double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_checkpoint_loads_as_its_own_bytes_with_transformers_logits(tmp_path, kind, double_quant):
    directory, model = _quantized_checkpoint(tmp_path, load_in_4bit=True, bnb_4bit_quant_type=kind,
                                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    params, cfg = load_hf(directory)
    leaf = params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(leaf, QuantizedWeight) and leaf.kind == kind and leaf.double_quant == double_quant
    assert leaf.shape == (96, 64)  # [in, out]; stored as nn.Linear's [64, 96]
    reader = SafetensorsReader(directory)
    np.testing.assert_array_equal(np.asarray(leaf.codes).reshape(-1),
                                  reader.get("model.layers.1.mlp.down_proj.weight").reshape(-1))
    np.testing.assert_array_equal(np.asarray(leaf.scales).reshape(-1),
                                  reader.get("model.layers.1.mlp.down_proj.weight.absmax"))
    assert isinstance(params["embed"]["embedding"], jnp.ndarray)  # embeddings and the head stay dense
    # reference: transformers' forward over bitsandbytes' dequantization of each Linear4bit, by
    # its reference (PyTorch) kernel. Its CPU matmul refuses these small shapes, and its CPU
    # dequantize_4bit (0.50.2, AVX-512) is wrong where blocks straddle rows (down_proj: 96 inputs).
    F = require("bitsandbytes.functional")
    default_ops = require("bitsandbytes.backends.default.ops")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    quantized = dict(model.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.endswith("_proj"):
                q, st = quantized[name].weight.data, quantized[name].weight.quant_state
                absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
                module.weight.copy_(default_ops._dequantize_4bit_compute(q.reshape(-1), absmax, st.code, st.blocksize,
                                                                         st.shape, torch.float32))
        ref = reference(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(Model(cfg).apply(params, jnp.asarray(TOKENS))), ref, atol=1e-4, rtol=0)


def test_8bit_checkpoint_loads_as_int8_leaves(tmp_path):
    directory, model = _quantized_checkpoint(tmp_path, load_in_8bit=True)
    params, cfg = load_hf(directory)
    leaf = params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert isinstance(leaf, QuantizedWeight) and leaf.kind == "int8"
    F = require("bitsandbytes.functional")
    reader = SafetensorsReader(directory)
    weight = torch.from_numpy(reader.get("model.layers.0.self_attn.q_proj.weight"))
    dense = F.int8_vectorwise_dequant(weight, torch.from_numpy(reader.get("model.layers.0.self_attn.q_proj.SCB")))
    np.testing.assert_array_equal(np.asarray(leaf.dequantize_t(jnp.float32)), dense.numpy())
    # LLM.int8's own matmul runs in fp16 with outlier columns; the reference for jaxtune's
    # dequantize-then-matmul is the dense model holding the dequantized weights.
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.endswith("_proj") and f"{name}.SCB" in reader.names():
                codes = torch.from_numpy(reader.get(f"{name}.weight"))
                module.weight.copy_(F.int8_vectorwise_dequant(codes, torch.from_numpy(reader.get(f"{name}.SCB"))))
        ref = reference(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(Model(cfg).apply(params, jnp.asarray(TOKENS))), ref, atol=1e-4, rtol=0)


def test_quantized_source_then_qlora_and_bad_checkpoints(tmp_path):
    directory, _ = _quantized_checkpoint(tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    params, _, _ = load_model(ModelSource(hf_dir=str(directory)))
    assert isinstance(params["layers_0"]["attn"]["v_proj"]["kernel"], QuantizedWeight)
    with pytest.raises(ValueError, match="already quantized"):
        load_model(ModelSource(hf_dir=str(directory), quant=QuantConfig()))
    # a checkpoint whose quant state disagrees with config.json is refused, naming the tensor
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key]).decode())
    state["shape"] = [state["shape"][0] + 1, state["shape"][1]]
    tensors[key] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantizedCheckpointError, match="up_proj.weight was quantized with shape"):
        load_hf(directory)
    del tensors[key]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantizedCheckpointError, match="up_proj.weight has an absmax but no"):
        load_hf(directory)
