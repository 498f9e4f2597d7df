"""PEFT-format adapters both ways, checked against PEFT itself on the transformers model:

- export: a jaxtune LoRA (rank / alpha patterns, rsLoRA) or DoRA tree written with
  `save_peft_adapter` and loaded by ``peft.PeftModel.from_pretrained`` on the model that
  `save_hf` exports gives jaxtune's logits (fp32, atol 1e-4), for Llama and GPT-2 (fused c_attn);
- import: adapters made and saved by PEFT (LoRA, DoRA, IA3) loaded with `load_peft_adapter` give
  PEFT's logits, and export again to the same tensors;
- the merged model (`save_merged_hf`) loads in transformers with the same logits;
- bad adapter directories and unexportable trees raise errors that name the tensor / module.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune.interop import load_hf, save_hf
from jaxtune.interop.peft_adapters import AdapterFormatError, linear_modules, load_peft_adapter
from jaxtune.interop.peft_export import save_merged_hf, save_peft_adapter
from jaxtune.peft.core import merge_adapters
from jaxtune.models import Model
from jaxtune.peft import LoraConfig, LoraWeight, apply_lora
from jaxtune.peft.dora import DoraWeight, apply_dora
from jaxtune.peft.ia3 import IA3Config, IA3Weight, apply_ia3
from tests.reference import require

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

TOKENS = np.random.default_rng(0).integers(3, 97, (2, 10))
ATOL = 1e-4


def _is_leaf(x):
    return isinstance(x, (LoraWeight, DoraWeight, IA3Weight))


def _perturb(params, seed=1):
    """Random B (and DoRA magnitudes / IA3 vectors): at init they make the adapter a no-op."""
    keys = iter(jax.random.split(jax.random.key(seed), 512))

    def change(x):
        if isinstance(x, LoraWeight):
            return LoraWeight(x.base, x.a, 0.2 * jax.random.normal(next(keys), x.b.shape), x.scale, x.dropout)
        if isinstance(x, DoraWeight):
            m = x.magnitude * jax.random.uniform(next(keys), x.magnitude.shape, minval=0.5, maxval=1.5)
            return DoraWeight(x.base, x.a, 0.2 * jax.random.normal(next(keys), x.b.shape), m, x.scale, x.dropout)
        if isinstance(x, IA3Weight):
            return IA3Weight(x.base, 1 + 0.3 * jax.random.normal(next(keys), x.scale_vec.shape), x.on_input)
        return x

    return jax.tree.map(change, params, is_leaf=_is_leaf)


def _ours(params, cfg):
    # eager: with a handful of tiny trees, op-by-op dispatch (primitives cached across calls) is
    # cheaper than compiling each tree structure
    return np.asarray(Model(cfg).apply(params, jnp.asarray(TOKENS)))


def _theirs(model):
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


def _exported_base(params, cfg, directory):
    """The transformers model of ``save_hf``'s export of the base params."""
    save_hf(params, cfg, directory)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def _randomise_peft(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name or "ia3_l" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))


# --- export ---------------------------------------------------------------------------------


def test_export_lora_with_patterns_and_rslora(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    params, cfg = load_hf(directory)
    lora = LoraConfig(rank=4, alpha=8, targets=("all-linear",), rank_pattern={"v_proj": 2},
                      alpha_pattern={"o_proj": 3}, rslora=True)
    adapted = _perturb(apply_lora(params, lora, jax.random.key(0)))
    out = save_peft_adapter(adapted, cfg, tmp_path / "adapter", use_rslora=True, base_model_name_or_path="my/base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == \
        ("LORA", 4, 8, True, False)
    assert config["base_model_name_or_path"] == "my/base"
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 2 for i in range(2)}
    assert config["alpha_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 3 for i in range(2)}
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"])
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (2, 64)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)

    model = peft.PeftModel.from_pretrained(_exported_base(params, cfg, tmp_path / "base"), out).eval()
    layer = model.base_model.model.model.layers[1].self_attn
    assert layer.o_proj.scaling["default"] == pytest.approx(adapted["layers_1"]["attn"]["o_proj"]["kernel"].scale)
    assert layer.v_proj.r["default"] == 2
    ours = _ours(adapted, cfg)
    assert np.abs(ours - _ours(params, cfg)).max() > 1e-2  # the adapters change the model
    np.testing.assert_allclose(_theirs(model), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,targets", [("llama", ("attention-qv", "mlp")), ("gpt2", ("attention-qv", "mlp"))])
def test_export_dora(hf_checkpoint, tmp_path, name, targets):
    """GPT-2: q and v (k un-adapted, so DoRA's magnitude there is ||W||) with their own A share one
    fused c_attn: exported block-diagonally (rank 8), exactly. (q, k, v sharing one A export at
    rank 4: see the import round trip.)"""
    directory, _ = hf_checkpoint(name)
    params, cfg = load_hf(directory)
    adapted = _perturb(apply_dora(params, LoraConfig(rank=4, alpha=8, targets=targets, dora=True), jax.random.key(0)))
    out = save_peft_adapter(adapted, cfg, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] and config["fan_in_fan_out"] == (name == "gpt2")
    tensors = load_file(out / "adapter_model.safetensors")
    if name == "gpt2":
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, 64)
        ranks = {m: config["rank_pattern"].get(m, config["r"]) for m in ("transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj")}
        assert ranks == {"transformer.h.1.attn.c_attn": 8, "transformer.h.1.mlp.c_proj": 4}
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"].shape == (192,)
    else:
        assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].shape == (64,)
    model = peft.PeftModel.from_pretrained(_exported_base(params, cfg, tmp_path / "base"), out).eval()
    ours = _ours(adapted, cfg)
    assert np.abs(ours - _ours(params, cfg)).max() > 1e-2
    np.testing.assert_allclose(_theirs(model), ours, atol=ATOL, rtol=0)


