"""Training rows of ``bench_speed.py``: forward + backward of a loss, and a full AdamW step, port vs Scenic.

Both sides start from the same weights (the Flax tree through ``flax_to_torch``) and the same batch:

* **loss**: softmax cross-entropy of the logits against integer labels, mean over the batch (Scenic's
  ``weighted_softmax_cross_entropy`` with one-hot labels and no label smoothing), in float32 (the head's
  logits are float32 under Scenic's bf16 policy too).
* **forward + backward**: port ``loss.backward()`` after ``zero_grad(set_to_none=True)``; Scenic
  ``jax.jit(jax.value_and_grad(loss))`` (what Scenic's ``train_step`` differentiates). The gradients of every
  parameter are compared in the benchmark itself (scaled like the goldens: max|port - Flax| / max(1,
  max|Flax|), worst leaf named) for every port column.
* **full step**: the same plus the optimiser. Scenic: ``optax.adamw`` applied inside one jitted step
  (params and optimiser state donated, as Scenic's ``train_step``). Port, one line per ``optimizers`` entry
  (:data:`OPTIMIZERS`), same hyper-parameters (:data:`ADAMW`): ``optax`` = the project's optax-order AdamW
  (``tokenlearner_torch.training.scenic_optimizer``, what ``ScenicTrainer`` steps with: optax's update
  order and rounding, ``torch._foreach_*`` ops); ``torch`` = ``torch.optim.AdamW(..., fused=True)`` (one
  fused kernel; the same update in exact arithmetic, rounded in another order). Each is checked in the
  benchmark: one step against ``optax.adamw`` fed the port's own gradients (so only the optimisers
  differ), scaled parameter error printed.
* **memory**: a fresh process per (workload, implementation) runs one forward + backward at the row's batch
  after building the model (port: parameters materialised; Flax: compiled). CPU: peak RSS during the step
  minus RSS before it; CUDA: ``torch.cuda.max_memory_allocated()`` / jax ``memory_stats()['peak_bytes_in_use']``
  minus what was in use before. Both include the gradient buffers the step creates (one parameter-sized
  set on each side).
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from recipes import recipe

__all__ = ["ADAMW", "bench_train", "train_memory_child", "torch_loss", "make_adamw"]

#: AdamW hyper-parameters of the full-step rows, both sides (optax.adamw names). Scenic's ImageNet
#: TokenLearner config uses 'adam' with weight_decay (optax adamw) and b1/b2 0.9/0.999.
ADAMW = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
#: The port's optimisers of the full-step rows (label, one line of code).
OPTIMIZERS = {
    "optax": ("optax-order AdamW", 'tokenlearner_torch.training.scenic_optimizer({"optimizer": "adamw", '
              '"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-4}, lambda step: 1e-3, specs)'),
    "torch": ("torch AdamW fused", "torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), "
              "eps=1e-8, weight_decay=1e-4, fused=True)"),
}
OPTIMIZER_NOTE = "Scenic: optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4) in one jitted step"


def labels(batch: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed + 7).randint(0, num_classes, size=(batch,)).astype(np.int32)


def torch_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch (Scenic's, one-hot labels, no smoothing)."""
    return F.cross_entropy(logits.float(), target)


def make_adamw(model: torch.nn.Module, kind: str = "torch") -> torch.optim.Optimizer:
    """AdamW with :data:`ADAMW`: ``kind`` 'optax' (the project's optax-order chain) or 'torch' (fused)."""
    h = ADAMW
    if kind == "torch":
        return torch.optim.AdamW(
            model.parameters(), lr=h["learning_rate"], betas=(h["b1"], h["b2"]), eps=h["eps"],
            weight_decay=h["weight_decay"], fused=True,
        )
    if kind != "optax":
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    from tokenlearner_torch.training.optim import named_specs, scenic_optimizer
    from tokenlearner_torch.weights_convert.mapping import iter_leaves, torch_to_flax
    from tokenlearner_torch.weights_convert.layouts import flatten_tree

    # As ScenicTrainer builds them: Flax paths and Flax ranks (masks and global norms use the Flax view).
    flat = flatten_tree(torch_to_flax(model))
    named = dict(model.named_parameters())
    specs = named_specs([(path, named[key], np.ndim(flat[path])) for key, path in iter_leaves(model)])
    cfg = {"optimizer": "adamw", **{k: h[k] for k in ("b1", "b2", "eps", "weight_decay")}}
    return scenic_optimizer(cfg, lambda step: h["learning_rate"], specs)


