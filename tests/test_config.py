from __future__ import annotations

import json

import pytest

from ernie45.config import ConfigError, ModelConfig, preset
from ernie45.params import count_params


def test_presets_match_spec():
    big = preset("ERNIE-4.5-300B-A47B")
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads) == (8192, 54, 64, 8)
    assert big.moe_layers == tuple(i >= 3 for i in range(54)) and big.num_moe_layers == 51
    assert not big.tie_word_embeddings and big.moe_num_shared_experts == 0 and big.moe_k == 8
    a3b = preset("baidu/ERNIE-4.5-21B-A3B-PT")
    assert a3b.moe_layers == tuple(i >= 1 for i in range(28)) and a3b.shared_intermediate_size == 3072
    small = preset("ernie-4.5-0.3b-base-pt")
    assert small.head_dim == 128 and small.hidden_size // small.num_attention_heads == 64 and not small.is_moe


@pytest.mark.parametrize("name,total,active,mtp", [
    ("ERNIE-4.5-300B-A47B", 299_484_163_264, 47_079_337_152, 989_888_512),
    ("ERNIE-4.5-21B-A3B", 21_825_437_888, 3_352_150_208, 123_217_920),
    ("ERNIE-4.5-0.3B", 360_748_032, 360_748_032, 0),
])
def test_parameter_counts(name, total, active, mtp):
    assert count_params(preset(name)) == {"params_total": total, "params_active": active, "params_mtp": mtp}


def _moe_raw(**kw):
    raw = dict(model_type="ernie4_5_moe", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=6,
               num_attention_heads=2, num_key_value_heads=1, moe_num_experts=4, moe_k=2, moe_intermediate_size=4)
    raw.update(kw)
    return raw


def test_sentinels_resolved_once():
    cfg = ModelConfig.from_dict(_moe_raw(moe_layer_end_index=-1, moe_layer_start_index=1))
    assert cfg.moe_layer_end_index == 5 and cfg.head_dim == 4
    assert cfg.moe_layers == (False, True, True, True, True, True)
    cfg = ModelConfig.from_dict(_moe_raw(moe_layer_interval=2, moe_layer_start_index=0, moe_layer_end_index=4))
    assert cfg.moe_layers == (False, True, False, True, False, False)

    # transformers 5.25's save_pretrained writes null for the MTP depth it ignores: no MTP layer
    assert ModelConfig.from_dict(_moe_raw(num_nextn_predict_layers=None)).num_nextn_predict_layers == 0
    assert ModelConfig.from_dict(_moe_raw(num_nextn_predict_layers=1)).num_nextn_predict_layers == 1


def test_rope_theta_from_either_key():
    assert ModelConfig.from_dict(_moe_raw(rope_theta=10000.0)).rope_theta == 10000.0
    assert ModelConfig.from_dict(_moe_raw(rope_parameters={"rope_theta": 7.0, "rope_type": "default"})).rope_theta == 7.0
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        ModelConfig.from_dict(_moe_raw(rope_parameters={"rope_theta": 7.0, "rope_type": "yarn"}))


@pytest.mark.parametrize("change,message", [
    (dict(model_type="ernie4_5_vl"), "unsupported model_type"),
    (dict(use_bias=True), "use_bias=true"),
    (dict(num_key_value_heads=3, num_attention_heads=4), "not a multiple"),
    (dict(moe_k=9), "moe_k=9"),
    (dict(hidden_act="swish2"), "hidden_act"),
])
def test_bad_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(_moe_raw(**change))


def test_missing_key_named():
    raw = _moe_raw()
    del raw["vocab_size"]
    with pytest.raises(ConfigError, match="no 'vocab_size'"):
        ModelConfig.from_dict(raw)


def test_hf_dict_roundtrip(tmp_path):
    cfg = preset("ERNIE-4.5-300B-A47B")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert ModelConfig.from_file(tmp_path) == cfg
    dense = preset("ERNIE-4.5-0.3B")
    assert not any(k.startswith("moe_") for k in dense.to_hf_dict())


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