# --- import ---------------------------------------------------------------------------------


def _peft_adapter(torch_model, tmp_path, config, seed=0):
    model = peft.get_peft_model(copy.deepcopy(torch_model), config)
    _randomise_peft(model, seed)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    return model, tmp_path / "peft"


@pytest.mark.parametrize("name,dora", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)])
def test_import_lora_and_dora(hf_checkpoint, tmp_path, name, dora):
    directory, torch_model = hf_checkpoint(name)
    if name == "llama":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                 rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 5}, use_rslora=True,
                                 use_dora=dora, lora_dropout=0.1)
    else:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], use_dora=dora,
                                 fan_in_fan_out=True)
    model, adapter = _peft_adapter(torch_model, tmp_path, config)
    params, cfg = load_hf(directory)
    adapted = load_peft_adapter(params, cfg, adapter)
    kind = DoraWeight if dora else LoraWeight
    leaves = [x for x in jax.tree.leaves(adapted, is_leaf=_is_leaf) if _is_leaf(x)]
    assert all(isinstance(x, kind) for x in leaves)
    assert len(leaves) == (8 if name == "llama" else 2 * 4)  # gpt2: c_attn -> q, k, v; mlp.c_proj -> down
    if name == "llama":
        v = adapted["layers_0"]["attn"]["v_proj"]["kernel"]
        assert v.rank == 2 and v.scale == pytest.approx(8 / np.sqrt(2)) and v.dropout == pytest.approx(0.1)
    ref = _theirs(model)
    assert np.abs(ref - _theirs(torch_model)).max() > 1e-2
    np.testing.assert_allclose(_ours(adapted, cfg), ref, atol=ATOL, rtol=0)

    # and back: the same tensors (GPT-2's c_attn parts share their A, so it is rank 4 again)
    again = save_peft_adapter(adapted, cfg, tmp_path / "again", use_rslora=name == "llama")
    original, exported = load_file(adapter / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), again).eval()
    np.testing.assert_allclose(_theirs(reloaded), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_import_ia3(hf_checkpoint, tmp_path, name):
    """PEFT's default IA3 targets; GPT-2's c_attn has a bias, which PEFT scales too (folded)."""
    directory, torch_model = hf_checkpoint(name)
    model, adapter = _peft_adapter(torch_model, tmp_path, peft.IA3Config())
    params, cfg = load_hf(directory)
    adapted = load_peft_adapter(params, cfg, adapter)
    layer = adapted["layers_0"]
    assert layer["mlp"]["down_proj"]["kernel"].on_input and not layer["attn"]["v_proj"]["kernel"].on_input
    ref = _theirs(model)
    assert np.abs(ref - _theirs(torch_model)).max() > 1e-2
    np.testing.assert_allclose(_ours(adapted, cfg), ref, atol=ATOL, rtol=0)
    if name == "llama":  # bias-free: exports back to the same tensors
        again = save_peft_adapter(adapted, cfg, tmp_path / "again")
        original, exported = load_file(adapter / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
        assert sorted(original) == sorted(exported)
        for key in original:
            np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), again).eval()
        np.testing.assert_allclose(_theirs(reloaded), ref, atol=ATOL, rtol=0)
    else:  # c_attn's bias was folded: PEFT would scale it a second time
        with pytest.raises(AdapterFormatError, match=r"'transformer.h.0.attn.c_attn'.*bias"):
            save_peft_adapter(_perturb(apply_ia3(params, IA3Config.peft_default("gpt2"))), cfg, tmp_path / "x")