# --------------------------------------------------------------------------------------------------------
# Flax side
# --------------------------------------------------------------------------------------------------------
def flax_train_fns(module, call: dict):
    """(jitted value_and_grad(loss), jitted full step, optax optimiser) for a Flax classifier."""
    import jax
    import jax.numpy as jnp
    import optax

    call = {**call, "train": True}

    def loss(params, x, y):
        logits = module.apply({"params": params}, x, rngs={"dropout": jax.random.PRNGKey(0)}, **call)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    tx = optax.adamw(**ADAMW)

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(jax.value_and_grad(loss)), jax.jit(step, donate_argnums=(0, 1)), tx


# --------------------------------------------------------------------------------------------------------
# Port side
# --------------------------------------------------------------------------------------------------------
def port_fwd_bwd(model: torch.nn.Module, fn: Callable, x: torch.Tensor, y: torch.Tensor,
                 cudagraphs: bool = False) -> Callable[[], torch.Tensor]:
    """One forward + backward of the loss through ``fn`` (the module or a compiled wrapper of it)."""
    params = [p for p in model.parameters()]

    def run():
        if cudagraphs:
            # A new iteration of the captured graphs: the previous step's outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        for p in params:
            p.grad = None
        loss = torch_loss(fn(x), y)
        loss.backward()
        return loss

    return run


def port_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().float().cpu().clone() for k, p in model.named_parameters()}


def tree_error(model: torch.nn.Module, tensors: dict[str, torch.Tensor], ref_tree) -> tuple[float, str]:
    """(max over leaves of max|a - ref| / max(1, max|ref|), the worst leaf's Flax path)."""
    from tokenlearner_torch.weights_convert import torch_to_flax
    from tokenlearner_torch.weights_convert.layouts import flatten_tree

    ours = flatten_tree(torch_to_flax(model, tensors))
    ref = flatten_tree(ref_tree)
    worst, where = 0.0, ""
    for path, a in ours.items():
        r = np.asarray(ref[path], dtype=np.float32)
        err = float(np.abs(np.asarray(a, dtype=np.float32) - r).max() / max(1.0, float(np.abs(r).max())))
        if err >= worst:
            worst, where = err, path
    return worst, where


def adamw_error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> float:
    """One step of the port's AdamW (``kind``) against optax.adamw fed the same (port) gradients: scaled
    parameter error."""
    import jax
    import optax
    from tokenlearner_torch.weights_convert import torch_to_flax
    from tokenlearner_torch.weights_convert.layouts import flatten_tree

    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = make_adamw(model, kind)
    port_fwd_bwd(model, model, x, y)()
    grads = port_grads(model)
    opt.step()
    after = {k: p.detach().float().cpu().clone() for k, p in model.named_parameters()}
    with torch.no_grad():  # put the weights back: the timed rounds and other checks start from them
        for k, p in model.named_parameters():
            p.copy_(before[k])
            p.grad = None
    p0 = jax.tree_util.tree_map(np.asarray, torch_to_flax(model, {k: v.cpu() for k, v in before.items()}))
    g = jax.tree_util.tree_map(np.asarray, torch_to_flax(model, grads))
    with jax.default_device(jax.devices("cpu")[0]):
        tx = optax.adamw(**ADAMW)
        updates, _ = tx.update(g, tx.init(p0), p0)
        p1 = flatten_tree(jax.tree_util.tree_map(np.asarray, optax.apply_updates(p0, updates)))
    ours = flatten_tree(torch_to_flax(model, after))
    return max(
        float(np.abs(ours[k] - p1[k]).max() / max(1.0, float(np.abs(p1[k]).max()))) for k in ours
    )


def _compile_col(model: torch.nn.Module, device: str, column: str, backend: Optional[str]):
    rec = recipe(device, "train", column)
    return None if rec is None else rec.apply(model, backend=backend)


