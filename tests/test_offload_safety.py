"""Nothing lost, never a silent wrong token: saving, one owner per store, links, bytes changed under the store,
threads, relative paths, stale fingerprints, block discovery, leftovers and progress bars. Every case with real
files, threads and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from helpers import prompts, snapshot, store_config, tiny_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from hf_moe_offload import OffloadConfig, disable_offload, enable_offload, load_offloaded
from hf_moe_offload.offload import ownership


def nvme(tmp_path, name="store", **kwargs) -> OffloadConfig:
    return OffloadConfig(offload_device="nvme", nvme_path=tmp_path / name, **kwargs)


def unit_files(folder):
    return sorted(folder.glob("unit_*.safetensors"))


def greedy(model, ids=None, n=6):
    return model.generate(prompts() if ids is None else ids, max_new_tokens=n, do_sample=False)


def in_memory_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def other_weights(arch="llama"):
    model = tiny_model(arch)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)  # same shapes, other weights
    return model


def save_checkpoint(model, path):
    model.save_pretrained(path)
    return path


# -- 1. saving writes the real weights ------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "kind"), [("llama", "cpu"), ("llama", "nvme"), ("gpt_moe", "nvme"), ("gpt2", "cpu")])
def test_state_dict_and_save_pretrained_of_an_offloaded_model_are_the_real_weights(arch, kind, tmp_path, offloaded):
    model = tiny_model(arch)
    expected = in_memory_state(model)
    tokens = greedy(model)
    offloaded(model, store_config(kind, tmp_path, 1))
    greedy(model)  # after use: some units may sit in slots
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt")
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())
    assert torch.equal(greedy(again), tokens)
    assert torch.equal(greedy(model), tokens)  # saving changed nothing of the offloaded model


def test_saving_over_the_checkpoint_read_in_place_is_refused_and_it_survives(tmp_path):
    source = tiny_model("llama")
    tokens = greedy(source)
    checkpoint = save_checkpoint(source, tmp_path / "ckpt")
    before = load_file(checkpoint / "model.safetensors")
    model = load_offloaded(checkpoint, nvme(tmp_path))  # float32 shards: read in place
    assert model._hf_moe_offload_state.store.name == "nvme" and not unit_files(tmp_path / "store")
    with pytest.raises(RuntimeError, match=r"would overwrite .*model.safetensors, which this offloaded model reads"):
        model.save_pretrained(checkpoint)
    after = load_file(checkpoint / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(greedy(model), tokens)
    model.save_pretrained(tmp_path / "elsewhere")  # any other folder works
    saved = load_file(tmp_path / "elsewhere" / "model.safetensors")
    assert all(torch.equal(saved[k], before[k]) for k in saved)
    disable_offload(model)


def test_saving_over_the_checkpoint_a_written_store_came_from_keeps_both_right(tmp_path):
    source = tiny_model("llama")
    tokens = greedy(source)
    checkpoint = save_checkpoint(source, tmp_path / "ckpt")
    before = load_file(checkpoint / "model.safetensors")
    model = load_offloaded(checkpoint, nvme(tmp_path, reuse_checkpoint=False))
    model.save_pretrained(checkpoint)  # the store holds its own copy: the checkpoint is rewritten with real weights
    after = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(greedy(model), tokens)
    disable_offload(model)


# -- 2. a store has one owner ---------------------------------------------------------------------------------------


def test_a_second_model_with_other_weights_is_refused_the_store_of_a_live_one(tmp_path):
    a, b = tiny_model("llama"), other_weights()
    tokens = greedy(a)
    before = snapshot(a)
    enable_offload(a, nvme(tmp_path))
    with pytest.raises(
        RuntimeError,
        match=rf"nvme_path \({tmp_path / 'store'}\) is in use by another offloaded model "
        rf"\(pid {os.getpid()} .*\) holding other weights",
    ):
        enable_offload(b, nvme(tmp_path))
    assert b.model.layers[0].mlp.up_proj.weight.numel() > 0  # b was left as it was
    assert torch.equal(greedy(a), tokens)
    disable_offload(a)
    from helpers import assert_unchanged

    assert_unchanged(a, before)
    enable_offload(b, nvme(tmp_path))  # once a let go, b may rebuild it
    disable_offload(b)


def test_two_models_of_the_same_weights_share_a_store_read_only(tmp_path):
    a, b = tiny_model("llama"), tiny_model("llama")
    tokens = greedy(a)
    enable_offload(a, nvme(tmp_path))
    enable_offload(b, nvme(tmp_path))
    assert torch.equal(greedy(a), tokens) and torch.equal(greedy(b), tokens)
    disable_offload(a)
    assert torch.equal(greedy(b), tokens)
    disable_offload(b)


CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from helpers import prompts, tiny_model
from hf_moe_offload import OffloadConfig, enable_offload, disable_offload
model = tiny_model("llama")
if {scale}:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_({scale})
expected = model.generate(prompts(), max_new_tokens=6, do_sample=False)
try:
    enable_offload(model, OffloadConfig(offload_device="nvme", nvme_path={path!r}))
except RuntimeError as err:
    print("REFUSED", err, flush=True)
    sys.exit(0)
print("OWNER", flush=True)
for _ in range({rounds}):
    assert torch.equal(model.generate(prompts(), max_new_tokens=6, do_sample=False), expected)
sys.stdin.readline()  # hold the store until told
disable_offload(model)
print("DONE", flush=True)
"""