# --- merged export --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merged_export_loads_in_transformers(hf_checkpoint, tmp_path, name):
    directory, _ = hf_checkpoint(name)
    params, cfg = load_hf(directory)
    adapted = apply_dora(params, LoraConfig(rank=4, alpha=8, targets=("attention",)), jax.random.key(0))
    adapted = apply_ia3(apply_lora(adapted, LoraConfig(rank=2, targets=(r"mlp/up_proj/kernel$",)), jax.random.key(1)),
                        IA3Config(targets=(r"mlp/down_proj/kernel$",)))
    adapted = _perturb(adapted)
    assert not any(_is_leaf(x) for x in jax.tree.leaves(merge_adapters(adapted), is_leaf=_is_leaf))
    out = save_merged_hf(adapted, cfg, tmp_path / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours = _ours(adapted, cfg)
    assert np.abs(ours - _ours(params, cfg)).max() > 1e-2
    np.testing.assert_allclose(_theirs(model), ours, atol=ATOL, rtol=0)


# --- errors ---------------------------------------------------------------------------------


@pytest.fixture
def llama_adapter(hf_checkpoint, tmp_path):
    directory, torch_model = hf_checkpoint("llama")
    _, adapter = _peft_adapter(torch_model, tmp_path, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    params, cfg = load_hf(directory)
    return params, cfg, adapter


def _edit(adapter, config=None, tensors=None):
    if config is not None:
        old = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(config(old)))
    if tensors is not None:
        new = tensors(load_file(adapter / "adapter_model.safetensors"))
        save_file(new, adapter / "adapter_model.safetensors", metadata={"format": "pt"})


Q_B = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"


def test_import_errors_name_the_tensor(llama_adapter):
    params, cfg, adapter = llama_adapter
    load_peft_adapter(params, cfg, adapter)  # the untouched adapter loads

    _edit(adapter, tensors=lambda t: {k: v for k, v in t.items() if k != Q_B})
    with pytest.raises(AdapterFormatError, match=f"missing tensor '{Q_B}'"):
        load_peft_adapter(params, cfg, adapter)
    _edit(adapter, tensors=lambda t: {**t, Q_B: np.zeros((64, 3), np.float32)})
    with pytest.raises(AdapterFormatError, match=rf"'{Q_B}' has shape \(64, 3\), the model needs \(64, 4\)"):
        load_peft_adapter(params, cfg, adapter)
    _edit(adapter, tensors=lambda t: {**t, Q_B: np.zeros((64, 4), np.float32),
                                      "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 97), np.float32)})
    with pytest.raises(AdapterFormatError, match="'base_model.model.model.embed_tokens.lora_embedding_A' is not one of"):
        load_peft_adapter(params, cfg, adapter)
    _edit(adapter, tensors=lambda t: {**{k: v for k, v in t.items() if "embed" not in k},
                                      "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(AdapterFormatError, match="adapts 'model.layers.0.self_attn.rotary', which is not a linear layer"):
        load_peft_adapter(params, cfg, adapter)
    _edit(adapter, tensors=lambda t: {k: v for k, v in t.items() if "rotary" not in k})
    load_peft_adapter(params, cfg, adapter)  # repaired

    # tensors of a module that target_modules does not select; a selected module with none
    _edit(adapter, config=lambda c: {**c, "target_modules": ["q_proj"]})
    with pytest.raises(AdapterFormatError, match=r"modules \['model.layers.0.self_attn.v_proj'.*does not select"):
        load_peft_adapter(params, cfg, adapter)
    _edit(adapter, config=lambda c: {**c, "target_modules": ["q_proj", "v_proj", "k_proj"]})
    with pytest.raises(AdapterFormatError, match=r"missing LoRA tensors for modules \['model.layers.0.self_attn.k_proj'"):
        load_peft_adapter(params, cfg, adapter)
    _edit(adapter, config=lambda c: {**c, "target_modules": ["q_proj", "v_proj"], "use_dora": True})
    with pytest.raises(AdapterFormatError, match="missing tensor .*lora_magnitude_vector' \\(use_dora is set\\)"):
        load_peft_adapter(params, cfg, adapter)
    _edit(adapter, config=lambda c: {**c, "use_dora": False, "r": 8})
    with pytest.raises(AdapterFormatError, match=r"lora_A.weight' has shape \(4, 64\), the model needs \(8, 64\)"):
        load_peft_adapter(params, cfg, adapter)


@pytest.mark.parametrize("change,message", [
    (dict(peft_type="LOHA"), "peft_type='LOHA' is not supported"),
    (dict(modules_to_save=["lm_head"]), "unsupported adapter options.*modules_to_save"),
    (dict(init_lora_weights="pissa_niter_4"), "unsupported adapter options.*pissa"),
    (dict(bias="all"), "unsupported adapter options.*'bias': 'all'"),
    (dict(use_some_future_variant=True), "unsupported adapter options.*use_some_future_variant"),
])
def test_unsupported_adapters_are_refused(llama_adapter, change, message):
    params, cfg, adapter = llama_adapter
    _edit(adapter, config=lambda c: {**c, **change})
    with pytest.raises(AdapterFormatError, match=message):
        load_peft_adapter(params, cfg, adapter)


def test_missing_files_and_pickles(llama_adapter, tmp_path):
    params, cfg, adapter = llama_adapter
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(params, cfg, tmp_path / "nowhere")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files are refused"):
        load_peft_adapter(params, cfg, adapter)


def test_export_errors(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    params, cfg = load_hf(directory)
    with pytest.raises(AdapterFormatError, match="no adapter leaves"):
        save_peft_adapter(params, cfg, tmp_path / "a")
    lora = apply_lora(params, LoraConfig(rank=2, targets=("attention",)), jax.random.key(0))
    with pytest.raises(AdapterFormatError, match="IA3Weight.*LoraWeight.*as one PEFT adapter"):
        save_peft_adapter(apply_ia3(lora, IA3Config(targets=("mlp",))), cfg, tmp_path / "b")
    nested = jax.tree.map(lambda x: IA3Weight(x, jnp.ones(x.base.shape[1]), False) if isinstance(x, LoraWeight) else x,
                          lora, is_leaf=_is_leaf)
    with pytest.raises(AdapterFormatError, match=r"layers_0/attn/k_proj/kernel: nested adapters \(IA3Weight over LoraWeight\)"):
        save_peft_adapter(nested, cfg, tmp_path / "c")
    with pytest.raises(AdapterFormatError, match="different dropout rates"):
        save_peft_adapter(apply_lora(lora, LoraConfig(targets=("mlp",), dropout=0.1), jax.random.key(1)), cfg, tmp_path / "d")
    save_peft_adapter(lora, cfg, tmp_path / "e", base_params=params)  # default init: the base is the model's
    pissa = apply_lora(params, LoraConfig(rank=2, targets=("attention",), init="pissa"), jax.random.key(0))
    with pytest.raises(AdapterFormatError, match="layers_0/attn/k_proj/kernel: the adapter's base differs"):
        save_peft_adapter(pissa, cfg, tmp_path / "p", base_params=params)
    with pytest.raises(FileExistsError, match="not empty"):
        save_peft_adapter(lora, cfg, tmp_path / "e")
    with pytest.raises(AdapterFormatError, match="already has an adapter"):
        load_peft_adapter(lora, cfg, tmp_path / "e")


def test_module_table_comes_from_the_weight_maps(hf_checkpoint):
    """Names and layouts derived from hf_weights' TensorMaps: nn.Linear kernels transposed, GPT-2's
    Conv1D not, its c_attn split into q, k, v by output feature."""
    _, cfg = load_hf(hf_checkpoint("llama")[0])
    llama = linear_modules(cfg)
    assert len(llama) == 7 * 2 + 1  # + lm_head
    q = llama["model.layers.1.self_attn.q_proj"]
    assert (q.paths, q.conv1d, q.in_features, q.out_features) == ((("layers_1", "attn", "q_proj", "kernel"),), False, 64, 64)
    _, gcfg = load_hf(hf_checkpoint("gpt2")[0])
    c_attn = linear_modules(gcfg)["transformer.h.0.attn.c_attn"]
    assert c_attn.conv1d and [p[2] for p in c_attn.paths] == ["q_proj", "k_proj", "v_proj"]
    assert c_attn.out_slices == (slice(0, 64), slice(64, 128), slice(128, 192)) and c_attn.out_features == 192
