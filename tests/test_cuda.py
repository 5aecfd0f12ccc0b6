"""Target `cuda`. Build-side tests run anywhere; tests marked `gpu` need an NVIDIA GPU and run against
artifacts built beforehand (KILN_CUDA_ARTIFACTS, see tests/cuda_models.py) or built here when TVM's
compiler is installed."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from cuda_models import MODELS, artifact_name, build, make_model


def _has_gpu() -> bool:
    return torch.cuda.is_available()


def _has_compiler() -> bool:
    return importlib.util.find_spec("tvm") is not None and not os.environ.get("TVM_USE_RUNTIME_LIB")


def gpu(test):
    """Marked `gpu` (select with -m gpu) and skipped where no CUDA GPU is present."""
    return pytest.mark.gpu(pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")(test))


compiler = pytest.mark.skipif(not _has_compiler(), reason="needs TVM's compiler")


@pytest.fixture(scope="session")
def cuda_dir(tmp_path_factory):
    d = os.environ.get("KILN_CUDA_ARTIFACTS")
    if d:
        return d
    if not _has_compiler():
        pytest.skip("no prebuilt cuda artifacts (KILN_CUDA_ARTIFACTS) and no TVM compiler to build them")
    return str(tmp_path_factory.mktemp("cuda"))


def _artifact(cuda_dir: str, model: str, variant: str) -> str:
    path = os.path.join(cuda_dir, artifact_name(model, variant))
    if not os.path.exists(os.path.join(path, "manifest.json")):
        if not _has_compiler():
            pytest.skip(f"artifact {path} was not built")
        build(cuda_dir, models=(model,), variants=(variant,))
    return path


# -- build side (no GPU) -----------------------------------------------------------------------------


@compiler
def test_build_lists_kernels_and_layout(cuda_dir):
    path = _artifact(cuda_dir, "tiny-llama", "int4")
    man = json.load(open(os.path.join(path, "manifest.json")))
    assert man["target"]["name"] == "cuda" and man["target"]["arch"] == "sm_90a"
    assert man["target"]["compute_capability"] == "9.0"
    assert man["weights_included"] is False and not os.path.exists(os.path.join(path, "weights.safetensors"))
    assert all(t["dtype"] == "float16" for t in man["kv_cache"]["tensors"])
    ks = man["kernels"]
    assert any(k.startswith("cuda_qgemv_") and "_4_128_" in k for k in ks)  # int4 tensor-core GEMV for decode
    assert any(k.startswith("cuda_dequant_") for k in ks)  # dequantize + GEMM for prefill
    assert any(k.startswith("cuda_paged_decode_") for k in ks)
    # prefill and verify attend in the fused kernel: no gathered K/V, no score matrix in the memory estimate
    assert any(k.startswith("cuda_flash_") for k in ks) and not any(k.startswith("cuda_gather_kv") for k in ks)
    assert man["target"]["prefill_scores_bytes"] == 0 and man["target"]["prefill_gathers_kv"] is False
    # a decode step's launches per layer: q, k and v as one GEMV writing three outputs, RMSNorm with the
    # residual add before it, rotary + KV append in one kernel
    assert any(k.startswith("cuda_qgemv_") and "_parts_" in k for k in ks)
    assert any(k.startswith("cuda_rms_norm_") and k.endswith("_True") for k in ks)
    assert any(k.startswith("cuda_rope_append_") for k in ks)
    assert man["target"]["gemv_max_batch"] == 16  # quantized: the GEMV up to batch 16 (fp16: 1)
    # the fields a quantized linear needs, in the documented shapes: codes [N/16, K*2] int32 (16 rows x K
    # int4 codes per row tile), scales/zs [N, K/128]
    q = [w for w in man["weights"] if w["transform"].startswith("cuda_mma_q4g128a")]
    codes = [w for w in q if w["transform"].endswith(":0")]
    assert codes and all(w["dtype"] == "int32" for w in codes)
    assert all(w["shape"][1] % 256 == 0 for w in codes)
    scales = {w["sources"][0]: w["shape"] for w in q if w["transform"].endswith(":1")}
    assert all(scales[w["sources"][0]] == [w["shape"][0] * 16, w["shape"][1] // 256] for w in codes)


@compiler
def test_numpy_and_torch_packers_agree_and_dequantize_exactly():
    from kiln.quant import dequantize, parse_scheme, rtn
    from kiln.targets.cuda.kernels import natural_column, storage_position
    from kiln.targets.cuda.layouts import F16, Quant, code_index, storage_columns

    # the fp16 interleave map: a permutation of each tile, and the kernels' index expressions agree with it
    cols = storage_columns(2 * 256, 16)
    assert sorted(cols.tolist()) == list(range(len(cols)))
    assert [natural_column(p, 16) for p in range(len(cols))] == cols.tolist()
    assert [storage_position(int(c), 16) for c in cols] == list(range(len(cols)))
    torch.manual_seed(0)
    w = torch.randn(24, 200)  # K=200: a ragged last group, padded; N=24: padded to 2 row tiles of 16
    # fp16: padded to a whole tile (256 columns) with zeros, columns interleaved
    f16 = F16().pack([w.numpy()])[0]
    assert f16.shape == (24, 256) and np.array_equal(f16, F16().pack_torch([w])[0].numpy())
    nat = np.zeros_like(f16)
    nat[:, storage_columns(256, 16)] = f16
    assert np.array_equal(nat[:, :200], w.numpy().astype(np.float16)) and not nat[:, 200:].any()
    for bits, scheme in ((4, "int4_g64"), (8, "int8_g64"), (4, "int4_g32_sym"), (8, "int8"), (4, "int4_g64_floatzero")):
        sch = parse_scheme(scheme)
        q, s, z = rtn(w, sch)
        lay = Quant(bits=bits, group=sch.group_for(200), sym=sch.sym)
        arrays = lay.pack([q.numpy(), s.numpy(), z.numpy()])
        torch_arrays = lay.pack_torch([q, s, z])
        assert all(np.array_equal(a, t.numpy()) for a, t in zip(arrays, torch_arrays)), scheme
        kp = 224 if sch.group == 0 else 256  # whole loads (64 int4 / 32 int8 columns) and whole groups
        g = sch.group or kp
        assert arrays[0].shape == (2, kp * bits // 2) and arrays[1].shape == (32, kp // g), scheme
        # read every code back where the kernels look for it, and dequantize as they do
        r, c = np.meshgrid(np.arange(32), np.arange(kp), indexing="ij")
        tile, word, shift = code_index(r, c, bits)
        codes = ((arrays[0].view(np.uint32)[tile, word] >> shift.astype(np.uint32)) & (2**bits - 1)).astype(np.int64)
        assert np.array_equal(codes[:24, :200], q.numpy()), scheme
        sc = np.repeat(arrays[1].astype(np.float32), g, 1)
        if sch.sym:
            got = (codes - 2 ** (bits - 1)) * sc
        else:
            got = codes * sc + np.repeat(arrays[2].astype(np.float32), g, 1)
        ref = dequantize(q, s, z, sch.group_for(200)).numpy()
        assert np.abs(got[:24, :200] - ref).max() < 2e-2 * np.abs(ref).max(), scheme  # fp16 scales
        # padding rows are zero; padding columns hold the zero point (rounded to a code: within s/2 of 0
        # when it is a float; the kernels multiply the padding by zero inputs)
        assert not got[24:].any(), scheme
        pad = np.abs(got[:24, 200:]) - (0.5 * sc[:24, 200:] if sch.float_zero else 0)
        assert pad.max() < 1e-2 * np.abs(ref).max(), scheme
    assert Quant(part=2, bits=4, group=64, sym=False).key() == "cuda_mma_q4g64a:2"


def test_quantized_codes_sit_where_the_mma_fragments_want_them():
    """The packer's order against the PTX m16n8k16 A-fragment rule, decoded the way the kernel's device code
    does (mask pairs of codes out of a word): lane 4g + t holds (a0, a1) at row g, columns 2t, 2t + 1;
    (a2, a3) at row g + 8; (a4, a5) and (a6, a7) 8 columns further."""
    from kiln.targets.cuda.layouts import pack_codes

    rng = np.random.default_rng(0)
    for bits in (4, 8):
        codes = rng.integers(0, 2**bits, size=(32, 128)).astype(np.uint8)
        words = pack_codes(codes, bits).view(np.uint32)
        rec = np.zeros_like(codes)
        for tile in range(2):
            for kt in range(8):
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    if bits == 4:  # one word: (q, q >> 4, q >> 8, q >> 12) masked with 0x000F000F
                        q = int(words[tile, kt // 4 * 128 + lane * 4 + kt % 4])
                        regs = [((q >> s) & 15, (q >> (s + 16)) & 15) for s in (0, 4, 8, 12)]
                    else:  # two words: (q, q >> 8) masked with 0x00FF00FF
                        ws = words[tile, kt // 2 * 128 + lane * 4 + kt % 2 * 2 :][:2]
                        regs = [((int(q) >> s) & 255, (int(q) >> (s + 16)) & 255) for q in ws for s in (0, 8)]
                    for (rr, cc), (v0, v1) in zip(
                        [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)], regs
                    ):
                        rec[tile * 16 + rr, kt * 16 + cc : kt * 16 + cc + 2] = (v0, v1)
        assert np.array_equal(rec, codes), bits


def test_stacked_biases_are_one_field():
    # the biases of linears run as one kernel (q, k, v): one field, the same from numpy and torch
    from kiln.targets.common.layouts import CAT, parse_layout
    from kiln.targets.cuda.weights import WeightMaker

    b = {"q.bias": torch.randn(8), "k.bias": torch.randn(2), "v.bias": torch.randn(2)}
    assert parse_layout("cat") is CAT
    cat = CAT.pack([t.numpy() for t in b.values()])[0]
    spec = {"name": "qkv", "sources": list(b), "transform": "cat", "shape": [12], "dtype": "float32"}
    assert np.array_equal(cat, torch.cat(list(b.values())).numpy())
    assert np.array_equal(WeightMaker(b).field(spec).numpy(), cat)


@compiler
def test_unsupported_options_are_refused_with_the_fix(capsys):
    import kiln
    from kiln.errors import KilnError

    m = make_model("tiny-llama", meta=True)
    with pytest.raises(KilnError, match="kv-quant"):
        kiln.compile(m, target="cuda", kv_quant="int8", pack_weights=False, max_context=64)
    with pytest.raises(KilnError, match="sm_"):
        kiln.compile(m, target="cuda", pack_weights=False, max_context=64, target_options={"arch": "sm_70"})
    # the CLI refuses what the quantized kernels cannot take before it loads the model
    from kiln.cli import main

    for scheme in ("int4_g8", "int3_g64"):
        assert main(["build", "never-loaded", "--target", "cuda", "--quant", scheme, "-o", "/nonexistent"]) == 1
        err = capsys.readouterr().err
        assert f"--quant {scheme}: target cuda has int8 and int4 kernels with groups that are multiples of 16" in err


@compiler
def test_engine_refuses_cuda_artifact_without_gpu(cuda_dir):
    if _has_gpu():
        pytest.skip("this host has a GPU")
    import kiln
    from kiln.runtime.artifact import ArtifactError

    path = _artifact(cuda_dir, "tiny-llama", "fp16")
    with pytest.raises(ArtifactError, match="no CUDA GPU"):
        kiln.load(path)


# -- on the GPU --------------------------------------------------------------------------------------


def _engine_and_reference(path: str, model: str):
    """The kiln engine with weights made on the GPU, and an fp32 reference model computing with the same
    (fp16-rounded or dequantized) weights."""
    from kiln.runtime.engine import Engine
    from kiln.targets.cuda.weights import WeightMaker, tensors_of

    ref = make_model(model, device="cuda").float()
    if ref.lm_head.weight is ref.model.embed_tokens.weight:  # kiln may quantize the LM head and not the table
        ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())
    maker = WeightMaker(tensors_of(ref), keep_dequantized=True)
    man = json.load(open(os.path.join(path, "manifest.json")))
    weights = maker.all(man)
    eng = Engine(path, kv_cache_tokens=4096, weights=weights)
    with torch.no_grad():  # the reference sees exactly the values the kernels compute with
        params = dict(ref.named_parameters())
        for p in params.values():
            if p.dim() == 2:
                p.copy_(p.half().float())
        for name, w in maker.dequantized.items():
            params[name].copy_(w)
    return eng, ref


@gpu
@pytest.mark.parametrize("model,variant", [(m, v) for m in MODELS for v in ("fp16", "int8", "int4")])
def test_generation_matches_reference(cuda_dir, model, variant):
    """Prefill (tensor-core path) and decode (GEMV + paged kernels) against the fp32 reference: logits
    at fp16 tolerance, for ragged batches on both decode paths: the GEMV (fp16: batch 1; quantized: up to
    16, batch 12 in two passes) and the batched GEMMs (fp16 from batch 2, quantized at batch 20)."""
    path = _artifact(cuda_dir, model, variant)
    eng, ref = _engine_and_reference(path, model)
    vocab = MODELS[model][0]["vocab_size"]
    g = torch.Generator().manual_seed(7)
    for batch in (1, 3, 12, 20):
        prompts = [
            torch.randint(0, vocab, (int(n),), generator=g).tolist()
            for n in torch.randint(5, 60, (batch,), generator=g)
        ]
        steps = 40  # passes the sliding window (24) of tiny-window
        seqs = [list(p) for p in prompts]
        logits = []
        pages = [eng.pool.alloc(eng.pool.pages_for(len(p) + steps)) for p in prompts]
        try:
            first = [eng.prefill(p, pg) for p, pg in zip(prompts, pages)]
            logits.append(np.stack(first))
            for s, lg in zip(seqs, first):
                s.append(int(np.argmax(lg)))
            for _ in range(steps - 1):
                lg = eng.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs], pages)
                logits.append(lg)
                for s, row in zip(seqs, lg):
                    s.append(int(np.argmax(row)))
        finally:
            for pg in pages:
                eng.pool.release(pg)
        got = np.stack(logits, 1)  # [batch, steps, vocab]
        for i, s in enumerate(seqs):
            with torch.no_grad():
                r = ref(torch.tensor([s], device="cuda")).logits[0, len(prompts[i]) - 1 : -1].float().cpu().numpy()
            err = np.abs(got[i] - r).max() / np.abs(r).max()
            assert err < 3e-2, f"{model}-{variant} batch {batch} sequence {i}: relative error {err:.3g}"
            agree = (got[i].argmax(-1) == r.argmax(-1)).mean()
            assert agree >= 0.85, f"{model}-{variant}: greedy tokens agree on {agree:.0%} of steps"


@gpu
def test_closing_an_engine_gives_its_gpu_memory_back(cuda_dir):
    """Weights, KV cache, CUDA graphs and the VM's pool are freed by `close`, not at process exit: engines
    can be loaded one after another in one process."""
    path = _artifact(cuda_dir, "smollm2-135m", "fp16")
    eng, ref = _engine_and_reference(path, "smollm2-135m")
    del ref
    from kiln.runtime.sampling import SamplingParams

    eng.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True))  # captures a graph
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = sum(int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize for t in (*eng.weights, *eng.caches))
    free_before = torch.cuda.mem_get_info()[0]
    eng.close()
    torch.cuda.empty_cache()  # the weights came from torch: its cache hands them back to the device
    freed = torch.cuda.mem_get_info()[0] - free_before
    assert freed >= 0.9 * held, f"close freed {freed / 1e6:.0f} MB of the {held / 1e6:.0f} MB the engine held"


@gpu
def test_wrong_architecture_is_refused(cuda_dir, tmp_path):
    import shutil

    from kiln.runtime.artifact import ArtifactError
    from kiln.runtime.engine import Engine

    src = _artifact(cuda_dir, "tiny-llama", "fp16")
    dst = tmp_path / "other-arch"
    shutil.copytree(src, dst)
    man = json.load(open(dst / "manifest.json"))
    man["target"]["arch"], man["target"]["compute_capability"] = "sm_80", "8.0"
    json.dump(man, open(dst / "manifest.json", "w"))
    with pytest.raises(ArtifactError, match="compute capability"):
        Engine(str(dst), verify=False, weights={})


@gpu
def test_server_serves_a_cuda_engine_with_prefix_sharing(cuda_dir):
    """`Server` on a cuda engine: continuous batching, a repeated prompt served from the prefix cache with
    its shared last page copied on the GPU (copy-on-write through the engine's KV layout), and greedy
    outputs equal to the same prompts run alone through `Engine.generate`."""
    from kiln.runtime.sampling import SamplingParams
    from kiln.runtime.serving import Server

    path = _artifact(cuda_dir, "tiny-llama", "fp16")
    eng, _ = _engine_and_reference(path, "tiny-llama")
    copies: list[tuple[int, int]] = []
    copy = eng.kv_layout.copy_page

    def counted(src: int, dst: int) -> None:
        copies.append((src, dst))
        copy(src, dst)

    eng.kv_layout.copy_page = counted
    g = torch.Generator().manual_seed(3)
    # whole pages: the repeat finds every page cached and recomputes its last token into a copied page
    prompt = torch.randint(0, 1000, (3 * eng.page_size,), generator=g).tolist()
    other = torch.randint(0, 1000, (20,), generator=g).tolist()
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = [c.token_ids for c in eng.generate([prompt], sp)] + [c.token_ids for c in eng.generate([other], sp)]
    with Server(eng, policy="continuous", max_batch=4, background=False) as server:
        first = server.generate([prompt, other], sp)
        again = server.generate([prompt], sp)  # its pages come from the prefix cache
        m = server.metrics()
    assert [c.token_ids for c in first] == alone
    # the repeat recomputes one token through a GEMM of another size (cuBLAS may sum in another order), so
    # bit-equality is not promised past a near-tie; the decode steps after the copy read the copied page
    assert again[0].token_ids[:4] == alone[0][:4]
    assert m["prefix_hit_tokens"] >= 3 * eng.page_size - 1 and m["cow_copies"] >= 1 and copies, (m, copies)


@gpu
def test_decode_tokens_drawn_on_the_device_match_the_host(cuda_dir):
    """A cuda artifact draws decode tokens on the GPU (targets/cuda/sample.py): greedy outputs through
    `generate` equal the host's argmax of the same logits token for token, on the GEMV program (batch 1) and
    decode_batched (batch 6); rows that need their logits (logprobs, a penalty) read them from the device beside
    rows drawn there and get the host's answers; seeded temperature draws repeat, another seed differs."""
    from dataclasses import replace

    from kiln.runtime.sampling import SamplingParams

    path = _artifact(cuda_dir, "tiny-llama", "fp16")
    eng, _ = _engine_and_reference(path, "tiny-llama")
    assert eng.device_sampling and eng.manifest["target"]["sampler"]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (6,), generator=g)]
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    params = [greedy, replace(greedy, logprobs=2), greedy, replace(greedy, repetition_penalty=1.3), greedy, greedy]
    for batch in (1, 6):
        on = eng.generate(prompts[:batch], params[:batch])
        eng.device_sampling = False
        try:
            off = eng.generate(prompts[:batch], params[:batch])
        finally:
            eng.device_sampling = True
        assert [c.token_ids for c in on] == [c.token_ids for c in off], batch
        for a, b in zip(on, off):
            assert (a.logprobs is None) == (b.logprobs is None)
            if a.logprobs:
                assert [x.top for x in a.logprobs] == [x.top for x in b.logprobs]
    hot = SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, seed=11)
    first = eng.generate([prompts[0]] * 2, [hot, replace(hot, seed=12)])
    again = eng.generate([prompts[0]] * 2, [hot, replace(hot, seed=12)])
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert first[0].token_ids != first[1].token_ids


