"""Bad input and faults of the offload runtime: clear errors, nothing half-written used later, never wrong tokens."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest
import torch
from helpers import nvme_path, prompts, tiny_model
from torch import nn

import hf_moe_offload
from hf_moe_offload import OffloadConfig, disable_offload, enable_offload, get_offload_stats
from hf_moe_offload.offload import store as store_module


def nvme(tmp_path, **kwargs) -> OffloadConfig:
    return OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store", **kwargs)


def unit_files(tmp_path):
    return sorted((tmp_path / "store").glob("unit_*.safetensors"))


@pytest.fixture
def llama_and_tokens():
    model = tiny_model("llama")
    return model, model.generate(prompts(), max_new_tokens=6, do_sample=False)


# -- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"offload_device": "disk"}, "offload_device ('disk') must be one of"),
        ({"offload_device": "nvme"}, "needs nvme_path"),
        ({"prefetch_depth": -1}, "prefetch_depth (-1) must be an integer in [0, 64]"),
        ({"prefetch_depth": 1.5}, "prefetch_depth (1.5) must be an integer in [0, 64]"),
        ({"prefetch_depth": 10**6}, "prefetch_depth (1000000) must be an integer in [0, 64]"),
        ({"prefetch_depth": True}, "prefetch_depth (True) must be an integer"),
        ({"io_threads": 0}, "io_threads (0) must be an integer in [1, 256]"),
        ({"execution_device": "meta"}, "execution_device ('meta') must be the CPU or a CUDA device"),
        ({"execution_device": "not a device"}, "is not a torch device"),
        ({"execution_device": 1.5}, "execution_device (1.5) must be a str, an int or a torch.device"),
        # booleans must be bools: "False" is a true string
        ({"direct_io": "False"}, "direct_io ('False') must be True or False (a bool, not str)"),
        ({"pin_memory": "false"}, "pin_memory ('false') must be True or False"),
        ({"verify_reads": 1}, "verify_reads (1) must be True or False (a bool, not int)"),
        ({"distributed": "no"}, "distributed ('no') must be True, False or None"),
        ({"offload_device": "nvme", "nvme_path": 5}, "nvme_path (5) must be a str or an os.PathLike, not int"),
        ({"offload_device": "nvme", "nvme_path": b"/tmp/x"}, "nvme_path (b'/tmp/x') must be a str or an os.PathLike"),
        ({"offload_device": "nvme", "nvme_path": ""}, "nvme_path ('') must be a non-empty path"),
        ({"nvme_path": "/tmp/store"}, "nvme_path ('/tmp/store') is set but offload_device is 'cpu'"),
        ({"chunk_bytes": 4096.0}, "chunk_bytes (4096.0) must be an integer in [4096, 1073741824]"),
        ({"chunk_bytes": 6000}, "chunk_bytes (6000) must be a multiple of 4096"),
        ({"expert_cache_size": -1}, "expert_cache_size (-1) must be an integer >= 0"),
        ({"dtype": "bfloat16"}, "dtype ('bfloat16') must be a torch.dtype"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError) as err:
        OffloadConfig(**kwargs)
    assert message in str(err.value)


def test_from_deepspeed_reads_zero_inference_config():
    config = OffloadConfig.from_deepspeed(
        {
            "zero_optimization": {
                "stage": 3,
                "offload_param": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": False, "buffer_count": 3},
            },
            "aio": {"thread_count": 4},
        },
        execution_device="cpu",
    )
    assert config.offload_device == "nvme" and config.nvme_path == "/local_nvme"
    assert config.pin_memory is False and config.prefetch_depth == 2 and config.io_threads == 4
    assert OffloadConfig.from_deepspeed({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})


def zero3(offload: dict, **top) -> dict:
    return {"zero_optimization": {"stage": 3, "offload_param": offload}, **top}


def test_from_deepspeed_auto_values_mean_the_defaults_and_precision_gives_the_dtype(caplog):
    # as pasted from the transformers DeepSpeed docs
    ds = zero3(
        {"device": "cpu", "pin_memory": "auto", "buffer_count": "auto", "nvme_path": "auto"},
        aio={"thread_count": "auto"},
        bf16={"enabled": True},
    )
    config = OffloadConfig.from_deepspeed(ds)
    default = OffloadConfig()
    assert (config.pin_memory, config.prefetch_depth, config.io_threads) == (
        default.pin_memory,
        default.prefetch_depth,
        default.io_threads,
    )
    assert config.dtype == torch.bfloat16
    assert OffloadConfig.from_deepspeed(zero3({"device": "cpu"}, fp16={"enabled": True})).dtype == torch.float16
    assert OffloadConfig.from_deepspeed(zero3({"device": "cpu"}, bf16={"enabled": "auto"})).dtype is None
    assert OffloadConfig.from_deepspeed(zero3({"device": "cpu"}, bf16={"enabled": True}), dtype=None).dtype is None


def test_from_deepspeed_reads_a_json_file_and_names_what_it_ignores(tmp_path, caplog):
    ds = zero3({"device": "nvme", "nvme_path": str(tmp_path), "buffer_size": 1e8}, train_batch_size=8)
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ds))
    with caplog.at_level("WARNING"):
        config = OffloadConfig.from_deepspeed(path)
    assert config.offload_device == "nvme" and config.nvme_path == str(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert len(warnings) == 1  # one warning naming every ignored key
    for key in ("train_batch_size", "zero_optimization.stage3_prefetch_bucket_size", "offload_param.buffer_size"):
        assert key in warnings[0]


@pytest.mark.parametrize(
    ("ds_config", "message"),
    [
        ({"train_batch_size": 1}, "'zero_optimization' section"),
        ({"zero_optimization": None}, "'zero_optimization' section (a dict)"),
        (zero3({"device": "cpu"}) | {"zero_optimization": {"stage": 2}}, "stage (2) must be the integer 3"),
        ({"zero_optimization": {"stage": "3", "offload_param": {"device": "cpu"}}}, "stage ('3') must be the integer"),
        ({"zero_optimization": {"stage": 3}}, "offload_param is missing"),
        (zero3({"device": "none"}), "device ('none') must be one of"),
        (zero3({"device": "gpu"}), "device ('gpu') must be one of"),
        (zero3({"device": "cpu", "buffer_count": 0}), "buffer_count (0) must be an integer >= 1"),
        (zero3({"device": "cpu", "buffer_count": True}), "buffer_count (True) must be an integer >= 1"),
        (zero3({"device": "cpu", "pin_memory": "false"}), "pin_memory ('false') must be true, false or \"auto\""),
        (zero3({"device": "cpu"}, aio={"thread_count": "4"}), "io_threads ('4') must be an integer"),
        (zero3({"device": "cpu"}, bf16={"enabled": True}, fp16={"enabled": True}), "both bf16 and fp16"),
        (zero3({"device": "cpu"}, bf16={"enabled": "yes"}), "bf16.enabled ('yes') must be true, false or"),
        ("/no/such/ds_config.json", "ds_config (/no/such/ds_config.json) cannot be read"),
    ],
)
def test_from_deepspeed_bad_configs(ds_config, message):
    with pytest.raises(ValueError) as err:
        OffloadConfig.from_deepspeed(ds_config)
    assert message in str(err.value)


def test_cuda_on_a_torch_without_cuda_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ValueError, match=r"built without CUDA; use execution_device='cpu'"):
        OffloadConfig(execution_device="cuda")
    monkeypatch.undo()
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    # a torch with CUDA on a machine without a device: refused when offloading starts, before any file is made
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    config = OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store", execution_device="cuda:0")
    with pytest.raises(ValueError, match=r"sees no CUDA device on this machine; use execution_device='cpu'"):
        hf_moe_offload.load_offloaded(tmp_path / "no_checkpoint", config)
    assert not (tmp_path / "store").exists()


# -- models the runtime cannot take --------------------------------------------------------------------------------


def test_model_without_block_list_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(ValueError, match=r"no torch.nn.ModuleList of decoder blocks \(such as model.layers"):
        enable_offload(model, OffloadConfig())


def test_offloading_twice_and_disabling_a_plain_model_are_refused(tmp_path):
    model = tiny_model("gpt2")
    with pytest.raises(RuntimeError, match="not offloaded"):
        disable_offload(model)
    with pytest.raises(RuntimeError, match="not offloaded"):
        get_offload_stats(model)
    enable_offload(model, OffloadConfig())
    with pytest.raises(RuntimeError, match="already offloaded"):
        enable_offload(model, OffloadConfig())
    disable_offload(model)


def test_model_dispatched_by_accelerate_is_refused():
    from accelerate import cpu_offload

    model = tiny_model("gpt2")
    cpu_offload(model, execution_device="cpu")
    with pytest.raises(ValueError, match="already has accelerate hooks"):
        enable_offload(model, OffloadConfig())


@pytest.mark.parametrize("call", ["to", "cuda", "cpu", "half", "float", "bfloat16"])
def test_moving_an_offloaded_model_says_to_disable_first(call, tmp_path):
    model = tiny_model("llama")
    enable_offload(model, OffloadConfig())
    args = ("cpu",) if call == "to" else ()
    with pytest.raises(RuntimeError, match=r"call hf_moe_offload.disable_offload\(model\) first"):
        getattr(model, call)(*args)
    disable_offload(model)
    assert model.to("cpu") is model  # the guard is gone


# -- the NVMe store: paths, space, reuse, staleness, corruption -----------------------------------------------------


def test_nvme_path_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"nvme_path \(.*a_file/store\) cannot be created"):
        enable_offload(model, OffloadConfig(offload_device="nvme", nvme_path=blocker / "store"))
    assert model.transformer.h[0].mlp.c_fc.weight.numel() > 0  # nothing was taken from the model


def test_nvme_path_not_writable():
    # sysfs refuses new files even to root
    with pytest.raises(ValueError, match=r"nvme_path \(/sys\) is not writable"):
        enable_offload(tiny_model("gpt2"), OffloadConfig(offload_device="nvme", nvme_path="/sys"))


def test_not_enough_space_is_refused_before_writing(tmp_path, monkeypatch):
    real = store_module.shutil.disk_usage
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    model = tiny_model("gpt2")
    with pytest.raises(RuntimeError, match=r"the NVMe store needs .* GiB but .* has 0.00 GiB free"):
        enable_offload(model, nvme(tmp_path))
    assert not unit_files(tmp_path) and not (tmp_path / "store" / "manifest.json").exists()
    assert getattr(model, "_hf_moe_offload_state", None) is None


def test_running_out_of_space_while_writing_leaves_no_store(tmp_path, monkeypatch, llama_and_tokens):
    model, tokens = llama_and_tokens
    calls = [0]
    real_fsync = os.fsync

    def fsync_fails_on_third_file(fd):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync_fails_on_third_file)
    with pytest.raises(RuntimeError, match=r"writing the NVMe store file .*unit_00002.safetensors failed \(out of"):
        enable_offload(model, nvme(tmp_path))
    monkeypatch.setattr(store_module.os, "fsync", real_fsync)
    store_dir = tmp_path / "store"
    assert not (store_dir / "manifest.json").exists() and not list(store_dir.glob("*.tmp"))
    assert not unit_files(tmp_path)  # the two finished files of a store without a manifest were removed too
    # the model was left as it was and the next attempt writes a whole store
    assert torch.equal(model.generate(prompts(), max_new_tokens=6, do_sample=False), tokens)
    enable_offload(model, nvme(tmp_path))
    assert torch.equal(model.generate(prompts(), max_new_tokens=6, do_sample=False), tokens)
    disable_offload(model)


def test_valid_store_is_reused_incomplete_and_stale_ones_rebuilt(tmp_path, llama_and_tokens):
    model, tokens = llama_and_tokens
    enable_offload(model, nvme(tmp_path))
    disable_offload(model)
    stamps = {f: f.stat().st_mtime_ns for f in unit_files(tmp_path)}
    enable_offload(model, nvme(tmp_path))
    assert {f: f.stat().st_mtime_ns for f in unit_files(tmp_path)} == stamps  # reused, not written again
    assert torch.equal(model.generate(prompts(), max_new_tokens=6, do_sample=False), tokens)
    disable_offload(model)

    (tmp_path / "store" / "manifest.json").unlink()  # an interrupted write: no manifest
    enable_offload(model, nvme(tmp_path))
    assert all(f.stat().st_mtime_ns != stamps[f] for f in unit_files(tmp_path))
    disable_offload(model)

    other = tiny_model("llama")
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(1.5)  # same shapes, other weights: the store is stale
    other_tokens = other.generate(prompts(), max_new_tokens=6, do_sample=False)
    enable_offload(other, nvme(tmp_path))
    assert torch.equal(other.generate(prompts(), max_new_tokens=6, do_sample=False), other_tokens)
    disable_offload(other)


def test_store_files_are_safetensors_with_aligned_data(tmp_path):
    from safetensors import safe_open

    model = tiny_model("gpt_moe")
    expected = {}
    for name, p in model.named_parameters():
        module, _, attr = name.rpartition(".")
        if module.endswith(".experts"):  # stored expert-major: one entry per expert slice
            expected.update({f"{module}.{e}.{attr}": p[e].detach().clone() for e in range(p.shape[0])})
        else:
            expected[name] = p.detach().clone()
    enable_offload(model, nvme(tmp_path))
    seen = set()
    for path in unit_files(tmp_path):
        data_start, header = store_module.read_safetensors_header(str(path))
        assert data_start % 4096 == 0
        for key, info in header.items():
            if ".experts." in key and key.endswith(".up_proj"):  # the first slice of an expert: its region's start
                assert info["data_offsets"][0] % 4096 == 0
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if not key.startswith("__padding"):
                    assert torch.equal(f.get_tensor(key), expected[key])
                    seen.add(key)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["format"] == store_module.STORE_FORMAT and len(manifest["files"]) == len(unit_files(tmp_path))
    disable_offload(model)
    assert seen == set(expected)


def test_corrupted_store_file_is_named(tmp_path, llama_and_tokens):
    model, _ = llama_and_tokens
    enable_offload(model, nvme(tmp_path))
    disable_offload(model)
    victim = unit_files(tmp_path)[1]
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match=rf"{victim.name} fails its checksum .* the file is corrupted"):
        enable_offload(model, nvme(tmp_path))
    assert getattr(model, "_hf_moe_offload_state", None) is None


def test_truncated_store_file_is_named_when_opened(tmp_path, llama_and_tokens):
    model, _ = llama_and_tokens
    enable_offload(model, nvme(tmp_path))
    disable_offload(model)
    victim = unit_files(tmp_path)[2]
    os.truncate(victim, victim.stat().st_size - 100)
    with pytest.raises(RuntimeError, match=rf"{victim.name} has \d+ bytes, its manifest says \d+: the file is trunc"):
        enable_offload(model, nvme(tmp_path))


@pytest.mark.parametrize("map_files", [False, True])
def test_store_file_truncated_while_running_raises_never_wrong_tokens(map_files, tmp_path, llama_and_tokens):
    model, _ = llama_and_tokens
    enable_offload(model, nvme(tmp_path, prefetch_depth=2, map_files=map_files))
    victim = unit_files(tmp_path)[2]
    os.truncate(victim, 4096 + 64)
    with pytest.raises(RuntimeError, match=rf"{victim.name} changed after it was opened \(its size changed"):
        model.generate(prompts(), max_new_tokens=6, do_sample=False)


# -- failures while running ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("map_files", "method", "thread"), [(False, "read", "io"), (True, "populate_run", "fetch")])
def test_reader_thread_exception_surfaces_in_the_caller(map_files, method, thread, tmp_path, llama_and_tokens):
    model, tokens = llama_and_tokens
    enable_offload(model, nvme(tmp_path, prefetch_depth=2, io_threads=2, map_files=map_files))
    store = model._hf_moe_offload_state.store
    real = getattr(store, method)
    threads = set()

    def failing(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            return real(*args, **kwargs)  # the embedding's row lookups run in the caller
        threads.add(threading.current_thread().name)
        raise OSError(errno.EIO, "Input/output error (injected)")

    setattr(store, method, failing)
    with pytest.raises(OSError, match=r"injected"):
        model.generate(prompts(), max_new_tokens=6, do_sample=False)
    assert threads and all(name.startswith(f"hf_moe_offload-{thread}") for name in threads)
    setattr(store, method, real)
    assert torch.equal(model.generate(prompts(), max_new_tokens=6, do_sample=False), tokens)
    disable_offload(model)


@pytest.mark.parametrize(("kind", "map_files"), [("cpu", False), ("nvme", False), ("nvme", True)])
def test_keyboard_interrupt_mid_generate_leaves_the_model_usable(kind, map_files, tmp_path, llama_and_tokens):
    model, tokens = llama_and_tokens
    config = OffloadConfig(
        offload_device=kind, nvme_path=nvme_path(kind, tmp_path), prefetch_depth=2, map_files=map_files
    )
    enable_offload(model, config)
    calls = [0]

    def interrupt(module, args):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.generate(prompts(), max_new_tokens=6, do_sample=False)
    handle.remove()
    assert torch.equal(model.generate(prompts(), max_new_tokens=6, do_sample=False), tokens)
    assert get_offload_stats(model).peak_resident_units <= 3
    disable_offload(model)
