"""LoRA adapters against HF + PEFT, on the tiny Qwen2.5-VL checkpoint (float32, CPU; or as
VLMX_TEST_DEVICE / VLMX_TEST_DTYPE / VLMX_TEST_ATOL say, e.g. cuda + bfloat16 with CUDA graphs).

Each adapter is made by PEFT with re-randomised weights (PEFT starts B at zero) and must change
the reference's answers. vlmx's greedy tokens and logprobs must equal the reference's with the
adapter applied by PEFT: alone, mixed in one batch with other adapters and the base model,
after eviction and reloading, with rsLoRA and rank / alpha patterns, with a fused qkv_proj
adapter, and with an adapter on the vision tower and projector.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_reference import TEST_DEVICE, TEST_DTYPE, compare_with_reference
from tests.lora_adapters import (
    DECODER_MODULES,
    fuse_qkv,
    make_adapter,
    peft_reference,
    share_qkv_a,
)
from vlmx import LLM, LoRARequest, SamplingParams
from vlmx.llm import InvalidPromptsError
from vlmx.lora.request import LORA_DISABLED

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, logprobs=2)
QUESTION = "Describe the images."
TOWER_MODULES = (
    r".*visual\.(blocks|merger).*\.(qkv|proj|gate_proj|up_proj|down_proj|mlp\.0|mlp\.2)"
    r"|.*language_model.*\.(q_proj|o_proj)"
)


@pytest.fixture(scope="module")
def setup(qwen2_5_vl_ckpt, tmp_path_factory, test_images):
    """Adapters, their PEFT references' greedy answers, and the prompts."""
    base = qwen2_5_vl_ckpt
    root = tmp_path_factory.mktemp("lora")
    qkv = make_adapter(base, str(root / "qkv"), r".*language_model.*\.(q_proj|k_proj|v_proj)", 3)
    share_qkv_a(qkv)
    paths = {
        "a": make_adapter(base, str(root / "a"), DECODER_MODULES, seed=1),
        "b": make_adapter(
            base,
            str(root / "b"),
            r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)",
            seed=2,
            use_rslora=True,
            rank_pattern={"o_proj": 4},
            alpha_pattern={"down_proj": 4.0},
        ),
        "qkv": qkv,
        "tower": make_adapter(base, str(root / "tower"), TOWER_MODULES, seed=4),
    }
    fused = fuse_qkv(qkv, str(root / "fused"))
    a_bin = root / "a_bin"  # adapter a as adapter_model.bin
    a_bin.mkdir()
    shutil.copy(os.path.join(paths["a"], "adapter_config.json"), a_bin)
    torch.save(
        load_file(os.path.join(paths["a"], "adapter_model.safetensors")),
        a_bin / "adapter_model.bin",
    )
    base_ref = peft_reference(base, None)
    prompts = [
        (base_ref.chat_prompt(2, QUESTION), test_images[:2]),
        (base_ref.chat_prompt(1, QUESTION), test_images[3:4]),
    ]
    refs = {name: peft_reference(base, path) for name, path in paths.items()}
    answers = {
        name: [ref.greedy(p, imgs, GREEDY.max_tokens) for p, imgs in prompts]
        for name, ref in [("base", base_ref), *refs.items()]
    }
    for name in paths:  # every adapter changes the reference's answers
        assert answers[name] != answers["base"], name
    requests = {
        name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(paths.items())
    }
    requests["fused"] = LoRARequest("fused", 9, fused)  # answers as "qkv", its split form
    requests["a_bin"] = LoRARequest("a_bin", 10, str(a_bin))  # answers as "a"
    return {
        "base": base,
        "root": root,
        "prompts": prompts,
        "refs": {"base": base_ref, **refs, "fused": refs["qkv"], "a_bin": refs["a"]},
        "answers": {**answers, "fused": answers["qkv"], "a_bin": answers["a"]},
        "requests": requests,
    }


def _inputs(prompts):
    return [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in prompts]


def _llm(path: str, **kwargs) -> LLM:
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, max_model_len=2048, **kwargs)


@pytest.fixture(scope="module")
def llm(setup) -> LLM:
    return _llm(
        setup["base"], enable_lora=True, max_loras=2, max_cpu_loras=4, max_lora_rank=8,
        enable_tower_connector_lora=True,
    )  # fmt: skip


def _check(setup, name: str, prompt_idx: int, output) -> None:
    prompt, images = setup["prompts"][prompt_idx]
    compare_with_reference(setup["refs"][name], prompt, images, output)
    if TEST_DTYPE == "float32":  # bf16 on a GPU: logprobs within VLMX_TEST_ATOL, clear argmaxes
        assert list(output.outputs[0].token_ids) == setup["answers"][name][prompt_idx], name