def child(tmp_path, scale=0, rounds=1):
    code = CHILD.format(tests=os.path.dirname(__file__), scale=scale, path=str(tmp_path / "store"), rounds=rounds)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_another_process_holding_other_weights_is_named_and_a_dead_one_lets_go(tmp_path):
    owner = child(tmp_path)
    try:
        assert owner.stdout.readline().strip() == "OWNER"
        with pytest.raises(RuntimeError, match=rf"in use by another offloaded model \(pid {owner.pid} "):
            enable_offload(other_weights(), nvme(tmp_path))
    finally:
        owner.kill()  # a crash: the kernel drops its lock
        owner.wait()
    model = other_weights()
    tokens = greedy(model)
    enable_offload(model, nvme(tmp_path))
    assert torch.equal(greedy(model), tokens)
    disable_offload(model)


def test_two_processes_opening_one_path_at_once_both_get_right_tokens(tmp_path):
    first, second = child(tmp_path, rounds=3), child(tmp_path, rounds=3)  # same weights, racing to build the store
    try:
        lines = [first.stdout.readline().strip(), second.stdout.readline().strip()]
        assert lines == ["OWNER", "OWNER"], lines
        for proc in (first, second):
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert [first.stdout.readline().strip(), second.stdout.readline().strip()] == ["DONE", "DONE"]
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()
    assert not list((tmp_path / "store").glob(f"{ownership.TEMP_PREFIX}*"))


# -- 3. no write follows a link ---------------------------------------------------------------------------------------