# --------------------------------------------------------------------------------------------------------
# One table row
# --------------------------------------------------------------------------------------------------------
def bench_train(name: str, spec: dict, batch: int, repeats: int, columns: tuple[str, ...], log, env,
                device: str = "cpu", prec: str = "highest", warmup: int = 1,
                backend: Optional[str] = None, optimizers: tuple[str, ...] = ("optax",)) -> dict:
    """Forward + backward and full-step timings, interleaved round by round, with the checks above.

    ``env``: bench_speed's helpers (flax, port, inputs, jax_inputs, timed, mode, jax_precision).
    ``columns``: port columns besides eager ("compiled", "cudagraphs"); ``backend`` overrides inductor.
    """
    import jax

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    xs = env.inputs(spec, batch)
    ys = labels(batch, spec["kwargs"]["num_classes"])
    module, params, _, ref_name = env.flax(spec, xs)
    grad_fn, step_fn, tx = flax_train_fns(module, {k: v for k, v in spec["call"].items() if k != "train"})
    params_j, xs_j = env.jax_inputs(params, xs, cuda)
    # On the device once, as in Scenic's train state (numpy params would be copied in at every call).
    params_j_device = jax.devices("gpu")[0] if cuda else jax.devices("cpu")[0]
    params_j = jax.device_put(params_j, params_j_device)
    xs_j = [jax.device_put(x, params_j_device) for x in xs_j]
    y_j = jax.device_put(ys, params_j_device)
    mode = env.mode(prec)
    row: dict[str, Any] = dict(workload=name, batch=batch, reference=ref_name, precision=prec, kind="train",
                               tolerance=mode.grad_tolerance(device))

    with jax.default_matmul_precision(mode.jax_matmul_precision):
        loss_ref, grads_ref = grad_fn(params_j, xs_j[0], y_j)
        grads_ref = jax.tree_util.tree_map(np.asarray, grads_ref)
        step_params = jax.tree_util.tree_map(lambda a: jax.numpy.array(a, copy=True), params_j)  # donated by every step
        # Committed to the device like the step's outputs: else the second call would compile again.
        step_state = list(jax.device_put([step_params, tx.init(step_params)], params_j_device))
    row["loss"] = float(loss_ref)

    model = env.port(spec, params).to(device).train()
    x = torch.from_numpy(xs[0]).to(device)
    y = torch.from_numpy(ys).long().to(device)
    fns: dict[str, Callable[[], Any]] = {}
    fwd_bwd = {"eager": port_fwd_bwd(model, model, x, y)}
    for col in columns:
        t0 = time.perf_counter()
        try:
            wrapped = _compile_col(model, device, col, backend)
            if wrapped is None:
                continue
            fwd_bwd[col] = port_fwd_bwd(model, wrapped, x, y, cudagraphs=col == "cudagraphs")
            fwd_bwd[col]()  # compiles forward and backward
            row[f"compile_s_{col}"] = time.perf_counter() - t0
        except Exception as e:  # report, do not hide
            row[f"error_{col}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            fwd_bwd.pop(col, None)
    for col, run in fwd_bwd.items():  # every column's gradients against Scenic's, from the same weights
        loss = run()
        row[f"grad_err_{col}"], row[f"grad_worst_{col}"] = tree_error(model, port_grads(model), grads_ref)
        row[f"loss_err_{col}"] = abs(float(loss.detach()) - row["loss"]) / max(1.0, abs(row["loss"]))
    row["adamw_err"] = {k: adamw_error(model, x, y, k) for k in optimizers}
    opts = {k: make_adamw(model, k) for k in optimizers}

    def step_of(run, opt):
        def step():
            loss = run()
            opt.step()
            return loss

        return step

    def jax_grad():
        with jax.default_matmul_precision(mode.jax_matmul_precision):
            return jax.block_until_ready(grad_fn(params_j, xs_j[0], y_j))

    def jax_step():
        with jax.default_matmul_precision(mode.jax_matmul_precision):
            out = step_fn(step_state[0], step_state[1], xs_j[0], y_j)
            step_state[0], step_state[1] = out[0], out[1]
            return jax.block_until_ready(out)

    for col, run in fwd_bwd.items():
        fns[f"fwd_bwd:{col}"] = run
    fns["fwd_bwd:flax"] = jax_grad
    for k, opt in opts.items():
        for col, run in fwd_bwd.items():
            fns[f"step[{k}]:{col}"] = step_of(run, opt)
    fns["step:flax"] = jax_step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "donated buffers were not usable" on backends without donation
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(env.timed(fn, sync))
    row["times"] = {k: statistics.median(v) for k, v in times.items()}
    log(f"  train {name} b={batch} {prec}: "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["times"].items())
        + "; grad err " + ", ".join(f"{c} {row[f'grad_err_{c}']:.1e}" for c in fwd_bwd)
        + "; adamw err " + ", ".join(f"{k} {v:.1e}" for k, v in row["adamw_err"].items()))
    del model, opts, fwd_bwd, fns
    return row


