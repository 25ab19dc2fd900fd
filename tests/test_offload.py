"""Memory caps, fit rows, checkpointing modes and the expert offloader's bookkeeping on a tiny GPT-OSS (CPU)."""
import copy
import warnings

import pytest
import torch

from moebench import offload as O
from moebench.metrics import read_rows, write_rows

GIB = 2**30
ROW = dict(run_id="t", tier="cpu", model="tiny", arm="hf_bf16", precision="bf16")


# ---------------------------------------------------------------- caps
def test_cap_fraction():
    assert O.cap_fraction(24, 80 * GIB) == pytest.approx(0.3)
    assert O.cap_fraction(48, 96 * GIB) == pytest.approx(0.5)
    assert O.cap_fraction(80, int(79.2 * GIB)) == 1.0  # a sold "80 GB" card: the whole card, not an error


def test_cap_above_card_names_cap_and_card():
    with pytest.raises(O.CapTooLarge) as e:
        O.cap_fraction(80, 24 * GIB)
    assert "cap 80 GiB" in str(e.value) and "card has only 24.0 GiB" in str(e.value)
    with pytest.raises(ValueError):
        O.cap_fraction(0, 24 * GIB)


def test_caps_from_config():
    assert O.caps_from_config({}) == [24, 40, 48, 80]
    assert O.caps_from_config({"offload": {"caps_gb": [48, 16]}}) == [16, 48]


class FakeCuda:
    """torch.cuda's memory calls, recorded, for a card of `total` bytes."""

    def __init__(self, total):
        self.total, self.calls = total, []

    def get_device_properties(self, d):
        return type("P", (), {"total_memory": self.total})()

    def set_per_process_memory_fraction(self, f, d):
        self.calls.append(("fraction", f))

    def empty_cache(self):
        pass

    def reset_peak_memory_stats(self, d):
        self.calls.append(("reset",))

    def max_memory_allocated(self, d):
        return 3 * GIB

    def max_memory_reserved(self, d):
        return 4 * GIB


def test_try_at_cap_fits_and_lifts_cap():
    cuda = FakeCuda(80 * GIB)
    a = O.try_at_cap(24, lambda: 1234.0, cuda=cuda, variant="ckpt=plain")
    assert (a.outcome, a.tokens_per_s, a.peak_alloc_bytes, a.variant) == ("fits", 1234.0, 3 * GIB, "ckpt=plain")
    fr = [c[1] for c in cuda.calls if c[0] == "fraction"]
    assert fr == [pytest.approx(0.3), 1.0]  # capped for the run, lifted after


def test_try_at_cap_oom_error_and_skip():
    cuda = FakeCuda(80 * GIB)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def boom():
        raise RuntimeError("shape mismatch")

    a = O.try_at_cap(24, oom, cuda=cuda)
    assert a.outcome == "oom" and a.reason == "OOM at cap 24 GiB"
    assert cuda.calls[-1] == ("fraction", 1.0)  # lifted even after the OOM
    b = O.try_at_cap(40, boom, cuda=cuda)
    assert b.outcome == "error" and "shape mismatch" in b.reason
    ran = []
    c = O.try_at_cap(80, lambda: ran.append(1), cuda=FakeCuda(24 * GIB))
    assert c.outcome == "skipped" and c.reason == "card has only 24.0 GiB" and not ran


def _by_metric(rows):
    return {r.metric: r for r in rows}


def test_fit_rows_fits():
    a = O.Attempt(24, "fits", tokens_per_s=900.0, peak_alloc_bytes=int(20.5 * GIB), peak_reserved_bytes=22 * GIB)
    rows = _by_metric(O.fit_rows(a, **ROW))
    assert rows["fits@cap24"].value == 1.0 and rows["tokens_per_s@cap24"].value == 900.0
    assert rows["peak_alloc_gb@cap24"].value == pytest.approx(20.5)
    assert rows["peak_reserved_gb@cap24"].value == pytest.approx(22.0)
    assert all(r.stage == "offload" and r.status == "measured" for r in rows.values())