def test_links_planted_at_the_store_names_are_replaced_never_written_through(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("the user's data")
    store = tmp_path / "store"
    store.mkdir()
    names = ["unit_00000.safetensors.tmp", "manifest.json.tmp", "unit_00002.safetensors", "manifest.json"]
    for name in names:
        (store / name).symlink_to(outside)
    model = tiny_model("llama")
    tokens = greedy(model)
    enable_offload(model, nvme(tmp_path))
    assert outside.read_text() == "the user's data"
    for path in [*unit_files(store), store / "manifest.json"]:
        assert path.is_file() and not path.is_symlink()
        assert not os.access(path, os.W_OK) or os.geteuid() == 0  # read-only (root writes anyway)
        assert (path.stat().st_mode & 0o222) == 0
    assert torch.equal(greedy(model), tokens)
    disable_offload(model)


# -- 4. bytes changed under the store are detected before use ------------------------------------------------------


def rewrite_in_place(path, offset=-16, keep_times=True):
    """Flip one byte of `path` in place (as another process or a bad page would), keeping its size and mtime."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, 0o444)
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("map_files", [False, True])
def test_a_store_file_changed_while_offloaded_raises_and_is_never_copied_back(map_files, tmp_path):
    model = tiny_model("llama")
    before = snapshot(model)
    enable_offload(model, nvme(tmp_path, map_files=map_files))
    greedy(model)
    held = model.state_dict()  # (what one state_dict handed out is never reused unverified by the next)
    rewrite_in_place(unit_files(tmp_path / "store")[2])
    with pytest.raises(RuntimeError, match=r"unit_00002.safetensors changed after it was opened"):
        greedy(model)
    with pytest.raises(RuntimeError, match=r"disable_offload did not put the weights back, the model stays offloaded"):
        disable_offload(model)
    assert torch.isnan(model.model.layers[0].mlp.up_proj.weight).all()  # placeholders, never the bad bytes
    with pytest.raises(RuntimeError, match="changed after it was opened"):
        model.state_dict()
    del held
    model._hf_moe_offload_state.store.close()  # (teardown of a broken store: nothing to put back)
    assert all(before[name][0] is not None for name in before)


def test_verify_reads_catches_bytes_the_identity_cannot_see_and_disable_always_checks(tmp_path):
    model = tiny_model("llama")
    enable_offload(model, nvme(tmp_path))
    disable_offload(model)
    # the store is corrupted before it is opened, and reused without the CRC check at open
    rewrite_in_place(unit_files(tmp_path / "store")[3])
    model = tiny_model("llama")
    enable_offload(model, nvme(tmp_path, verify_checksums=False, verify_reads=True))
    with pytest.raises(RuntimeError, match=r"unit_00003.safetensors fails its checksum .* its bytes changed"):
        greedy(model)
    model._hf_moe_offload_state.store.close()
    model = tiny_model("llama")
    enable_offload(model, nvme(tmp_path, verify_checksums=False))  # no verify_reads: disable checks anyway
    with pytest.raises(RuntimeError, match=r"stays offloaded .*/unit_00003.safetensors fails its checksum"):
        disable_offload(model)
    assert torch.isnan(model.model.layers[1].mlp.up_proj.weight).all()
    model._hf_moe_offload_state.store.close()


def test_a_checkpoint_shard_read_in_place_changed_under_it_raises(tmp_path):
    checkpoint = save_checkpoint(tiny_model("llama"), tmp_path / "ckpt")
    model = load_offloaded(checkpoint, nvme(tmp_path))
    greedy(model)
    rewrite_in_place(checkpoint / "model.safetensors", offset=-8)
    with pytest.raises(RuntimeError, match=r"checkpoint shard .*model.safetensors changed after it was opened"):
        greedy(model)
    with pytest.raises(RuntimeError, match="stays offloaded"):
        disable_offload(model)
    model._hf_moe_offload_state.store.close()


@pytest.mark.parametrize("files", [None, {}, "drop-one"])
def test_a_manifest_without_complete_file_records_is_rebuilt(files, tmp_path):
    model = tiny_model("llama")
    tokens = greedy(model)
    enable_offload(model, nvme(tmp_path))
    disable_offload(model)
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    if files == "drop-one":
        manifest["files"].pop(sorted(manifest["files"])[0])
    elif files is None:
        del manifest["files"]
    else:
        manifest["files"] = files
    os.chmod(path, 0o644)
    path.write_text(json.dumps(manifest))
    rewrite_in_place(unit_files(tmp_path / "store")[1])  # a bad file the incomplete manifest cannot vouch for
    enable_offload(model, nvme(tmp_path))
    assert "files" in json.loads(path.read_text()) and len(json.loads(path.read_text())["files"]) == len(
        unit_files(tmp_path / "store")
    )
    assert torch.equal(greedy(model), tokens)
    disable_offload(model)


# -- 5. threads -----------------------------------------------------------------------------------------------------


def test_two_threads_generating_on_one_offloaded_model_both_get_their_tokens(tmp_path, offloaded):
    model = tiny_model("gpt_moe")
    inputs = [prompts(batch=1, seq=4 + i, seed=i) for i in range(4)]
    expected = [greedy(model, ids, n=5) for ids in inputs]
    offloaded(model, store_config("nvme", tmp_path, 2))
    results, errors = {}, []

    def run(worker):
        try:
            for round_ in range(3):
                k = (worker + round_) % len(inputs)
                results[(worker, round_)] = (k, greedy(model, inputs[k], n=5))
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 12
    for k, tokens in results.values():
        assert torch.equal(tokens, expected[k])


def test_a_threaded_text_generation_pipeline_gives_every_caller_its_text(tmp_path, offloaded):
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer, pipeline

    from hf_moe_offload.cli.demo import DEMO_MODEL

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    texts = ["def parse(path):", "import os\n", "class Reader:", "for line in"]
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    expected = [generate(t, **kwargs)[0]["generated_text"] for t in texts]
    offloaded(model, OffloadConfig(prefetch_depth=2))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: generate(t, **kwargs)[0]["generated_text"], texts * 3))
    assert got == expected * 3


# -- 6. a relative nvme_path is resolved when the store opens ------------------------------------------------------


def test_a_relative_nvme_path_is_resolved_once_when_the_store_opens(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    other = other_weights()
    enable_offload(other, OffloadConfig(offload_device="nvme", nvme_path="store"))  # b/store: other weights
    disable_offload(other)
    monkeypatch.chdir(tmp_path / "a")
    model = tiny_model("llama")
    tokens = greedy(model)
    enable_offload(model, OffloadConfig(offload_device="nvme", nvme_path="store"))
    assert model._hf_moe_offload_state.store.path == str(tmp_path / "a" / "store")
    monkeypatch.chdir(tmp_path / "b")
    assert torch.equal(greedy(model), tokens)
    disable_offload(model)


# -- 7. the checkpoint fingerprint is its content -------------------------------------------------------------------


def test_a_checkpoint_replaced_by_other_weights_of_the_same_size_and_time_rebuilds_the_store(tmp_path):
    checkpoint = save_checkpoint(tiny_model("llama"), tmp_path / "ckpt")
    config = nvme(tmp_path, reuse_checkpoint=False)
    model = load_offloaded(checkpoint, config)
    disable_offload(model)
    shard = checkpoint / "model.safetensors"
    st = shard.stat()
    other = other_weights()
    tokens = greedy(other)
    other.save_pretrained(tmp_path / "other")
    os.replace(tmp_path / "other" / "model.safetensors", shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    model = load_offloaded(checkpoint, config)
    assert torch.equal(greedy(model), tokens)
    disable_offload(model)


# -- 8. block discovery ---------------------------------------------------------------------------------------------


class TwoLists(nn.Module):
    """A decoder whose block list sits beside another non-empty list (as in Gemma3n, Zamba2)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.projections = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8)) for _ in range(3)])
        self.head = nn.Linear(8, 10)

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for projection in self.projections:
            hidden = projection(hidden)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def test_a_model_with_several_module_lists_streams_its_blocks():
    from hf_moe_offload.offload.discovery import find_block_list

    model = TwoLists().eval()
    assert find_block_list(model)[0] == "layers"
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        expected = model(ids)
        enable_offload(model, OffloadConfig())
        assert torch.equal(model(ids), expected)
    disable_offload(model)


