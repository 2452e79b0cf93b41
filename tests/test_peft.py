"""LoRA fine-tuning of GPT-MoE with PEFT: attention projections and the 3-D expert weights."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM
from hf_moe_offload.training import BlockDataset


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.up_proj", "mlp.experts.down_proj"]


def test_lora_on_attention_and_experts_trains_saves_and_loads_back(tmp_path):
    base = GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe"))
    base.save_pretrained(tmp_path / "base")
    frozen = {name: p.clone() for name, p in base.named_parameters()}
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        base_logits = base.eval()(ids).logits

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTENTION, target_parameters=EXPERTS)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)  # LoRA B starts at zero: the model is unchanged
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("experts" in name for name in trainable) and any("q_proj" in name for name in trainable)

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(torch.randint(0, 64, (16, 16))))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    for name, p in model.get_base_model().named_parameters():
        if name in frozen:  # the base weights never move (LoRA parameters are new names)
            assert torch.equal(p, frozen[name]), name
    model.eval()
    with torch.no_grad():
        tuned_logits = model(ids).logits
    assert not torch.allclose(tuned_logits, base_logits)
    expert_lora = [name for name, p in model.named_parameters() if "experts" in name and "lora_B" in name]
    assert expert_lora and all(model.get_parameter(name).abs().sum() > 0 for name in expert_lora)

    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    loaded = PeftModel.from_pretrained(GPTMoEForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tuned_logits)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, tuned_logits, rtol=1e-4, atol=1e-5)  # W + BA folded once
    assert isinstance(merged, GPTMoEForCausalLM)