def test_fit_rows_oom_is_failed_not_zero(tmp_path):
    rows = _by_metric(O.fit_rows(O.Attempt(24, "oom", reason="OOM at cap 24 GiB", variant="offload"), **ROW))
    assert rows["fits@cap24[offload]"].value == 0.0 and rows["fits@cap24[offload]"].status == "measured"
    for m in ("tokens_per_s", "peak_alloc_gb", "peak_reserved_gb"):
        r = rows[f"{m}@cap24[offload]"]
        assert r.status == "failed" and r.value is None and r.reason == "OOM at cap 24 GiB"
    back = _by_metric(read_rows(write_rows(tmp_path / "m.csv", rows.values())))
    assert back["tokens_per_s@cap24[offload]"].value is None


def test_fit_rows_skipped_and_error_have_no_fits_value():
    for a, status in ((O.Attempt(80, "skipped", reason="card has only 24.0 GiB"), "skipped"),
                      (O.Attempt(40, "error", reason="error at cap 40 GiB: x"), "failed")):
        rows = O.fit_rows(a, **ROW)
        assert all(r.status == status and r.value is None and r.reason == a.reason for r in rows)
    with pytest.raises(ValueError):
        O.fit_rows(O.Attempt(24, "fits"), **ROW)  # a fit without a speed is not a measurement


def test_cap_metric_roundtrip():
    assert O.parse_cap_metric(O.cap_metric("tokens_per_s", 24, "ckpt=plain")) == ("tokens_per_s", 24.0, "ckpt=plain")
    assert O.parse_cap_metric("fits@cap40") == ("fits", 40.0, "")
    assert O.parse_cap_metric("step_s") is None


# ---------------------------------------------------------------- tiny GPT-OSS
@pytest.fixture(scope="module")
def base():
    from transformers import GptOssConfig, GptOssForCausalLM

    warnings.filterwarnings("ignore")
    cfg = GptOssConfig(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=4, hidden_size=128,
                       intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       vocab_size=2048, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    m = GptOssForCausalLM(cfg)
    with torch.no_grad():  # random-init leaves router/experts at zero/empty: give every weight a real value
        for n, p in m.named_parameters():
            if "experts" in n or not p.abs().sum():
                p.normal_(0, 0.05)
    return m


IDS = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(3))


def _train_model(base, peft=False, ckpt="none", impl="grouped_mm"):
    m = copy.deepcopy(base)
    m.config._experts_implementation = impl
    if peft:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                         init_lora_weights=False))  # non-zero B: the experts' LoRA matters
    else:
        for n, p in m.named_parameters():
            p.requires_grad_("experts" not in n)
    m.train()
    if ckpt == "reentrant":
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        return m
    return O.apply_checkpointing(m, ckpt)


def _loss_and_grads(m):
    loss = m(IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_finds_experts_under_peft_wrapping(base):
    for peft in (False, True):
        found = O.find_expert_params(_train_model(base, peft=peft))
        names = sorted(n.rsplit(".", 1)[1] for plist in found.values() for n, _ in plist)
        assert sorted(found) == [0, 1] and names == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]


def test_attach_puts_experts_on_host_and_detach_restores(base):
    m = _train_model(base)
    off = O.ExpertOffloader(m, "cpu").attach()
    for plist in off.params.values():
        for name, p in plist:
            assert p.data_ptr() == off.home[name].data_ptr() and p.device.type == "cpu"
    with torch.no_grad():
        m.eval()
        y = m(IDS).logits
    off.detach()
    before = dict(off.stats)
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, y)
    assert off.stats == before  # hooks are gone