def test_an_encoder_decoder_model_is_refused_clearly():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration is an encoder-decoder model: .* decoder-only"):
        enable_offload(t5, OffloadConfig())


def test_lists_without_parameters_are_named_when_no_block_list_qualifies():
    model = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([nn.ReLU(), nn.ReLU()]), nn.Linear(4, 10))
    with pytest.raises(ValueError, match=r"its lists 1 hold no parameters"):
        enable_offload(model, OffloadConfig())


# -- 9. bad input (the config's own table is in test_offload_faults.py) ---------------------------------------------


def test_prefetch_depth_is_bounded_by_the_model(tmp_path):
    model = tiny_model("llama")  # 3 blocks + embedding + norm + head: 6 units
    with pytest.raises(ValueError, match=r"prefetch_depth \(6\) must be < the number of units \(6\)"):
        enable_offload(model, OffloadConfig(prefetch_depth=6))
    assert model.model.layers[0].mlp.up_proj.weight.numel() > 0


def test_load_offloaded_refuses_offload_folder_clearly(tmp_path):
    checkpoint = save_checkpoint(tiny_model("llama"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="do not pass offload_folder"):
        load_offloaded(checkpoint, OffloadConfig(), offload_folder=str(tmp_path / "x"))


def test_load_offloaded_takes_the_dtype_of_the_config(tmp_path):
    checkpoint = save_checkpoint(tiny_model("llama"), tmp_path / "ckpt")
    ds = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "bf16": {"enabled": True}}
    model = load_offloaded(checkpoint, OffloadConfig.from_deepspeed(ds))
    assert model.dtype == torch.bfloat16
    disable_offload(model)
    model = load_offloaded(checkpoint, OffloadConfig.from_deepspeed(ds), dtype=torch.float32)  # dtype= wins
    assert model.dtype == torch.float32
    disable_offload(model)


