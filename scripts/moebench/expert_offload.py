"""Expert offload (`ExpertOffloader`). GPT-OSS keeps every expert of a layer in two fused 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), about 95% of the weights. Frozen under LoRA, they can
live in pinned host memory and be copied to the GPU one decoder layer at a time: a forward pre-hook makes
layer i resident (waiting on a copy started earlier on a side CUDA stream) and starts the copy of the next
layer; a forward hook drops layer i again. For backward:
  - with gradient checkpointing (recommended) the layer's forward is re-run in backward, the same pre-hook
    fetches the layer again (prefetching i-1 this time), and nothing large is kept between layers;
  - without checkpointing (or with reentrant checkpointing, whose recompute runs hook-free), saved-tensor hooks
    replace every saved expert weight (grouped_mm saves the Parameter itself, whose data we swap back to the
    host; eager saves per-expert views) by a reference into the host copy, and backward copies back just
    that tensor from pinned memory, synchronously on the compute stream.
Limitation under PEFT `target_parameters` (the hf_bf16 arm): PEFT folds the LoRA delta into a full-size merged
tensor W+BA on every forward, and autograd saves that merged tensor, not the base weight. Without
checkpointing the merged tensors of every layer stay on the GPU until backward, so offload then frees the base
weights only (about half of the expert memory), not all of it. The hooks cannot stream the merged tensor
without re-implementing PEFT's fold, which we do not do. Pair offload with checkpointing "plain".
Only dense floating-point parameters are handled (bf16 arm); quantised (nf4) experts are not offloaded.

Shared: the offload stage measures it, and the recipe snippet snippets/hf_peft_offload.py.tmpl hands it to users.
"""
from __future__ import annotations

import re