@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("ckpt", ["none", "plain", "reentrant"])
def test_offloaded_training_step_equals_resident(base, peft, ckpt):
    ref_loss, ref_g = _loss_and_grads(_train_model(base, peft, ckpt))
    m = _train_model(base, peft, ckpt)
    off = O.ExpertOffloader(m, "cpu").attach()
    loss, g = _loss_and_grads(m)
    assert torch.equal(loss, ref_loss)
    assert g.keys() == ref_g.keys() and len(g) > 0
    for n in g:
        assert torch.allclose(g[n], ref_g[n], atol=1e-6, rtol=1e-5), n
    assert off.resident == {} and off.pending == {}  # nothing left on the device after backward
    layers = len(off.params)
    assert off.stats["fetches"] == layers * (1 if ckpt == "none" else 2)  # recompute fetches again
    assert off.stats["max_resident_layers"] == 2  # the current layer + the prefetched one, never more


def test_experts_are_resident_only_inside_their_layer(base):
    m = _train_model(base)
    off = O.ExpertOffloader(m, "cpu").attach()
    seen = []

    def spy(mod, args):
        for idx, plist in off.params.items():
            for name, p in plist:
                on_device = p.data_ptr() != off.home[name].data_ptr()
                seen.append((idx, on_device, idx in off.resident))

    for name, mod in m.named_modules():
        if name.endswith("mlp.experts"):
            mod.register_forward_pre_hook(spy)
    with torch.no_grad():
        m(IDS)
    # while layer 0's experts run, only layer 0 points at device copies; same for layer 1
    assert seen[:2] == [(0, True, True), (0, True, True)] and seen[2:4] == [(1, False, False)] * 2
    assert seen[4:6] == [(0, False, False)] * 2 and seen[6:] == [(1, True, True)] * 2


def _track_copies(off):
    """Keep every device copy the offloader makes (alive, so its address cannot be reused by another tensor)."""
    kept = []
    orig = off._copy

    def tracked(idx):
        out = orig(idx)
        kept.extend(out)
        return out

    off._copy = tracked
    return kept


def _saved_storages(loss) -> set[int]:
    """Storage addresses of every tensor the autograd graph saved for backward (reading them runs unpack)."""
    ptrs, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for attr in [a for a in dir(fn) if a.startswith("_saved_")] + ["saved_tensors"]:
            try:
                v = getattr(fn, attr)
            except Exception:
                continue
            for t in v if isinstance(v, (tuple, list)) else [v]:
                if isinstance(t, torch.Tensor):
                    ptrs.add(t.untyped_storage().data_ptr())
        stack.extend(f for f, _ in fn.next_functions)
    return ptrs