@pytest.mark.parametrize("name", ["a", "b", "fused", "tower"])
def test_each_adapter_matches_peft(setup, llm, name):
    """Greedy tokens and logprobs equal HF + PEFT: all decoder layers; rsLoRA with rank and
    alpha patterns; a fused qkv_proj adapter; the vision tower and projector."""
    outputs = llm.generate(
        _inputs(setup["prompts"]), GREEDY, use_tqdm=False, lora_request=setup["requests"][name]
    )
    for i, output in enumerate(outputs):
        _check(setup, name, i, output)
    if name == "tower":  # the images' encoder outputs are the adapter's, cached apart
        llm.generate(_inputs(setup["prompts"]), GREEDY, use_tqdm=False)
        cached = llm.llm_engine.executor.runner.encoder.outputs
        adapted = [h for h in cached if h.endswith("+lora4")]
        assert len(adapted) == 3
        for h in adapted:
            assert not torch.allclose(cached[h], cached[h.removesuffix("+lora4")], atol=1e-3)


def test_one_batch_mixes_adapters_and_the_base_model(setup, llm):
    """Two adapters, the base model and a repeat in one call (one step while prefilling);
    then the same prompt with a, then b: b's answer, none of a's KV reused (then b's is)."""
    reqs = setup["requests"]
    order = [("a", 0), ("b", 0), ("base", 0), ("a", 0), ("b", 1)]
    prompts = [setup["prompts"][i] for _, i in order]
    loras = [None if name == "base" else reqs[name] for name, _ in order]
    llm.reset_prefix_cache()
    llm.llm_engine.step_log = []
    outputs = llm.generate(_inputs(prompts), GREEDY, use_tqdm=False, lora_request=loras)
    assert llm.llm_engine.step_log[0].num_requests == len(order)  # all in one step
    llm.llm_engine.step_log = None
    for (name, i), output in zip(order, outputs):
        _check(setup, name, i, output)

    one = _inputs(setup["prompts"][:1])
    llm.reset_prefix_cache()
    first = llm.generate(one, GREEDY, use_tqdm=False, lora_request=reqs["a"])[0]
    then = llm.generate(one, GREEDY, use_tqdm=False, lora_request=reqs["b"])[0]
    again = llm.generate(one, GREEDY, use_tqdm=False, lora_request=reqs["b"])[0]
    assert first.num_cached_tokens == then.num_cached_tokens == 0  # none of a's KV for b
    assert again.num_cached_tokens > 0  # b's own KV is reused
    _check(setup, "a", 0, first)
    _check(setup, "b", 0, then)
    _check(setup, "b", 0, again)


def test_eviction_and_reloading_give_the_same_answers(setup):
    """One device slot and one host adapter: every switch evicts and reloads from disk (a
    `.bin` adapter among them)."""
    reqs = setup["requests"]
    llm = _llm(setup["base"], enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8)
    order = ["a", "b", "base", "a", "fused", "a_bin", "b"]
    prompts = [setup["prompts"][0]] * len(order)
    loras = [None if name == "base" else reqs[name] for name in order]
    outputs = llm.generate(_inputs(prompts), GREEDY, use_tqdm=False, lora_request=loras)
    for name, output in zip(order, outputs):
        _check(setup, name, 0, output)
    manager = llm.llm_engine.executor.runner.lora
    assert len(manager.host) == 1 and len(manager.slot_of) == 1
    again = llm.generate(_inputs(prompts[:1]), GREEDY, use_tqdm=False, lora_request=reqs["a"])
    _check(setup, "a", 0, again[0])


def _unmappable_adapter(src: str, out) -> str:
    """Adapter `src` with one module renamed to one the model lacks."""
    out.mkdir()
    shutil.copy(os.path.join(src, "adapter_config.json"), out)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    renamed = {
        k.replace("layers.1.mlp.down_proj", "layers.1.mlp.fc_extra"): v for k, v in tensors.items()
    }
    save_file(renamed, str(out / "adapter_model.safetensors"))
    return str(out)