_EXPERT = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?experts\.(?:.+\.)?(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def find_expert_params(model) -> dict[int, list[tuple[str, object]]]:
    """Expert weight tensors by layer index, matched by name so PEFT's `base_layer.` nesting is found too
    (biases and LoRA factors do not match: they end in `_bias` / `.weight`)."""
    out: dict[int, list] = {}
    for name, p in model.named_parameters():
        m = _EXPERT.search(name)
        if m:
            out.setdefault(int(m[1]), []).append((name, p))
    return out


def find_layers(model) -> dict[int, object]:
    return {int(m[1]): mod for name, mod in model.named_modules() if (m := _LAYER.search(name))}


class _Ref:
    """What a saved expert-weight view becomes while it waits for backward: its place in the host copy."""

    __slots__ = ("name", "size", "stride", "offset")

    def __init__(self, name, t):
        self.name, self.size, self.stride, self.offset = name, t.size(), t.stride(), t.storage_offset()


def _checkpoint_saves(layer) -> bool:
    """True when non-reentrant checkpointing runs this layer: its own saved-tensor hooks (which detach, so a
    swapped Parameter is harmless) must stay innermost. Reentrant checkpointing saves nothing in the first
    forward and recomputes in backward with no hooks of its own, so ours apply there."""
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return False
    kw = getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", None) or {}
    return kw.get("use_reentrant") is False


class ExpertOffloader:
    """Keep frozen expert weights in (pinned) host memory and stream them to `device` layer by layer.

    `attach()` moves the expert weights to the host and, with `move_rest`, everything else to `device`, so a
    model loaded on the CPU never needs to fit on the GPU whole. `detach()` puts the experts back on `device`.
    On a CPU device the same bookkeeping runs with plain copies and no stream, which is what the tests use.
    """

    def __init__(self, model, device, prefetch: bool = True, move_rest: bool = True):
        import torch

        self.torch, self.model = torch, model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # "cuda" != "cuda:0" when comparing tensor devices
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch, self.move_rest = prefetch, move_rest
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.params: dict[int, list[tuple[str, object]]] = {}
        self.home: dict[str, object] = {}  # name -> host copy
        self.resident: dict[int, list] = {}  # layer -> device copies now in the params
        self.pending: dict[int, tuple[list, object]] = {}  # layer -> (device copies, event) being copied
        self._ptr: dict[int, str] = {}  # storage pointer of a resident copy -> param name
        self._handles: list = []
        self._ctx = None
        self._queued_task = None
        self.stats = dict(fetches=0, prefetches=0, h2d_bytes=0, refetches=0, max_resident_layers=0)

    # -- attach / detach
    def attach(self) -> "ExpertOffloader":
        torch = self.torch
        self.params = find_expert_params(self.model)
        layers = find_layers(self.model)
        if not self.params:
            raise ValueError("no expert weights (layers.N...experts.gate_up_proj/down_proj) in this model")
        for idx, plist in self.params.items():
            if idx not in layers:
                raise ValueError(f"expert weights of layer {idx} but no module named layers.{idx}")
            for name, p in plist:
                if p.requires_grad or not p.is_floating_point():
                    raise ValueError(f"{name}: only frozen floating-point expert weights can be offloaded")
                home = p.data.detach().to("cpu").contiguous()
                self.home[name] = home.pin_memory() if self.cuda else home  # pinned: async H2D copies
                p.data = self.home[name]
        if self.move_rest:
            self._move_rest()
        for idx in self.params:
            layer = layers[idx]
            self._handles.append(layer.register_forward_pre_hook(lambda mod, args, i=idx: self._pre(i, mod)))
            self._handles.append(layer.register_forward_hook(lambda mod, args, out, i=idx: self._post(i)))
        torch.cuda.empty_cache() if self.cuda else None
        return self

    def _move_rest(self) -> None:
        offloaded = {id(p) for plist in self.params.values() for _, p in plist}
        for p in self.model.parameters():
            if id(p) not in offloaded:
                p.data = p.data.to(self.device)
        for mod in self.model.modules():
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = b.to(self.device)

    def detach(self) -> None:
        self._exit_saved_hooks()
        self.release_all()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for plist in self.params.values():
            for name, p in plist:
                p.data = self.home[name].to(self.device)
        self.home.clear()

    # -- moving layers
    def _copy(self, idx: int) -> list:
        """Device copies of layer idx's expert weights (on the side stream when there is one)."""
        torch = self.torch
        out = []
        for name, _ in self.params[idx]:
            home = self.home[name]
            dev = torch.empty(home.shape, dtype=home.dtype, device=self.device)
            dev.copy_(home, non_blocking=self.cuda)  # on CPU a real copy too, so the bookkeeping is exercised
            out.append(dev)
            self.stats["h2d_bytes"] += home.numel() * home.element_size()
        return out

    def _start_prefetch(self, idx: int) -> None:
        if idx not in self.params or idx in self.resident or idx in self.pending:
            return
        if self.stream is None:
            self.pending[idx] = (self._copy(idx), None)
        else:
            # no wait on the compute stream: host copies never change, and the allocator keeps freed blocks
            # (record_stream) until their last use is done, so the copy may overlap the current layer
            with self.torch.cuda.stream(self.stream):
                copies = self._copy(idx)
                ev = self.torch.cuda.Event()
                ev.record(self.stream)
            self.pending[idx] = (copies, ev)
        self.stats["prefetches"] += 1

    def _make_resident(self, idx: int) -> None:
        if idx in self.resident:
            return
        copies, ev = self.pending.pop(idx, (None, None))
        if copies is None:
            copies = self._copy(idx)  # nothing prefetched (first layer, or prefetch off)
        if ev is not None:
            cur = self.torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            for c in copies:
                c.record_stream(cur)  # allocated on the side stream, used on this one: free only after use
        for (name, p), c in zip(self.params[idx], copies):
            p.data = c
            self._ptr[c.untyped_storage().data_ptr()] = name
        self.resident[idx] = copies
        self.stats["fetches"] += 1

    def release(self, idx: int) -> None:
        """Point layer idx's params back at the host copies; the device memory goes once nothing holds it."""
        for c in self.resident.pop(idx, []):
            self._ptr.pop(c.untyped_storage().data_ptr(), None)
        for name, p in self.params.get(idx, []):
            p.data = self.home[name]

    def release_all(self) -> None:
        for idx in list(self.resident):
            self.release(idx)
        self.pending.clear()

    # -- hooks
    def _in_backward(self) -> bool:
        return self.torch._C._current_graph_task_id() != -1

    def _pre(self, idx: int, layer) -> None:
        self._exit_saved_hooks()  # a previous layer that raised (OOM) never reached its post hook
        # a checkpoint recompute can stop early without running the post hook: drop anything left behind
        for other in [i for i in self.resident if i != idx]:
            self.release(other)
        backward = self._in_backward()
        self._make_resident(idx)
        if self.prefetch:
            self._start_prefetch(idx - 1 if backward else idx + 1)
        live = len(self.resident) + len(self.pending)  # layers holding device memory for experts right now
        self.stats["max_resident_layers"] = max(self.stats["max_resident_layers"], live)
        if backward:
            self._release_after_backward()
        if self.torch.is_grad_enabled() and not _checkpoint_saves(layer):
            # autograd saves the weight Parameter itself (grouped_mm) or views of it (eager): a saved Parameter
            # would see its data swapped back to the host copy before backward, a saved view would pin the device
            # copy until backward. The pack hook stores a reference into the host copy instead.
            self._ctx = self.torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._ctx.__enter__()

    def _post(self, idx: int) -> None:
        self._exit_saved_hooks()
        self.release(idx)

    def _exit_saved_hooks(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    def _release_after_backward(self) -> None:
        task = self.torch._C._current_graph_task_id()
        if task != self._queued_task:
            self._queued_task = task
            self.torch.autograd.Variable._execution_engine.queue_callback(self.release_all)

    def _pack(self, t):
        try:
            name = self._ptr.get(t.untyped_storage().data_ptr()) if t.device.type == self.device.type else None
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage (subclasses, sparse)
            return t
        if name is None or t.dtype != self.home[name].dtype:
            return t
        return _Ref(name, t)

    def _unpack(self, x):
        if not isinstance(x, _Ref):
            return x
        self.stats["refetches"] += 1
        view = self.home[x.name].as_strided(x.size, x.stride, x.offset)
        return view.to(self.device, non_blocking=self.cuda)