# -- 10. leftovers --------------------------------------------------------------------------------------------------


def test_what_an_interrupted_writer_left_is_removed_by_the_next_open(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (store / f"{ownership.CONVERT_PREFIX}{dead_pid}_abc").mkdir()  # an interrupted load_offloaded
    live = store / f"{ownership.CONVERT_PREFIX}{os.getpid()}_live"  # a load of a live process: kept
    live.mkdir()
    (store / f"{ownership.TEMP_PREFIX}unit_00001.safetensors.x.tmp").write_bytes(b"half")
    big = tiny_model("llama")
    enable_offload(big, nvme(tmp_path))
    disable_offload(big)
    assert live.is_dir() and not list(store.glob(f"{ownership.TEMP_PREFIX}*"))
    assert not (store / f"{ownership.CONVERT_PREFIX}{dead_pid}_abc").exists()
    many = len(unit_files(store))
    small = AutoModelForCausalLM.from_config(
        tiny_model("llama").config.__class__(**{**tiny_model("llama").config.to_dict(), "num_hidden_layers": 1})
    ).eval()
    enable_offload(small, nvme(tmp_path))  # a smaller model rebuilds the store: the old units are gone
    assert len(unit_files(store)) == many - 2
    manifest = json.loads((store / "manifest.json").read_text())
    assert {f.stem for f in unit_files(store)} == set(manifest["files"])
    disable_offload(small)


def test_an_interrupted_load_offloaded_leaves_no_folder_after_the_next_load(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tiny_model("llama"), tmp_path / "ckpt")
    store = tmp_path / "store"
    script = textwrap.dedent(f"""
        import os, sys
        import transformers
        def interrupted(*args, **kwargs):
            os._exit(1)  # killed while transformers converts
        transformers.AutoModelForCausalLM.from_pretrained = interrupted
        from hf_moe_offload import OffloadConfig, load_offloaded
        load_offloaded({str(checkpoint)!r}, OffloadConfig(offload_device="nvme", nvme_path={str(store)!r}))
    """)
    subprocess.run([sys.executable, "-c", script], check=False)
    assert list(store.glob(f"{ownership.CONVERT_PREFIX}*"))  # left behind by the killed process
    model = load_offloaded(checkpoint, nvme(tmp_path))
    assert not list(store.glob(f"{ownership.CONVERT_PREFIX}*"))
    disable_offload(model)


# -- 11. progress bars follow the HF switches -----------------------------------------------------------------------


@pytest.mark.parametrize("switch", ["transformers", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"])
def test_progress_bars_follow_the_switches_users_know(switch, tmp_path, monkeypatch, capfd):
    from transformers.utils import logging as hf_logging

    model = tiny_model("llama")
    enable_offload(model, nvme(tmp_path, name="shown"))
    disable_offload(model)
    assert "Writing the NVMe store" in capfd.readouterr().err
    if switch == "transformers":
        hf_logging.disable_progress_bar()
    elif switch == "HF_HUB_DISABLE_PROGRESS_BARS":
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()
    else:
        monkeypatch.setenv("TQDM_DISABLE", "1")
    try:
        enable_offload(model, nvme(tmp_path, name="silent"))
        disable_offload(model)
        assert "Writing the NVMe store" not in capfd.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
        import huggingface_hub.utils as hub_utils

        hub_utils.enable_progress_bars()
