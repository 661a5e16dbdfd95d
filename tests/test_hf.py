"""Hugging Face layout: fastckpt-written folders load with from_pretrained, and HF
folders restore in place with fastckpt."""

import json
import os

import pytest
import torch

import fastckpt
from fastckpt.integrations import hf

transformers = pytest.importorskip("transformers", reason="needs transformers (fastckpt[hf])")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=100)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saved_folder_loads_with_from_pretrained(tmp_path):
    model = tiny_bert()
    d = tmp_path / "bert"
    r = hf.save_pretrained(model, d, max_shard_size=20_000).wait(60)
    assert r.num_shards > 1
    names = sorted(os.listdir(d))
    assert "config.json" in names and hf.INDEX_FILE in names and "fastckpt.json" in names
    assert f"model-00001-of-{r.num_shards:05d}.safetensors" in names
    index = json.loads((d / hf.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert fastckpt.verify(d).ok
    loaded = transformers.AutoModel.from_pretrained(d).eval()
    assert type(loaded) is type(model) and same_weights(loaded, model)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_tied_weights_written_once(tmp_path):
    model = tiny_gpt2()
    d = tmp_path / "gpt2"
    hf.save_pretrained(model, d).wait(60)
    index = json.loads((d / hf.INDEX_FILE).read_text())
    assert "lm_head.weight" not in index["weight_map"]  # as HF writes it: tied to wte
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert same_weights(loaded, model)
    target = tiny_gpt2(seed=1)
    assert hf.load_into(target, d, verify=True).ok
    assert same_weights(target, model)


@pytest.mark.parametrize("shard", ["20KB", None])
def test_load_into_from_an_hf_written_folder(tmp_path, shard):
    model = tiny_bert()
    d = tmp_path / "hf"
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, **kwargs)
    target = tiny_bert(seed=1)
    assert not same_weights(target, model)
    params = {k: v.data_ptr() for k, v in target.state_dict().items()}
    report = hf.load_into(target, d)
    assert report.ok and report.loaded == len(params)
    assert same_weights(target, model)
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == params  # in place


def test_load_into_strict_reports_mismatch(tmp_path):
    d = tmp_path / "bert"
    hf.save_pretrained(tiny_bert(), d).wait(60)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=100)
    with pytest.raises(fastckpt.CheckpointError, match="unexpected"):
        hf.load_into(transformers.BertModel(cfg), d)
    assert hf.load_into(transformers.BertModel(cfg), d, strict=False).unexpected


def test_export_refuses_weights_whose_names_coincide(tmp_path):
    from fastckpt import export

    src = tmp_path / "ck"
    fastckpt.save({"model": {"a.b": torch.ones(2), "a": {"b": torch.zeros(3)}}}, src).wait()
    with pytest.raises(fastckpt.CheckpointError, match="two model weights export as 'a.b'"):
        export.export_for_inference(src, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