def _ptrs(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_graph_saves_host_references_not_device_copies(base, impl):
    m = _train_model(base, impl=impl)
    off = O.ExpertOffloader(m, "cpu").attach()
    copies = _track_copies(off)
    loss = m(IDS, labels=IDS).loss
    saved = _saved_storages(loss)
    assert copies and not saved & _ptrs(copies)  # nothing in the graph pins a device copy
    assert saved & _ptrs(off.home.values())  # the expert weights come back from the host copies
    assert off.stats["refetches"] > 0
    loss.backward()


def test_control_without_pack_hook_graph_pins_device_copies(base):
    """The check above can fail: with the pack hook disabled, saved views (eager experts) pin the device copies
    until backward."""
    m = _train_model(base, impl="eager")
    off = O.ExpertOffloader(m, "cpu").attach()
    off._pack = lambda t: t
    copies = _track_copies(off)
    loss = m(IDS, labels=IDS).loss
    assert _saved_storages(loss) & _ptrs(copies)


def test_control_without_pack_hook_saved_parameter_is_swapped(base):
    """Why grouped_mm needs the hook too: autograd saves the weight Parameter itself, whose data the post hook
    swaps back to the host copy, so without the hook backward would read host memory on a GPU run."""
    m = _train_model(base, impl="grouped_mm")
    off = O.ExpertOffloader(m, "cpu").attach()
    off._pack = lambda t: t
    copies = _track_copies(off)
    saved = _saved_storages(m(IDS, labels=IDS).loss)
    assert not saved & _ptrs(copies) and saved & _ptrs(off.home.values())


def test_offloader_refuses_what_it_cannot_offload(base):
    with pytest.raises(ValueError, match="no expert weights"):
        O.ExpertOffloader(torch.nn.Linear(4, 4), "cpu").attach()
    m = copy.deepcopy(base)
    m.model.layers[0].mlp.experts.down_proj.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        O.ExpertOffloader(m, "cpu").attach()


# ---------------------------------------------------------------- checkpointing modes
def test_checkpoint_modes(base):
    assert O.checkpoint_modes() == ["none", "plain", "unsloth"]
    m = copy.deepcopy(base)
    O.apply_checkpointing(m, "plain")
    assert m.is_gradient_checkpointing and m.config.use_cache is False
    O.apply_checkpointing(m, "none")
    assert not m.is_gradient_checkpointing
    with pytest.raises(ValueError, match="Unsloth arm"):
        O.apply_checkpointing(m, "unsloth")
    with pytest.raises(ValueError, match="unknown"):
        O.apply_checkpointing(m, "full")


# ---------------------------------------------------------------- on a GPU only (skipped on the CPU VM)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_cuda_cap_turns_an_oversized_step_into_an_oom_row():
    def step(gib):
        def run():
            x = torch.empty(int(gib * GIB), dtype=torch.uint8, device="cuda")
            del x
            return 1.0
        return run

    fits = O.try_at_cap(24, step(1))
    oom = O.try_at_cap(24, step(30))
    assert fits.outcome == "fits" and fits.peak_alloc_bytes >= GIB
    assert oom.outcome == "oom" and oom.reason == "OOM at cap 24 GiB"
    torch.empty(int(30 * GIB), dtype=torch.uint8, device="cuda")  # the cap was lifted afterwards


def _gpu_model(peft, ckpt):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(num_hidden_layers=4, num_local_experts=32, num_experts_per_tok=4, hidden_size=1024,
                       intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                       vocab_size=4096, layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    m = GptOssForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "experts" in n or not p.abs().sum():
                p.normal_(0, 0.02)
    return _train_model(m.to(torch.bfloat16), peft, ckpt)


@cuda_only
@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("ckpt", ["none", "plain"])
def test_cuda_offload_matches_and_lowers_peak(peft, ckpt):
    ids = torch.randint(0, 4096, (2, 256), generator=torch.Generator().manual_seed(3)).cuda()

    def step(m):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = m(ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
        return loss.float().item(), grads, torch.cuda.max_memory_allocated()

    ref = _gpu_model(peft, ckpt).cuda()
    ref_loss, ref_g, ref_peak = step(ref)
    del ref
    torch.cuda.empty_cache()
    m = _gpu_model(peft, ckpt)  # built on the CPU: the offloader moves the rest, the experts stay in pinned memory
    off = O.ExpertOffloader(m, "cuda").attach()
    assert all(off.home[n].is_pinned() for n in off.home)
    loss, g, peak = step(m)
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    for n in ref_g:
        assert torch.allclose(g[n], ref_g[n], atol=1e-2, rtol=5e-2), n
    layer_bytes = sum(off.home[n].numel() * 2 for n, _ in off.params[0])
    print(f"peft={peft} ckpt={ckpt} peak resident {ref_peak / GIB:.3f} GiB offloaded {peak / GIB:.3f} GiB "
          f"layer experts {layer_bytes / GIB:.3f} GiB stats {off.stats}")
    assert off.resident == {} and off.stats["max_resident_layers"] <= 2
    saved = 2 if (ckpt == "plain" or not peft) else 1  # PEFT without checkpointing keeps merged W+BA per layer
    assert peak < ref_peak - saved * layer_bytes * 0.5
