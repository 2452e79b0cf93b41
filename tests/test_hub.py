"""Model cards and Hub upload (`hf_moe_offload.hub`): rendered metadata and body, refresh rules, the exact files of
an upload with only the network calls replaced."""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM
from hf_moe_offload.gpt_moe import parameter_counts
from hf_moe_offload.hub import MIN_TRANSFORMERS, TAGS, model_card, push_to_hub, write_model_card
from hf_moe_offload.training import BlockDataset, add_router_metrics, stdlib_modules, train_bpe_tokenizer


ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "configuration_gpt_moe.py",
    "modeling_gpt_moe.py",
}


def tiny_config(**overrides) -> GPTMoEConfig:
    return GPTMoEConfig.from_preset("tiny-moe", vocab_size=320, **overrides)


@pytest.fixture(scope="module")
def tokenizer():
    files = [path for paths in stdlib_modules(["json"]).values() for path in paths]
    return train_bpe_tokenizer(files, 320)


@pytest.fixture
def trained_dir(tmp_path, tokenizer):
    """A tiny GPT-MoE trained 6 steps by Trainer (evaluated every 2, router metrics on), saved in the Hub layout with
    its tokenizer and `trainer_state.json`, plus what a training directory also holds and an upload must leave out."""
    torch.manual_seed(0)
    model = GPTMoEForCausalLM(tiny_config())
    blocks = torch.randint(0, 320, (12, 16))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=6,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        include_num_input_tokens_seen=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(blocks), eval_dataset=BlockDataset(blocks[:4]))
    add_router_metrics(trainer)
    trainer.train()
    out = Path(args.output_dir)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    (out / "runs").mkdir(exist_ok=True)
    (out / "runs" / "events.out").write_text("tensorboard")
    return out, trainer.state


def test_card_metadata_and_body_describe_the_checkpoint_and_its_training(trained_dir):
    model_dir, state = trained_dir
    path = write_model_card(model_dir, license="apache-2.0", datasets=["some/dataset"], repo_id="someone/tiny")
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == list(TAGS) and data["license"] == "apache-2.0" and data["datasets"] == ["some/dataset"]
    config = tiny_config()
    counts = parameter_counts(config)
    text = card.text
    assert f"{counts['total'] / 1e3:.3g}K total, {counts['active'] / 1e3:.3g}K active per token" in text
    assert "| experts per MoE block | 8 |" in text and "| MoE blocks | 1, 3 (of 0-3) |" in text
    assert "top-1" in text and "capacity factor 1.0 in training (min 4), dropless at inference" in text
    assert (
        f"transformers>={MIN_TRANSFORMERS}" in text
        and 'from_pretrained("someone/tiny", trust_remote_code=True)' in text
    )
    assert "pip install hf_moe_offload" in text and "load_offloaded(" in text and "hf-moe-offload generate" in text
    evals = [log for log in state.log_history if "eval_loss" in log]
    assert len(evals) == 3
    for log in evals:  # every evaluation is a row: step | training loss logged at that step | eval loss
        loss = next(x["loss"] for x in state.log_history if x.get("step") == log["step"] and "loss" in x)
        assert f"| {log['step']} | {loss:.4f} | {log['eval_loss']:.4f} |" in text
    router = [log for log in state.log_history if "router/aux_loss" in log][-1]
    assert f"load-balancing loss\n{router['router/aux_loss']:.3f} per MoE block" in text
    assert state.num_input_tokens_seen == 6 * 4 * 16
    assert "6 optimizer steps, 2.00 epochs, 384 tokens, batch size 4 per device." in text


def test_card_without_trainer_state_or_tokenizer_says_so(tmp_path):
    GPTMoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    text = model_card(tmp_path).text
    assert "No Trainer state (`trainer_state.json`)" in text and "AutoTokenizer" not in text
    dense = tmp_path / "dense"
    GPTMoEForCausalLM(tiny_config(num_experts=1)).save_pretrained(dense)
    assert "A dense GPT decoder of the GPT-MoE family" in model_card(dense).text


def test_refresh_keeps_metadata_and_description_and_never_replaces_a_foreign_card(tmp_path):
    GPTMoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    write_model_card(tmp_path, license="mit", language=["code"], tags=["demo"], description="Trained on nothing.")
    path = write_model_card(tmp_path)  # a refresh: nothing given again
    card = ModelCard.load(path)
    assert card.data.license == "mit" and card.data.language == ["code"] and card.data.tags == [*TAGS, "demo"]
    assert "Trained on nothing." in card.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left

    path.write_text("# My own card\n")
    with pytest.raises(ValueError, match="was not written by hf_moe_offload; pass overwrite=True"):
        write_model_card(tmp_path)
    assert path.read_text() == "# My own card\n"
    write_model_card(tmp_path, overwrite=True)
    assert "<!-- Written by hf_moe_offload" in path.read_text()


def test_card_refuses_what_is_not_a_gpt_moe_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        model_card(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"holds no config\.json"):
        model_card(tmp_path)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has model_type 'gpt2'; model cards are written for GPT-MoE checkpoints"):
        model_card(tmp_path)


def test_the_minimum_transformers_version_of_the_card_is_the_package_requirement():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    requirement = next(r for r in parser["options"]["install_requires"].split("\n") if r.startswith("transformers"))
    assert requirement.startswith(f"transformers>={MIN_TRANSFORMERS},")