# --------------------------------------------------------------------------------------------------------
# Memory of one training step (fresh process)
# --------------------------------------------------------------------------------------------------------
def train_memory_child(spec: dict, impl: str, batch: int, device: str, prec: str, env) -> dict:
    """Peak memory of one forward + backward beyond what was allocated before it (see the module docstring)."""
    cuda = device == "cuda"
    xs = env.inputs(spec, batch)
    ys = labels(batch, spec["kwargs"]["num_classes"])
    mib = 2**20
    if impl == "port":
        model = env.port(spec, None).to(device).train()
        x = torch.from_numpy(xs[0]).to(device)
        y = torch.from_numpy(ys).long().to(device)
        if cuda:  # creates the cuBLAS/cuDNN handles and workspaces of forward and backward: kept, not activations
            port_fwd_bwd(model, model, x[:1], y[:1])()
        else:
            # Forward only: a backward here would allocate and free a set of gradients, and freed heap pages
            # may stay in RSS (glibc), hiding the measured step's own gradient buffers.
            with torch.no_grad():
                model(x[:1])
        run = port_fwd_bwd(model, model, x, y)
        for p in model.parameters():
            p.grad = None
        grad_mib = sum(p.numel() * 4 for p in model.parameters()) / mib
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            return {"activation_mib": (torch.cuda.max_memory_allocated() - before) / mib, "grad_mib": grad_mib}
        return _rss_delta(run) | {"grad_mib": grad_mib}
    import jax

    module, params, _, _ = env.flax(spec, xs)
    grad_fn, _, _ = flax_train_fns(module, {k: v for k, v in spec["call"].items() if k != "train"})
    params_j, xs_j = env.jax_inputs(params, xs, cuda)
    params_j = jax.device_put(params_j, jax.devices("gpu")[0] if cuda else jax.devices("cpu")[0])
    y_j = jax.device_put(ys, jax.devices("gpu")[0]) if cuda else jax.numpy.asarray(ys)
    mode = env.mode(prec)
    with jax.default_matmul_precision(mode.jax_matmul_precision):
        compiled = grad_fn.lower(params_j, xs_j[0], y_j).compile()
    grad_mib = sum(np.asarray(a).size * 4 for a in jax.tree_util.tree_leaves(params)) / mib
    run = lambda: jax.block_until_ready(compiled(params_j, xs_j[0], y_j))  # noqa: E731
    if not cuda:
        return _rss_delta(run) | {"grad_mib": grad_mib}
    gpu = jax.devices("gpu")[0]
    stats = gpu.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return {"activation_mib": None, "note": "jax memory_stats() has no peak_bytes_in_use here"}
    before, peak_before = stats["bytes_in_use"], stats["peak_bytes_in_use"]
    run()
    peak = gpu.memory_stats()["peak_bytes_in_use"]
    out = {"activation_mib": (max(peak, peak_before) - before) / mib, "grad_mib": grad_mib}
    if peak <= peak_before:  # jax cannot reset its peak counter: only a bound
        out["upper_bound"] = True
    return out


def _rss_delta(run: Callable[[], Any]) -> dict:
    import gc

    def status(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = status("VmRSS")
    run()
    return {"before_mib": before / 2**20, "activation_mib": (status("VmHWM") - before) / 2**20}