@gpu
def test_device_draws_match_the_reference(cuda_dir):
    """The `sample` function alone on the GPU, 300 rows: argmax rows exactly numpy's (a tie takes the first
    index), Gumbel-max rows the numpy reference's draw up to float32 near-ties."""
    from cuda_sample_ref import gumbel, reference

    path = _artifact(cuda_dir, "tiny-llama", "fp16")
    eng, _ = _engine_and_reference(path, "tiny-llama")
    rng = np.random.default_rng(0)
    b, v = 300, eng.vocab_size
    logits = (rng.standard_normal((b, 2, v)) * 3).astype(np.float32)
    logits[0, -1, [3, 700]] = 40.0
    temp = np.where(np.arange(b) % 2 == 0, 0.0, 0.8).astype(np.float32)
    key = rng.integers(0, 2**31 - 1, size=b).astype(np.int32)
    got = eng.vm["sample"](eng._t(logits), eng._t(temp), eng._t(key)).numpy()
    want = reference(logits, temp, key)
    assert got[0] == 3
    assert (got[::2] == want[::2]).all()
    for i in np.nonzero(got != want)[0]:
        z = logits[i, -1].astype(np.float64) / temp[i] + gumbel(int(key[i]), v)
        assert z[got[i]] >= z.max() - 1e-4, i
    assert (got == want).mean() >= 0.95