class FakeHub:
    """Stands in for the two network calls of an upload and keeps what would have been committed."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.repos: list[tuple] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return mock.Mock(repo_id=repo_id)

    def create_commit(self, api, repo_id, operations, **kwargs):
        for operation in operations:  # read now: the files may live in a temporary directory
            source = operation.path_or_fileobj
            self.files[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else source
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test suite runs offline; nothing leaves anyway
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(
        HfApi, "create_commit", lambda api, repo_id, operations, **kw: hub.create_commit(api, repo_id, operations, **kw)
    )
    return hub


def test_upload_of_a_checkpoint_directory_commits_weights_code_tokenizer_and_card(trained_dir, fake_hub, tmp_path):
    model_dir, _ = trained_dir
    assert (model_dir / "training_args.bin").is_file() and (model_dir / "checkpoint-3").is_dir()
    readme = model_dir / "README.md"
    local_card = readme.read_bytes() if readme.exists() else None
    push_to_hub(model_dir, "someone/tiny-moe", license="apache-2.0", private=True)
    assert (readme.read_bytes() if readme.exists() else None) == local_card  # the card went into the commit only
    assert fake_hub.repos == [("someone/tiny-moe", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert set(fake_hub.files) == MODEL_FILES | TOKENIZER_FILES | {"README.md", "trainer_state.json"}
    card = ModelCard(fake_hub.files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == list(TAGS) and card.data.license == "apache-2.0"
    assert 'from_pretrained("someone/tiny-moe", trust_remote_code=True)' in card.text
    assert json.loads(fake_hub.files["config.json"])["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_gpt_moe.GPTMoEForCausalLM"
    )
    # What was committed loads with its own code files where hf_moe_offload is not imported, same logits.
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, data in fake_hub.files.items():
        (pulled / name).write_bytes(data)
    ids = torch.randint(0, 320, (2, 12))
    torch.save(ids, tmp_path / "ids.pt")
    load_without_the_package = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(pulled)!r}, trust_remote_code=True).eval()
assert "hf_moe_offload" not in sys.modules and type(model).__module__.startswith("transformers_modules")
torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
"""
    subprocess.run([sys.executable, "-c", load_without_the_package], check=True, timeout=300)
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert torch.equal(original(ids).logits, torch.load(tmp_path / "logits.pt"))


def test_upload_of_a_model_in_memory_saves_it_with_its_tokenizer(fake_hub, tokenizer):
    model = GPTMoEForCausalLM(tiny_config())
    push_to_hub(model, "someone/tiny-moe", tokenizer=tokenizer, datasets=["some/dataset"])
    assert set(fake_hub.files) == MODEL_FILES | TOKENIZER_FILES | {"README.md"}
    assert ModelCard(fake_hub.files["README.md"].decode()).data.datasets == ["some/dataset"]


def test_upload_refuses_an_incomplete_checkpoint_or_an_offline_hub(tmp_path, fake_hub, monkeypatch):
    GPTMoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "modeling_gpt_moe.py").unlink()
    with pytest.raises(ValueError, match=r"lacks modeling_gpt_moe\.py, without which the checkpoint does not load"):
        push_to_hub(tmp_path, "someone/x")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds no \.safetensors weights"):
        push_to_hub(tmp_path, "someone/x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"cannot upload to someone/x: the Hub is offline \(HF_HUB_OFFLINE=1\)"):
        push_to_hub(tmp_path, "someone/x")
    assert fake_hub.files == {} and not (tmp_path / "README.md").exists()


def test_a_plain_push_to_hub_uploads_the_code_files_and_tags_its_card(fake_hub, monkeypatch):
    """transformers' own `model.push_to_hub`: the third network call (the remote card) is replaced too."""
    monkeypatch.setattr(ModelCard, "load", mock.Mock(side_effect=EntryNotFoundError("no README.md yet")))
    GPTMoEForCausalLM(tiny_config()).push_to_hub("someone/tiny-moe")
    assert set(fake_hub.files) == MODEL_FILES | {"README.md"}
    card = ModelCard(fake_hub.files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.tags == list(TAGS)
    assert GPTMoEForCausalLM(tiny_config()).model_tags == list(TAGS)  # one tag list, the model's


@pytest.mark.parametrize("how", ["hf_moe_offload", "transformers"])
def test_pushing_an_offloaded_model_uploads_its_real_weights(how, fake_hub, monkeypatch, tmp_path):
    from safetensors.torch import load

    from hf_moe_offload import OffloadConfig, disable_offload, enable_offload

    monkeypatch.setattr(ModelCard, "load", mock.Mock(side_effect=EntryNotFoundError("no README.md yet")))
    model = GPTMoEForCausalLM(tiny_config()).eval()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    enable_offload(model, OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store"))
    try:
        if how == "transformers":
            model.push_to_hub("someone/tiny-moe")
        else:
            push_to_hub(model, "someone/tiny-moe")
    finally:
        disable_offload(model)
    uploaded = load(fake_hub.files["model.safetensors"])
    assert uploaded.keys() and all(torch.equal(value, expected[key]) for key, value in uploaded.items())