def test_errors_name_the_problem_and_spare_the_other_prompts(setup, tmp_path):
    reqs = setup["requests"]
    base = setup["base"]
    big = make_adapter(base, str(tmp_path / "big"), DECODER_MODULES, seed=6, r=16)
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    llm = _llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    bad = {
        1: (LoRARequest("big", 11, big), ("rank 16", "max_lora_rank=8")),
        2: (LoRARequest("none", 12, str(not_adapter)), ("not a PEFT adapter",)),
        3: (
            LoRARequest("odd", 13, _unmappable_adapter(reqs["a"].lora_path, tmp_path / "odd")),
            ("'model.language_model.layers.1.mlp.fc_extra'", "cannot map"),
        ),
        4: (reqs["tower"], ("model.visual.blocks.0.attn.proj", "enable_tower_connector_lora")),
    }
    loras = [reqs["a"]] + [lora for lora, _ in bad.values()]
    prompts = _inputs([setup["prompts"][0]] * len(loras))
    with pytest.raises(InvalidPromptsError) as excinfo:
        llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    errors, outputs = excinfo.value.errors, excinfo.value.outputs
    assert sorted(errors) == sorted(bad)
    for i, (_, causes) in bad.items():
        for cause in causes:
            assert cause in errors[i], (i, errors[i])
    _check(setup, "a", 0, outputs[0])
    with pytest.raises(ValueError, match="rank 16"):
        llm.llm_engine.add_lora(LoRARequest("big", 11, big))
    assert llm.llm_engine.add_lora(reqs["a"]) is True
    with pytest.raises(ValueError, match="lora_requests for 1 prompts"):
        llm.generate(prompts[:1], GREEDY, use_tqdm=False, lora_request=[reqs["a"]] * 2)

    plain = _llm(base)
    with pytest.raises(InvalidPromptsError) as excinfo:
        plain.generate(prompts[:2], GREEDY, use_tqdm=False, lora_request=[None, reqs["a"]])
    assert excinfo.value.errors == {1: LORA_DISABLED}
    _check(setup, "base", 0, excinfo.value.outputs[0])


def test_bench_and_generate_cli_take_lora_options(setup, monkeypatch, tmp_path, capsys):
    """`vlmx bench --num-loras 2 --lora-rank 4` builds two random adapters and spreads them
    over the prompts; `vlmx generate --enable-lora --lora-path` applies one."""
    from vlmx.bench import run as bench_run
    from vlmx.cli import main

    built = []
    build_llm = bench_run.build_llm
    monkeypatch.setattr(
        bench_run, "build_llm", lambda *a, **k: built.append(build_llm(*a, **k)) or built[-1]
    )
    out_file = tmp_path / "results.json"
    args = ["bench", "--model", setup["base"], "--workload", "w2-decode", "--output-len", "2"]
    args += ["--num-prompts", "3", "--device", "cpu", "--card", "H100", "--json", str(out_file)]
    assert main([*args, "--num-loras", "2", "--lora-rank", "4"]) == 0
    assert json.loads(out_file.read_text())[0]["num_loras"] == 2
    manager = built[0].llm_engine.executor.runner.lora
    assert sorted(manager.slot_of) == [1, 2] and manager.config.max_lora_rank == 4

    prompt, images = setup["prompts"][1]
    image = tmp_path / "image.png"
    images[0].save(image)
    args = ["generate", "--model", setup["base"], "--image", str(image), "--device", "cpu"]
    args += ["--max-tokens", "3", "--dtype", "float32"]
    lora = [
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--lora-path",
        setup["requests"]["a"].lora_path,
    ]
    capsys.readouterr()
    assert main(args + lora) == 0
    with_a = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out != with_a
    assert main(args + lora[3:]) == 2
    assert "enable_lora=False" in capsys.readouterr().err


def test_scheduler_keeps_each_step_within_max_loras():
    """A waiting request whose adapter would be a third one of the running requests waits
    (first come, first served) until one adapter's requests are done; the base model never
    counts."""
    from tests.engine_helpers import default_sample, make_request, make_scheduler, text

    sched = make_scheduler()
    sched.max_loras = 2
    params = SamplingParams(temperature=0.0, max_tokens=2)
    ids = [1, 0, 2, 1, 3, 2]
    for i, lora_id in enumerate(ids):
        sched.add_request(
            make_request(f"r{i}", [text(4, 10 * i)], params=params, lora_int_id=lora_id)
        )
    seen = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        loras = {sched.requests[r].lora_int_id for r in out.request_ids} - {0}
        assert len(loras) <= 2, loras
        seen.append(out.request_ids)
        samples = [default_sample(sched.requests[r]) for r in out.request_ids]
        sched.update_from_output(out, samples)
    assert seen[0] == ["r0", "r1", "r2", "r3"]  # r4's adapter 3 waits for 1 or 2 to finish
    assert any("r4" in step for step in seen)
